//! The task log writer: NOTIFIED and EXECUTION_FINISHED records. It remembers which
//! (task, instance, operation) keys are already stored, so that an agent polling again
//! with an old `lastCommandTime` costs no write and never makes a second row (the store
//! keys the rows too). Pending logs are written in batches on a short timer; a failed
//! write is kept and tried again on the next tick.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use lru::LruCache;

use crate::metrics;
use crate::model::{TaskLog, TaskLogKey};
use crate::store::{Store, StoreError};

/// Logs queued for the writer at most; past it the agent's command waits a poll.
pub const MAILBOX_CAPACITY: usize = 4_096;

#[derive(Message)]
#[rtype(result = "()")]
pub struct RecordLog(pub TaskLog);

/// Writes every pending log now and answers with the outcome.
#[derive(Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct FlushLogs;

pub struct TaskLogWriter {
    store: Arc<dyn Store>,
    flush_interval: Duration,
    pending: Vec<TaskLog>,
    pending_keys: HashSet<TaskLogKey>,
    /// Keys known to be stored.
    written: LruCache<TaskLogKey, ()>,
    /// Pending logs held at most while the store is down; older ones are dropped, counted.
    max_pending: usize,
    /// A write is in flight; the next one waits for it, so writes never overlap.
    writing: bool,
    /// `FlushLogs` callers that asked during a write: answered by the write after it.
    flush_waiters: Vec<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
}

impl TaskLogWriter {
    pub fn new(
        store: Arc<dyn Store>,
        flush_interval: Duration,
        dedup_capacity: usize,
    ) -> TaskLogWriter {
        let capacity = NonZeroUsize::new(dedup_capacity).unwrap_or(NonZeroUsize::MIN);
        TaskLogWriter {
            store,
            flush_interval,
            pending: Vec::new(),
            pending_keys: HashSet::new(),
            written: LruCache::new(capacity),
            max_pending: dedup_capacity.max(1),
            writing: false,
            flush_waiters: Vec::new(),
        }
    }

    /// Writes the pending logs in the background: the actor keeps taking logs while the
    /// store works (or hangs, until `store.timeout_ms`), so agents polling for commands
    /// never wait on it. One write at a time.
    fn flush(
        &mut self,
        ctx: &mut Context<Self>,
        reply_opt: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    ) {
        if self.writing {
            if let Some(reply) = reply_opt {
                self.flush_waiters.push(reply);
            }
            return;
        }
        if self.pending.is_empty() {
            if let Some(reply) = reply_opt {
                let _ = reply.send(Ok(()));
            }
            return;
        }
        let logs = std::mem::take(&mut self.pending);
        let store = self.store.clone();
        let write = async move {
            let result = store.insert_task_logs(&logs).await;
            (logs, result)
        };
        self.writing = true;
        ctx.spawn(write.into_actor(self).map(move |(logs, result), writer, ctx| {
            writer.writing = false;
            match &result {
                Ok(()) => {
                    for log in logs {
                        let key = log.key();
                        writer.pending_keys.remove(&key);
                        ::metrics::counter!(metrics::TASK_LOGS_WRITTEN, "operation" => log.operation.name())
                            .increment(1);
                        writer.written.put(key, ());
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, logs = logs.len(), "task log write failed; will retry");
                    let mut logs = logs;
                    logs.append(&mut writer.pending);
                    writer.pending = logs;
                    writer.drop_overflow();
                }
            }
            if let Some(reply) = reply_opt {
                let _ = reply.send(result);
            }
            // Callers that asked during this write get a write of their own.
            for waiter in std::mem::take(&mut writer.flush_waiters) {
                writer.flush(ctx, Some(waiter));
            }
        }));
    }

    fn drop_overflow(&mut self) {
        if self.pending.len() <= self.max_pending {
            return;
        }
        let overflow = self.pending.len() - self.max_pending;
        for log in self.pending.drain(..overflow) {
            self.pending_keys.remove(&log.key());
        }
        tracing::error!(
            dropped = overflow,
            "task log backlog full while the store is down"
        );
        ::metrics::counter!(metrics::TASK_LOGS_DROPPED).increment(overflow as u64);
    }
}

impl Actor for TaskLogWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Agents hand logs over with try_send; a burst of polls must fit.
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        ctx.run_interval(self.flush_interval, |writer, ctx| writer.flush(ctx, None));
    }
}

impl Handler<RecordLog> for TaskLogWriter {
    type Result = ();

    fn handle(&mut self, message: RecordLog, _ctx: &mut Self::Context) {
        let key = message.0.key();
        if self.written.contains(&key) || self.pending_keys.contains(&key) {
            return;
        }
        self.pending_keys.insert(key);
        self.pending.push(message.0);
        self.drop_overflow();
    }
}

impl Handler<FlushLogs> for TaskLogWriter {
    type Result = ResponseFuture<Result<(), StoreError>>;

    fn handle(&mut self, _message: FlushLogs, ctx: &mut Self::Context) -> Self::Result {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.flush(ctx, Some(reply));
        Box::pin(async move {
            done.await
                .unwrap_or_else(|_| Err(StoreError::Unavailable("task log writer stopped".into())))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Operation, Task};
    use crate::store::sqlite::SqliteStore;

    #[actix::test]
    async fn test_task_log_dedup_repeated_notified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db"), 1).unwrap());
        let writer = TaskLogWriter::new(store.clone(), Duration::from_secs(3600), 100).start();
        let task = Task {
            id: "t".into(),
            service: "svc".into(),
            endpoint_name: "/e".into(),
            start_time: 0,
            duration: 1,
            min_duration_threshold: 0,
            dump_period: 10,
            max_sampling_count: 5,
            create_time: 0,
        };
        for time in 0..3 {
            writer
                .send(RecordLog(TaskLog::new(
                    &task,
                    "i1",
                    Operation::Notified,
                    time,
                )))
                .await
                .unwrap();
        }
        writer.send(FlushLogs).await.unwrap().unwrap();
        writer
            .send(RecordLog(TaskLog::new(&task, "i1", Operation::Notified, 9)))
            .await
            .unwrap();
        writer
            .send(RecordLog(TaskLog::new(&task, "i2", Operation::Notified, 9)))
            .await
            .unwrap();
        writer.send(FlushLogs).await.unwrap().unwrap();
        let logs = store.task_logs("t").await.unwrap();
        assert_eq!(logs.len(), 2);
        assert_eq!(
            logs[0].operation_time, 0,
            "the first NOTIFIED is the one kept"
        );
    }
}
