//! `skysnap consume`: a consumer-group member that moves the snapshot topic into the
//! configured store. A batch is committed to the store first and its Kafka offsets
//! after that, so a crash re-reads (at least once) and never skips; the store
//! collapses re-read snapshots by key. Several consumers share the partitions.
//!
//! Nothing wedges the group and nothing is dropped: a message that is no valid
//! `ThreadSnapshot`, or a snapshot the store refuses for good, goes to the dead-letter
//! topic (`kafka.dlq_topic`) with the reason in its headers before the offsets move
//! past it; a store that is only unavailable is retried, never skipped.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::actors::sink::kafka::{self, client_config};
use crate::actors::sink::retry::RetryPolicy;
use crate::actors::sink::store::StoreSink;
use crate::actors::sink::{SinkError, SnapshotSink};
use crate::config::{Config, KafkaConfig};
use crate::http;
use crate::model::wire_to_record;
use crate::model::SnapshotRecord;
use crate::process::{open_store, signal, stopped};
use crate::telemetry;
use crate::wire::decode_snapshot;
use bytes::Bytes;

/// Runs the consumer until a signal; returns whether it stopped cleanly.
pub fn run(config: Config) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("skysnap-consume")
        .build()?;
    runtime.block_on(consume(config))
}

async fn consume(config: Config) -> anyhow::Result<bool> {
    anyhow::ensure!(
        config.kafka_enabled(),
        "skysnap consume needs kafka.brokers"
    );
    let prometheus = telemetry::install(telemetry::Role::Consumer)?;
    telemetry::register_consumer_zeros();
    let store = open_store(&config).await?;
    let sink = StoreSink::new(store);
    let dead_letters = DeadLetterQueue::new(&config.kafka)
        .with_context(|| format!("cannot use kafka.brokers {}", config.kafka.brokers))?;
    let mut client = client_config(&config.kafka);
    for (key, value) in CONSUMER_DEFAULTS {
        if !config.kafka.properties.contains_key(*key) {
            client.set(*key, *value);
        }
    }
    let consumer: StreamConsumer = client
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "session.timeout.ms",
            config.kafka.session_timeout_ms.to_string(),
        )
        .create()
        .with_context(|| format!("cannot use kafka.brokers {}", config.kafka.brokers))?;
    // Shared with the lag reporter's blocking thread.
    let consumer = Arc::new(consumer);
    consumer
        .subscribe(&[&config.kafka.topic])
        .with_context(|| format!("cannot subscribe to kafka.topic {}", config.kafka.topic))?;

    let metrics_listener = tokio::net::TcpListener::bind(config.metrics.addr)
        .await
        .with_context(|| format!("cannot listen on metrics.addr {}", config.metrics.addr))?;
    let metrics_addr = metrics_listener.local_addr()?;
    let (stop_sender, stop) = watch::channel(false);
    let metrics_task = tokio::spawn(http::serve_metrics(
        metrics_listener,
        prometheus,
        stopped(stop.clone()),
    ));
    tracing::info!(topic = %config.kafka.topic, group = %config.kafka.group_id, dlq = %dead_letters.topic, store = sink.name(), "consuming");
    // The SIGTERM handler is installed here, before the ready line.
    let stop_signal = signal();
    println!("skysnap consumer ready metrics={metrics_addr}");

    let signal_task = tokio::spawn(async move {
        stop_signal.await;
        let _ = stop_sender.send(true);
    });
    let lag_task = spawn_lag_reporter(consumer.clone(), stop.clone());
    let result = consume_loop(&config, &consumer, &sink, &dead_letters, stop).await;
    signal_task.abort();
    // A measurement already running ends within LAG_BUDGET; the runtime waits for it.
    lag_task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), metrics_task).await;
    result.map(|()| true)
}

/// How often the consumer lag gauge is refreshed.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Longest one lag measurement takes in all (its broker calls share it): it holds a
/// blocking thread, and the runtime waits for that thread when the consumer stops.
const LAG_BUDGET: Duration = Duration::from_secs(2);

