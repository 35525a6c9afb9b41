//! What `serve` and `consume` share as processes: opening the configured store, and the
//! signals that stop them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::config::{Config, StoreKind};
use crate::store::clickhouse::ClickHouseStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;

/// Opens the configured store, every call of it bounded by `store.timeout_ms`.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let limit = Duration::from_millis(config.store.timeout_ms.get());
    let store = open_unbounded_store(config, limit).await?;
    Ok(crate::store::timeout::TimeoutStore::wrap(store, limit))
}

async fn open_unbounded_store(config: &Config, limit: Duration) -> anyhow::Result<Arc<dyn Store>> {
    match config.store.kind {
        StoreKind::Sqlite => {
            let path = config.sqlite.path.clone();
            let readers = config.sqlite.read_connections;
            let busy_timeout = Duration::from_millis(config.sqlite.busy_timeout_ms);
            let synchronous = config.sqlite.synchronous;
            let store = tokio::task::spawn_blocking(move || {
                SqliteStore::open_with(&path, readers.get(), busy_timeout, synchronous)
            })
            .await?
            .with_context(|| format!("cannot open sqlite.path {}", config.sqlite.path.display()))?;
            tracing::info!(path = %config.sqlite.path.display(), synchronous = synchronous.pragma(), "sqlite store open");
            Ok(Arc::new(store))
        }
        StoreKind::Clickhouse => {
            // Start-up reads the version and may create the schema (many statements):
            // bounded too, but not by one call's limit.
            let startup_limit = limit.max(Duration::from_secs(30));
            let connect = ClickHouseStore::connect(&config.clickhouse, config.retention.days.get());
            let store = tokio::time::timeout(startup_limit, connect)
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "no answer within {} s while connecting and creating the schema",
                        startup_limit.as_secs()
                    )
                })
                .and_then(|result| result.map_err(anyhow::Error::from))
                .with_context(|| format!("cannot use clickhouse.url {}", config.clickhouse.url))?;
            // As long as it takes: it reports its progress, and nothing is served before.
            store.migrate_earlier_layout().await.with_context(|| {
                format!(
                    "cannot move the earlier snapshot table of {} into the stack dictionary",
                    config.clickhouse.database
                )
            })?;
            Ok(Arc::new(store))
        }
    }
}

pub async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Resolves on SIGTERM or SIGINT. The SIGTERM handler is installed when this is called,
/// not when the future is first polled: call it before telling anyone the process is
/// ready, or a SIGTERM in between kills the process instead of draining it.
pub fn signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    async move {
        #[cfg(unix)]
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
