//! Forwarding to an upstream OAP, against the real `skysnap serve` binary. The upstream
//! here is a small in-test HTTP/2 gRPC server that records exactly what reached it and
//! answers as told (echo, a chosen status, silence), or a second real skysnap; the real
//! SkyWalking OAP is exercised by tests/e2e/test_oap.py.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use skysnap::proto::v3::management_service_client::ManagementServiceClient;
use skysnap::proto::v3::{Commands, InstancePingPkg, ProfileTaskCommandQuery};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Server as TonicServer};

use common::{snapshot, snapshot_rows, Server};
use skysnap::grpc::raw::RawCodec;

/// What the fake upstream saw of one call.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Replies with the request body as its own (the same gRPC frames; for other than
    /// made-up services an empty message), header `x-reply`, and the status asked for in
    /// `x-want-status` with trailer `x-trailer`.
    Echo,
    /// Takes the call and never answers.
    Silent,
}

struct FakeUpstream {
    address: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    calls: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    async fn start(behaviour: Behaviour) -> FakeUpstream {
        FakeUpstream::start_with(behaviour, None, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_with(
        behaviour: Behaviour,
        tls_opt: Option<tonic::transport::ServerTlsConfig>,
        bind: SocketAddr,
    ) -> FakeUpstream {
        // A port just given up may take a moment to be free again.
        let listener = loop {
            match tokio::net::TcpListener::bind(bind).await {
                Ok(listener) => break listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (handler_seen, handler_calls) = (seen.clone(), calls.clone());
        let handler = move |request: http::Request<axum::body::Body>| {
            let (seen, calls) = (handler_seen.clone(), handler_calls.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let (parts, body) = request.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push(Seen {
                    path: parts.uri.path().to_string(),
                    headers: parts.headers.clone(),
                    body: body.clone(),
                });
                if behaviour == Behaviour::Silent {
                    std::future::pending::<()>().await;
                }
                let status = parts
                    .headers
                    .get("x-want-status")
                    .map(|value| value.to_str().unwrap().to_string())
                    .unwrap_or_else(|| "0".into());
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_str(&status).unwrap());
                trailers.insert("grpc-message", HeaderValue::from_static("echo%20says%20so"));
                trailers.insert("x-trailer", HeaderValue::from_static("t"));
                // Echoes the frames of made-up services; others get an empty message,
                // the reply every SkyWalking method accepts.
                let reply = if parts.uri.path().starts_with("/made.up") {
                    body
                } else {
                    Bytes::from_static(&[0, 0, 0, 0, 0])
                };
                let frames = vec![
                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(reply)),
                    Ok(http_body::Frame::trailers(trailers)),
                ];
                http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("x-reply", "r")
                    .body(axum::body::Body::new(http_body_util::StreamBody::new(
                        futures::stream::iter(frames),
                    )))
                    .unwrap()
            }
        };
        let router = axum::Router::new().fallback(handler);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut builder = TonicServer::builder();
        if let Some(tls) = tls_opt {
            builder = builder.tls_config(tls).unwrap();
        }
        let routes = tonic::service::Routes::from(router);
        let task = tokio::spawn(async move {
            builder
                .add_routes(routes)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .unwrap();
        });
        FakeUpstream {
            address,
            seen,
            calls,
            stop: Some(stop),
            task,
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Stops listening and sends its connections GOAWAY, like a stopped OAP; calls it
    /// never answers are cut off after a second.
    async fn kill(mut self) {
        let _ = self.stop.take();
        if tokio::time::timeout(Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

fn framed(message: &[u8]) -> Vec<u8> {
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// One agent connection to skysnap's gRPC port.
async fn connect(server: &Server) -> Channel {
    Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn grpc(server: &Server) -> tonic::client::Grpc<Channel> {
    tonic::client::Grpc::new(connect(server).await)
}

fn ping() -> InstancePingPkg {
    InstancePingPkg {
        service: "shop".into(),
        service_instance: "shop-1".into(),
        layer: String::new(),
    }
}

#[tokio::test]
async fn test_upstream_forwards_unknown_method_bytes_metadata_and_status() {
    let upstream = FakeUpstream::start(Behaviour::Echo).await;
    let address = upstream.address.to_string();
    let mut server = Server::start(&[("SKYSNAP_UPSTREAM_ADDRESSES", address.as_str())]);
    let mut client = grpc(&server).await;
    client.ready().await.unwrap();
    // Bytes that are no protobuf at all: the passthrough must not look at them.
    let messages = vec![
        Bytes::from_static(b"\x00\xff first"),
        Bytes::new(),
        Bytes::from(vec![42u8; 100_000]),
    ];
    let mut request = tonic::Request::new(tokio_stream::iter(messages.clone()));
    request
        .metadata_mut()
        .insert("x-custom", "custom-value".parse().unwrap());
    request
        .metadata_mut()
        .insert("authentication", "agent-token".parse().unwrap());
    request
        .metadata_mut()
        .insert("x-want-status", "7".parse().unwrap());
    request.set_timeout(Duration::from_secs(7));
    let response = client
        .streaming(
            request,
            PathAndQuery::from_static("/made.up.v99.NewService/Exchange"),
            RawCodec,
        )
        .await
        .expect("headers of the upstream's reply");
    assert_eq!(response.metadata().get("x-reply").unwrap(), "r");
    let mut stream = response.into_inner();
    let mut replies = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(message)) => replies.push(message),
            Ok(None) => panic!("the upstream's status 7 was lost"),
            Err(status) => break status,
        }
    };
    assert_eq!(replies, messages, "every message back, byte for byte");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "echo says so");
    assert_eq!(status.metadata().get("x-trailer").unwrap(), "t");

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/made.up.v99.NewService/Exchange");
    assert_eq!(seen[0].headers.get("x-custom").unwrap(), "custom-value");
    assert_eq!(
        seen[0].headers.get("authentication").unwrap(),
        "agent-token"
    );
    // The agent's deadline travels with the call.
    assert_eq!(seen[0].headers.get("grpc-timeout").unwrap(), "7000000u");
    let expected: Vec<u8> = messages.iter().flat_map(|m| framed(m)).collect();
    assert_eq!(
        seen[0].body, expected,
        "request frames reach the upstream unchanged"
    );

    let scrape = server.scrape().await;
    assert_eq!(
        common::parse_metric(
            &scrape,
            "skysnap_upstream_calls_total",
            &[
                "service=\"other\"",
                "method=\"other\"",
                "code=\"permission_denied\""
            ]
        ),
        1.0
    );
    assert_eq!(
        common::parse_metric(
            &scrape,
            "skysnap_upstream_messages_total",
            &["service=\"other\"", "direction=\"request\""]
        ),
        3.0
    );
    assert!(
        common::parse_metric(
            &scrape,
            "skysnap_upstream_bytes_total",
            &["direction=\"sent\""]
        ) >= expected.len() as f64
    );
    server.stop();
    upstream.kill().await;
}

#[tokio::test]
async fn test_upstream_many_calls_share_one_connection() {
    // HTTP/2 servers count empty DATA frames without END_STREAM as abuse and close the
    // connection after a few hundred; each forwarded call must not add one.
    let upstream = FakeUpstream::start(Behaviour::Echo).await;
    let address = upstream.address.to_string();
    let mut server = Server::start(&[("SKYSNAP_UPSTREAM_ADDRESSES", address.as_str())]);
    let channel = connect(&server).await;
    let mut client =
        skysnap::proto::v3::trace_segment_report_service_client::TraceSegmentReportServiceClient::new(
            channel,
        );
    for call in 0..1500 {
        client
            .collect(tokio_stream::iter(vec![
                skysnap::proto::v3::SegmentObject::default(),
            ]))
            .await
            .unwrap_or_else(|status| panic!("call {call}: {status:?}"));
    }
    assert_eq!(upstream.calls(), 1500);
    server.stop();
    upstream.kill().await;
}

#[tokio::test]
async fn test_upstream_management_recorded_and_forwarded_with_upstream_token() {
    let upstream = FakeUpstream::start(Behaviour::Echo).await;
    let address = upstream.address.to_string();
    let mut server = Server::start(&[
        ("SKYSNAP_UPSTREAM_ADDRESSES", address.as_str()),
        ("SKYSNAP_UPSTREAM_TOKEN", "oap-secret"),
        ("SKYSNAP_AUTH_AGENT_TOKEN", "agent-secret"),
    ]);
    let channel = connect(&server).await;
    let mut client = ManagementServiceClient::new(channel);
    let mut request = tonic::Request::new(ping());
    request
        .metadata_mut()
        .insert("authentication", "agent-secret".parse().unwrap());
    client.keep_alive(request).await.expect("forwarded");
    // Without the agent token skysnap refuses before anything is forwarded.
    let refused = client.keep_alive(ping()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/skywalking.v3.ManagementService/keepAlive");
    assert_eq!(seen[0].headers.get("authentication").unwrap(), "oap-secret");
    let (status, services) = server.get("/api/v1/services").await;
    assert_eq!(status, 200);
    assert_eq!(services[0]["service"], "shop", "{services}");
    assert_eq!(services[0]["instances"][0]["name"], "shop-1");
    server.stop();
    upstream.kill().await;
}

#[tokio::test]
async fn test_upstream_down_fails_fast_and_profiling_goes_on() {
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let mut server = Server::start(&[
        ("SKYSNAP_UPSTREAM_ADDRESSES", address.as_str()),
        ("SKYSNAP_UPSTREAM_CONNECT_TIMEOUT_MS", "500"),
    ]);
    let channel = connect(&server).await;
    let mut management = ManagementServiceClient::new(channel.clone());
    for _ in 0..3 {
        let started = Instant::now();
        let error = management.keep_alive(ping()).await.unwrap_err();
        assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    // Profiling on the same connection is untouched.
    let mut profile = skysnap::proto::v3::profile_task_client::ProfileTaskClient::new(channel);
    profile
        .collect_snapshot(tokio_stream::iter(vec![snapshot("t", "down-seg", 0)]))
        .await
        .expect("snapshots stored while the upstream is down");
    assert_eq!(snapshot_rows(&server.db_path(), "down-seg"), 1);
    let scrape = server.scrape().await;
    assert_eq!(
        common::parse_metric(
            &scrape,
            "skysnap_upstream_calls_total",
            &["method=\"keepAlive\"", "code=\"unavailable\""]
        ),
        3.0
    );
    assert_eq!(
        common::parse_metric(
            &scrape,
            "skysnap_upstream_up",
            &[&format!("upstream=\"{address}\"")]
        ),
        0.0
    );
    server.stop();
}

#[tokio::test]
async fn test_upstream_stalled_is_bounded_and_takes_no_profiling_capacity() {
    let upstream = FakeUpstream::start(Behaviour::Silent).await;
    let address = upstream.address.to_string();
    let mut server = Server::start(&[
        ("SKYSNAP_UPSTREAM_ADDRESSES", address.as_str()),
        ("SKYSNAP_UPSTREAM_TIMEOUT_MS", "1000"),
        ("SKYSNAP_UPSTREAM_MAX_CONCURRENT_CALLS", "8"),
        ("SKYSNAP_GRPC_MAX_CONCURRENT_STREAMS", "16"),
    ]);
    let channel = connect(&server).await;
    // 40 forwarded calls at once on one agent connection whose stream limit is 16.
    let started = Instant::now();
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let mut client = ManagementServiceClient::new(channel.clone());
            tokio::spawn(async move {
                let result = client.keep_alive(ping()).await;
                (
                    result.map(|_| ()).map_err(|status| status.code()),
                    started.elapsed(),
                )
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile profiling answers promptly on the same connection.
    let mut profile = skysnap::proto::v3::profile_task_client::ProfileTaskClient::new(channel);
    let profiled = Instant::now();
    profile
        .get_profile_task_commands(ProfileTaskCommandQuery {
            service: "shop".into(),
            service_instance: "shop-1".into(),
            last_command_time: 0,
        })
        .await
        .expect("task poll during the stall");
    profile
        .collect_snapshot(tokio_stream::iter(vec![snapshot("t", "stall-seg", 0)]))
        .await
        .expect("snapshots during the stall");
    assert!(
        profiled.elapsed() < Duration::from_millis(500),
        "profiling waited {:?} behind a stalled upstream",
        profiled.elapsed()
    );
    let mut codes = std::collections::BTreeMap::new();
    for call in calls {
        let (result, elapsed) = call.await.unwrap();
        let code = result.expect_err("nothing answers");
        assert!(
            elapsed < Duration::from_secs(4),
            "{code:?} after {elapsed:?}"
        );
        *codes.entry(format!("{code:?}")).or_insert(0) += 1;
    }
    // At most 8 wait for the upstream (DEADLINE_EXCEEDED after 1 s); the rest are
    // refused at once (RESOURCE_EXHAUSTED, or UNAVAILABLE once the stalled upstream is
    // marked down).
    assert!(
        codes.get("DeadlineExceeded").copied().unwrap_or(0) <= 8,
        "{codes:?}"
    );
    assert!(
        codes.get("DeadlineExceeded").copied().unwrap_or(0) >= 1,
        "{codes:?}"
    );
    assert_eq!(codes.values().sum::<i32>(), 40);
    assert!(
        upstream.calls() <= 8,
        "{} calls reached the upstream",
        upstream.calls()
    );
    assert_eq!(snapshot_rows(&server.db_path(), "stall-seg"), 1);
    let scrape = server.scrape().await;
    assert!(
        common::parse_metric(
            &scrape,
            "skysnap_upstream_calls_total",
            &["method=\"keepAlive\"", "code=\"deadline_exceeded\""]
        ) >= 1.0
    );
    server.stop();
    upstream.kill().await;
}

#[tokio::test]
async fn test_upstream_round_robin_and_failover() {
    let first = FakeUpstream::start(Behaviour::Echo).await;
    let second = FakeUpstream::start(Behaviour::Echo).await;
    let addresses = format!("{},{}", first.address, second.address);
    let mut server = Server::start(&[
        ("SKYSNAP_UPSTREAM_ADDRESSES", addresses.as_str()),
        ("SKYSNAP_UPSTREAM_RETRY_BACKOFF_MS", "200"),
    ]);
    let channel = connect(&server).await;
    let mut client = ManagementServiceClient::new(channel);
    for _ in 0..20 {
        client.keep_alive(ping()).await.expect("forwarded");
    }
    assert_eq!(first.calls(), 10);
    assert_eq!(second.calls(), 10);

    let first_address = first.address;
    first.kill().await;
    let mut failures = 0;
    for _ in 0..20 {
        if client.keep_alive(ping()).await.is_err() {
            failures += 1;
        }
    }
    assert!(
        failures <= 1,
        "{failures} calls failed after the first one noticed"
    );
    assert_eq!(second.calls(), 10 + 20 - failures);

    // Back on the same address: taken into the rotation again without a restart.
    let revived = FakeUpstream::start_with(Behaviour::Echo, None, first_address).await;
    let revived_calls = revived.calls.clone();
    common::eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        let revived_calls = revived_calls.clone();
        async move {
            let _ = client.keep_alive(ping()).await;
            (revived_calls.load(Ordering::SeqCst) > 0).then_some(())
        }
    })
    .await;
    server.stop();
    second.kill().await;
    revived.kill().await;
}

#[tokio::test]
async fn test_upstream_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    common::make_certificates(certs.path());
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(certs.path().join("cert.pem")).unwrap(),
        std::fs::read(certs.path().join("key.pem")).unwrap(),
    );
    let upstream = FakeUpstream::start_with(
        Behaviour::Echo,
        Some(tonic::transport::ServerTlsConfig::new().identity(identity)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let address = format!("localhost:{}", upstream.address.port());
    let ca = certs.path().join("ca.pem");
    let mut server = Server::start(&[
        ("SKYSNAP_UPSTREAM_ADDRESSES", address.as_str()),
        ("SKYSNAP_UPSTREAM_TLS", "true"),
        ("SKYSNAP_UPSTREAM_TLS_CA_PATH", ca.to_str().unwrap()),
    ]);
    let channel = connect(&server).await;
    let reply: tonic::Response<Commands> = ManagementServiceClient::new(channel)
        .keep_alive(ping())
        .await
        .expect("forwarded over TLS");
    drop(reply);
    assert_eq!(upstream.calls(), 1);
    server.stop();
    upstream.kill().await;
}

#[tokio::test]
async fn test_no_upstream_answers_async_profiler_and_unknown_methods_empty() {
    let mut server = Server::start(&[]);
    let mut client = grpc(&server).await;
    for path in [
        "/skywalking.v10.AsyncProfilerTask/getAsyncProfilerTaskCommands",
        "/made.up.Service/Call",
    ] {
        client.ready().await.unwrap();
        let reply = client
            .unary(
                tonic::Request::new(Bytes::from_static(b"\x0a\x04shop")),
                PathAndQuery::from_maybe_shared(path).unwrap(),
                RawCodec,
            )
            .await
            .unwrap_or_else(|status| panic!("{path}: {status:?}"));
        assert!(
            reply.into_inner().is_empty(),
            "an empty Commands for {path}"
        );
    }
    let scrape = server.scrape().await;
    assert_eq!(
        common::parse_metric(
            &scrape,
            "skysnap_discarded_messages_total",
            &[
                "service=\"skywalking.v10.AsyncProfilerTask\"",
                "method=\"getAsyncProfilerTaskCommands\""
            ]
        ),
        1.0
    );
    server.stop();
}