/// Refreshes the lag gauge every `LAG_INTERVAL` until told to stop. The measurement asks
/// the brokers and blocks, so it runs on a blocking thread, one at a time, and the
/// consume loop never waits for it (a slow broker slows the gauge, not the batches).
fn spawn_lag_reporter(
    consumer: Arc<StreamConsumer>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(LAG_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|stop| *stop) => return,
                _ = ticks.tick() => {}
            }
            let consumer = consumer.clone();
            let measured =
                tokio::task::spawn_blocking(move || measure_lag(&consumer, LAG_BUDGET)).await;
            match measured {
                Ok(Ok(lag)) => metrics::gauge!(telemetry::CONSUMER_LAG).set(lag as f64),
                Ok(Err(error)) => tracing::debug!(%error, "consumer lag not measured"),
                Err(error) => tracing::debug!(%error, "consumer lag measurement failed"),
            }
        }
    })
}

/// For each assigned partition, its end offset minus the committed offset (the whole
/// partition when nothing is committed yet), summed. Blocks for up to `budget`.
fn measure_lag(consumer: &StreamConsumer, budget: Duration) -> KafkaResult<i64> {
    let deadline = std::time::Instant::now() + budget;
    let remaining = || deadline.saturating_duration_since(std::time::Instant::now());
    let assignment = consumer.assignment()?;
    let committed = consumer.committed_offsets(assignment, remaining())?;
    let mut lag = 0;
    for element in committed.elements() {
        let (low, high) =
            consumer.fetch_watermarks(element.topic(), element.partition(), remaining())?;
        let position = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => low,
        };
        lag += (high - position).max(0);
    }
    Ok(lag)
}

/// Where a message came from: its dead letter, should it get one, carries all of it.
#[derive(Debug, Clone)]
struct Origin {
    topic: String,
    partition: i32,
    offset: i64,
    key_opt: Option<Vec<u8>>,
    /// The value as read (none for a tombstone), so that a dead letter holds the
    /// original bytes, not a re-encoding; the decoded record's stack shares it.
    payload_opt: Option<Bytes>,
}

/// A message on its way to the dead-letter topic.
#[derive(Debug)]
struct DeadLetter {
    origin: Origin,
    /// The `reason` label: a snapshot rejection reason, or `store_refused`.
    reason: &'static str,
    /// What was wrong, for the `skysnap-error` header.
    error: String,
}

/// Longest `skysnap-error` header: a store's error text can quote a whole statement, and
/// the letter must still fit where the original message fitted.
const MAX_ERROR_HEADER_BYTES: usize = 1024;

impl DeadLetter {
    fn headers(&self) -> OwnedHeaders {
        let mut error = self.error.as_str();
        if error.len() > MAX_ERROR_HEADER_BYTES {
            let mut end = MAX_ERROR_HEADER_BYTES;
            while !error.is_char_boundary(end) {
                end -= 1;
            }
            error = &error[..end];
        }
        let partition = self.origin.partition.to_string();
        let offset = self.origin.offset.to_string();
        [
            ("skysnap-error", error),
            ("skysnap-reason", self.reason),
            ("skysnap-source-topic", self.origin.topic.as_str()),
            ("skysnap-source-partition", partition.as_str()),
            ("skysnap-source-offset", offset.as_str()),
        ]
        .into_iter()
        .fold(OwnedHeaders::new(), |headers, (key, value)| {
            headers.insert(Header {
                key,
                value: Some(value),
            })
        })
    }
}

/// `kafka.dlq_topic`, or `<topic>.dlq` when it is empty.
fn dead_letter_topic(config: &KafkaConfig) -> String {
    match config.dlq_topic.trim() {
        "" => format!("{}.dlq", config.topic),
        topic => topic.to_string(),
    }
}

/// The dead-letter topic and its producer (idempotent, `acks=all`, as the sink's).
struct DeadLetterQueue {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetterQueue {
    fn new(config: &KafkaConfig) -> KafkaResult<DeadLetterQueue> {
        Ok(DeadLetterQueue {
            producer: kafka::producer(config)?,
            topic: dead_letter_topic(config),
        })
    }

