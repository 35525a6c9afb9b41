//! A snapshot shard: collects the snapshots routed to it into a batch, closes the batch
//! for a named reason (idle, size, bytes, drain, shutdown), commits it to every sink
//! with bounded retries, and only then answers the receipts of the streams that sent
//! them.
//!
//! Group commit: a batch closes as soon as the shard's mailbox has run empty and a
//! commit slot is free (after `linger`, 0 by default), not on a timer. A lone agent's
//! stream is committed and answered within one commit's time; under load, the next
//! batch grows with whatever arrives while up to `max_commits_in_flight` batches
//! commit, so batch size follows the load up to the caps. A batch at a cap with every
//! slot busy makes the shard take no new messages until one finishes: a slow sink
//! fills the bounded mailbox and senders wait, backpressure reaching the gRPC streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::sink::retry::{write_with_retry, RetryPolicy};
use super::sink::{SinkError, SnapshotSink};
use crate::model::SnapshotRecord;
#[cfg(test)]
use crate::model::Stack;
use crate::telemetry;

/// Why a batch was closed; the `reason` label of `skysnap_batches_flushed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The mailbox ran empty and a commit slot was free (group commit).
    Idle,
    Size,
    Bytes,
    /// An explicit `Flush`, e.g. from a test or an operator.
    Drain,
    Shutdown,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Idle => "idle",
            CloseReason::Size => "size",
            CloseReason::Bytes => "bytes",
            CloseReason::Drain => "drain",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// Resolves once the snapshots of one `Ingest` are committed, or failed for good.
pub type CommitReceipt = oneshot::Receiver<Result<(), SinkError>>;

/// Snapshots for this shard; answered at once with a receipt for their commit.
#[derive(Message)]
#[rtype(result = "CommitReceipt")]
pub struct Ingest {
    pub records: Vec<SnapshotRecord>,
}

/// Closes the open batch and answers once it is committed.
#[derive(Message)]
#[rtype(result = "Result<(), SinkError>")]
pub struct Flush {
    pub reason: CloseReason,
}

#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub max_snapshots: usize,
    pub max_bytes: usize,
    /// How long a batch waits after its first snapshot before an idle shard commits it;
    /// zero commits at once (fewer, larger commits at moderate load when set).
    pub linger: Duration,
    /// Closed batches of one shard committing at once; while they do, the shard goes on
    /// filling the next one instead of stalling its streams.
    pub max_commits_in_flight: usize,
}

#[derive(Default)]
struct Batch {
    /// Identifies the batch; a closer started for an earlier one re-checks the linger.
    id: u64,
    /// When the first snapshot arrived, for `linger`.
    opened: Option<tokio::time::Instant>,
    records: Vec<SnapshotRecord>,
    bytes: usize,
    waiters: Vec<oneshot::Sender<Result<(), SinkError>>>,
}

pub struct SnapshotShard {
    /// `skysnap_shard_batch_snapshots` of this shard.
    batch_gauge: metrics::Gauge,
    sinks: Arc<[Arc<dyn SnapshotSink>]>,
    limits: BatchLimits,
    retry: RetryPolicy,
    mailbox_capacity: usize,
    batch: Batch,
    /// One permit per batch that may commit at once (`max_commits_in_flight`).
    commit_permits: Arc<Semaphore>,
    /// Whether a closer (waiting for the linger and a free slot) is already spawned; one
    /// at a time, so that a burst of messages makes one commit, not one each.
    closer_pending: bool,
}

impl SnapshotShard {
    pub fn new(
        shard_index: usize,
        sinks: Arc<[Arc<dyn SnapshotSink>]>,
        limits: BatchLimits,
        retry: RetryPolicy,
        mailbox_capacity: usize,
    ) -> SnapshotShard {
        SnapshotShard {
            batch_gauge: metrics::gauge!(telemetry::SHARD_BATCH_SNAPSHOTS, "shard" => shard_index.to_string()),
            sinks,
            retry,
            mailbox_capacity,
            commit_permits: Arc::new(Semaphore::new(limits.max_commits_in_flight.max(1))),
            limits,
            batch: Batch::default(),
            closer_pending: false,
        }
    }

