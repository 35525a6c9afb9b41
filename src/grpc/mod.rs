//! The agent-facing gRPC server: `ProfileTask` is skysnap's own (`profile.rs`, statuses
//! mapped in `status`); every other path goes to `crate::upstream`'s passthrough.

pub mod profile;
pub mod raw;
pub mod snapshots;
pub mod status;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt as _;
use tonic::codec::CompressionEncoding;
use tonic::service::{InterceptorLayer, Routes};
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};

use crate::config::Config;
use crate::pipeline::Handles;
use crate::proto::compat;
use crate::proto::v3::profile_task_server::ProfileTaskServer;
use crate::telemetry::GRPC_UNAUTHENTICATED;
use crate::upstream::tap::Taps;
use crate::upstream::Passthrough;

/// Calls being handled now. Shutdown waits for this to reach zero rather than for
/// agents to close their connections, which they keep open for as long as they run.
#[derive(Default)]
pub struct InFlight {
    calls: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held by a handler for the length of one call.
pub struct InFlightGuard(Arc<InFlight>);

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Resolves once no call is being handled.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self
            .0
            .calls
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// SkyWalking agents send their token in this metadata key.
pub const AUTH_METADATA_KEY: &str = "authentication";

/// Refuses calls without the configured agent token (none configured: all pass).
fn check_token(
    expected: Option<Arc<str>>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let Some(expected) = &expected else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get(AUTH_METADATA_KEY)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            Ok(request)
        } else {
            metrics::counter!(GRPC_UNAUTHENTICATED).increment(1);
            Err(Status::unauthenticated(
                "missing or wrong authentication token",
            ))
        }
    }
}

/// Compares without an early exit, so the time taken says nothing about the token.
pub fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = given.len() ^ expected.len();
    for (index, byte) in expected.iter().enumerate() {
        difference |= usize::from(byte ^ given.get(index).copied().unwrap_or(0));
    }
    difference == 0
}

/// Serves every agent service on the listener until `shutdown` resolves; from then on
/// no new connection or stream is accepted (open connections get GOAWAY).
pub async fn serve(
    config: &Config,
    handles: Handles,
    in_flight: Arc<InFlight>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let limit = config.grpc.max_message_bytes;
    let profile = profile::ProfileService::new(handles.clone(), in_flight.clone(), config);
    let mut builder = Server::builder().max_concurrent_streams(config.grpc.max_concurrent_streams);
    if let (Some(cert_path), Some(key_path)) =
        (&config.grpc.tls_cert_path, &config.grpc.tls_key_path)
    {
        let cert = std::fs::read(cert_path).map_err(|error| {
            anyhow::anyhow!(
                "cannot read grpc.tls_cert_path {}: {error}",
                cert_path.display()
            )
        })?;
        let key = std::fs::read(key_path).map_err(|error| {
            anyhow::anyhow!(
                "cannot read grpc.tls_key_path {}: {error}",
                key_path.display()
            )
        })?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|error| anyhow::anyhow!("invalid gRPC TLS configuration: {error}"))?;
    }
    let token = config.auth.agent_token.as_deref().map(Arc::<str>::from);
    let taps = Taps::new(handles.instances.clone(), handles.segments.clone(), limit);
    let passthrough = Passthrough::new(&config.upstream, taps, in_flight)?;

    let limited = |server: ProfileTaskServer<profile::ProfileService>| {
        server
            .max_decoding_message_size(limit)
            .accept_compressed(CompressionEncoding::Gzip)
    };
    let compat = compat::profile_task_server::ProfileTaskServer::new(profile.clone())
        .max_decoding_message_size(limit)
        .accept_compressed(CompressionEncoding::Gzip);
    // skysnap answers ProfileTask (both names) itself; every other path, known or not,
    // goes to the passthrough: forwarded upstream, or answered here and counted.
    let collect_route = snapshots::CollectSnapshotRoute::new(profile.clone(), limit);
    let mut routes = Routes::new(limited(ProfileTaskServer::new(profile)))
        .add_service(compat)
        .into_axum_router();
    // The snapshot streams take the in-place decoder; axum matches these exact paths
    // before the services' wildcard routes.
    for path in snapshots::COLLECT_SNAPSHOT_PATHS {
        routes = routes.route_service(path, collect_route.clone());
    }
    let routes = routes.fallback_service(passthrough);
    // No Nagle on agent connections: a reply skysnap writes in parts (a forwarded reply's
    // headers, message and trailers arrive from the upstream one by one) would otherwise
    // wait for the agent's delayed ACK, 40 ms on Linux, after its first part.
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY on an agent connection");
            }
        })
    });
    builder
        .layer(InterceptorLayer::new(check_token(token)))
        .add_routes(Routes::from(routes))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_auth_token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn test_auth_interceptor() {
        let mut open = check_token(None);
        assert!(open(Request::new(())).is_ok());
        let mut guarded = check_token(Some(Arc::from("tok")));
        assert_eq!(
            guarded(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert(AUTH_METADATA_KEY, "tok".parse().unwrap());
        assert!(guarded(request).is_ok());
    }
}