    /// Delivers every letter, each acknowledged by the brokers, before the caller may
    /// commit the offsets past them. After any failure all of them are sent again (a
    /// letter may then land twice), backing off, until they are delivered or the
    /// consumer is told to stop — which fails the batch with its offsets uncommitted.
    async fn deliver(
        &self,
        letters: &[DeadLetter],
        retry: &RetryPolicy,
        stop: &watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let error = match self.send_all(letters).await {
                Ok(()) => break,
                Err(error) => error,
            };
            metrics::counter!(telemetry::CONSUMER_DEAD_LETTER_FAILURES).increment(1);
            if *stop.borrow() {
                anyhow::bail!(
                    "stopped before the dead letters reached {}: {error}",
                    self.topic
                );
            }
            let delay = retry.backoff(attempt.min(10));
            tracing::warn!(topic = %self.topic, %error, attempt, ?delay, "dead-letter delivery failed; the batch's offsets stay uncommitted, retrying");
            tokio::time::sleep(delay).await;
        }
        for letter in letters {
            telemetry::dead_lettered(letter.reason);
            tracing::debug!(
                reason = letter.reason,
                error = %letter.error,
                partition = letter.origin.partition,
                offset = letter.origin.offset,
                "dead-lettered"
            );
        }
        tracing::warn!(topic = %self.topic, count = letters.len(), first_reason = letters[0].reason, first_error = %letters[0].error, "messages sent to the dead-letter topic");
        Ok(())
    }

    async fn send_all(&self, letters: &[DeadLetter]) -> KafkaResult<()> {
        let mut deliveries = Vec::with_capacity(letters.len());
        for letter in letters {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(letter.headers());
            if let Some(key) = &letter.origin.key_opt {
                record = record.key(key.as_slice());
            }
            if let Some(payload) = &letter.origin.payload_opt {
                record = record.payload(payload.as_ref());
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        // librdkafka's queue is full: wait for deliveries to make room.
                        record = returned;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => return Err(error),
                }
            }
        }
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(error),
                Err(_) => return Err(KafkaError::Canceled),
            }
        }
        Ok(())
    }
}

/// librdkafka consumer settings skysnap picks unless `kafka.properties` sets them.
/// librdkafka 2.x waits `fetch.queue.backoff.ms` (1 s) before fetching a partition
/// again once its local queue holds `queued.min.messages`; with batches read 10,000 at
/// a time that pause bounded `consume` to about 33,000 snapshots/s while it and
/// ClickHouse used a quarter of a core each (measured; 10 ms: about 200,000/s). The
/// pre-fetch queue is kept to 16 MiB a partition (64 by default), so that memory does
/// not grow with the partitions a consumer owns.
const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("fetch.queue.backoff.ms", "10"),
    ("queued.max.messages.kbytes", "16384"),
];

/// One batch: the records to store, the messages to dead-letter and, per partition,
/// the offset to commit after both.
#[derive(Default)]
struct Batch {
    records: Vec<SnapshotRecord>,
    /// Where each record came from, in the same order, for the dead letter of a record
    /// the store refuses.
    origins: Vec<Origin>,
    /// Messages that are no valid snapshot.
    dead_letters: Vec<DeadLetter>,
    next_offsets: HashMap<(String, i32), i64>,
}

impl Batch {
    fn messages(&self) -> usize {
        self.records.len() + self.dead_letters.len()
    }
}

