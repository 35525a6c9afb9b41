//! Lifecycle and operations against the real binary: shutdown under load, tokens,
//! configuration errors, an unavailable store, and the `skysnap task` CLI.

mod common;

use std::time::{Duration, Instant};

use skysnap::proto::v3::profile_task_client::ProfileTaskClient;
use skysnap::proto::v3::{ProfileTaskCommandQuery, ThreadSnapshot};
use tonic::metadata::MetadataValue;

use common::{aged_segment, snapshot, snapshot_rows, PacedAgents, Server};

#[tokio::test]
async fn test_sigterm_during_streams_loses_nothing_acknowledged() {
    let mut server = Server::start(&[("SKYSNAP_SHUTDOWN_GRACE_MS", "10000")]);
    let stop_at = Instant::now() + Duration::from_secs(6);
    let agents = PacedAgents::start(&server.grpc, "task-sig", "sig", 8, 200, Some(stop_at));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    server.signal("TERM");
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait(Duration::from_secs(15));
        (status, server)
    })
    .await
    .unwrap();
    let (status, server) = status;
    assert!(status.success(), "exit {status}:\n{}", server.stderr());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exited within the grace period"
    );
    let (acknowledged, refused) = agents.finish(Duration::from_secs(30)).await;
    assert!(
        acknowledged.len() >= 8,
        "load ran: {} streams acknowledged",
        acknowledged.len()
    );
    for segment in &acknowledged {
        assert_eq!(
            snapshot_rows(&server.db_path(), segment),
            200,
            "acknowledged stream {segment}"
        );
    }
    let total = snapshot_rows(&server.db_path(), "sig-%");
    eprintln!(
        "acknowledged streams: {}, refused streams: {}, rows: {total}",
        acknowledged.len(),
        refused.len()
    );
    assert!(total >= 200 * acknowledged.len() as i64);
}

