//! Where shard batches go. A sink writes one batch and says whether a failure may pass
//! (retriable) or not (final); `retry` decides how long to keep trying.

pub mod kafka;
pub mod retry;
pub mod store;

use async_trait::async_trait;

use crate::model::SnapshotRecord;

#[derive(Debug, Clone, thiserror::Error)]
#[error("sink {sink} failed: {message}")]
pub struct SinkError {
    pub sink: &'static str,
    pub message: String,
    /// Whether the same batch may succeed if written again later.
    pub retriable: bool,
}

#[async_trait]
pub trait SnapshotSink: Send + Sync + 'static {
    /// Short name for logs and the `sink` metric label.
    fn name(&self) -> &'static str;

    /// Writes the whole batch, or fails without a partial write being visible as missing
    /// data (a retried batch may re-write rows; stores collapse them by key).
    async fn write(&self, batch: &[SnapshotRecord]) -> Result<(), SinkError>;

    /// The largest batch this sink takes best, if it has a preference; a shard's batch
    /// cap is the smallest preference of its sinks unless configured.
    fn max_batch_snapshots(&self) -> Option<usize> {
        None
    }

    /// Whether the sink sends snapshots on as the agent encoded them: then the receiver
    /// keeps each message's bytes in its record (`SnapshotRecord::encoded`).
    fn wants_encoded(&self) -> bool {
        false
    }

    /// Whether the sink can take writes now (for `/readyz`).
    async fn ready(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Hands over whatever the sink still buffers; called once at shutdown.
    async fn close(&self) {}
}

/// Accepts and forgets everything: the baseline for benchmarks of the pipeline itself.
pub struct NullSink;

#[async_trait]
impl SnapshotSink for NullSink {
    fn name(&self) -> &'static str {
        "null"
    }

    async fn write(&self, _batch: &[SnapshotRecord]) -> Result<(), SinkError> {
        Ok(())
    }
}
