//! The Kafka broker stopped and restarted under load in kafka mode: every acknowledged
//! snapshot is in the topic, every refused stream was refused with UNAVAILABLE. Its own
//! test binary, because it stops the broker the other tests share.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use skysnap::proto::v3::ThreadSnapshot;

use common::{fresh_topic, kafka_brokers, read_topic, snapshot, Server};

fn kafka_service(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services/kafka.sh");
    let output = Command::new(script)
        .arg(action)
        .output()
        .expect("kafka.sh runs");
    assert!(
        output.status.success(),
        "kafka.sh {action}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

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
    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    let refused: Arc<Mutex<HashMap<String, tonic::Code>>> = Arc::default();
    let load_until = Instant::now() + Duration::from_secs(30);
    let mut workers = Vec::new();
    for worker in 0..8 {
        let mut client = server.profile_client().await;
        let (acknowledged, refused) = (acknowledged.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            let mut round = 0;
            while Instant::now() < load_until {
                round += 1;
                let segment = format!("ko-{worker}-{round}");
                let messages: Vec<ThreadSnapshot> =
                    (0..500).map(|n| snapshot("task-ko", &segment, n)).collect();
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
    kafka_service("stop");
    tokio::time::sleep(Duration::from_secs(10)).await;
    kafka_service("start");
    for worker in workers {
        worker.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();

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
