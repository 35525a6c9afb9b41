//! Faults production brings: a store that accepts connections and never answers, a
//! flood of unknown task ids, more streams than the server should hold. Against the real
//! `skysnap serve` binary; the hung store is the real ClickHouse behind a loopback proxy
//! that can stop passing bytes (a fault, not a stand-in for ClickHouse's behaviour).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use skysnap::proto::v3::profile_task_client::ProfileTaskClient;
use skysnap::proto::v3::ProfileTaskCommandQuery;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

use common::{snapshot, snapshot_rows, Server};

/// A TCP proxy to the test ClickHouse that can hang: while hung it accepts connections
/// and reads nothing, and open connections stop passing bytes either way.
struct HangingProxy {
    address: String,
    hung: Arc<AtomicBool>,
}

impl HangingProxy {
    async fn start(target: String) -> HangingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let hung = Arc::new(AtomicBool::new(false));
        let accept_hung = hung.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (target, hung) = (target.clone(), accept_hung.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pipe(client_read, server_write, hung.clone()));
                    pipe(server_read, client_write, hung).await;
                });
            }
        });
        HangingProxy { address, hung }
    }

    fn set_hung(&self, hung: bool) {
        self.hung.store(hung, Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hung: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        while hung.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        // Bytes read just before the hang wait with it, as in a stalled kernel buffer.
        while hung.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

fn rss_megabytes(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap();
    kb / 1024.0
}

async fn connect(server: &Server) -> Channel {
    Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn query(service: &str) -> ProfileTaskCommandQuery {
    ProfileTaskCommandQuery {
        service: service.into(),
        service_instance: "i-1".into(),
        last_command_time: 0,
    }
}

/// Streams of 50 snapshots each; answers (acknowledged snapshots, failure codes).
async fn send_streams(
    channel: &Channel,
    segment_prefix: &str,
    streams: usize,
) -> (u64, Vec<tonic::Code>) {
    let acknowledged = Arc::new(AtomicU64::new(0));
    let mut calls = Vec::new();
    for stream in 0..streams {
        let mut client = ProfileTaskClient::new(channel.clone());
        let segment = format!("{segment_prefix}-{stream}");
        let acknowledged = acknowledged.clone();
        calls.push(tokio::spawn(async move {
            let batch: Vec<_> = (0..50)
                .map(|n| snapshot("hang-task", &segment, n))
                .collect();
            match client.collect_snapshot(tokio_stream::iter(batch)).await {
                Ok(_) => {
                    acknowledged.fetch_add(50, Ordering::SeqCst);
                    None
                }
                Err(status) => Some(status.code()),
            }
        }));
    }
    let mut codes = Vec::new();
    for call in calls {
        if let Some(code) = call.await.unwrap() {
            codes.push(code);
        }
    }
    (acknowledged.load(Ordering::SeqCst), codes)
}

// Multi-threaded: `Server::start` blocks its thread while the proxy must keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_hung_clickhouse_is_bounded_and_agents_keep_their_tasks() {
    let database = common::fresh_database("hang");
    let target = common::clickhouse_url()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let proxy = HangingProxy::start(target).await;
    let url = format!("http://{}", proxy.address);
    let answer = reqwest::Client::new()
        .post(format!("{url}/"))
        .body("SELECT 1")
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("the proxy passes requests")
        .text()
        .await
        .unwrap();
    assert_eq!(answer.trim(), "1");
    let mut server = Server::start(&[
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", &url),
        ("SKYSNAP_CLICKHOUSE_DATABASE", &database),
        ("SKYSNAP_STORE_TIMEOUT_MS", "1000"),
        ("SKYSNAP_SINK_ATTEMPT_TIMEOUT_MS", "1000"),
        ("SKYSNAP_SINK_RETRY_BUDGET_MS", "2000"),
    ]);
    server.create_task("hang-shop", "/orders").await;
    let channel = connect(&server).await;
    let (before, codes) = send_streams(&channel, "before", 4).await;
    assert!(codes.is_empty(), "{codes:?}");

    proxy.set_hung(true);
    // Agents polling for commands get their task at once, store or no store.
    let mut profile = ProfileTaskClient::new(channel.clone());
    for _ in 0..10 {
        let asked = Instant::now();
        let commands = profile
            .get_profile_task_commands(query("hang-shop"))
            .await
            .expect("commands while the store hangs")
            .into_inner();
        assert_eq!(commands.commands.len(), 1);
        assert!(
            asked.elapsed() < Duration::from_millis(100),
            "a poll took {:?} while the store hangs",
            asked.elapsed()
        );
    }
    // Streams under load end UNAVAILABLE within the bound: 2 s of retries plus one
    // 1 s attempt.
    let started = Instant::now();
    let (during, codes) = send_streams(&channel, "during", 16).await;
    let took = started.elapsed();
    assert_eq!(during, 0, "acknowledged while the store hangs");
    assert_eq!(codes.len(), 16);
    assert!(
        codes.iter().all(|code| *code == tonic::Code::Unavailable),
        "{codes:?}"
    );
    assert!(
        took < Duration::from_secs(6),
        "streams answered after {took:?}"
    );
    let (status, body) = server.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.to_string().contains("store.timeout_ms"), "{body}");
    let rss = rss_megabytes(server.pid());
    assert!(rss < 300.0, "RSS {rss:.0} MB while the store hangs");

    proxy.set_hung(false);
    let (after, codes) = send_streams(&channel, "after", 4).await;
    assert!(codes.is_empty(), "{codes:?}");
    // Every acknowledged snapshot is there. An insert that timed out while the store
    // hung may still land once it answers again (it was in flight): refused to the agent,
    // stored once anyway (the key dedupes a re-send), never acknowledged without a commit.
    let stored = |prefix: &'static str| {
        let database = database.clone();
        async move {
            common::clickhouse_count(&format!(
                "SELECT count() FROM {database}.profile_snapshot FINAL \
                 WHERE segment_id LIKE '{prefix}-%'"
            ))
            .await as u64
        }
    };
    assert_eq!(stored("before").await, before);
    assert_eq!(stored("after").await, after);
    assert!(stored("during").await <= 16 * 50);
    assert!(
        server
            .metric("skysnap_store_timeouts_total", &["store=\"clickhouse\""])
            .await
            >= 1.0
    );
    server.stop();
    common::clickhouse(&format!("DROP DATABASE IF EXISTS {database}")).await;
}

