//! The sink that commits batches to the configured store (SQLite or ClickHouse).

use std::sync::Arc;

use async_trait::async_trait;

use super::{SinkError, SnapshotSink};
use crate::model::SnapshotRecord;
use crate::store::Store;

pub struct StoreSink {
    store: Arc<dyn Store>,
}

impl StoreSink {
    pub fn new(store: Arc<dyn Store>) -> StoreSink {
        StoreSink { store }
    }
}

#[async_trait]
impl SnapshotSink for StoreSink {
    fn name(&self) -> &'static str {
        self.store.kind()
    }

    async fn write(&self, batch: &[SnapshotRecord]) -> Result<(), SinkError> {
        self.store
            .insert_snapshots(batch)
            .await
            .map_err(|error| SinkError {
                sink: self.store.kind(),
                retriable: error.is_retriable(),
                message: error.to_string(),
            })
    }

    fn max_batch_snapshots(&self) -> Option<usize> {
        Some(self.store.batch_snapshots())
    }

    async fn ready(&self) -> Result<(), SinkError> {
        self.store.ping().await.map_err(|error| SinkError {
            sink: self.store.kind(),
            retriable: error.is_retriable(),
            message: error.to_string(),
        })
    }
}
