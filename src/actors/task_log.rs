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

use super::supervision::{catch_future, guarded};
use crate::model::{TaskLog, TaskLogKey};
use crate::store::{Store, StoreError};
use crate::telemetry;

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
    /// The logs of the write in flight (empty: none). The next write waits for it, so
    /// writes never overlap; a failed write, or a restart that drops it, puts them back.
    in_flight: Vec<TaskLog>,
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
            in_flight: Vec::new(),
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
        if !self.in_flight.is_empty() {
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
        self.in_flight = std::mem::take(&mut self.pending);
        let logs = self.in_flight.clone();
        let store = self.store.clone();
        let write = catch_future(ACTOR, async move { store.insert_task_logs(&logs).await });
        ctx.spawn(write.into_actor(self).map(move |outcome, writer, ctx| {
            let result = outcome.unwrap_or_else(|()| Err(panicked()));
            guarded(ACTOR, writer, ctx, |writer, _ctx| {
                writer.write_done(&result)
            });
            if let Some(reply) = reply_opt {
                let _ = reply.send(result);
            }
            // Callers that asked during this write get a write of their own.
            for waiter in std::mem::take(&mut writer.flush_waiters) {
                writer.flush(ctx, Some(waiter));
            }
        }));
    }

    fn write_done(&mut self, result: &Result<(), StoreError>) {
        let logs = std::mem::take(&mut self.in_flight);
        match result {
            Ok(()) => {
                for log in logs {
                    let key = log.key();
                    self.pending_keys.remove(&key);
                    metrics::counter!(telemetry::TASK_LOGS_WRITTEN, "operation" => log.operation.name())
                        .increment(1);
                    self.written.put(key, ());
                }
            }
            Err(error) => {
                tracing::warn!(%error, logs = logs.len(), "task log write failed; will retry");
                self.requeue(logs);
            }
        }
    }

    /// Puts logs whose write failed back in front of the pending ones.
    fn requeue(&mut self, mut logs: Vec<TaskLog>) {
        logs.append(&mut self.pending);
        self.pending = logs;
        self.drop_overflow();
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
        metrics::counter!(telemetry::TASK_LOGS_DROPPED).increment(overflow as u64);
    }
}

const ACTOR: &str = "task_log";

impl Actor for TaskLogWriter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Agents hand logs over with try_send; a burst of polls must fit.
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        ctx.run_interval(self.flush_interval, |writer, ctx| writer.flush(ctx, None));
    }
}

impl Supervised for TaskLogWriter {
    /// Logs owed to the store are kept: the write a restart dropped is tried again
    /// (writes are idempotent by key). Only the memory of stored keys starts over, and
    /// the callers waiting for a flush are answered that it failed.
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        let in_flight = std::mem::take(&mut self.in_flight);
        self.requeue(in_flight);
        self.written.clear();
        for waiter in std::mem::take(&mut self.flush_waiters) {
            let _ = waiter.send(Err(panicked()));
        }
    }
}

impl Handler<RecordLog> for TaskLogWriter {
    type Result = ();

    fn handle(&mut self, message: RecordLog, ctx: &mut Self::Context) {
        guarded(ACTOR, self, ctx, |writer, _ctx| {
            #[cfg(test)]
            super::supervision::test_hooks::panic_if(&message.0.instance);
            let key = message.0.key();
            if writer.written.contains(&key) || writer.pending_keys.contains(&key) {
                return;
            }
            writer.pending_keys.insert(key);
            writer.pending.push(message.0);
            writer.drop_overflow();
        });
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

fn panicked() -> StoreError {
    StoreError::Unavailable("the task log writer panicked and was restarted".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Operation, Task};
    use crate::store::sqlite::SqliteStore;

    fn task() -> Task {
        Task {
            id: "t".into(),
            service: "svc".into(),
            endpoint_name: "/e".into(),
            start_time: 0,
            duration: 1,
            min_duration_threshold: 0,
            dump_period: 10,
            max_sampling_count: 5,
            create_time: 0,
        }
    }

    #[actix::test]
    async fn test_task_log_dedup_repeated_notified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db"), 1).unwrap());
        let writer = TaskLogWriter::new(store.clone(), Duration::from_secs(3600), 100).start();
        let task = task();
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

    #[actix::test]
    async fn test_task_log_restart_after_panic_keeps_pending_logs() {
        use crate::actors::supervision::test_hooks::PANIC;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("db"), 1).unwrap());
        let writer_store = store.clone();
        let writer = Supervisor::start(move |_ctx| {
            TaskLogWriter::new(writer_store, Duration::from_secs(3600), 100)
        });
        let task = task();
        let log = |instance: &str| RecordLog(TaskLog::new(&task, instance, Operation::Notified, 1));
        writer.send(log("before")).await.unwrap();
        writer.send(log(PANIC)).await.unwrap();
        writer.send(log("after")).await.unwrap();
        writer.send(FlushLogs).await.unwrap().unwrap();
        let mut instances: Vec<_> = store
            .task_logs("t")
            .await
            .unwrap()
            .into_iter()
            .map(|log| log.instance)
            .collect();
        instances.sort();
        assert_eq!(
            instances,
            ["after", "before"],
            "the pending log survived the restart"
        );
    }
}