    /// Takes the open batch, leaving an empty one with the next id.
    fn take_batch(&mut self) -> Batch {
        let next_id = self.batch.id + 1;
        self.batch_gauge.set(0.0);
        std::mem::replace(
            &mut self.batch,
            Batch {
                id: next_id,
                ..Batch::default()
            },
        )
    }

    /// Takes the open batch and commits it in the background; when the most batches
    /// allowed are already committing, the actor waits (takes no messages) for a slot.
    fn close_batch(&mut self, reason: CloseReason, ctx: &mut Context<Self>) {
        let batch = self.take_batch();
        if batch.records.is_empty() {
            for waiter in batch.waiters {
                let _ = waiter.send(Ok(()));
            }
            return;
        }
        telemetry::batch_closed(reason.as_str());
        let sinks = self.sinks.clone();
        let retry = self.retry.clone();
        // Commits run as tasks of the shard's thread, not inside the actor's context:
        // actix polls nothing else of an actor while it waits, so a commit spawned into
        // the context could never free the slot the actor is waiting for.
        match self.commit_permits.clone().try_acquire_owned() {
            Ok(permit) => {
                actix::spawn(commit_batch(batch, sinks, retry, permit));
            }
            Err(_) => {
                let permits = self.commit_permits.clone();
                let wait_for_slot = async move {
                    let permit = permits
                        .acquire_owned()
                        .await
                        .expect("the shard never closes its semaphore");
                    actix::spawn(commit_batch(batch, sinks, retry, permit));
                };
                ctx.wait(wait_for_slot.into_actor(self));
            }
        }
    }

    /// Group commit: makes sure a closer is on its way for the open batch. The closer
    /// is a future of the actor's context, and actix polls those only once the mailbox
    /// has nothing ready, so every message already queued joins the batch first. It
    /// waits out the linger, then for a commit slot (taking messages meanwhile: the
    /// batch grows while the slots are busy), and commits whatever the batch holds then.
    fn schedule_closer(&mut self, ctx: &mut Context<Self>) {
        if self.closer_pending || self.batch.records.is_empty() {
            return;
        }
        self.closer_pending = true;
        let lingered_until = self.batch.opened.map(|opened| opened + self.limits.linger);
        let permits = self.commit_permits.clone();
        let closer = async move {
            if let Some(deadline) = lingered_until {
                tokio::time::sleep_until(deadline).await;
            }
            permits
                .acquire_owned()
                .await
                .expect("the shard never closes its semaphore")
        };
        ctx.spawn(closer.into_actor(self).map(|permit, shard, ctx| {
            shard.closer_pending = false;
            let lingering = shard
                .batch
                .opened
                .is_some_and(|opened| opened + shard.limits.linger > tokio::time::Instant::now());
            if shard.batch.records.is_empty() || lingering {
                // The batch it waited for closed on a cap; a newer one gets its own closer.
                drop(permit);
                shard.schedule_closer(ctx);
                return;
            }
            let batch = shard.take_batch();
            telemetry::batch_closed(CloseReason::Idle.as_str());
            actix::spawn(commit_batch(
                batch,
                shard.sinks.clone(),
                shard.retry.clone(),
                permit,
            ));
        }));
    }
}

/// What a panic leaves for the streams that waited: UNAVAILABLE, so agents send again.
fn panicked(what: &str, payload: &(dyn std::any::Any + Send)) -> SinkError {
    let message = super::supervision::panic_message(payload);
    tracing::error!(panic = %message, "{what} panicked; its streams get UNAVAILABLE");
    metrics::counter!(telemetry::ACTOR_PANICS, "actor" => "shard").increment(1);
    SinkError {
        sink: "shard",
        message: format!("{what} failed unexpectedly: {message}"),
        retriable: true,
    }
}

/// Commits one closed batch and answers its waiters; the permit frees the slot. A
/// panic inside a sink is caught here: the batch's streams get UNAVAILABLE (never an
/// acknowledgement) and the shard goes on with its next batch.
async fn commit_batch(
    batch: Batch,
    sinks: Arc<[Arc<dyn SnapshotSink>]>,
    retry: RetryPolicy,
    _permit: OwnedSemaphorePermit,
) {
    let commit = std::panic::AssertUnwindSafe(commit_to_sinks(&sinks, &batch.records, &retry));
    let result = match futures::FutureExt::catch_unwind(commit).await {
        Ok(result) => result,
        Err(payload) => Err(panicked("a batch commit", payload.as_ref())),
    };
    let count = batch.records.len();
    match &result {
        Ok(()) => {
            metrics::counter!(telemetry::SNAPSHOTS_COMMITTED).increment(count as u64);
        }
        Err(error) => {
            tracing::error!(%error, snapshots = count, "batch not committed; its streams get UNAVAILABLE");
            telemetry::snapshots_refused("sink_unavailable", count);
        }
    }
    for waiter in batch.waiters {
        let _ = waiter.send(result.clone());
    }
}