async fn consume_loop(
    config: &Config,
    consumer: &StreamConsumer,
    sink: &dyn SnapshotSink,
    dead_letters: &DeadLetterQueue,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let wait = Duration::from_millis(config.kafka.consume_batch_wait_ms);
    let max_snapshots = config.kafka.consume_batch_snapshots;
    let retry = RetryPolicy::from_config(&config.sink);
    // One batch commits while the next fills; the next starts committing only after it
    // (offsets go forward in order), so at most two batches are in memory.
    let commit_stop = stop.clone();
    let mut committing: Option<std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + '_>>> =
        None;
    loop {
        let mut batch = Batch::default();
        let mut deadline_opt: Option<Instant> = None;
        // Invalid messages count too: a flood of them must not grow one batch unbounded.
        while batch.messages() < max_snapshots.get() {
            let timeout = deadline_opt.map(|deadline| tokio::time::sleep_until(deadline));
            let received = tokio::select! {
                _ = stop.wait_for(|stop| *stop) => None,
                _ = async { match timeout { Some(sleep) => sleep.await, None => std::future::pending().await } } => break,
                committed = async { match committing.as_mut() { Some(commit) => commit.await, None => std::future::pending().await } } => {
                    committing = None;
                    committed?;
                    continue;
                }
                received = consumer.recv() => Some(received),
            };
            let Some(received) = received else {
                tracing::info!("stopping: committing the batch in hand");
                if let Some(commit) = committing.take() {
                    commit.await?;
                }
                commit_batch(consumer, sink, dead_letters, &retry, batch, &commit_stop).await?;
                return Ok(());
            };
            let message = match received {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "kafka consumer error");
                    continue;
                }
            };
            deadline_opt.get_or_insert_with(|| Instant::now() + wait);
            let key = (message.topic().to_string(), message.partition());
            let next = message.offset() + 1;
            let entry = batch.next_offsets.entry(key).or_insert(next);
            *entry = (*entry).max(next);
            metrics::counter!(telemetry::SNAPSHOTS_RECEIVED).increment(1);
            let payload_opt = message.payload().map(Bytes::copy_from_slice);
            let origin = Origin {
                topic: message.topic().to_string(),
                partition: message.partition(),
                offset: message.offset(),
                key_opt: message.key().map(<[u8]>::to_vec),
                payload_opt: payload_opt.clone(),
            };
            match decode_payload(payload_opt, config.grpc.max_stack_depth.get()) {
                Ok(record) => {
                    batch.records.push(record);
                    batch.origins.push(origin);
                }
                Err(reason) => {
                    telemetry::snapshot_rejected(reason);
                    batch.dead_letters.push(DeadLetter {
                        origin,
                        reason,
                        error: format!("not a valid ThreadSnapshot: {reason}"),
                    });
                }
            }
        }
        if let Some(commit) = committing.take() {
            commit.await?;
        }
        committing = Some(Box::pin(commit_batch(
            consumer,
            sink,
            dead_letters,
            &retry,
            batch,
            &commit_stop,
        )));
    }
}

/// Turns a message value into a record; the error is the `reason` label of the
/// rejection (`malformed` for an empty or undecodable value). Pure, so that the fuzz
/// targets in `fuzz/` drive exactly what the consume loop runs.
pub fn decode_value(
    payload_opt: Option<&[u8]>,
    max_stack_depth: usize,
) -> Result<SnapshotRecord, &'static str> {
    decode_payload(payload_opt.map(Bytes::copy_from_slice), max_stack_depth)
}

/// `decode_value` on bytes already copied out of librdkafka's buffer: the record's
/// stack stays in them, as on the receiver.
fn decode_payload(
    payload_opt: Option<Bytes>,
    max_stack_depth: usize,
) -> Result<SnapshotRecord, &'static str> {
    let payload = payload_opt.ok_or("malformed")?;
    let snapshot = decode_snapshot(payload).map_err(|_| "malformed")?;
    wire_to_record(snapshot, max_stack_depth, false)
}

/// Stores the batch's records and dead-letters what cannot be stored, then commits the
/// offsets past all of it. Until both are done the offsets stay uncommitted: a consumer
/// stopped or killed in between leaves the batch to be read again.
async fn commit_batch(
    consumer: &StreamConsumer,
    sink: &dyn SnapshotSink,
    dead_letter_queue: &DeadLetterQueue,
    retry: &RetryPolicy,
    batch: Batch,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if batch.next_offsets.is_empty() {
        return Ok(());
    }
    let Batch {
        records,
        origins,
        mut dead_letters,
        next_offsets,
    } = batch;
    let refused = store_records(sink, &records, retry, stop).await?;
    let stored = records.len() - refused.len();
    metrics::counter!(telemetry::SNAPSHOTS_COMMITTED).increment(stored as u64);
    let mut origins: Vec<Option<Origin>> = origins.into_iter().map(Some).collect();
    for (index, error) in refused {
        let origin = origins[index].take().expect("one origin per record");
        dead_letters.push(DeadLetter {
            origin,
            reason: telemetry::STORE_REFUSED,
            error: error.to_string(),
        });
    }
    dead_letter_queue
        .deliver(&dead_letters, retry, stop)
        .await?;
    metrics::counter!(telemetry::CONSUMER_BATCHES).increment(1);
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), next) in &next_offsets {
        offsets.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    // A synchronous commit blocks this thread briefly; keep the runtime's others free.
    let committed = tokio::task::block_in_place(|| consumer.commit(&offsets, CommitMode::Sync));
    match committed {
        Ok(()) => metrics::counter!(telemetry::CONSUMER_COMMITS, "result" => "ok").increment(1),
        Err(error) => {
            // A rebalance took the partition: its new owner re-reads (the store collapses
            // duplicates), so nothing is lost.
            tracing::warn!(%error, "offset commit failed");
            metrics::counter!(telemetry::CONSUMER_COMMITS, "result" => "failed").increment(1);
        }
    }
    Ok(())
}

