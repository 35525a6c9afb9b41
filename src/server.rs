//! `skysnap serve`: opens the store, starts the pipeline and the three listeners, and
//! shuts down in a fixed order on SIGTERM/SIGINT: stop accepting, let open streams
//! finish, flush every shard and the task log, stop the actors.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::pipeline::{sinks_for, Pipeline};
use crate::process::{open_store, signal, stopped};
use crate::{grpc, telemetry};

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

async fn bind(key: &str, addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {key} {addr}"))
}

async fn serve(config: Config) -> anyhow::Result<bool> {
    let prometheus = telemetry::install(telemetry::Role::Receiver)?;
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
            config.analysis.max_concurrent_requests.get(),
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
