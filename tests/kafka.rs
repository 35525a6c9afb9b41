//! Kafka mode against the real broker the test command starts (Apache Kafka 4.x, KRaft,
//! loopback): receivers write the topic, `skysnap consume` moves it into ClickHouse and
//! SQLite, and a consumer killed with SIGKILL mid-topic loses nothing. A fresh topic and
//! database per test.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use skysnap::proto::v3::ThreadSnapshot;

use common::{
    clickhouse, clickhouse_count, clickhouse_url, eventually, fresh_database, fresh_topic,
    kafka_brokers, read_topic, snapshot, snapshot_rows, Consumer, Server,
};

const STREAMS: usize = 20;
const PER_STREAM: i32 = 2_500;

/// Sends 20 concurrent streams of 2,500 snapshots through a kafka-mode receiver.
async fn load_through_receiver(server: &Server, task_id: &str, prefix: &str) {
    let mut senders = Vec::new();
    for stream in 0..STREAMS {
        let mut client = server.profile_client().await;
        let messages: Vec<ThreadSnapshot> = (0..PER_STREAM)
            .map(|n| snapshot(task_id, &format!("{prefix}-{stream:02}"), n))
            .collect();
        senders.push(tokio::spawn(async move {
            client.collect_snapshot(tokio_stream::iter(messages)).await
        }));
    }
    for sender in senders {
        sender
            .await
            .unwrap()
            .expect("stream acknowledged after Kafka delivery");
    }
}

#[tokio::test]
async fn test_kafka_mode_to_topic_then_consume_into_clickhouse_and_sqlite() {
    let topic = fresh_topic("kmode", 4).await;
    let brokers = kafka_brokers();
    let mut receiver = Server::start(&[
        ("SKYSNAP_PIPELINE_MODE", "kafka"),
        ("SKYSNAP_KAFKA_BROKERS", brokers.as_str()),
        ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
    ]);
    let (status, ready) = receiver.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["sink:kafka"], "ok");
    let task = receiver.create_task("shop", "/orders").await;
    let task_id = task["id"].as_str().unwrap().to_string();
    load_through_receiver(&receiver, &task_id, "km").await;
    // Kafka mode: nothing went to the receiver's own store.
    assert_eq!(snapshot_rows(&receiver.db_path(), "km-%"), 0);

    // Every snapshot is a decodable ThreadSnapshot keyed by its segment, one segment
    // per partition.
    let messages = read_topic(&topic);
    assert_eq!(messages.len(), STREAMS * PER_STREAM as usize);
    let mut partitions_of_segment: HashMap<String, HashSet<i32>> = HashMap::new();
    let mut keys = HashSet::new();
    for message in &messages {
        assert_eq!(message.key, message.snapshot.trace_segment_id.as_bytes());
        assert_eq!(message.snapshot.task_id, task_id);
        assert_eq!(
            message
                .snapshot
                .stack
                .as_ref()
                .unwrap()
                .code_signatures
                .len(),
            10
        );
        partitions_of_segment
            .entry(message.snapshot.trace_segment_id.clone())
            .or_default()
            .insert(message.partition);
        keys.insert((
            message.snapshot.trace_segment_id.clone(),
            message.snapshot.sequence,
        ));
    }
    assert_eq!(keys.len(), STREAMS * PER_STREAM as usize);
    assert!(partitions_of_segment.values().all(|p| p.len() == 1));
    assert!(
        partitions_of_segment
            .values()
            .flatten()
            .collect::<HashSet<_>>()
            .len()
            > 1,
        "spread over partitions"
    );

    // Two members of one group into ClickHouse, another group into SQLite.
    let database = fresh_database("consume");
    let url = clickhouse_url();
    let clickhouse_dir = tempfile::tempdir().unwrap();
    let clickhouse_env = [
        ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
        ("SKYSNAP_KAFKA_GROUP_ID", "ch-group"),
        ("SKYSNAP_KAFKA_CONSUME_BATCH_SNAPSHOTS", "1000"),
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", url.as_str()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database.as_str()),
    ];
    let mut into_clickhouse = Consumer::start(clickhouse_dir.path(), &clickhouse_env);
    let mut into_clickhouse_too = Consumer::start(clickhouse_dir.path(), &clickhouse_env);
    let sqlite_dir = tempfile::tempdir().unwrap();
    let sqlite_path = sqlite_dir.path().join("consumed.db");
    let mut into_sqlite = Consumer::start(
        sqlite_dir.path(),
        &[
            ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
            ("SKYSNAP_KAFKA_GROUP_ID", "sqlite-group"),
            ("SKYSNAP_SQLITE_PATH", sqlite_path.to_str().unwrap()),
        ],
    );
    let expected = (STREAMS * PER_STREAM as usize) as i64;
    let table = format!("{database}.profile_thread_snapshot");
    eventually(Duration::from_secs(90), || async {
        // The consumer creates its tables when it starts.
        let tables = clickhouse_count(&format!(
            "SELECT count() FROM system.tables WHERE database = '{database}' AND name = 'profile_thread_snapshot'"
        ))
        .await;
        if tables == 0 {
            return None;
        }
        let stored = clickhouse_count(&format!("SELECT count() FROM {table} FINAL")).await;
        (stored == expected).then_some(())
    })
    .await;
    eventually(Duration::from_secs(90), || {
        std::future::ready(
            (sqlite_path.exists() && snapshot_rows(&sqlite_path, "km-%") == expected).then_some(()),
        )
    })
    .await;
    check_dashboard_metrics(&(receiver.scrape().await + &into_clickhouse.scrape().await));
    let (first, second) = (
        into_clickhouse.committed().await,
        into_clickhouse_too.committed().await,
    );
    eprintln!("group members committed {first} and {second} snapshots");
    assert!(first + second >= expected as f64, "{first} + {second}");
    into_clickhouse.stop();
    into_clickhouse_too.stop();
    into_sqlite.stop();
    receiver.stop();
    clickhouse(&format!("DROP DATABASE {database}")).await;
}

