//! Wires the actors sink-first: sinks, then the shards that write to them (one per
//! Arbiter thread), then the caches, the registry and the log writer. The handles are
//! what the gRPC and HTTP layers talk to; `drain` is the shutdown flush.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::actors::instances::InstanceRegistry;
use crate::actors::retention::RetentionActor;
use crate::actors::shard::{BatchLimits, CloseReason, Flush, SnapshotShard};
use crate::actors::sink::kafka::KafkaSink;
use crate::actors::sink::retry::RetryPolicy;
use crate::actors::sink::store::StoreSink;
use crate::actors::sink::{NullSink, SnapshotSink};
use crate::actors::task_by_id::TaskByIdCache;
use crate::actors::task_cache::{Refresh, TaskCacheActor};
use crate::actors::task_log::{FlushLogs, TaskLogWriter};
use crate::actors::task_registry::TaskRegistry;
use crate::config::{Config, PipelineMode};
use crate::segments::SegmentCapture;
use crate::store::Store;

/// Addresses of the running actors, cloned into every request handler.
#[derive(Clone)]
pub struct Handles {
    pub shards: Arc<[Addr<SnapshotShard>]>,
    pub task_cache: Addr<TaskCacheActor>,
    pub by_id: Addr<TaskByIdCache>,
    pub task_log: Addr<TaskLogWriter>,
    pub registry: Addr<TaskRegistry>,
    pub instances: Addr<InstanceRegistry>,
    pub retention: Addr<RetentionActor>,
    pub store: Arc<dyn Store>,
    /// Keeps the trace segments that have snapshots; fed by the profile handler (which
    /// segments have snapshots) and by the gRPC passthrough's tap (the segments).
    pub segments: SegmentCapture,
    /// Where shards commit batches; asked by `/readyz`.
    pub sinks: Arc<[Arc<dyn SnapshotSink>]>,
}

/// The running pipeline: the handles plus the threads its actors live on.
pub struct Pipeline {
    pub handles: Handles,
    arbiters: Vec<Arbiter>,
}

impl Pipeline {
    /// Starts every actor; must run inside an actix `System`. `sinks` is where shards
    /// commit batches (the store, plus Kafka or a null sink where configured).
    pub fn spawn(
        config: &Config,
        store: Arc<dyn Store>,
        sinks: Vec<Arc<dyn SnapshotSink>>,
    ) -> Pipeline {
        for sink in &sinks {
            crate::telemetry::register_sink_zeros(sink.name());
        }
        let sinks: Arc<[Arc<dyn SnapshotSink>]> = Arc::from(sinks);
        // Unset, a batch is capped where its sinks prefer (ClickHouse's large INSERTs);
        // without a preference (Kafka batches by itself, discard), at 20,000.
        let max_snapshots = match config.pipeline.batch_max_snapshots {
            0 => sinks
                .iter()
                .filter_map(|sink| sink.max_batch_snapshots())
                .min()
                .unwrap_or(20_000),
            configured => configured,
        };
        let limits = BatchLimits {
            max_snapshots,
            max_bytes: config.pipeline.batch_max_bytes.get(),
            linger: Duration::from_millis(config.pipeline.batch_linger_ms),
            max_commits_in_flight: config.pipeline.shard_commits_in_flight.get(),
        };
        let retry = RetryPolicy::from_config(&config.sink);
        let shard_sinks = sinks.clone();
        let mut arbiters = Vec::new();
        let mut shards = Vec::new();
        for shard_index in 0..config.shard_count() {
            let arbiter = Arbiter::new();
            let (sinks, limits, retry) = (shard_sinks.clone(), limits.clone(), retry.clone());
            let capacity = config.pipeline.shard_mailbox_capacity;
            shards.push(SnapshotShard::start_in_arbiter(
                &arbiter.handle(),
                move |_ctx| SnapshotShard::new(shard_index, sinks, limits, retry, capacity.get()),
            ));
            arbiters.push(arbiter);
        }

        // The caches, registry and log writer are light; they share one thread.
        let control = Arbiter::new();
        let (segments, segment_writer) = SegmentCapture::new(&config.segments, store.clone());
        control.spawn(segment_writer.run());
        let tasks = config.tasks.clone();
        let cache_store = store.clone();
        let cache_segments = segments.clone();
        let task_cache = Supervisor::start_in_arbiter(&control.handle(), move |_ctx| {
            TaskCacheActor::new(
                cache_store,
                Duration::from_millis(tasks.cache_refresh_interval_ms.get()),
                Duration::from_millis(tasks.cache_expire_ms),
                tasks.cache_max_services.get(),
                cache_segments,
            )
        });
        let by_id_store = store.clone();
        let by_id_size = config.tasks.by_id_cache_size;
        let by_id = Supervisor::start_in_arbiter(&control.handle(), move |_ctx| {
            TaskByIdCache::new(by_id_store, by_id_size.get())
        });
        let log_store = store.clone();
        let tasks = config.tasks.clone();
        let task_log = Supervisor::start_in_arbiter(&control.handle(), move |_ctx| {
            TaskLogWriter::new(
                log_store,
                Duration::from_millis(tasks.log_flush_interval_ms.get()),
                tasks.log_dedup_capacity,
            )
        });
        let registry_store = store.clone();
        let (registry_cache, registry_by_id) = (task_cache.clone(), by_id.clone());
        let registry = TaskRegistry::start_in_arbiter(&control.handle(), move |_ctx| {
            TaskRegistry::new(registry_store, registry_cache, registry_by_id)
        });
        let instances_config = config.instances.clone();
        let instances = Supervisor::start_in_arbiter(&control.handle(), move |_ctx| {
            InstanceRegistry::new(
                instances_config.live_window_ms,
                instances_config.max_instances,
            )
        });
        let retention_store = store.clone();
        let retention_config = config.retention.clone();
        let retention = RetentionActor::start_in_arbiter(&control.handle(), move |_ctx| {
            RetentionActor::new(
                retention_store,
                retention_config.days.get(),
                Duration::from_millis(retention_config.check_interval_ms.get()),
            )
        });
        arbiters.push(control);

        Pipeline {
            handles: Handles {
                shards: Arc::from(shards),
                task_cache,
                by_id,
                task_log,
                registry,
                instances,
                retention,
                store,
                segments,
                sinks,
            },
            arbiters,
        }
    }

