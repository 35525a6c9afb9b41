//! `skysnap consume`: a consumer-group member that moves the snapshot topic into the
//! configured store. A batch is committed to the store first and its Kafka offsets
//! after that, so a crash re-reads (at least once) and never skips; the store
//! collapses re-read snapshots by key. Several consumers share the partitions.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use prost::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::actors::sink::kafka::client_config;
use crate::actors::sink::retry::RetryPolicy;
use crate::config::Config;
use crate::grpc::profile::to_record;
use crate::http;
use crate::metrics;
use crate::model::SnapshotRecord;
use crate::proto::v3::ThreadSnapshot;
use crate::server::{open_store, signal, stopped};
use crate::store::Store;

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
    let prometheus = metrics::install()?;
    metrics::register_consumer_zeros();
    let store = open_store(&config).await?;
    let consumer: StreamConsumer = client_config(&config.kafka)
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
    tracing::info!(topic = %config.kafka.topic, group = %config.kafka.group_id, store = store.kind(), "consuming");
    println!("skysnap consumer ready metrics={metrics_addr}");

    let signal_task = tokio::spawn(async move {
        signal().await;
        let _ = stop_sender.send(true);
    });
    let result = consume_loop(&config, &consumer, store.as_ref(), stop).await;
    signal_task.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), metrics_task).await;
    result.map(|()| true)
}

/// How often the consumer lag gauge is refreshed.
const LAG_INTERVAL: Duration = Duration::from_secs(5);

/// Sets the lag gauge: for each assigned partition, its end offset minus the committed
/// offset (the whole partition when nothing is committed yet).
fn report_lag(consumer: &StreamConsumer) {
    let lag = tokio::task::block_in_place(|| -> rdkafka::error::KafkaResult<i64> {
        let assignment = consumer.assignment()?;
        let committed = consumer.committed_offsets(assignment.clone(), Duration::from_secs(2))?;
        let mut lag = 0;
        for element in committed.elements() {
            let (low, high) = consumer.fetch_watermarks(
                element.topic(),
                element.partition(),
                Duration::from_secs(2),
            )?;
            let position = match element.offset() {
                Offset::Offset(offset) => offset,
                _ => low,
            };
            lag += (high - position).max(0);
        }
        Ok(lag)
    });
    match lag {
        Ok(lag) => ::metrics::gauge!(metrics::CONSUMER_LAG).set(lag as f64),
        Err(error) => tracing::debug!(%error, "consumer lag not measured"),
    }
}

/// One batch: the records to store and, per partition, the offset to commit after.
#[derive(Default)]
struct Batch {
    records: Vec<SnapshotRecord>,
    next_offsets: HashMap<(String, i32), i64>,
}

async fn consume_loop(
    config: &Config,
    consumer: &StreamConsumer,
    store: &dyn Store,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let wait = Duration::from_millis(config.kafka.consume_batch_wait_ms);
    let max_snapshots = config.kafka.consume_batch_snapshots;
    let retry = RetryPolicy::from_config(&config.sink);
    let mut lag_reported_at = Instant::now();
    loop {
        if lag_reported_at.elapsed() >= LAG_INTERVAL {
            report_lag(consumer);
            lag_reported_at = Instant::now();
        }
        let mut batch = Batch::default();
        let mut deadline_opt: Option<Instant> = None;
        while batch.records.len() < max_snapshots {
            let timeout = deadline_opt.map(|deadline| tokio::time::sleep_until(deadline));
            let received = tokio::select! {
                _ = stop.wait_for(|stop| *stop) => None,
                _ = async { match timeout { Some(sleep) => sleep.await, None => std::future::pending().await } } => break,
                received = consumer.recv() => Some(received),
            };
            let Some(received) = received else {
                tracing::info!("stopping: committing the batch in hand");
                commit_batch(consumer, store, &retry, batch, &mut stop).await?;
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
            ::metrics::counter!(metrics::SNAPSHOTS_RECEIVED).increment(1);
            let decoded = message
                .payload()
                .ok_or("empty message")
                .and_then(|payload| ThreadSnapshot::decode(payload).map_err(|_| "malformed"));
            match decoded.map(|snapshot| to_record(snapshot, config.grpc.max_stack_depth)) {
                Ok(Ok(record)) => batch.records.push(record),
                Ok(Err(reason)) | Err(reason) => {
                    metrics::snapshot_rejected(if reason == "empty message" {
                        "malformed"
                    } else {
                        reason
                    })
                }
            }
        }
        commit_batch(consumer, store, &retry, batch, &mut stop).await?;
    }
}

/// Stores the batch (retrying until it is stored or the consumer is told to stop),
/// then commits its offsets.
async fn commit_batch(
    consumer: &StreamConsumer,
    store: &dyn Store,
    retry: &RetryPolicy,
    batch: Batch,
    stop: &mut watch::Receiver<bool>,
) -> anyhow::Result<()> {
    if batch.next_offsets.is_empty() {
        return Ok(());
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match store.insert_snapshots(&batch.records).await {
            Ok(()) => break,
            Err(error) => {
                metrics::sink_error(store.kind(), error.is_retriable());
                // The offsets stay uncommitted: whoever owns the partition next re-reads.
                let delay = retry.backoff(attempt.min(10));
                tracing::warn!(%error, attempt, ?delay, "store write failed; retrying the batch");
                if *stop.borrow() {
                    anyhow::bail!("stopped before the batch was stored: {error}");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
    ::metrics::counter!(metrics::SNAPSHOTS_COMMITTED).increment(batch.records.len() as u64);
    ::metrics::counter!(metrics::CONSUMER_BATCHES).increment(1);
    let mut offsets = TopicPartitionList::new();
    for ((topic, partition), next) in &batch.next_offsets {
        offsets.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    // A synchronous commit blocks this thread briefly; keep the runtime's others free.
    let committed = tokio::task::block_in_place(|| consumer.commit(&offsets, CommitMode::Sync));
    match committed {
        Ok(()) => ::metrics::counter!(metrics::CONSUMER_COMMITS, "result" => "ok").increment(1),
        Err(error) => {
            // A rebalance took the partition: its new owner re-reads (the store collapses
            // duplicates), so nothing is lost.
            tracing::warn!(%error, "offset commit failed");
            ::metrics::counter!(metrics::CONSUMER_COMMITS, "result" => "failed").increment(1);
        }
    }
    Ok(())
}
