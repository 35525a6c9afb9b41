//! ClickHouse stopped for 15 s under load and started again: every acknowledged
//! snapshot is there, every refused stream was refused with UNAVAILABLE. Its own test
//! binary, because it stops the ClickHouse server the other tests share.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skysnap::proto::v3::ThreadSnapshot;

use common::{clickhouse, clickhouse_url, fresh_database, snapshot, Server};

fn clickhouse_service(action: &str) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/services/clickhouse.sh"
    );
    let output = Command::new(script)
        .arg(action)
        .output()
        .expect("clickhouse.sh runs");
    assert!(
        output.status.success(),
        "clickhouse.sh {action}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn test_clickhouse_outage_loses_nothing_acknowledged() {
    let database = fresh_database("outage");
    let url = clickhouse_url();
    let mut server = Server::start(&[
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", url.as_str()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database.as_str()),
        ("SKYSNAP_SINK_RETRY_BUDGET_MS", "4000"),
    ]);
    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused: Arc<Mutex<HashMap<String, tonic::Code>>> = Arc::default();
    let load_until = Instant::now() + Duration::from_secs(26);
    let mut workers = Vec::new();
    for worker in 0..8 {
        let mut client = server.profile_client().await;
        let (acknowledged, refused) = (acknowledged.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            let mut round = 0;
            while Instant::now() < load_until {
                round += 1;
                let segment = format!("out-{worker}-{round}");
                let messages: Vec<ThreadSnapshot> = (0..500)
                    .map(|n| snapshot("task-out", &segment, n))
                    .collect();
                match client.collect_snapshot(tokio_stream::iter(messages)).await {
                    Ok(_) => acknowledged.lock().unwrap().push(segment),
                    Err(status) => {
                        refused.lock().unwrap().insert(segment, status.code());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acknowledged_before = acknowledged.lock().unwrap().len();
    clickhouse_service("stop");
    tokio::time::sleep(Duration::from_secs(15)).await;
    clickhouse_service("start");
    for worker in workers {
        worker.await.unwrap();
    }

    let acknowledged = acknowledged.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    let counts_text = clickhouse(&format!(
        "SELECT segment_id, count() FROM {database}.profile_thread_snapshot FINAL GROUP BY segment_id FORMAT TSV"
    ))
    .await;
    let counts: HashMap<String, i64> = counts_text
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(segment, count)| (segment.to_string(), count.parse().unwrap()))
        .collect();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|segment| counts.get(*segment).copied().unwrap_or(0) != 500)
        .collect();
    eprintln!(
        "acknowledged streams: {} ({} before the outage), refused: {}, acknowledged streams incomplete: {}",
        acknowledged.len(),
        acknowledged_before,
        refused.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged but not stored: {missing:?}"
    );
    assert!(acknowledged_before > 0, "load ran before the outage");
    assert!(!refused.is_empty(), "the outage was noticed");
    assert!(
        refused
            .values()
            .all(|code| *code == tonic::Code::Unavailable),
        "refusals are UNAVAILABLE: {refused:?}"
    );
    assert!(
        acknowledged.len() > acknowledged_before,
        "ingest resumed after ClickHouse came back"
    );
    let refused_metric = server.metric("skysnap_snapshots_refused_total", &[]).await;
    assert!(refused_metric >= 500.0, "{refused_metric}");
    server.stop();
    clickhouse(&format!("DROP DATABASE {database}")).await;
}