    /// Loads the downstream cache before agents are served, so a restarted replica
    /// hands out running tasks at once.
    pub async fn warm_up(&self) {
        match self.handles.task_cache.send(Refresh).await {
            Ok(Ok(loaded)) => tracing::info!(tasks = loaded, "task cache loaded"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "task cache not loaded; retrying on its timer")
            }
            Err(error) => tracing::warn!(%error, "task cache actor unreachable"),
        }
    }

    /// Commits every open batch and pending task log, then stops the actor threads.
    /// Call after the servers stopped accepting.
    pub async fn drain(self) -> bool {
        let mut clean = true;
        for (index, shard) in self.handles.shards.iter().enumerate() {
            match shard
                .send(Flush {
                    reason: CloseReason::Shutdown,
                })
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::error!(shard = index, %error, "final flush failed");
                    clean = false;
                }
                Err(error) => {
                    tracing::error!(shard = index, %error, "shard unreachable at shutdown");
                    clean = false;
                }
            }
        }
        match self.handles.task_log.send(FlushLogs).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(%error, "final task log flush failed");
                clean = false;
            }
            Err(error) => {
                tracing::error!(%error, "task log writer unreachable at shutdown");
                clean = false;
            }
        }
        for sink in self.handles.sinks.iter() {
            sink.close().await;
        }
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        clean
    }
}

/// The sinks of a configuration: `direct` writes to the store, then (when brokers are
/// set) copies to Kafka; `kafka` writes to Kafka only; `discard` drops every batch.
pub fn sinks_for(
    config: &Config,
    store: Arc<dyn Store>,
) -> anyhow::Result<Vec<Arc<dyn SnapshotSink>>> {
    if config.pipeline.mode == PipelineMode::Discard {
        tracing::warn!("pipeline.mode is discard: snapshots are acknowledged but not stored");
        return Ok(vec![Arc::new(NullSink)]);
    }
    let mut sinks: Vec<Arc<dyn SnapshotSink>> = Vec::new();
    if config.pipeline.mode == PipelineMode::Direct {
        sinks.push(Arc::new(StoreSink::new(store)));
    }
    if config.kafka_enabled() {
        let kafka = KafkaSink::new(&config.kafka).map_err(|error| {
            anyhow::anyhow!("cannot use kafka.brokers {}: {error}", config.kafka.brokers)
        })?;
        sinks.push(Arc::new(kafka));
    }
    Ok(sinks)
}