#[tokio::test]
async fn test_consumer_killed_mid_topic_and_restarted_misses_nothing() {
    let topic = fresh_topic("kkill", 4).await;
    let brokers = kafka_brokers();
    let mut receiver = Server::start(&[
        ("SKYSNAP_PIPELINE_MODE", "kafka"),
        ("SKYSNAP_KAFKA_BROKERS", brokers.as_str()),
        ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
    ]);
    load_through_receiver(&receiver, "task-kill", "kk").await;
    receiver.stop();

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consumed.db");
    let env = [
        ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
        ("SKYSNAP_KAFKA_GROUP_ID", "kill-group"),
        ("SKYSNAP_KAFKA_CONSUME_BATCH_SNAPSHOTS", "500"),
        // The killed member's partitions free up after this.
        ("SKYSNAP_KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ("SKYSNAP_SQLITE_PATH", db.to_str().unwrap()),
    ];
    let expected = (STREAMS * PER_STREAM as usize) as i64;
    let mut consumer = Consumer::start(dir.path(), &env);
    let at_kill = eventually(Duration::from_secs(60), || {
        let rows = if db.exists() {
            snapshot_rows(&db, "kk-%")
        } else {
            0
        };
        std::future::ready((rows > 0).then_some(rows))
    })
    .await;
    consumer.kill9();
    let after_kill = snapshot_rows(&db, "kk-%");
    assert!(
        after_kill < expected,
        "killed mid-topic: {after_kill} of {expected} stored"
    );
    let mut restarted = Consumer::start(dir.path(), &env);
    eventually(Duration::from_secs(90), || {
        std::future::ready((snapshot_rows(&db, "kk-%") == expected).then_some(()))
    })
    .await;
    eprintln!("rows when killed: {at_kill}..{after_kill} of {expected}; after restart: {expected}");
    restarted.stop();
}

/// Every metric the shipped Grafana dashboard queries exists in a real scrape of a
/// receiver and a consumer.
fn check_dashboard_metrics(scrape: &str) {
    fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                        _ => exprs(value, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|item| exprs(item, out)),
            _ => {}
        }
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/skysnap/dashboards/skysnap.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard file"))
            .expect("dashboard is JSON");
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(!queries.is_empty(), "the dashboard has queries");
    let names: HashSet<&str> = queries
        .iter()
        .flat_map(|expr| expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|token| token.starts_with("skysnap_"))
        .collect();
    let scraped: HashSet<&str> = scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let missing: Vec<_> = names
        .iter()
        .filter(|name| !scraped.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard queries metrics no scrape has: {missing:?}"
    );
    eprintln!("dashboard metrics found in the scrape: {}", names.len());
}