#[tokio::test]
async fn test_agent_token_required_when_configured() {
    let mut server = Server::start(&[("SKYSNAP_AUTH_AGENT_TOKEN", "agent-secret")]);
    let mut client = server.profile_client().await;
    let query = || ProfileTaskCommandQuery {
        service: "shop".into(),
        service_instance: "shop-1".into(),
        last_command_time: -1,
    };
    let error = client.get_profile_task_commands(query()).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unauthenticated);
    let error = client
        .collect_snapshot(tokio_stream::iter(vec![snapshot("t", "tok-seg", 0)]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unauthenticated);

    let mut wrong = tonic::Request::new(query());
    wrong
        .metadata_mut()
        .insert("authentication", MetadataValue::from_static("nope"));
    assert_eq!(
        client
            .get_profile_task_commands(wrong)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    let mut right = tonic::Request::new(query());
    right
        .metadata_mut()
        .insert("authentication", MetadataValue::from_static("agent-secret"));
    client
        .get_profile_task_commands(right)
        .await
        .expect("token accepted");
    let mut stream = tonic::Request::new(tokio_stream::iter(vec![snapshot("t", "tok-seg", 0)]));
    stream
        .metadata_mut()
        .insert("authentication", MetadataValue::from_static("agent-secret"));
    client
        .collect_snapshot(stream)
        .await
        .expect("token accepted");
    assert_eq!(snapshot_rows(&server.db_path(), "tok-seg"), 1);
    assert_eq!(
        server
            .metric("skysnap_grpc_unauthenticated_total", &[])
            .await,
        3.0
    );
    // Without an admin token the API is open.
    assert_eq!(server.get("/api/v1/tasks").await.0, 200);
    server.stop();
}

#[tokio::test]
async fn test_admin_token_required_when_configured() {
    let mut server = Server::start(&[("SKYSNAP_AUTH_ADMIN_TOKEN", "admin-secret")]);
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/tasks", server.http);
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    let response = http.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(response.status(), 401);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("token"));
    assert_eq!(
        http.get(&url)
            .bearer_auth("admin-secret")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let created = http
        .post(&url)
        .bearer_auth("admin-secret")
        .json(
            &serde_json::json!({"service": "s", "endpoint_name": "/e", "duration": 1,
            "min_duration_threshold": 0, "dump_period": 10, "max_sampling_count": 1}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    // Probes stay open for Kubernetes, and agents need no admin token.
    assert_eq!(server.get("/healthz").await.0, 200);
    assert_eq!(server.get("/readyz").await.0, 200);
    let mut client = server.profile_client().await;
    client
        .collect_snapshot(tokio_stream::iter(vec![snapshot("t", "adm-seg", 0)]))
        .await
        .unwrap();
    server.stop();
}

#[tokio::test]
async fn test_store_down_past_retry_budget_answers_unavailable_and_metrics_add_up() {
    let mut server = Server::start(&[
        ("SKYSNAP_SQLITE_BUSY_TIMEOUT_MS", "20"),
        ("SKYSNAP_SINK_RETRY_INITIAL_BACKOFF_MS", "20"),
        ("SKYSNAP_SINK_RETRY_BUDGET_MS", "500"),
    ]);
    let mut client = server.profile_client().await;
    // 100 valid snapshots and 3 invalid ones (rejected whatever the store does).
    let stream = || {
        let mut messages: Vec<ThreadSnapshot> = (0..100)
            .map(|n| snapshot("task-down", "down-seg", n))
            .collect();
        messages.push(ThreadSnapshot {
            sequence: -1,
            ..snapshot("task-down", "down-seg", 0)
        });
        messages.push(ThreadSnapshot {
            time: 0,
            ..snapshot("task-down", "down-seg", 1)
        });
        messages.push(ThreadSnapshot {
            task_id: String::new(),
            ..snapshot("task-down", "down-seg", 2)
        });
        tokio_stream::iter(messages)
    };

    // Another process holds the write lock: every write attempt fails with "busy".
    let blocker = rusqlite::Connection::open(server.db_path()).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let error = client
        .collect_snapshot(stream())
        .await
        .expect_err("store is locked");
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert_eq!(
        server
            .metric(
                "skysnap_snapshots_refused_total",
                &["reason=\"sink_unavailable\""]
            )
            .await,
        100.0
    );
    assert!(server.metric("skysnap_sink_retries_total", &[]).await >= 1.0);
    blocker.execute_batch("ROLLBACK").unwrap();

    // The agent sends the stream again once the store is back.
    client
        .collect_snapshot(stream())
        .await
        .expect("store is back");
    assert_eq!(snapshot_rows(&server.db_path(), "down-seg"), 100);
    let received = server.metric("skysnap_snapshots_received_total", &[]).await;
    let committed = server
        .metric("skysnap_snapshots_committed_total", &[])
        .await;
    let refused = server.metric("skysnap_snapshots_refused_total", &[]).await;
    let rejected = server.metric("skysnap_snapshots_rejected_total", &[]).await;
    // The accounting operators rely on: every decoded snapshot is exactly one of these.
    assert_eq!(
        (received, committed, rejected, refused),
        (206.0, 100.0, 6.0, 100.0)
    );
    assert_eq!(received, committed + rejected + refused);
    assert_eq!(
        server
            .metric("skysnap_sink_snapshots_written_total", &["sink=\"sqlite\""])
            .await,
        100.0
    );
    assert!(
        server
            .metric(
                "skysnap_sink_errors_total",
                &["sink=\"sqlite\"", "retriable=\"true\""]
            )
            .await
            >= 1.0
    );
    assert!(server.metric("skysnap_batches_flushed_total", &[]).await >= 2.0);
    assert!(
        server
            .metric(
                "skysnap_batch_flush_duration_seconds_count",
                &["sink=\"sqlite\""]
            )
            .await
            >= 1.0
    );
    // Gauges settle at zero once nothing is queued.
    assert_eq!(server.metric("skysnap_shard_mailbox_depth", &[]).await, 0.0);
    assert_eq!(server.metric("skysnap_grpc_streams_active", &[]).await, 0.0);
    server.stop();
}

fn skysnap(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = common::skysnap_command();
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("skysnap runs")
}

#[test]
fn test_bad_configuration_fails_startup_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let output = skysnap(&["serve"], &[("SKYSNAP_GRPC_ADDR", "not-an-address")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("grpc.addr"), "{stderr}");

    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "pipeline:\n  batch_max_snapshot: 10\n").unwrap();
    let output = skysnap(&["serve", "--config", file.to_str().unwrap()], &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("batch_max_snapshot"), "{stderr}");

    let output = skysnap(&["serve"], &[("SKYSNAP_RETENTION_DAYZ", "4")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SKYSNAP_RETENTION_DAYZ"), "{stderr}");
}

#[tokio::test]
async fn test_cli_task_commands() {
    let mut server = Server::start(&[("SKYSNAP_AUTH_ADMIN_TOKEN", "cli-secret")]);
    let base = server.http.clone();
    let cli = move |args: &[&str]| {
        let mut all = vec!["task", "--server", base.as_str()];
        all.extend_from_slice(args);
        skysnap(&all, &[("SKYSNAP_AUTH_ADMIN_TOKEN", "cli-secret")])
    };
    let created = cli(&[
        "create",
        "--service",
        "shop",
        "--endpoint",
        "/orders",
        "--duration",
        "2",
        "--json",
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let task: serde_json::Value = serde_json::from_slice(&created.stdout).unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    assert_eq!(task["duration"], 2);

    let listed = cli(&["list", "--service", "shop"]);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains("/orders"), "{table}");

    let shown = cli(&["show", &id]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("dump period"));

    // A poll makes a NOTIFIED log for the logs command to show.
    let mut client = server.profile_client().await;
    let mut poll = tonic::Request::new(ProfileTaskCommandQuery {
        service: "shop".into(),
        service_instance: "shop-7".into(),
        last_command_time: -1,
    });
    poll.metadata_mut()
        .insert("authentication", MetadataValue::from_static("unused"));
    client.get_profile_task_commands(poll).await.unwrap();
    let logs = common::eventually(Duration::from_secs(5), || {
        let output = cli(&["logs", &id]);
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        std::future::ready(text.contains("NOTIFIED").then_some(text))
    })
    .await;
    assert!(logs.contains("shop-7"), "{logs}");

    let refused = cli(&[
        "create",
        "--service",
        "shop",
        "--endpoint",
        "/x",
        "--duration",
        "0",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("monitor duration must greater than 1 minutes"),
        "{stderr}"
    );
    let missing = cli(&["show", "no-such-task"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    let unauthorized = skysnap(&["task", "--server", &server.http, "list"], &[]);
    assert!(!unauthorized.status.success());
    assert!(String::from_utf8_lossy(&unauthorized.stderr).contains("401"));
    server.stop();
}

#[tokio::test]
async fn test_slow_store_pushes_back_on_the_stream() {
    let mut server = Server::start(&[
        ("SKYSNAP_PIPELINE_SHARDS", "1"),
        ("SKYSNAP_PIPELINE_SHARD_MAILBOX_CAPACITY", "2"),
        ("SKYSNAP_PIPELINE_STREAM_CHUNK_SNAPSHOTS", "16"),
        ("SKYSNAP_PIPELINE_BATCH_MAX_SNAPSHOTS", "32"),
        // The locked store makes a write wait instead of failing.
        ("SKYSNAP_SQLITE_BUSY_TIMEOUT_MS", "60000"),
        ("SKYSNAP_SINK_RETRY_BUDGET_MS", "120000"),
    ]);
    let blocker = rusqlite::Connection::open(server.db_path()).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let offered = 20_000;
    let mut client = server.profile_client().await;
    let sender = tokio::spawn(async move {
        let messages = (0..offered).map(|n| snapshot("task-bp", "bp-seg", n));
        client.collect_snapshot(tokio_stream::iter(messages)).await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    // While the store is stuck the server stops reading: only what fits in one batch,
    // the bounded mailbox and the handler's hand was decoded.
    let received_while_stuck = server.metric("skysnap_snapshots_received_total", &[]).await;
    assert!(received_while_stuck >= 32.0, "{received_while_stuck}");
    assert!(
        received_while_stuck <= 500.0,
        "read on while stuck: {received_while_stuck}"
    );
    assert!(!sender.is_finished());

    blocker.execute_batch("ROLLBACK").unwrap();
    sender
        .await
        .unwrap()
        .expect("stream committed once the store is back");
    assert_eq!(
        snapshot_rows(&server.db_path(), "bp-seg"),
        i64::from(offered)
    );
    eprintln!("received while the store was stuck: {received_while_stuck} of {offered}");
    server.stop();
}

/// A throwaway CA and a `localhost` certificate signed by it, made with `openssl`.

#[tokio::test]
async fn test_grpc_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    common::make_certificates(certs.path());
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    let mut server = Server::start(&[
        ("SKYSNAP_GRPC_TLS_CERT_PATH", cert.to_str().unwrap()),
        ("SKYSNAP_GRPC_TLS_KEY_PATH", key.to_str().unwrap()),
    ]);
    let ca = std::fs::read(certs.path().join("ca.pem")).unwrap();
    let address = server.grpc.replace("http://", "https://");
    let channel = tonic::transport::Endpoint::from_shared(address)
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .expect("TLS handshake with the configured certificate");
    let mut client = ProfileTaskClient::new(channel);
    client
        .collect_snapshot(tokio_stream::iter(vec![snapshot("t", "tls-seg", 0)]))
        .await
        .expect("stream over TLS");
    assert_eq!(snapshot_rows(&server.db_path(), "tls-seg"), 1);
    // Plain text is not served on a TLS port.
    let plain = match ProfileTaskClient::connect(server.grpc.clone()).await {
        Ok(mut plain) => plain
            .collect_snapshot(tokio_stream::iter(vec![snapshot("t", "tls-seg", 1)]))
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(plain, "a plain-text client was served on the TLS port");
    server.stop();
}

#[tokio::test]
async fn test_sqlite_retention_removes_expired_rows() {
    let mut server = Server::start(&[("SKYSNAP_RETENTION_CHECK_INTERVAL_MS", "300")]);
    let day_ms = 86_400_000;
    let mut messages = aged_segment("ret-old", 4 * day_ms);
    messages.extend(aged_segment("ret-edge", 3 * day_ms - 3_600_000));
    messages.extend(aged_segment("ret-new", 0));
    let mut client = server.profile_client().await;
    client
        .collect_snapshot(tokio_stream::iter(messages))
        .await
        .unwrap();
    let db = server.db_path();
    common::eventually(Duration::from_secs(10), || {
        std::future::ready((snapshot_rows(&db, "ret-old") == 0).then_some(()))
    })
    .await;
    assert_eq!(snapshot_rows(&db, "ret-edge"), 10);
    assert_eq!(snapshot_rows(&db, "ret-new"), 10);
    assert_eq!(
        server
            .metric(
                "skysnap_retention_rows_removed_total",
                &["store=\"sqlite\""]
            )
            .await,
        10.0
    );
    server.stop();
}
