//! Kafka mode against the real broker the test command starts (Apache Kafka 4.x, KRaft,
//! loopback): receivers write the topic, `skysnap consume` moves it into ClickHouse and
//! SQLite, a consumer killed with SIGKILL mid-topic loses nothing, and what the consumer
//! cannot store goes to the dead-letter topic without stopping the group. A fresh topic
//! and database per test.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use skysnap::proto::v3::ThreadSnapshot;

use prost::Message as _;
use skysnap::proto::v3::ThreadSnapshot as Snapshot;

use common::{
    clickhouse, clickhouse_count, clickhouse_url, committed_and_end_offsets, create_topic,
    eventually, fresh_database, fresh_topic, kafka_brokers, parse_metric, produce_raw, read_topic,
    read_topic_raw, snapshot, snapshot_rows, Consumer, Server,
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
    let table = format!("{database}.profile_snapshot");
    eventually(Duration::from_secs(90), || async {
        // The consumer creates its tables when it starts.
        let tables = clickhouse_count(&format!(
            "SELECT count() FROM system.tables WHERE database = '{database}' AND name = 'profile_snapshot'"
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
async fn test_kafka_mode_sends_the_agent_bytes_as_they_came() {
    use bytes::Bytes;
    use http::uri::PathAndQuery;
    let topic = fresh_topic("as-sent", 2).await;
    let brokers = kafka_brokers();
    let mut receiver = Server::start(&[
        ("SKYSNAP_PIPELINE_MODE", "kafka"),
        ("SKYSNAP_KAFKA_BROKERS", brokers.as_str()),
        ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
    ]);
    // Valid snapshots, each with a field of a later protocol version appended (field 15,
    // varint) that re-encoding would drop: the topic must carry it.
    let sent: Vec<Bytes> = (0..50)
        .map(|n| {
            let mut bytes = snapshot("task-raw", "segment-raw", n).encode_to_vec();
            bytes.extend([0x78, 0x2a]);
            Bytes::from(bytes)
        })
        .collect();
    let channel = tonic::transport::Endpoint::from_shared(receiver.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.client_streaming(
        tonic::Request::new(tokio_stream::iter(sent.clone())),
        PathAndQuery::from_static("/skywalking.v3.ProfileTask/collectSnapshot"),
        skysnap::grpc::raw::RawCodec,
    )
    .await
    .expect("stream acknowledged after Kafka delivery");
    let mut values: Vec<Vec<u8>> = read_topic_raw(&topic)
        .into_iter()
        .map(|message| message.value_opt.expect("a value"))
        .collect();
    let mut expected: Vec<Vec<u8>> = sent.iter().map(|bytes| bytes.to_vec()).collect();
    values.sort();
    expected.sort();
    assert_eq!(values, expected);
    receiver.stop();
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

/// Bytes no protobuf decoder takes: a varint longer than ten bytes.
fn garbage() -> Vec<u8> {
    let mut bytes = vec![0xff; 11];
    bytes.extend_from_slice(b" is no ThreadSnapshot");
    assert!(Snapshot::decode(bytes.as_slice()).is_err());
    bytes
}

/// Makes the SQLite store refuse, for good, every snapshot of one segment. A snapshot
/// that passes the consumer's validation is taken by both stores as they ship (no
/// column, constraint or size limit of theirs refuses one), so a store rule (a trigger
/// that aborts the insert, as a DBA's constraint would) stands in for "a row the store
/// rejects": SQLite answers it with a constraint error, which skysnap treats as final.
fn refuse_segment_in_sqlite(db: &std::path::Path, segment: &str) {
    drop(skysnap::store::sqlite::SqliteStore::open(db, 1).expect("schema created"));
    rusqlite::Connection::open(db)
        .unwrap()
        .execute_batch(&format!(
            "CREATE TRIGGER refuse_segment BEFORE INSERT ON profile_snapshot \
             WHEN (SELECT segment_id FROM profile_segment_task \
                   WHERE segment_pk = NEW.segment_pk) = '{segment}' \
             BEGIN SELECT RAISE(ABORT, 'segment {segment} refused by a store rule'); END;"
        ))
        .unwrap();
}

/// Waits until the group has committed every partition of the topic to its end.
async fn wait_until_committed_to_end(group: &str, topic: &str, consumer: &Consumer) {
    eventually(Duration::from_secs(60), || {
        let offsets = committed_and_end_offsets(group, topic);
        let done = offsets
            .values()
            .all(|(committed, end)| *committed == Some(*end));
        if !done {
            eprintln!("committed/end: {offsets:?}");
        }
        std::future::ready(done.then_some(()))
    })
    .await;
    assert!(!consumer.log().contains("panicked"), "{}", consumer.log());
}

#[tokio::test]
async fn test_consumer_dead_letters_invalid_and_refused_messages_and_moves_on() {
    let topic = fresh_topic("kdlq", 2).await;
    // The default dead-letter topic, `<topic>.dlq`, created as an operator would.
    let dlq = format!("{topic}.dlq");
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consumed.db");
    refuse_segment_in_sqlite(&db, "dlq-refused");

    // 300 good snapshots over 6 segments; the bad ones among them, each with its reason.
    let mut messages: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..300)
        .map(|n| {
            let segment = format!("dlq-good-{}", n % 6);
            let value = snapshot("task-dlq", &segment, n / 6).encode_to_vec();
            (segment.into_bytes(), Some(value))
        })
        .collect();
    let mut nameless = snapshot("task-dlq", "dlq-nameless", 0);
    nameless.task_id.clear();
    let bad: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("garbage", Some(garbage()), "malformed"),
        ("nameless", Some(nameless.encode_to_vec()), "empty_task_id"),
        ("tombstone", None, "malformed"),
        (
            "dlq-refused",
            Some(snapshot("task-dlq", "dlq-refused", 0).encode_to_vec()),
            "store_refused",
        ),
    ];
    for (position, (key, value, _)) in [40, 120, 121, 250].into_iter().zip(&bad) {
        messages.insert(position, (key.as_bytes().to_vec(), value.clone()));
    }
    let borrowed: Vec<(&[u8], Option<Vec<u8>>)> = messages
        .iter()
        .map(|(key, value)| (key.as_slice(), value.clone()))
        .collect();
    let placed = produce_raw(&topic, &borrowed).await;

    let group = format!("dlq-group-{topic}");
    let mut consumer = Consumer::start(
        dir.path(),
        &[
            ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
            ("SKYSNAP_KAFKA_GROUP_ID", group.as_str()),
            // Small batches: the refused snapshot shares its batch with good ones.
            ("SKYSNAP_KAFKA_CONSUME_BATCH_SNAPSHOTS", "40"),
            ("SKYSNAP_SQLITE_PATH", db.to_str().unwrap()),
        ],
    );
    // The group moves past every message, bad ones included, and every good one landed.
    wait_until_committed_to_end(&group, &topic, &consumer).await;
    assert_eq!(snapshot_rows(&db, "dlq-good-%"), 300);
    assert_eq!(snapshot_rows(&db, "dlq-refused"), 0);

    // One dead letter per bad message: its original key and bytes, and why.
    let letters = read_topic_raw(&dlq);
    assert_eq!(letters.len(), bad.len(), "{letters:?}");
    for (key, value, reason) in &bad {
        let index = messages
            .iter()
            .position(|(k, _)| k.as_slice() == key.as_bytes())
            .unwrap();
        let (partition, offset) = placed[index];
        let letter = letters
            .iter()
            .find(|letter| letter.key_opt.as_deref() == Some(key.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {key}: {letters:?}"));
        assert_eq!(&letter.value_opt, value, "{key}: the original bytes");
        assert_eq!(letter.headers["skysnap-reason"], *reason, "{key}");
        assert_eq!(letter.headers["skysnap-source-topic"], topic);
        assert_eq!(
            letter.headers["skysnap-source-partition"],
            partition.to_string()
        );
        assert_eq!(letter.headers["skysnap-source-offset"], offset.to_string());
        let error = &letter.headers["skysnap-error"];
        assert!(
            error.contains(reason) || *reason == "store_refused",
            "{key}: {error}"
        );
        if *reason == "store_refused" {
            assert!(error.contains("refused by a store rule"), "{error}");
        }
    }

    let scrape = consumer.scrape().await;
    let dead_lettered = |reason: &str| {
        parse_metric(
            &scrape,
            "skysnap_consumer_dead_lettered_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(dead_lettered("malformed"), 2.0, "{scrape}");
    assert_eq!(dead_lettered("empty_task_id"), 1.0);
    assert_eq!(dead_lettered("store_refused"), 1.0);
    assert_eq!(
        parse_metric(&scrape, "skysnap_consumer_dead_letter_failures_total", &[]),
        0.0
    );
    // The consumer's series say so: a receiver's committed snapshots are not these.
    assert_eq!(
        parse_metric(
            &scrape,
            "skysnap_snapshots_committed_total",
            &["role=\"consumer\""]
        ),
        300.0,
        "{scrape}"
    );
    // The refusal itself is counted where every sink failure is.
    assert!(
        parse_metric(
            &scrape,
            "skysnap_sink_errors_total",
            &["sink=\"sqlite\"", "retriable=\"false\""]
        ) >= 1.0
    );
    consumer.stop();
}

#[tokio::test]
async fn test_consumer_commits_nothing_past_a_dead_letter_it_could_not_deliver() {
    let topic = fresh_topic("kdlqdown", 1).await;
    // Not created yet, and the broker creates no topic by itself: the dead letter cannot
    // be delivered.
    let dlq = format!("{topic}.dlq");
    let mut messages: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..20)
        .map(|n| {
            let value = snapshot("task-dlq", "dlqdown-good", n).encode_to_vec();
            (b"dlqdown-good".to_vec(), Some(value))
        })
        .collect();
    messages.insert(10, (b"garbage".to_vec(), Some(garbage())));
    let borrowed: Vec<(&[u8], Option<Vec<u8>>)> = messages
        .iter()
        .map(|(key, value)| (key.as_slice(), value.clone()))
        .collect();
    let placed = produce_raw(&topic, &borrowed).await;
    let garbage_offset = placed[10].1;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consumed.db");
    let group = format!("dlqdown-group-{topic}");
    let mut consumer = Consumer::start(
        dir.path(),
        &[
            ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
            ("SKYSNAP_KAFKA_GROUP_ID", group.as_str()),
            ("SKYSNAP_KAFKA_MESSAGE_TIMEOUT_MS", "1500"),
            ("SKYSNAP_SQLITE_PATH", db.to_str().unwrap()),
        ],
    );
    eventually(Duration::from_secs(60), || async {
        let failures = parse_metric(
            &consumer.scrape().await,
            "skysnap_consumer_dead_letter_failures_total",
            &[],
        );
        (failures >= 2.0).then_some(())
    })
    .await;
    let offsets = committed_and_end_offsets(&group, &topic);
    let (committed, _) = offsets[&0];
    assert!(
        committed.is_none_or(|offset| offset <= garbage_offset),
        "committed past an undelivered dead letter: {offsets:?}"
    );

    // The topic appears: the same consumer delivers the letter and moves on.
    create_topic(&dlq, 1).await;
    wait_until_committed_to_end(&group, &topic, &consumer).await;
    assert_eq!(snapshot_rows(&db, "dlqdown-good"), 20);
    let letters = read_topic_raw(&dlq);
    assert!(!letters.is_empty());
    assert!(
        letters.iter().all(
            |letter| letter.key_opt.as_deref() == Some(b"garbage".as_slice())
                && letter.value_opt == Some(garbage())
                && letter.headers["skysnap-source-offset"] == garbage_offset.to_string()
        ),
        "{letters:?}"
    );
    consumer.stop();
}

/// A store that refuses everything because of its set-up (here its snapshot table was
/// dropped under the running consumer) is not the messages' fault: nothing goes to the
/// dead-letter topic and nothing is committed while it lasts; once the table is back
/// the same consumer stores every message and moves on.
#[tokio::test]
async fn test_consumer_waits_out_an_unusable_store_instead_of_dead_lettering() {
    let topic = fresh_topic("kunusable", 1).await;
    let dlq = format!("{topic}.dlq");
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("consumed.db");
    let group = format!("unusable-group-{topic}");
    let mut consumer = Consumer::start(
        dir.path(),
        &[
            ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
            ("SKYSNAP_KAFKA_GROUP_ID", group.as_str()),
            ("SKYSNAP_SQLITE_PATH", db.to_str().unwrap()),
        ],
    );
    // Ready: its schema is in place, then it goes.
    eventually(Duration::from_secs(30), || async {
        (!consumer.scrape().await.is_empty()).then_some(())
    })
    .await;
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("DROP TABLE profile_snapshot")
        .unwrap();
    let messages: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..50)
        .map(|n| {
            let value = snapshot("task-unusable", "unusable-seg", n).encode_to_vec();
            (b"unusable-seg".to_vec(), Some(value))
        })
        .collect();
    let borrowed: Vec<(&[u8], Option<Vec<u8>>)> = messages
        .iter()
        .map(|(key, value)| (key.as_slice(), value.clone()))
        .collect();
    produce_raw(&topic, &borrowed).await;

    // The write fails as retriable, again and again, and is not dead-lettered.
    eventually(Duration::from_secs(60), || async {
        let errors = parse_metric(
            &consumer.scrape().await,
            "skysnap_sink_errors_total",
            &["sink=\"sqlite\"", "retriable=\"true\""],
        );
        (errors >= 2.0).then_some(())
    })
    .await;
    let offsets = committed_and_end_offsets(&group, &topic);
    assert!(
        offsets[&0].0.is_none_or(|offset| offset == 0),
        "committed while the store could take nothing: {offsets:?}"
    );
    assert!(
        read_topic_raw(&dlq).is_empty(),
        "dead-lettered a store fault"
    );
    assert!(
        consumer.log().contains("no such table"),
        "{}",
        consumer.log()
    );

    // The table is back (as an operator would restore it): everything lands.
    drop(skysnap::store::sqlite::SqliteStore::open(&db, 1).expect("schema re-created"));
    wait_until_committed_to_end(&group, &topic, &consumer).await;
    assert_eq!(snapshot_rows(&db, "unusable-seg"), 50);
    assert!(read_topic_raw(&dlq).is_empty());
    let scrape = consumer.scrape().await;
    assert_eq!(
        parse_metric(&scrape, "skysnap_consumer_dead_lettered_total", &[]),
        0.0,
        "{scrape}"
    );
    consumer.stop();
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
    // A panel that picks one role (so that kafka mode does not count a snapshot twice)
    // picks a role the binaries really label their series with.
    let mut role_selectors = HashSet::new();
    for expr in &queries {
        for (start, _) in expr.match_indices("skysnap_") {
            let rest = &expr[start..];
            let name_end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let Some(selector) = rest[name_end..].strip_prefix('{') else {
                continue;
            };
            let selector = &selector[..selector.find('}').expect("closed selector")];
            if let Some(role) = selector.split("role=\"").nth(1) {
                let role = &role[..role.find('"').unwrap()];
                role_selectors.insert((rest[..name_end].to_string(), role.to_string()));
            }
        }
    }
    assert!(
        !role_selectors.is_empty(),
        "the ingest panel selects by role"
    );
    for (name, role) in &role_selectors {
        let label = format!("role=\"{role}\"");
        assert!(
            scrape
                .lines()
                .any(|line| line.starts_with(&format!("{name}{{")) && line.contains(&label)),
            "dashboard selects {name}{{{label}}}, which no scrape has"
        );
    }
    eprintln!("dashboard metrics found in the scrape: {}", names.len());
}