/// Writes the records. Where the sink refuses a part for good, the part is split in
/// halves until each refused record stands alone, so that the others still land (one
/// bad record in n costs about 2·log2(n) more writes); answers the indexes of the
/// refused records, ascending, with why. A retriable failure backs off and writes the
/// same part again, without a limit — the offsets wait until it is stored — unless the
/// consumer is told to stop, which fails the batch.
async fn store_records(
    sink: &dyn SnapshotSink,
    records: &[SnapshotRecord],
    retry: &RetryPolicy,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<(usize, SinkError)>> {
    let mut refused = Vec::new();
    // Parts still to write, the next on top.
    let mut pending: Vec<Range<usize>> = Vec::new();
    pending.push(0..records.len());
    while let Some(range) = pending.pop() {
        if range.is_empty() {
            continue;
        }
        let part = &records[range.clone()];
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let error = match tokio::time::timeout(retry.attempt_timeout, sink.write(part)).await {
                Ok(Ok(())) => {
                    telemetry::batch_written(
                        sink.name(),
                        part.len(),
                        started.elapsed().as_secs_f64(),
                    );
                    break;
                }
                Ok(Err(error)) => error,
                Err(_) => SinkError {
                    sink: sink.name(),
                    message: format!(
                        "no answer within {} ms (sink.attempt_timeout_ms)",
                        retry.attempt_timeout.as_millis()
                    ),
                    retriable: true,
                },
            };
            telemetry::sink_error(sink.name(), error.retriable);
            if !error.retriable {
                if part.len() == 1 {
                    tracing::warn!(%error, "the store refused a snapshot for good; dead-lettering it");
                    refused.push((range.start, error));
                } else {
                    let middle = range.start + part.len() / 2;
                    pending.push(middle..range.end);
                    pending.push(range.start..middle);
                }
                break;
            }
            if *stop.borrow() {
                anyhow::bail!("stopped before the batch was stored: {error}");
            }
            // The offsets stay uncommitted: whoever owns the partition next re-reads.
            let delay = retry.backoff(attempt.min(10));
            tracing::warn!(%error, attempt, ?delay, "store write failed; retrying the batch");
            telemetry::sink_retry(sink.name());
            tokio::time::sleep(delay).await;
        }
    }
    Ok(refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use async_trait::async_trait;

    use crate::config::SinkConfig;

    /// Refuses for good every write that holds a snapshot of segment `bad`, the way a
    /// store refuses a batch with one row it will never take; fails the first
    /// `unavailable` writes as retriable; keeps what it accepted.
    #[derive(Default)]
    struct PickySink {
        unavailable: AtomicU32,
        writes: AtomicU32,
        stored: Mutex<Vec<SnapshotRecord>>,
    }

    #[async_trait]
    impl SnapshotSink for PickySink {
        fn name(&self) -> &'static str {
            "picky"
        }

        async fn write(&self, batch: &[SnapshotRecord]) -> Result<(), SinkError> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            let unavailable = self.unavailable.load(Ordering::SeqCst);
            if unavailable > 0 {
                self.unavailable.store(unavailable - 1, Ordering::SeqCst);
                return Err(SinkError {
                    sink: "picky",
                    message: "store unavailable".to_string(),
                    retriable: true,
                });
            }
            if batch.iter().any(|record| record.segment_id == "bad") {
                return Err(SinkError {
                    sink: "picky",
                    message: "store rejected the request: row refused".to_string(),
                    retriable: false,
                });
            }
            self.stored.lock().unwrap().extend_from_slice(batch);
            Ok(())
        }
    }

    fn record(segment: &str, sequence: i32) -> SnapshotRecord {
        SnapshotRecord {
            task_id: "t".to_string(),
            segment_id: segment.to_string(),
            sequence,
            dump_time: 1_700_000_000_000,
            stack: vec!["main".to_string()].into(),
            encoded: None,
        }
    }

    fn retry() -> RetryPolicy {
        RetryPolicy::from_config(&SinkConfig::default())
    }

    /// Never told to stop (store_records only reads the flag).
    fn running() -> watch::Receiver<bool> {
        watch::channel(false).1
    }

    #[tokio::test(start_paused = true)]
    async fn test_consume_store_refusal_dead_letters_only_the_refused_records() {
        let records: Vec<SnapshotRecord> = (0..100)
            .map(|n| record(if n == 13 || n == 77 { "bad" } else { "good" }, n))
            .collect();
        let sink = PickySink::default();
        let refused = store_records(&sink, &records, &retry(), &running())
            .await
            .unwrap();
        let refused_indexes: Vec<usize> = refused.iter().map(|(index, _)| *index).collect();
        assert_eq!(refused_indexes, vec![13, 77]);
        assert!(refused
            .iter()
            .all(|(_, error)| !error.retriable && error.message.contains("row refused")));
        let mut stored: Vec<i32> = sink
            .stored
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.sequence)
            .collect();
        stored.sort();
        let expected: Vec<i32> = (0..100).filter(|n| *n != 13 && *n != 77).collect();
        assert_eq!(stored, expected, "every good record landed, once");
        // Bisection, not one write per record.
        let writes = sink.writes.load(Ordering::SeqCst);
        assert!(writes <= 30, "{writes} writes for 2 bad records in 100");
    }

    #[tokio::test(start_paused = true)]
    async fn test_consume_store_refusal_of_a_single_record_and_of_all() {
        let sink = PickySink::default();
        let refused = store_records(&sink, &[record("bad", 0)], &retry(), &running())
            .await
            .unwrap();
        assert_eq!(refused.len(), 1);
        let all_bad: Vec<SnapshotRecord> = (0..5).map(|n| record("bad", n)).collect();
        let refused = store_records(&sink, &all_bad, &retry(), &running())
            .await
            .unwrap();
        assert_eq!(
            refused.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4]
        );
        assert!(sink.stored.lock().unwrap().is_empty());
        assert!(store_records(&sink, &[], &retry(), &running())
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn test_consume_store_unavailable_is_retried_not_dead_lettered() {
        let sink = PickySink {
            // Far beyond the sink retry policy's attempts: the consumer never gives up.
            unavailable: AtomicU32::new(50),
            ..PickySink::default()
        };
        let records: Vec<SnapshotRecord> = (0..10).map(|n| record("good", n)).collect();
        let refused = store_records(&sink, &records, &retry(), &running())
            .await
            .unwrap();
        assert!(refused.is_empty());
        assert_eq!(sink.stored.lock().unwrap().len(), 10);
        assert_eq!(sink.writes.load(Ordering::SeqCst), 51);
    }

    #[tokio::test(start_paused = true)]
    async fn test_consume_store_unavailable_and_stopping_fails_the_batch() {
        let sink = PickySink {
            unavailable: AtomicU32::new(u32::MAX),
            ..PickySink::default()
        };
        let (stop_sender, stop) = watch::channel(false);
        stop_sender.send(true).unwrap();
        let error = store_records(&sink, &[record("good", 0)], &retry(), &stop)
            .await
            .unwrap_err();
        assert!(error
            .to_string()
            .contains("stopped before the batch was stored"));
        assert!(sink.stored.lock().unwrap().is_empty());
    }

    /// Never answers: a store that took the connection and hung.
    struct HungSink;

    #[async_trait]
    impl SnapshotSink for HungSink {
        fn name(&self) -> &'static str {
            "hung"
        }

        async fn write(&self, _batch: &[SnapshotRecord]) -> Result<(), SinkError> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn test_consume_hung_store_attempt_ends_and_is_retried() {
        let (stop_sender, stop) = watch::channel(false);
        let retry = retry();
        let started = Instant::now();
        // Stopping, so that the timed-out attempt is not retried forever.
        stop_sender.send(true).unwrap();
        let error = store_records(&HungSink, &[record("good", 0)], &retry, &stop)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("sink.attempt_timeout_ms"),
            "{error}"
        );
        assert!(started.elapsed() <= retry.attempt_timeout + Duration::from_millis(10));
    }

    #[test]
    fn test_consume_dead_letter_topic_default_and_override() {
        let mut config = KafkaConfig::default();
        assert_eq!(dead_letter_topic(&config), "skywalking-profilings.dlq");
        config.dlq_topic = "  ".to_string();
        assert_eq!(dead_letter_topic(&config), "skywalking-profilings.dlq");
        config.dlq_topic = "profilings-refused".to_string();
        assert_eq!(dead_letter_topic(&config), "profilings-refused");
        let env = |value: &str| {
            vec![
                (
                    "SKYSNAP_KAFKA_BROKERS".to_string(),
                    "127.0.0.1:9092".to_string(),
                ),
                ("SKYSNAP_KAFKA_DLQ_TOPIC".to_string(), value.to_string()),
            ]
        };
        let error = Config::load_with_env(None, &env("skywalking-profilings")).unwrap_err();
        assert!(error.to_string().contains("kafka.dlq_topic"), "{error}");
        assert!(Config::load_with_env(None, &env("")).is_ok());
    }

    #[test]
    fn test_consume_dead_letter_headers_name_the_source_and_the_error() {
        let letter = DeadLetter {
            origin: Origin {
                topic: "profilings".to_string(),
                partition: 3,
                offset: 42,
                key_opt: Some(b"segment".to_vec()),
                payload_opt: Some(Bytes::from_static(b"\xff\xff")),
            },
            reason: "malformed",
            error: "é".repeat(MAX_ERROR_HEADER_BYTES),
        };
        let headers = letter.headers();
        let header = |name: &str| -> String {
            use rdkafka::message::Headers as _;
            let found = headers
                .iter()
                .find(|header| header.key == name)
                .unwrap_or_else(|| panic!("header {name}"));
            String::from_utf8(found.value.unwrap().to_vec()).unwrap()
        };
        assert_eq!(header("skysnap-reason"), "malformed");
        assert_eq!(header("skysnap-source-topic"), "profilings");
        assert_eq!(header("skysnap-source-partition"), "3");
        assert_eq!(header("skysnap-source-offset"), "42");
        let error = header("skysnap-error");
        assert!(error.len() <= MAX_ERROR_HEADER_BYTES && error.starts_with('é'));
    }

    /// A consumer with a partition assigned and no broker that answers: any broker call
    /// blocks until its timeout.
    fn consumer_without_broker() -> StreamConsumer {
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("group.id", "lag-test")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset("profilings", 0, Offset::Beginning)
            .unwrap();
        consumer.assign(&assignment).unwrap();
        consumer
    }

    #[tokio::test]
    async fn test_consume_lag_measurement_is_bounded() {
        let consumer = consumer_without_broker();
        let started = std::time::Instant::now();
        assert!(measure_lag(&consumer, Duration::from_millis(300)).is_err());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    /// On a single-threaded runtime, where a blocking call would stop everything: the
    /// loop beside the reporter keeps its pace while the measurement hangs on the broker.
    #[tokio::test]
    async fn test_consume_lag_reporting_does_not_block_the_loop() {
        let consumer = Arc::new(consumer_without_broker());
        let (stop_sender, stop) = watch::channel(false);
        let reporter = spawn_lag_reporter(consumer, stop);
        let mut longest_gap = Duration::ZERO;
        let mut last = std::time::Instant::now();
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            longest_gap = longest_gap.max(last.elapsed());
            last = std::time::Instant::now();
        }
        stop_sender.send(true).unwrap();
        reporter.await.unwrap();
        assert!(
            longest_gap < Duration::from_millis(500),
            "the loop stalled {longest_gap:?}"
        );
    }
}
