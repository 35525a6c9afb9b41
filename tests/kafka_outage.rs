//! The Kafka broker stopped and restarted under load in kafka mode: every acknowledged
//! snapshot is in the topic, every refused stream was refused with UNAVAILABLE. Its own
//! test binary, because it stops the broker the other tests share.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{fresh_topic, kafka_brokers, load_through_outage, read_topic, LoadOutcome, Server};

#[tokio::test]
async fn test_kafka_broker_restart_loses_nothing_acknowledged() {
    let topic = fresh_topic("koutage", 4).await;
    let brokers = kafka_brokers();
    let mut server = Server::start(&[
        ("SKYSNAP_PIPELINE_MODE", "kafka"),
        ("SKYSNAP_KAFKA_BROKERS", brokers.as_str()),
        ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
        ("SKYSNAP_KAFKA_MESSAGE_TIMEOUT_MS", "3000"),
        ("SKYSNAP_SINK_RETRY_BUDGET_MS", "4000"),
    ]);
    let (
        acknowledged_before,
        LoadOutcome {
            acknowledged,
            refused,
        },
    ) = load_through_outage(
        &server,
        "ko",
        Duration::from_secs(30),
        "kafka",
        Duration::from_secs(10),
    )
    .await;

    let mut stored: HashMap<String, HashSet<i32>> = HashMap::new();
    let messages = read_topic(&topic);
    for message in &messages {
        stored
            .entry(message.snapshot.trace_segment_id.clone())
            .or_default()
            .insert(message.snapshot.sequence);
    }
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|segment| stored.get(*segment).map(HashSet::len).unwrap_or(0) != 500)
        .collect();
    eprintln!(
        "acknowledged streams: {} ({} before the outage), refused: {}, messages in topic: {}, acknowledged incomplete: {}",
        acknowledged.len(),
        acknowledged_before,
        refused.len(),
        messages.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "acknowledged but not in Kafka: {missing:?}"
    );
    assert!(acknowledged_before > 0);
    assert!(!refused.is_empty(), "the outage was noticed");
    assert!(
        refused
            .values()
            .all(|code| *code == tonic::Code::Unavailable),
        "{refused:?}"
    );
    assert!(
        acknowledged.len() > acknowledged_before,
        "ingest resumed after the broker came back"
    );
    server.stop();
}
