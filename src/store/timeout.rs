//! Every store call bounded in time. A store that accepts the connection and never
//! answers (a hung server, a half-open connection, a stuck proxy) would otherwise hold
//! whoever waits on it — a shard's commit, the task cache's refresh, an API read — for as
//! long as the socket lives. Wrapped around both stores at opening, so no caller has to
//! remember; a call past the limit fails `Unavailable` (retriable) and says why.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::{SnapshotFilter, StackCount, Store, StoreError, TaskFilter};
use crate::model::{ProfiledSegment, SegmentSummary, SnapshotRecord, Task, TaskLog};

pub struct TimeoutStore {
    inner: Arc<dyn Store>,
    limit: Duration,
}

impl TimeoutStore {
    pub fn wrap(inner: Arc<dyn Store>, limit: Duration) -> Arc<dyn Store> {
        Arc::new(TimeoutStore { inner, limit })
    }

    async fn bounded<T>(
        &self,
        call: &'static str,
        future: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.limit, future).await {
            Ok(result) => result,
            Err(_) => {
                metrics::counter!(crate::telemetry::STORE_TIMEOUTS, "store" => self.inner.kind(), "call" => call)
                    .increment(1);
                Err(StoreError::Unavailable(format!(
                    "{}: {call} got no answer within {} ms (store.timeout_ms)",
                    self.inner.kind(),
                    self.limit.as_millis()
                )))
            }
        }
    }
}

#[async_trait]
impl Store for TimeoutStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn batch_snapshots(&self) -> usize {
        self.inner.batch_snapshots()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.bounded("ping", self.inner.ping()).await
    }

    async fn insert_task(&self, task: &Task) -> Result<(), StoreError> {
        self.bounded("insert_task", self.inner.insert_task(task))
            .await
    }

    async fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError> {
        self.bounded("get_task", self.inner.get_task(id)).await
    }

    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>, StoreError> {
        self.bounded("list_tasks", self.inner.list_tasks(filter))
            .await
    }

    async fn overlapping_tasks(
        &self,
        service: &str,
        start_time: i64,
        end_time: i64,
    ) -> Result<Vec<Task>, StoreError> {
        self.bounded(
            "overlapping_tasks",
            self.inner.overlapping_tasks(service, start_time, end_time),
        )
        .await
    }

    async fn unfinished_tasks(&self, now_ms: i64) -> Result<Vec<Task>, StoreError> {
        self.bounded("unfinished_tasks", self.inner.unfinished_tasks(now_ms))
            .await
    }

    async fn insert_task_logs(&self, logs: &[TaskLog]) -> Result<(), StoreError> {
        self.bounded("insert_task_logs", self.inner.insert_task_logs(logs))
            .await
    }

    async fn task_logs(&self, task_id: &str) -> Result<Vec<TaskLog>, StoreError> {
        self.bounded("task_logs", self.inner.task_logs(task_id))
            .await
    }

    async fn insert_snapshots(&self, snapshots: &[SnapshotRecord]) -> Result<(), StoreError> {
        self.bounded("insert_snapshots", self.inner.insert_snapshots(snapshots))
            .await
    }

    async fn task_segments(&self, task_id: &str) -> Result<Vec<SegmentSummary>, StoreError> {
        self.bounded("task_segments", self.inner.task_segments(task_id))
            .await
    }

    async fn segment_snapshots(
        &self,
        segment_id: &str,
        limit: usize,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.bounded(
            "segment_snapshots",
            self.inner.segment_snapshots(segment_id, limit),
        )
        .await
    }

    async fn count_snapshots(&self, filter: &SnapshotFilter) -> Result<u64, StoreError> {
        self.bounded("count_snapshots", self.inner.count_snapshots(filter))
            .await
    }

    async fn snapshots(
        &self,
        filter: &SnapshotFilter,
        limit: usize,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        self.bounded("snapshots", self.inner.snapshots(filter, limit))
            .await
    }

    /// The limit applies to the wait for each item, so a long flame graph that keeps
    /// coming is fine and one that stops is cut.
    fn stack_counts(
        &self,
        filter: &SnapshotFilter,
    ) -> BoxStream<'static, Result<StackCount, StoreError>> {
        let kind = self.inner.kind();
        let limit = self.limit;
        tokio_stream::StreamExt::timeout(self.inner.stack_counts(filter), limit)
            .map(move |item| match item {
                Ok(result) => result,
                Err(_) => Err(StoreError::Unavailable(format!(
                    "{kind}: stack_counts got no answer within {} ms (store.timeout_ms)",
                    limit.as_millis()
                ))),
            })
            // One error ends the stream; the caller reports it.
            .scan(false, |failed, item| {
                let stop = *failed;
                *failed = item.is_err();
                std::future::ready((!stop).then_some(item))
            })
            .boxed()
    }

    async fn insert_profiled_segments(
        &self,
        segments: &[ProfiledSegment],
    ) -> Result<(), StoreError> {
        self.bounded(
            "insert_profiled_segments",
            self.inner.insert_profiled_segments(segments),
        )
        .await
    }

    async fn profiled_segment(
        &self,
        segment_id: &str,
    ) -> Result<Option<ProfiledSegment>, StoreError> {
        self.bounded("profiled_segment", self.inner.profiled_segment(segment_id))
            .await
    }

    async fn segments_with_snapshots(
        &self,
        segment_ids: &[String],
    ) -> Result<Vec<String>, StoreError> {
        self.bounded(
            "segments_with_snapshots",
            self.inner.segments_with_snapshots(segment_ids),
        )
        .await
    }

    async fn remove_expired(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        self.bounded("remove_expired", self.inner.remove_expired(cutoff_ms))
            .await
    }
}
