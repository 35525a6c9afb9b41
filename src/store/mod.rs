//! The storage interface the pipeline, caches and API use, and its implementations.
//! SQLite is the embedded default; ClickHouse slots in behind the same trait.

pub mod clickhouse;
pub mod sqlite;
pub mod timeout;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::model::{ProfiledSegment, SegmentSummary, SnapshotRecord, Task, TaskLog};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or was busy; the same call may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store refused this data or this query; retrying it will not help, other
    /// data may pass (a constraint, a value out of range, a malformed statement).
    #[error("store rejected the request: {0}")]
    Rejected(String),
    /// The store answers but can take nothing as it is set up: a table or database
    /// missing, no permission, read-only, a corrupt file. Not the data's fault: the same
    /// call succeeds once an operator fixes the store, so it is retried, never
    /// dead-lettered (a consumer that dead-lettered it would empty its topic into the
    /// dead-letter topic).
    #[error("store unusable as set up: {0}")]
    Unusable(String),
}

impl StoreError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Unusable(_))
    }
}

/// Filters of the task list.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub service: Option<String>,
    pub endpoint_name: Option<String>,
}

/// Which snapshots a read covers: those of a task, of a segment, or of a segment of a
/// task, optionally within a dump-time range (both ends inclusive, as SkyWalking reads).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    pub task_id_opt: Option<String>,
    pub segment_id_opt: Option<String>,
    /// Earliest dump time, epoch milliseconds.
    pub start_opt: Option<i64>,
    /// Latest dump time, epoch milliseconds.
    pub end_opt: Option<i64>,
    /// Agent instance: a snapshot carries none, so this keeps the snapshots of segments
    /// whose kept trace segment (`profiled_segment`) names the instance.
    pub instance_opt: Option<String>,
}

/// A value for one `?` of a snapshot filter's `WHERE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterValue {
    Text(String),
    Number(i64),
}

impl SnapshotFilter {
    /// `WHERE …` over the snapshot table's columns (empty without conditions) and the
    /// values of its `?`s in order. Built per filter rather than as one statement of
    /// `(? IS NULL OR …)` terms, which would keep SQLite from using its indexes; both
    /// stores share it.
    pub fn where_sql(&self) -> (String, Vec<FilterValue>) {
        let conditions = [
            (
                "task_id = ?",
                self.task_id_opt.clone().map(FilterValue::Text),
            ),
            (
                "segment_id = ?",
                self.segment_id_opt.clone().map(FilterValue::Text),
            ),
            ("dump_time >= ?", self.start_opt.map(FilterValue::Number)),
            ("dump_time <= ?", self.end_opt.map(FilterValue::Number)),
            (
                "segment_id IN (SELECT segment_id FROM profiled_segment WHERE instance = ?)",
                self.instance_opt.clone().map(FilterValue::Text),
            ),
        ];
        let (clauses, values): (Vec<&str>, Vec<FilterValue>) = conditions
            .into_iter()
            .filter_map(|(clause, value)| Some((clause, value?)))
            .unzip();
        if clauses.is_empty() {
            return (String::new(), values);
        }
        (format!("WHERE {}", clauses.join(" AND ")), values)
    }
}