/// Commits to every sink in turn; the batch counts as committed only if all succeed.
async fn commit_to_sinks(
    sinks: &[Arc<dyn SnapshotSink>],
    records: &[SnapshotRecord],
    retry: &RetryPolicy,
) -> Result<(), SinkError> {
    for sink in sinks {
        let started = Instant::now();
        write_with_retry(sink.as_ref(), records, retry).await?;
        telemetry::batch_written(sink.name(), records.len(), started.elapsed().as_secs_f64());
    }
    Ok(())
}

impl Actor for SnapshotShard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.mailbox_capacity);
    }
}

impl Handler<Ingest> for SnapshotShard {
    type Result = MessageResult<Ingest>;

    /// A panic while batching would end the actor, and with it every later stream of
    /// its hash range. It is caught: the open batch (this message's snapshots included)
    /// is failed back with UNAVAILABLE and the shard starts over with an empty batch.
    fn handle(&mut self, message: Ingest, ctx: &mut Self::Context) -> Self::Result {
        let (sender, receipt) = oneshot::channel();
        let batched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.batch_records(message, sender, ctx)
        }));
        if let Err(payload) = batched {
            let error = panicked("batching", payload.as_ref());
            let next_id = self.batch.id + 1;
            let lost = std::mem::replace(
                &mut self.batch,
                Batch {
                    id: next_id,
                    ..Batch::default()
                },
            );
            self.batch_gauge.set(0.0);
            telemetry::snapshots_refused("sink_unavailable", lost.records.len());
            for waiter in lost.waiters {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        MessageResult(receipt)
    }
}

impl SnapshotShard {
    fn batch_records(
        &mut self,
        message: Ingest,
        sender: oneshot::Sender<Result<(), SinkError>>,
        ctx: &mut Context<Self>,
    ) {
        #[cfg(test)]
        if message
            .records
            .iter()
            .any(|record| record.task_id == TEST_PANIC_TASK_ID)
        {
            // Test-only hook: the sender is moved into the batch first, as a real
            // panic midway would leave it.
            self.batch.waiters.push(sender);
            panic!("test hook: panic while batching");
        }
        if message.records.is_empty() {
            let _ = sender.send(Ok(()));
            return;
        }
        if self.batch.records.is_empty() {
            self.batch.opened = Some(tokio::time::Instant::now());
        }
        self.batch.bytes += message
            .records
            .iter()
            .map(SnapshotRecord::approximate_bytes)
            .sum::<usize>();
        self.batch.records.extend(message.records);
        self.batch.waiters.push(sender);
        self.batch_gauge.set(self.batch.records.len() as f64);
        if self.batch.records.len() >= self.limits.max_snapshots {
            self.close_batch(CloseReason::Size, ctx);
        } else if self.batch.bytes >= self.limits.max_bytes {
            self.close_batch(CloseReason::Bytes, ctx);
        } else {
            self.schedule_closer(ctx);
        }
    }
}

/// Snapshots of this task id make a test build's shard panic while batching.
#[cfg(test)]
pub const TEST_PANIC_TASK_ID: &str = "skysnap-test-panic";

impl Handler<Flush> for SnapshotShard {
    type Result = ResponseFuture<Result<(), SinkError>>;

    fn handle(&mut self, message: Flush, ctx: &mut Self::Context) -> Self::Result {
        let (sender, done) = oneshot::channel();
        self.batch.waiters.push(sender);
        self.close_batch(message.reason, ctx);
        // Answer once every batch closed before this flush has committed as well.
        let permits = self.commit_permits.clone();
        let all_permits = self.limits.max_commits_in_flight.max(1) as u32;
        Box::pin(async move {
            let result = done.await.unwrap_or_else(|_| {
                Err(SinkError {
                    sink: "shard",
                    message: "shard stopped before the flush finished".to_string(),
                    retriable: true,
                })
            });
            let _all_committed = permits.acquire_many(all_permits).await;
            result
        })
    }
}