#[tokio::test]
async fn test_random_task_ids_cost_bounded_store_reads() {
    let mut server = Server::start(&[("SKYSNAP_TASKS_UNKNOWN_LOOKUPS_PER_SECOND", "20")]);
    let mut client = ProfileTaskClient::new(connect(&server).await);
    let started = Instant::now();
    let snapshots: Vec<_> = (0..10_000)
        .map(|n| snapshot(&format!("random-task-{n}"), "random-seg", n))
        .collect();
    client
        .collect_snapshot(tokio_stream::iter(snapshots))
        .await
        .expect("snapshots of unknown tasks are stored");
    let seconds = started.elapsed().as_secs_f64().ceil() + 1.0;
    assert_eq!(snapshot_rows(&server.db_path(), "random-seg"), 10_000);
    let lookups = |result: &'static str| {
        let server = &server;
        async move {
            server
                .metric(
                    "skysnap_task_lookups_total",
                    &[&format!("result=\"{result}\"")],
                )
                .await
        }
    };
    let reads = lookups("found").await + lookups("missing").await + lookups("error").await;
    assert!(
        reads <= 20.0 * seconds,
        "{reads} store reads in {seconds} s"
    );
    assert!(lookups("skipped").await >= 10_000.0 - 20.0 * seconds);
    assert_eq!(
        server
            .metric("skysnap_snapshots_unknown_task_total", &[])
            .await,
        10_000.0
    );
    server.stop();
}

#[tokio::test]
async fn test_stream_limit_refuses_the_excess_and_commits_the_admitted() {
    let mut server = Server::start(&[
        ("SKYSNAP_GRPC_MAX_SNAPSHOT_STREAMS", "16"),
        ("SKYSNAP_GRPC_MAX_CONCURRENT_STREAMS", "1024"),
    ]);
    // 2,000 streams over 4 connections, each sending slowly so that they overlap.
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(connect(&server).await);
    }
    let acknowledged = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let mut calls = Vec::new();
    for stream in 0..2_000 {
        let mut client = ProfileTaskClient::new(channels[stream % 4].clone());
        let (acknowledged, refused) = (acknowledged.clone(), refused.clone());
        calls.push(tokio::spawn(async move {
            let segment = format!("flood-{stream}");
            let paced = futures::StreamExt::then(tokio_stream::iter(0..5), move |n| {
                let segment = segment.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    snapshot("flood-task", &segment, n)
                }
            });
            match client.collect_snapshot(paced).await {
                Ok(_) => {
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
                    assert!(status.message().contains("grpc.max_snapshot_streams"));
                    refused.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    // The server keeps answering people and agents throughout.
    let mut profile = ProfileTaskClient::new(channels[0].clone());
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let asked = Instant::now();
        let (status, _) = server.get("/healthz").await;
        assert_eq!(status, 200);
        profile
            .get_profile_task_commands(query("flood-shop"))
            .await
            .expect("commands during the flood");
        slowest = slowest.max(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for call in calls {
        call.await.unwrap();
    }
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    let (admitted, refused) = (
        acknowledged.load(Ordering::SeqCst),
        refused.load(Ordering::SeqCst),
    );
    assert_eq!(admitted + refused, 2_000);
    assert!(
        refused > 0 && admitted >= 16,
        "{admitted} admitted, {refused} refused"
    );
    assert_eq!(
        snapshot_rows(&server.db_path(), "flood-%"),
        (admitted * 5) as i64,
        "every admitted stream committed"
    );
    assert_eq!(
        server
            .metric(
                "skysnap_grpc_streams_refused_total",
                &["reason=\"streams\""]
            )
            .await,
        refused as f64
    );
    let rss = rss_megabytes(server.pid());
    assert!(rss < 300.0, "RSS {rss:.0} MB after the flood");
    server.stop();
}