/// A distinct stack and how many snapshots (each key once) have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackCount {
    pub stack: Vec<String>,
    pub count: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short name for logs and metric labels.
    fn kind(&self) -> &'static str;

    /// Snapshots one `insert_snapshots` call takes best at most: the cap of a shard's
    /// batch unless `pipeline.batch_max_snapshots` sets one.
    fn batch_snapshots(&self) -> usize {
        20_000
    }

    /// Whether the store answers at all (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    async fn insert_task(&self, task: &Task) -> Result<(), StoreError>;
    async fn get_task(&self, id: &str) -> Result<Option<Task>, StoreError>;
    /// Tasks matching the filter, newest `create_time` first.
    async fn list_tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>, StoreError>;
    /// Tasks of the service whose `[start, end]` shares an instant with the given one.
    async fn overlapping_tasks(
        &self,
        service: &str,
        start_time: i64,
        end_time: i64,
    ) -> Result<Vec<Task>, StoreError>;
    /// Tasks whose end is at or after `now_ms`, for the downstream cache.
    async fn unfinished_tasks(&self, now_ms: i64) -> Result<Vec<Task>, StoreError>;

    /// Writes logs; a log whose key is already stored is skipped.
    async fn insert_task_logs(&self, logs: &[TaskLog]) -> Result<(), StoreError>;
    /// Logs of a task, oldest first.
    async fn task_logs(&self, task_id: &str) -> Result<Vec<TaskLog>, StoreError>;

    /// Writes snapshots in one commit; a snapshot whose key is already stored is skipped.
    async fn insert_snapshots(&self, snapshots: &[SnapshotRecord]) -> Result<(), StoreError>;
    /// Profiled segments of a task, by first dump time.
    async fn task_segments(&self, task_id: &str) -> Result<Vec<SegmentSummary>, StoreError>;
    /// Snapshots of a segment in sequence order, at most `limit`.
    async fn segment_snapshots(
        &self,
        segment_id: &str,
        limit: usize,
    ) -> Result<Vec<SnapshotRecord>, StoreError>;

    /// How many snapshots match (each key once).
    async fn count_snapshots(&self, filter: &SnapshotFilter) -> Result<u64, StoreError>;
    /// Matching snapshots in (task, segment, sequence) order, at most `limit` (with only
    /// a segment given: in sequence order, then task).
    async fn snapshots(
        &self,
        filter: &SnapshotFilter,
        limit: usize,
    ) -> Result<Vec<SnapshotRecord>, StoreError>;
    /// The distinct stacks of the matching snapshots with their counts, counted by the
    /// store and streamed, so that no caller holds every row. A stack may come more than
    /// once (its counts then add up); the order is unspecified.
    fn stack_counts(
        &self,
        filter: &SnapshotFilter,
    ) -> BoxStream<'static, Result<StackCount, StoreError>>;

    /// Writes profiled segments with their spans, each in one row (never half a
    /// segment); a segment id already stored is replaced, not doubled.
    async fn insert_profiled_segments(
        &self,
        segments: &[ProfiledSegment],
    ) -> Result<(), StoreError>;
    /// A kept segment with its spans.
    async fn profiled_segment(
        &self,
        segment_id: &str,
    ) -> Result<Option<ProfiledSegment>, StoreError>;
    /// Which of the given segment ids have at least one snapshot stored (the look-up for
    /// trace segments the in-memory index does not know).
    async fn segments_with_snapshots(
        &self,
        segment_ids: &[String],
    ) -> Result<Vec<String>, StoreError>;

    /// Removes records whose time bucket is older than `cutoff_ms`; answers how many
    /// rows went (0 where the store expires rows itself, e.g. ClickHouse TTL).
    async fn remove_expired(&self, cutoff_ms: i64) -> Result<u64, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_store_snapshot_filter_instance_goes_through_kept_segments() {
        let filter = SnapshotFilter {
            task_id_opt: Some("t".into()),
            instance_opt: Some("i".into()),
            ..SnapshotFilter::default()
        };
        assert_eq!(
            filter.where_sql(),
            (
                "WHERE task_id = ? AND segment_id IN (SELECT segment_id FROM profiled_segment \
                 WHERE instance = ?)"
                    .to_string(),
                vec![FilterValue::Text("t".into()), FilterValue::Text("i".into())]
            )
        );
    }

    #[test]
    fn test_store_snapshot_filter_where() {
        assert_eq!(
            SnapshotFilter::default().where_sql(),
            (String::new(), vec![])
        );
        let filter = SnapshotFilter {
            task_id_opt: None,
            segment_id_opt: Some("s".into()),
            start_opt: Some(1),
            end_opt: Some(2),
            instance_opt: None,
        };
        assert_eq!(
            filter.where_sql(),
            (
                "WHERE segment_id = ? AND dump_time >= ? AND dump_time <= ?".to_string(),
                vec![
                    FilterValue::Text("s".into()),
                    FilterValue::Number(1),
                    FilterValue::Number(2)
                ]
            )
        );
    }
}
