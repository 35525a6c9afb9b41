//! Prometheus metrics: names, help texts and the small helpers the code records with.
//! Labels only ever take values from fixed sets (reasons, sinks, operations), never
//! task, segment or instance ids.

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SNAPSHOTS_RECEIVED: &str = "skysnap_snapshots_received_total";
pub const SNAPSHOTS_COMMITTED: &str = "skysnap_snapshots_committed_total";
pub const SNAPSHOTS_REJECTED: &str = "skysnap_snapshots_rejected_total";
pub const SNAPSHOTS_REFUSED: &str = "skysnap_snapshots_refused_total";
pub const SNAPSHOTS_UNKNOWN_TASK: &str = "skysnap_snapshots_unknown_task_total";
pub const STREAMS_ACTIVE: &str = "skysnap_grpc_streams_active";
pub const STREAMS_FAILED: &str = "skysnap_grpc_streams_failed_total";
pub const GRPC_UNAUTHENTICATED: &str = "skysnap_grpc_unauthenticated_total";
pub const DISCARDED_MESSAGES: &str = "skysnap_discarded_messages_total";
pub const BATCHES_FLUSHED: &str = "skysnap_batches_flushed_total";
pub const BATCH_SIZE: &str = "skysnap_batch_size_snapshots";
pub const BATCH_FLUSH_DURATION: &str = "skysnap_batch_flush_duration_seconds";
pub const SINK_ERRORS: &str = "skysnap_sink_errors_total";
pub const SINK_RETRIES: &str = "skysnap_sink_retries_total";
pub const TASKS_NOTIFIED: &str = "skysnap_tasks_notified_total";
pub const TASKS_NOTIFY_DEFERRED: &str = "skysnap_tasks_notify_deferred_total";
pub const TASK_LOGS_WRITTEN: &str = "skysnap_task_logs_written_total";
pub const TASK_LOGS_DROPPED: &str = "skysnap_task_logs_dropped_total";
pub const TASK_FINISH_UNKNOWN: &str = "skysnap_task_finish_unknown_total";
pub const TASK_CACHE_LOOKUPS: &str = "skysnap_task_cache_lookups_total";
pub const TASK_CACHE_SIZE: &str = "skysnap_task_cache_entries";
pub const TASKS_CREATED: &str = "skysnap_tasks_created_total";
pub const SHARD_MAILBOX_DEPTH: &str = "skysnap_shard_mailbox_depth";
pub const SHARD_BATCH_SNAPSHOTS: &str = "skysnap_shard_batch_snapshots";
pub const SINK_SNAPSHOTS_WRITTEN: &str = "skysnap_sink_snapshots_written_total";
pub const CONSUMER_LAG: &str = "skysnap_consumer_lag_messages";
pub const CONSUMER_COMMITS: &str = "skysnap_consumer_commits_total";
pub const CONSUMER_BATCHES: &str = "skysnap_consumer_batches_total";
pub const CONSUMER_DEAD_LETTERED: &str = "skysnap_consumer_dead_lettered_total";
pub const CONSUMER_DEAD_LETTER_FAILURES: &str = "skysnap_consumer_dead_letter_failures_total";
pub const UPSTREAM_CALLS: &str = "skysnap_upstream_calls_total";
pub const UPSTREAM_MESSAGES: &str = "skysnap_upstream_messages_total";
pub const UPSTREAM_BYTES: &str = "skysnap_upstream_bytes_total";
pub const UPSTREAM_LATENCY: &str = "skysnap_upstream_latency_seconds";
pub const UPSTREAM_CHANNEL_UP: &str = "skysnap_upstream_up";
pub const UPSTREAM_REFUSED: &str = "skysnap_upstream_refused_total";
pub const TAP_ERRORS: &str = "skysnap_tap_errors_total";
pub const SEGMENTS_KEPT: &str = "skysnap_profiled_segments_kept_total";
pub const SEGMENTS_SKIPPED: &str = "skysnap_profiled_segments_skipped_total";
pub const TASK_LOOKUPS: &str = "skysnap_task_lookups_total";
pub const STREAMS_REFUSED: &str = "skysnap_grpc_streams_refused_total";
pub const ACTOR_PANICS: &str = "skysnap_actor_panics_total";
pub const STORE_TIMEOUTS: &str = "skysnap_store_timeouts_total";
pub const RETENTION_ROWS_REMOVED: &str = "skysnap_retention_rows_removed_total";

/// Which process records: every series carries it as its `role` label, so that the
/// pipeline series both roles emit (snapshots received and committed, sink writes) are
/// told apart — in Kafka mode a snapshot is committed once by a receiver (to the topic)
/// and once more by a consumer (to the store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `skysnap serve`.
    Receiver,
    /// `skysnap consume`.
    Consumer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Receiver => "receiver",
            Role::Consumer => "consumer",
        }
    }
}

