//! The retention actor: on a timer, removes records whose time bucket is older than
//! `retention.days` (SQLite: chunked deletes; ClickHouse without TTL: dropped
//! partitions; ClickHouse with TTL: nothing to do).

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::supervision::catch_future;
use crate::model::now_ms;
use crate::store::{Store, StoreError};

/// Runs one retention pass now; answers the rows removed.
#[derive(Message)]
#[rtype(result = "Result<u64, StoreError>")]
pub struct RunRetention;

pub struct RetentionActor {
    store: Arc<dyn Store>,
    retention: Duration,
    interval: Duration,
}

impl RetentionActor {
    pub fn new(store: Arc<dyn Store>, days: u32, interval: Duration) -> RetentionActor {
        RetentionActor {
            store,
            retention: Duration::from_secs(u64::from(days) * 24 * 3_600),
            interval,
        }
    }
}

impl Actor for RetentionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.interval, |_actor, ctx| ctx.notify(RunRetention));
    }
}

impl Handler<RunRetention> for RetentionActor {
    type Result = AtomicResponse<Self, Result<u64, StoreError>>;

    fn handle(&mut self, _message: RunRetention, _ctx: &mut Self::Context) -> Self::Result {
        let store = self.store.clone();
        let cutoff_ms = now_ms() - i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let pass = async move {
            let result = store.remove_expired(cutoff_ms).await;
            match &result {
                Ok(removed) => {
                    metrics::counter!(crate::telemetry::RETENTION_ROWS_REMOVED, "store" => store.kind()).increment(*removed);
                    if *removed > 0 {
                        tracing::info!(removed, cutoff_ms, "expired records removed");
                    }
                }
                Err(error) => tracing::warn!(%error, "retention pass failed; next pass retries"),
            }
            result
        };
        // Holds no state: a panic in a pass is caught, reported and counted, and the
        // next pass runs as usual.
        let pass = async move {
            catch_future("retention", pass).await.unwrap_or_else(|()| {
                Err(StoreError::Unavailable(
                    "the retention pass panicked".into(),
                ))
            })
        };
        AtomicResponse::new(Box::pin(pass.into_actor(self)))
    }
}