/// Stable shard choice for a (task, segment): FNV-1a, so that one segment's snapshots
/// always meet in the same batch sequence, across restarts and replicas alike.
pub fn shard_for(task_id: &str, segment_id: &str, shards: usize) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in task_id
        .bytes()
        .chain(std::iter::once(0xff))
        .chain(segment_id.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    (hash % shards.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// Records every batch it is given; fails while `failing` is set.
    #[derive(Default)]
    struct RecordingSink {
        batches: Mutex<Vec<usize>>,
        failing: std::sync::atomic::AtomicBool,
        /// Panics on the next write (once), like a bug inside a sink.
        panic_once: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl SnapshotSink for RecordingSink {
        fn name(&self) -> &'static str {
            "recording"
        }

        async fn write(&self, batch: &[SnapshotRecord]) -> Result<(), SinkError> {
            if self
                .panic_once
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                panic!("sink bug");
            }
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(SinkError {
                    sink: "recording",
                    message: "down".into(),
                    retriable: false,
                });
            }
            self.batches.lock().unwrap().push(batch.len());
            Ok(())
        }
    }

    fn record(sequence: i32) -> SnapshotRecord {
        SnapshotRecord {
            task_id: "t".into(),
            segment_id: "s".into(),
            sequence,
            dump_time: 1,
            stack: Stack::from_frames(&["frame"]),
            encoded: None,
        }
    }

    fn start(sink: Arc<RecordingSink>, limits: BatchLimits) -> Addr<SnapshotShard> {
        let sinks: Arc<[Arc<dyn SnapshotSink>]> = Arc::from(vec![sink as Arc<dyn SnapshotSink>]);
        let retry = RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            budget: Duration::from_millis(10),
            attempt_timeout: Duration::from_secs(5),
        };
        SnapshotShard::new(0, sinks, limits, retry, 4).start()
    }

    fn limits(max_snapshots: usize, max_bytes: usize, linger_ms: u64) -> BatchLimits {
        BatchLimits {
            max_snapshots,
            max_bytes,
            linger: Duration::from_millis(linger_ms),
            max_commits_in_flight: 2,
        }
    }

    #[actix::test]
    async fn test_shard_closes_batch_on_size() {
        let sink = Arc::new(RecordingSink::default());
        let shard = start(sink.clone(), limits(3, usize::MAX, 60_000));
        let first = shard
            .send(Ingest {
                records: vec![record(0), record(1)],
            })
            .await
            .unwrap();
        let second = shard
            .send(Ingest {
                records: vec![record(2)],
            })
            .await
            .unwrap();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(*sink.batches.lock().unwrap(), vec![3]);
    }

    #[actix::test]
    async fn test_shard_closes_batch_on_bytes() {
        let sink = Arc::new(RecordingSink::default());
        let one = record(0).approximate_bytes();
        let shard = start(sink.clone(), limits(1_000, one * 2, 60_000));
        let receipt = shard
            .send(Ingest {
                records: vec![record(0), record(1)],
            })
            .await
            .unwrap();
        receipt.await.unwrap().unwrap();
        assert_eq!(*sink.batches.lock().unwrap(), vec![2]);
    }

    #[actix::test]
    async fn test_shard_commits_when_idle_without_a_timer() {
        // Paused time that never advances: only group commit can close this batch.
        tokio::time::pause();
        let sink = Arc::new(RecordingSink::default());
        let shard = start(sink.clone(), limits(1_000, usize::MAX, 0));
        let receipt = shard
            .send(Ingest {
                records: vec![record(0), record(1)],
            })
            .await
            .unwrap();
        receipt.await.unwrap().unwrap();
        assert_eq!(*sink.batches.lock().unwrap(), vec![2]);
    }

    #[actix::test]
    async fn test_shard_lingers_before_an_idle_commit() {
        tokio::time::pause();
        let sink = Arc::new(RecordingSink::default());
        let shard = start(sink.clone(), limits(1_000, usize::MAX, 60_000));
        let mut receipt = shard
            .send(Ingest {
                records: vec![record(0)],
            })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(59_990)).await;
        assert!(
            matches!(
                receipt.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            ),
            "committed before its linger"
        );
        let second = shard
            .send(Ingest {
                records: vec![record(1)],
            })
            .await
            .unwrap();
        tokio::time::advance(Duration::from_millis(20)).await;
        receipt.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        // Both joined the one batch that lingered.
        assert_eq!(*sink.batches.lock().unwrap(), vec![2]);
    }

    #[actix::test]
    async fn test_shard_batch_grows_while_every_slot_commits() {
        use std::sync::atomic::Ordering::SeqCst;
        tokio::time::pause();
        let sink = Arc::new(GatedSink::closed());
        let one_slot = BatchLimits {
            max_commits_in_flight: 1,
            ..limits(1_000, usize::MAX, 0)
        };
        let shard = start_gated(sink.clone(), one_slot);
        let mut receipts = vec![shard
            .send(Ingest {
                records: vec![record(0)],
            })
            .await
            .unwrap()];
        tokio::time::sleep(Duration::from_millis(1)).await;
        // The first stream commits alone, at once; the next five arrive while it does.
        assert_eq!(sink.running.load(SeqCst), 1);
        for sequence in 1..6 {
            receipts.push(
                shard
                    .send(Ingest {
                        records: vec![record(sequence)],
                    })
                    .await
                    .unwrap(),
            );
        }
        sink.gate.add_permits(2);
        for receipt in receipts {
            receipt.await.unwrap().unwrap();
        }
        // Two commits: the lone first one, then the five that gathered behind it.
        assert_eq!(*sink.sizes.lock().unwrap(), vec![1, 5]);
    }

    #[actix::test]
    async fn test_shard_flush_drains_and_failure_reaches_receipts() {
        let sink = Arc::new(RecordingSink::default());
        let shard = start(sink.clone(), limits(1_000, usize::MAX, 60_000));
        let receipt = shard
            .send(Ingest {
                records: vec![record(0)],
            })
            .await
            .unwrap();
        shard
            .send(Flush {
                reason: CloseReason::Drain,
            })
            .await
            .unwrap()
            .unwrap();
        receipt.await.unwrap().unwrap();
        // An empty flush succeeds without writing.
        shard
            .send(Flush {
                reason: CloseReason::Shutdown,
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(*sink.batches.lock().unwrap(), vec![1]);

        sink.failing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let receipt = shard
            .send(Ingest {
                records: vec![record(1)],
            })
            .await
            .unwrap();
        assert!(shard
            .send(Flush {
                reason: CloseReason::Drain
            })
            .await
            .unwrap()
            .is_err());
        assert!(receipt.await.unwrap().is_err());
    }

    /// Holds every write until the test opens the gate; counts writes running at once.
    struct GatedSink {
        gate: tokio::sync::Semaphore,
        running: std::sync::atomic::AtomicUsize,
        most_running: std::sync::atomic::AtomicUsize,
        written: std::sync::atomic::AtomicUsize,
        /// Each committed batch's size, in order.
        sizes: Mutex<Vec<usize>>,
    }

    impl GatedSink {
        fn closed() -> GatedSink {
            GatedSink {
                gate: tokio::sync::Semaphore::new(0),
                running: Default::default(),
                most_running: Default::default(),
                written: Default::default(),
                sizes: Default::default(),
            }
        }
    }

    fn start_gated(sink: Arc<GatedSink>, limits: BatchLimits) -> Addr<SnapshotShard> {
        let sinks: Arc<[Arc<dyn SnapshotSink>]> = Arc::from(vec![sink as Arc<dyn SnapshotSink>]);
        let retry = RetryPolicy {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(1),
            budget: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
        };
        SnapshotShard::new(0, sinks, limits, retry, 8).start()
    }

    #[async_trait]
    impl SnapshotSink for GatedSink {
        fn name(&self) -> &'static str {
            "gated"
        }

        async fn write(&self, batch: &[SnapshotRecord]) -> Result<(), SinkError> {
            use std::sync::atomic::Ordering::SeqCst;
            let running = self.running.fetch_add(1, SeqCst) + 1;
            self.most_running.fetch_max(running, SeqCst);
            self.gate.acquire().await.expect("open gate").forget();
            self.running.fetch_sub(1, SeqCst);
            self.written.fetch_add(batch.len(), SeqCst);
            self.sizes.lock().unwrap().push(batch.len());
            Ok(())
        }
    }

    #[actix::test]
    async fn test_shard_commits_at_most_the_limit_at_once() {
        use std::sync::atomic::Ordering::SeqCst;
        tokio::time::pause();
        let sink = Arc::new(GatedSink::closed());
        // One snapshot per batch: every Ingest closes a batch.
        let shard = start_gated(sink.clone(), limits(1, usize::MAX, 60_000));
        let mut receipts = Vec::new();
        for sequence in 0..3 {
            receipts.push(
                shard
                    .send(Ingest {
                        records: vec![record(sequence)],
                    })
                    .await
                    .unwrap(),
            );
        }
        // Paused time: the sleep ends once every task has run as far as it can.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The first two commit at once, the shard took the third and waits for a slot.
        assert_eq!(sink.running.load(SeqCst), 2);
        let flushed = shard.send(Flush {
            reason: CloseReason::Drain,
        });
        sink.gate.add_permits(3);
        flushed.await.unwrap().unwrap();
        // The flush answered only after every earlier batch had committed.
        assert_eq!(sink.written.load(SeqCst), 3);
        for receipt in receipts {
            receipt.await.unwrap().unwrap();
        }
        assert_eq!(sink.most_running.load(SeqCst), 2);
    }

    #[test]
    fn test_shard_routing_is_stable_and_spread() {
        assert_eq!(
            shard_for("task", "segment", 4),
            shard_for("task", "segment", 4)
        );
        assert_eq!(shard_for("a", "b", 1), 0);
        let mut counts = [0usize; 4];
        for segment in 0..4_000 {
            counts[shard_for("task", &format!("segment-{segment}"), 4)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(
            (0..64)
                .map(|n| shard_for("ab", &format!("c{n}"), 1024))
                .collect::<Vec<_>>(),
            (0..64)
                .map(|n| shard_for("a", &format!("bc{n}"), 1024))
                .collect::<Vec<_>>()
        );
    }

    #[actix::test]
    async fn test_shard_panic_in_a_sink_fails_the_batch_and_the_shard_goes_on() {
        let sink = Arc::new(RecordingSink::default());
        sink.panic_once
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let shard = start(sink.clone(), limits(2, usize::MAX, 60_000));
        let receipt = shard
            .send(Ingest {
                records: vec![record(0), record(1)],
            })
            .await
            .unwrap();
        let error = receipt.await.unwrap().unwrap_err();
        assert!(error.retriable, "{error:?}");
        assert!(error.message.contains("sink bug"), "{}", error.message);
        let receipt = shard
            .send(Ingest {
                records: vec![record(2), record(3)],
            })
            .await
            .unwrap();
        receipt.await.unwrap().expect("the next batch commits");
        assert_eq!(*sink.batches.lock().unwrap(), vec![2]);
    }

    #[actix::test]
    async fn test_shard_panic_while_batching_fails_the_open_batch_and_the_shard_goes_on() {
        let sink = Arc::new(RecordingSink::default());
        let shard = start(sink.clone(), limits(100, usize::MAX, 60_000));
        let waiting = shard
            .send(Ingest {
                records: vec![record(0)],
            })
            .await
            .unwrap();
        let poisoned = SnapshotRecord {
            task_id: TEST_PANIC_TASK_ID.into(),
            ..record(1)
        };
        let failed = shard
            .send(Ingest {
                records: vec![poisoned],
            })
            .await
            .expect("the shard answers after the panic");
        // Both the stream already waiting in the batch and the one that hit the panic
        // are failed back, never acknowledged.
        for receipt in [waiting, failed] {
            let error = receipt.await.unwrap().unwrap_err();
            assert!(
                error.message.contains("batching failed unexpectedly"),
                "{}",
                error.message
            );
        }
        let receipt = shard
            .send(Ingest {
                records: vec![record(2)],
            })
            .await
            .unwrap();
        shard
            .send(Flush {
                reason: CloseReason::Drain,
            })
            .await
            .unwrap()
            .expect("flush after the panic");
        receipt.await.unwrap().expect("the next stream commits");
        assert_eq!(*sink.batches.lock().unwrap(), vec![1]);
    }
}