/// How often the recorder drains histogram samples into their buckets. Without it the
/// samples pile up in memory while nothing scrapes (the crate leaves the timer to whoever
/// installs with `install_recorder`).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global recorder, labelling every series with the role, and starts its
/// upkeep timer; the returned handle renders `/metrics`.
pub fn install(role: Role) -> anyhow::Result<PrometheusHandle> {
    let handle = builder(role)?.install_recorder()?;
    let upkeep_handle = handle.clone();
    spawn_upkeep(UPKEEP_INTERVAL, move || upkeep_handle.run_upkeep())?;
    describe();
    register_zeros();
    gauge!("skysnap_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

/// The recorder's settings: the role label and the histogram buckets.
fn builder(role: Role) -> anyhow::Result<PrometheusBuilder> {
    Ok(PrometheusBuilder::new()
        .add_global_label("role", role.as_str())
        .set_buckets_for_metric(
            Matcher::Full(BATCH_FLUSH_DURATION.to_string()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_SIZE.to_string()),
            &[
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(UPSTREAM_LATENCY.to_string()),
            &[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )?)
}

/// Runs `upkeep` every `interval` on a thread of its own for the life of the process:
/// the recorder is process-wide, and a thread keeps the timer off the async runtimes
/// (serve's actix system, consume's tokio runtime) and outside their shutdown.
fn spawn_upkeep(
    interval: Duration,
    upkeep: impl Fn() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("skysnap-metrics-upkeep".to_string())
        .spawn(move || loop {
            std::thread::sleep(interval);
            upkeep();
        })
}

/// Reasons a snapshot is rejected as invalid (the `reason` label values).
pub const REJECT_REASONS: &[&str] = &[
    "empty_task_id",
    "empty_segment_id",
    "negative_sequence",
    "invalid_time",
    "stack_too_deep",
    "malformed",
];

/// gRPC codes a failed stream is counted under (`code` label of streams failed).
pub const STREAM_FAILURE_CODES: &[&str] = &[
    "invalid_argument",
    "unavailable",
    "out_of_range",
    "resource_exhausted",
    "cancelled",
    "other",
];

/// Reasons a valid snapshot is refused (not committed).
pub const REFUSE_REASONS: &[&str] = &[
    "sink_unavailable",
    "shutting_down",
    "overloaded",
    "stream_broken",
];

/// Makes every counter with a fixed label set visible at 0 from the start, so that
/// dashboards and `rate()` see a series before its first event.
fn register_zeros() {
    for name in [
        SNAPSHOTS_RECEIVED,
        SNAPSHOTS_COMMITTED,
        SNAPSHOTS_UNKNOWN_TASK,
        GRPC_UNAUTHENTICATED,
        TASKS_NOTIFIED,
        TASKS_CREATED,
        TASK_FINISH_UNKNOWN,
        TASK_LOGS_DROPPED,
        TASKS_NOTIFY_DEFERRED,
    ] {
        counter!(name).absolute(0);
    }
    for reason in REJECT_REASONS {
        counter!(SNAPSHOTS_REJECTED, "reason" => *reason).absolute(0);
    }
    for reason in REFUSE_REASONS {
        counter!(SNAPSHOTS_REFUSED, "reason" => *reason).absolute(0);
    }
    for code in STREAM_FAILURE_CODES {
        counter!(STREAMS_FAILED, "code" => *code).absolute(0);
    }
    for operation in ["NOTIFIED", "EXECUTION_FINISHED"] {
        counter!(TASK_LOGS_WRITTEN, "operation" => operation).absolute(0);
    }
    gauge!(STREAMS_ACTIVE).set(0.0);
    counter!(ACTOR_PANICS, "actor" => "shard").absolute(0);
    for reason in ["streams", "bytes"] {
        counter!(STREAMS_REFUSED, "reason" => reason).absolute(0);
    }
    for result in ["found", "missing", "error", "skipped"] {
        counter!(TASK_LOOKUPS, "result" => result).absolute(0);
    }
    for reason in SEGMENT_SKIP_REASONS {
        counter!(SEGMENTS_SKIPPED, "reason" => *reason).absolute(0);
    }
    counter!(SEGMENTS_KEPT).absolute(0);
}

/// Why a trace segment that may have been profiled was not kept.
pub const SEGMENT_SKIP_REASONS: &[&str] = &[
    "no_snapshots",
    "pending_full",
    "queue_full",
    "undecodable",
    "store_failed",
];

/// A sink's series, visible at 0 from the start.
pub fn register_sink_zeros(sink: &'static str) {
    for retriable in ["true", "false"] {
        counter!(SINK_ERRORS, "sink" => sink, "retriable" => retriable).absolute(0);
    }
    counter!(SINK_RETRIES, "sink" => sink).absolute(0);
    counter!(SINK_SNAPSHOTS_WRITTEN, "sink" => sink).absolute(0);
}

/// The `reason` of a dead-lettered valid snapshot the store refused for good; the
/// others are the rejection reasons of invalid messages (`REJECT_REASONS`).
pub const STORE_REFUSED: &str = "store_refused";

/// The consumer's own series, visible at 0 from its start.
pub fn register_consumer_zeros() {
    counter!(CONSUMER_BATCHES).absolute(0);
    for reason in REJECT_REASONS.iter().chain([&STORE_REFUSED]) {
        counter!(CONSUMER_DEAD_LETTERED, "reason" => *reason).absolute(0);
    }
    counter!(CONSUMER_DEAD_LETTER_FAILURES).absolute(0);
    for result in ["ok", "failed"] {
        counter!(CONSUMER_COMMITS, "result" => result).absolute(0);
    }
    gauge!(CONSUMER_LAG).set(0.0);
}

fn describe() {
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Messages of this consumer's partitions past the group's committed offsets"
    );
    describe_counter!(
        CONSUMER_COMMITS,
        Unit::Count,
        "Kafka offset commits after a stored batch, by result"
    );
    describe_counter!(
        CONSUMER_BATCHES,
        Unit::Count,
        "Batches the consumer stored (and dead-lettered) before committing their offsets"
    );
    describe_counter!(
        CONSUMER_DEAD_LETTERED,
        Unit::Count,
        "Messages sent to the dead-letter topic, by reason (a rejection reason, or store_refused)"
    );
    describe_counter!(
        CONSUMER_DEAD_LETTER_FAILURES,
        Unit::Count,
        "Failed deliveries to the dead-letter topic (the batch's offsets stay uncommitted; retried)"
    );
    describe_counter!(
        SNAPSHOTS_RECEIVED,
        Unit::Count,
        "Thread snapshots decoded from agent streams"
    );
    describe_counter!(
        SNAPSHOTS_COMMITTED,
        Unit::Count,
        "Snapshots committed to every configured sink"
    );
    describe_counter!(
        SNAPSHOTS_REJECTED,
        Unit::Count,
        "Snapshots refused as invalid, by reason"
    );
    describe_counter!(
        SNAPSHOTS_REFUSED,
        Unit::Count,
        "Valid snapshots not committed (their stream got UNAVAILABLE), by reason"
    );
    describe_counter!(
        SNAPSHOTS_UNKNOWN_TASK,
        Unit::Count,
        "Snapshots stored although their task id was unknown to this replica"
    );
    describe_gauge!(
        STREAMS_ACTIVE,
        Unit::Count,
        "collectSnapshot streams open now"
    );
    describe_counter!(
        STREAMS_FAILED,
        Unit::Count,
        "collectSnapshot streams that ended with an error, by gRPC code"
    );
    describe_counter!(
        GRPC_UNAUTHENTICATED,
        Unit::Count,
        "gRPC calls refused for a missing or wrong agent token"
    );
    describe_counter!(
        DISCARDED_MESSAGES,
        Unit::Count,
        "Agent messages accepted and dropped without an upstream, by service and method"
    );
    describe_counter!(
        UPSTREAM_CALLS,
        Unit::Count,
        "Calls forwarded to the upstream OAP, by service, method and gRPC code"
    );
    describe_counter!(
        UPSTREAM_MESSAGES,
        Unit::Count,
        "gRPC messages forwarded, by service, method and direction (request, response)"
    );
    describe_counter!(
        UPSTREAM_BYTES,
        Unit::Bytes,
        "Body bytes forwarded, by direction (sent to the upstream, received from it)"
    );
    describe_histogram!(
        UPSTREAM_LATENCY,
        Unit::Seconds,
        "From the agent's last request byte to the upstream's complete reply, by service"
    );
    describe_gauge!(
        UPSTREAM_CHANNEL_UP,
        Unit::Count,
        "1 while an upstream address takes calls, 0 while it is marked down"
    );
    describe_counter!(
        UPSTREAM_REFUSED,
        Unit::Count,
        "Calls not forwarded, by reason (all upstreams down, too many in flight)"
    );
    describe_counter!(
        TAP_ERRORS,
        Unit::Count,
        "Passing messages skysnap could not read (management, trace segments), by kind"
    );
    describe_counter!(
        SEGMENTS_KEPT,
        Unit::Count,
        "Trace segments with snapshots kept with their spans"
    );
    describe_counter!(
        SEGMENTS_SKIPPED,
        Unit::Count,
        "Trace segments that may have been profiled but were not kept, by reason"
    );
    describe_counter!(
        TASK_LOOKUPS,
        Unit::Count,
        "Store reads for task ids of snapshots no cache knew, by result (found, missing, error, skipped: over the rate limit)"
    );
    describe_counter!(
        STREAMS_REFUSED,
        Unit::Count,
        "collectSnapshot streams refused RESOURCE_EXHAUSTED, by limit (streams, bytes)"
    );
    describe_counter!(
        ACTOR_PANICS,
        Unit::Count,
        "Panics caught in an actor (its batch failed back UNAVAILABLE, the actor went on), by actor"
    );
    describe_counter!(
        STORE_TIMEOUTS,
        Unit::Count,
        "Store calls that got no answer within store.timeout_ms, by store and call"
    );
    describe_counter!(
        BATCHES_FLUSHED,
        Unit::Count,
        "Shard batches closed, by reason"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Snapshots per flushed batch");
    describe_histogram!(
        BATCH_FLUSH_DURATION,
        Unit::Seconds,
        "Time to commit one batch to a sink, retries included"
    );
    describe_counter!(
        SINK_ERRORS,
        Unit::Count,
        "Failed sink writes, by sink and retriable"
    );
    describe_counter!(SINK_RETRIES, Unit::Count, "Sink writes retried, by sink");
    describe_counter!(
        TASKS_NOTIFIED,
        Unit::Count,
        "ProfileTaskQuery commands handed to agents"
    );
    describe_counter!(
        TASKS_NOTIFY_DEFERRED,
        Unit::Count,
        "Commands held back to the agent's next poll because the task log writer was full"
    );
    describe_counter!(
        TASK_LOGS_WRITTEN,
        Unit::Count,
        "Task log rows written, by operation"
    );
    describe_counter!(
        TASK_LOGS_DROPPED,
        Unit::Count,
        "Task log rows given up after the store stayed down"
    );
    describe_counter!(
        TASK_FINISH_UNKNOWN,
        Unit::Count,
        "reportTaskFinish calls for a task id no store knows"
    );
    describe_counter!(
        TASK_CACHE_LOOKUPS,
        Unit::Count,
        "Task cache lookups, by cache and result"
    );
    describe_gauge!(
        TASK_CACHE_SIZE,
        Unit::Count,
        "Entries in the task caches, by cache"
    );
    describe_counter!(
        TASKS_CREATED,
        Unit::Count,
        "Profile tasks created through this replica"
    );
}

pub fn dead_lettered(reason: &'static str) {
    counter!(CONSUMER_DEAD_LETTERED, "reason" => reason).increment(1);
}

pub fn snapshot_rejected(reason: &'static str) {
    counter!(SNAPSHOTS_REJECTED, "reason" => reason).increment(1);
}

pub fn snapshots_refused(reason: &'static str, count: usize) {
    counter!(SNAPSHOTS_REFUSED, "reason" => reason).increment(count as u64);
}

pub fn sink_error(sink: &'static str, retriable: bool) {
    let retriable = if retriable { "true" } else { "false" };
    counter!(SINK_ERRORS, "sink" => sink, "retriable" => retriable).increment(1);
}

pub fn sink_retry(sink: &'static str) {
    counter!(SINK_RETRIES, "sink" => sink).increment(1);
}

pub fn cache_lookup(cache: &'static str, hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    counter!(TASK_CACHE_LOOKUPS, "cache" => cache, "result" => result).increment(1);
}

pub fn cache_size(cache: &'static str, entries: usize) {
    gauge!(TASK_CACHE_SIZE, "cache" => cache).set(entries as f64);
}

pub fn batch_closed(reason: &'static str) {
    counter!(BATCHES_FLUSHED, "reason" => reason).increment(1);
}

pub fn batch_written(sink: &'static str, size: usize, seconds: f64) {
    counter!(SINK_SNAPSHOTS_WRITTEN, "sink" => sink).increment(size as u64);
    histogram!(BATCH_SIZE, "sink" => sink).record(size as f64);
    histogram!(BATCH_FLUSH_DURATION, "sink" => sink).record(seconds);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn test_metrics_every_series_carries_the_role() {
        let recorder = builder(Role::Consumer).unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            counter!(SNAPSHOTS_COMMITTED).increment(3);
            batch_written("sqlite", 3, 0.01);
        });
        let text = handle.render();
        assert!(
            text.contains("skysnap_snapshots_committed_total{role=\"consumer\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("skysnap_batch_size_snapshots_bucket{role=\"consumer\",sink=\"sqlite\""),
            "{text}"
        );
    }

    #[test]
    fn test_metrics_upkeep_runs_on_its_timer() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        spawn_upkeep(Duration::from_millis(10), move || {
            counted.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        let started = std::time::Instant::now();
        while runs.load(Ordering::SeqCst) < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "upkeep ran {} times",
                runs.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
