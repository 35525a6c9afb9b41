//! The "gRPC limit" baseline: a bare tonic server for `skywalking.v3.ProfileTask`
//! that decodes every snapshot of a `collectSnapshot` stream and drops it. No
//! validation, no actors, no store, no metrics: what is left is HTTP/2 + prost.
//!
//! The server is built with the settings skysnap's gRPC server uses (see
//! `src/grpc/mod.rs`): max_concurrent_streams 1024, a 4 MiB decoding limit per message
//! (`grpc.max_message_bytes`), gzip accepted, connections served from a plain tokio
//! listener.
//!
//!   cargo run --release --example bare_grpc -- --addr 127.0.0.1:0
//!   target/release/skysnap load --target http://<addr> --duration 5s
//!
//! Prints `bare_grpc ready grpc=<addr>` once listening, and
//! `bare_grpc snapshots=<count>` on SIGTERM/SIGINT before exiting 0.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use skysnap::config::GrpcConfig;
use skysnap::proto::v3::profile_task_server::{ProfileTask, ProfileTaskServer};
use skysnap::proto::v3::{
    Commands, ProfileTaskCommandQuery, ProfileTaskFinishReport, ThreadSnapshot,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Parser)]
#[command(about = "Bare tonic ProfileTask server: decodes and drops snapshots")]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed at start-up).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
}

#[derive(Default)]
struct BareProfileTask {
    snapshots: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl ProfileTask for BareProfileTask {
    async fn get_profile_task_commands(
        &self,
        _request: Request<ProfileTaskCommandQuery>,
    ) -> Result<Response<Commands>, Status> {
        Ok(Response::new(Commands::default()))
    }

    async fn collect_snapshot(
        &self,
        request: Request<Streaming<ThreadSnapshot>>,
    ) -> Result<Response<Commands>, Status> {
        let mut stream = request.into_inner();
        let mut count = 0u64;
        while let Some(snapshot) = stream.message().await? {
            drop(snapshot);
            count += 1;
        }
        self.snapshots.fetch_add(count, Ordering::Relaxed);
        Ok(Response::new(Commands::default()))
    }

    async fn report_task_finish(
        &self,
        _request: Request<ProfileTaskFinishReport>,
    ) -> Result<Response<Commands>, Status> {
        Ok(Response::new(Commands::default()))
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called,
/// not when the future is first polled, so a signal sent as soon as the ready line is
/// out is already caught.
#[cfg(unix)]
fn signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // skysnap's defaults for the gRPC server.
    let grpc = GrpcConfig::default();

    let listener = TcpListener::bind(args.addr).await?;
    let addr = listener.local_addr()?;
    let service = BareProfileTask::default();
    let snapshots = service.snapshots.clone();

    let signal = signal()?;
    let (stop_sender, stop) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        Server::builder()
            .max_concurrent_streams(grpc.max_concurrent_streams)
            .add_service(
                ProfileTaskServer::new(service)
                    .max_decoding_message_size(grpc.max_message_bytes)
                    .accept_compressed(CompressionEncoding::Gzip),
            )
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stop.await;
            }),
    );

    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "bare_grpc ready grpc={addr}")?;
        stdout.flush()?;
    }

    tokio::select! {
        _ = signal => {}
        result = &mut server => {
            result??;
            anyhow::bail!("gRPC server stopped unexpectedly");
        }
    }
    let _ = stop_sender.send(());
    // Open streams may finish; clients keeping idle connections must not hold us up.
    if tokio::time::timeout(Duration::from_secs(2), &mut server)
        .await
        .is_err()
    {
        server.abort();
    }

    let mut stdout = std::io::stdout().lock();
    writeln!(
        stdout,
        "bare_grpc snapshots={}",
        snapshots.load(Ordering::Relaxed)
    )?;
    stdout.flush()?;
    Ok(())
}
