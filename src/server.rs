//! `skysnap serve`: opens the store, starts the pipeline and the three listeners, and
//! shuts down in a fixed order on SIGTERM/SIGINT: stop accepting, let open streams
//! finish, flush every shard and the task log, stop the actors.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Config, StoreKind};
use crate::http::{self, AppState};
use crate::pipeline::{sinks_for, Pipeline};
use crate::store::clickhouse::ClickHouseStore;
use crate::store::sqlite::SqliteStore;
use crate::store::Store;
use crate::{grpc, metrics};

/// Runs the service until a signal; returns whether everything was flushed.
pub fn run(config: Config) -> anyhow::Result<bool> {
    // Request handlers run on a multi-threaded runtime; each actor Arbiter has its own
    // thread.
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("skysnap-io")
            .build()
            .expect("tokio runtime")
    });
    system.block_on(serve(config))
}

/// Opens the configured store, every call of it bounded by `store.timeout_ms`.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let limit = Duration::from_millis(config.store.timeout_ms);
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
                SqliteStore::open_with(&path, readers, busy_timeout, synchronous)
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
            let connect = ClickHouseStore::connect(&config.clickhouse, config.retention.days);
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
            Ok(Arc::new(store))
        }
    }
}

async fn bind(key: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {key} {addr}"))
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

async fn serve(config: Config) -> anyhow::Result<bool> {
    let prometheus = metrics::install(metrics::Role::Receiver)?;
    let store = open_store(&config).await?;
    let grpc_listener = bind("grpc.addr", config.grpc.addr).await?;
    let http_listener = bind("http.addr", config.http.addr).await?;
    let metrics_listener = bind("metrics.addr", config.metrics.addr).await?;

    let pipeline = Pipeline::spawn(&config, store.clone(), sinks_for(&config, store)?);
    pipeline.warm_up().await;

    let (stop_sender, stop) = watch::channel(false);
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;
    let grpc_config = config.clone();
    let grpc_handles = pipeline.handles.clone();
    let in_flight = Arc::new(grpc::InFlight::default());
    let mut grpc_task = tokio::spawn({
        let stop = stop.clone();
        let in_flight = in_flight.clone();
        async move {
            grpc::serve(
                &grpc_config,
                grpc_handles,
                in_flight,
                grpc_listener,
                stopped(stop),
            )
            .await
        }
    });
    let state = AppState {
        handles: pipeline.handles.clone(),
        admin_token: config.auth.admin_token.as_deref().map(Arc::<str>::from),
        max_snapshots_per_response: config.http.max_snapshots_per_response,
        analysis: config.analysis.clone(),
        analysis_permits: Arc::new(tokio::sync::Semaphore::new(
            config.analysis.max_concurrent_requests,
        )),
    };
    let http_task = tokio::spawn(http::serve(http_listener, state, stopped(stop.clone())));
    let metrics_task = tokio::spawn(http::serve_metrics(
        metrics_listener,
        prometheus,
        stopped(stop.clone()),
    ));

    tracing::info!(%grpc_addr, %http_addr, %metrics_addr, shards = pipeline.handles.shards.len(), "skysnap serving");
    // One line on stdout for scripts and tests that start skysnap on port 0.
    let stop_signal = signal();
    println!("skysnap ready grpc={grpc_addr} http={http_addr} metrics={metrics_addr}");

    let early_exit = tokio::select! {
        _ = stop_signal => None,
        result = &mut grpc_task => Some(result),
    };
    let grace = Duration::from_millis(config.shutdown.grace_ms);
    let deadline = Instant::now() + grace;
    let _ = stop_sender.send(true);
    if let Some(result) = early_exit {
        // The gRPC server ended without a signal: flush what was accepted, then fail.
        let _ = pipeline.drain().await;
        result??;
        anyhow::bail!("gRPC server stopped unexpectedly");
    }

    // Open calls may finish (their snapshots commit through the running shards); keep
    // a quarter of the grace period for the final flush. Agents keep their connections
    // open, so wait for the calls, not for the connections.
    let calls_deadline = deadline - grace / 4;
    tokio::time::sleep(Duration::from_millis(50)).await;
    if tokio::time::timeout_at(calls_deadline, in_flight.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            calls = in_flight.count(),
            "open calls did not finish within the grace period; cutting them"
        );
    }
    if tokio::time::timeout(Duration::from_millis(200), &mut grpc_task)
        .await
        .is_err()
    {
        grpc_task.abort();
    }
    let clean = match tokio::time::timeout_at(deadline, pipeline.drain()).await {
        Ok(clean) => clean,
        Err(_) => {
            tracing::error!("final flush did not finish within shutdown.grace_ms");
            false
        }
    };
    for task in [http_task, metrics_task] {
        if tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .is_err()
        {
            tracing::warn!("an HTTP listener did not stop in time");
        }
    }
    tracing::info!(clean, "skysnap stopped");
    actix_rt::System::current().stop();
    Ok(clean)
}
