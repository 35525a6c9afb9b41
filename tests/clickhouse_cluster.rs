//! skysnap on a replicated, sharded ClickHouse cluster: the four Debian 18.16 servers
//! and the ZooKeeper that `scripts/services/clickhouse-cluster.sh` runs on loopback as
//! `skysnap_cluster`, 2 shards × 2 replicas (shard 1 = nodes 1 and 2, shard 2 = nodes
//! 3 and 4). Each test has a database of its own; the tests take turns, because one
//! of them kills a node.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use skysnap::proto::v3::{ProfileTaskFinishReport, ThreadSnapshot, ThreadStack};

/// A stream's segment, when its answer came, and the answer.
type StreamOutcome = (String, Instant, Result<(), tonic::Code>);

/// One test at a time on the cluster.
static CLUSTER: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

/// The nodes' HTTP interfaces, node 1 first.
fn nodes() -> Vec<String> {
    std::env::var("SKYSNAP_TEST_CLICKHOUSE_CLUSTER_URLS")
        .unwrap_or_else(|_| {
            (1..=4)
                .map(|node| format!("http://127.0.0.1:1813{node}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .split(',')
        .map(str::to_string)
        .collect()
}

fn cluster_name() -> String {
    std::env::var("SKYSNAP_TEST_CLICKHOUSE_CLUSTER")
        .unwrap_or_else(|_| "skysnap_cluster".to_string())
}

/// The URL list of the given nodes (1-based), for `clickhouse.url`.
fn urls(of: &[usize]) -> String {
    let nodes = nodes();
    of.iter()
        .map(|node| nodes[node - 1].clone())
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs SQL on one node (1-based) and answers its text.
async fn on_node(node: usize, sql: &str) -> String {
    let url = &nodes()[node - 1];
    let response = reqwest::Client::new()
        .post(url)
        .body(sql.to_string())
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .unwrap_or_else(|error| {
            panic!(
                "cluster node {node} is not reachable at {url} ({error}); run the tests \
                 through ./scripts/test.sh, which starts the cluster"
            )
        });
    let status = response.status();
    let text = response.text().await.expect("clickhouse answer");
    assert!(status.is_success(), "node {node} refused {sql}: {text}");
    text
}

async fn count_on_node(node: usize, sql: &str) -> i64 {
    on_node(node, sql).await.trim().parse().expect("a number")
}

/// Runs `scripts/services/clickhouse-cluster.sh <action> <node>`.
fn cluster_node(action: &str, node: usize) {
    let script = format!(
        "{}/scripts/services/clickhouse-cluster.sh",
        env!("CARGO_MANIFEST_DIR")
    );
    let output = std::process::Command::new(&script)
        .args([action, &node.to_string()])
        .output()
        .expect("cluster script runs");
    assert!(
        output.status.success(),
        "clickhouse-cluster.sh {action} {node}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A skysnap on the cluster, talking to the given nodes in turn.
fn receiver(database: &str, nodes: &[usize], extra: &[(&str, &str)]) -> Server {
    let url = urls(nodes);
    let cluster = cluster_name();
    let mut env = vec![
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", url.as_str()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database),
        ("SKYSNAP_CLICKHOUSE_CLUSTER", cluster.as_str()),
        ("SKYSNAP_TASKS_CACHE_REFRESH_INTERVAL_MS", "300"),
    ];
    env.extend_from_slice(extra);
    Server::start(&env)
}

/// A snapshot dumped now-ish whose stack is one of a few shapes, so that flame graphs
/// and stack trees have branches.
fn varied_snapshot(task_id: &str, segment: &str, sequence: i32, base_ms: i64) -> ThreadSnapshot {
    let shape = (segment.len() + sequence as usize / 7) % 5;
    let mut frames: Vec<String> = vec![
        "java.lang.Thread.run:750".into(),
        "org.apache.tomcat.util.threads.TaskThread$WrappingRunnable.run:61".into(),
        "com.shop.OrderController.list:42".into(),
    ];
    for depth in 0..shape + 1 {
        frames.push(format!("com.shop.Layer{shape}.call{depth}:{}", 10 + depth));
    }
    if sequence % 3 == 0 {
        frames.push("java.net.SocketInputStream.read:171".into());
    }
    ThreadSnapshot {
        task_id: task_id.to_string(),
        trace_segment_id: segment.to_string(),
        time: base_ms + i64::from(sequence) * 20,
        sequence,
        stack: Some(ThreadStack {
            code_signatures: frames,
        }),
    }
}

/// Sends one stream per segment (`per_stream` snapshots each), `parallel` at a time,
/// and answers each segment's outcome.
async fn send_segments(
    server: &Server,
    task_id: &str,
    segments: &[String],
    per_stream: i32,
    base_ms: i64,
    parallel: usize,
) -> Vec<(String, Result<(), tonic::Code>)> {
    let client = server.profile_client().await;
    let mut outcomes = Vec::new();
    for chunk in segments.chunks(parallel) {
        let sends = chunk.iter().map(|segment| {
            let mut client = client.clone();
            let messages: Vec<ThreadSnapshot> = (0..per_stream)
                .map(|sequence| varied_snapshot(task_id, segment, sequence, base_ms))
                .collect();
            async move {
                let result = client
                    .collect_snapshot(tokio_stream::iter(messages))
                    .await
                    .map(|_| ())
                    .map_err(|status| status.code());
                (segment.clone(), result)
            }
        });
        outcomes.extend(futures::future::join_all(sends).await);
    }
    outcomes
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Waits until both replicas of each shard hold the same rows in `table` (each key
/// once), and answers the rows of shard 1 and shard 2.
async fn replicas_equal(database: &str, table: &str, within: Duration) -> (i64, i64) {
    let columns = match table {
        "profile_snapshot" => "task_id, segment_id, sequence, dump_time, stack_id",
        "profile_stack" => "stack_id, day, arrayStringConcat(frames, '\\n')",
        "profile_segment_task" => "segment_id, task_id, day",
        other => panic!("no columns for {other}"),
    };
    let sql = format!("SELECT count() FROM {database}.{table}_local FINAL");
    let hashed =
        format!("SELECT count(), sum(cityHash64({columns})) FROM {database}.{table}_local FINAL");
    eventually(within, || {
        let (sql, hashed) = (sql.clone(), hashed.clone());
        async move {
            let mut rows = Vec::new();
            for (first, second) in [(1, 2), (3, 4)] {
                let (a, b) = (
                    on_node(first, &hashed).await,
                    on_node(second, &hashed).await,
                );
                if a != b {
                    return None;
                }
                rows.push(count_on_node(first, &sql).await);
            }
            Some((rows[0], rows[1]))
        }
    })
    .await
}

/// Each segment of the database's snapshots, by the shard (1 or 2) whose first replica
/// holds it locally.
async fn segments_by_shard(database: &str) -> BTreeMap<usize, BTreeSet<String>> {
    let mut by_shard = BTreeMap::new();
    for (shard, node) in [(1, 1), (2, 3)] {
        let text = on_node(
            node,
            &format!("SELECT DISTINCT segment_id FROM {database}.profile_snapshot_local"),
        )
        .await;
        by_shard.insert(shard, text.lines().map(str::to_string).collect());
    }
    by_shard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_two_receivers_store_each_snapshot_once_on_one_shard() {
    let _turn = CLUSTER.lock().await;
    let database = fresh_database("cluster");
    // Two receivers on two different nodes (of different shards).
    let first = receiver(&database, &[1, 2], &[]);
    let second = receiver(&database, &[3, 4], &[]);

    // A task created through one receiver is handed to agents by the other.
    let task = first.create_task("cluster-shop", "/orders").await;
    let task_id = task["id"].as_str().unwrap().to_string();
    let second_client = second.profile_client().await;
    wait_for_commands(
        &second_client,
        "cluster-shop",
        "cluster-shop-1",
        Duration::from_secs(20),
    )
    .await;
    let (status, read_back) = second.get(&format!("/api/v1/tasks/{task_id}")).await;
    assert_eq!(status, 200, "{read_back}");
    assert_eq!(read_back, task);

    // 50,000 snapshots: 100 segments of 500, every other segment through each receiver,
    // then 10 segments sent again through the other receiver.
    let base = now_ms() - 60_000;
    let segments: Vec<String> = (0..100).map(|n| format!("cl-seg-{n:03}")).collect();
    let (even, odd): (Vec<String>, Vec<String>) = segments
        .iter()
        .cloned()
        .partition(|segment| segment.ends_with(['0', '2', '4', '6', '8']));
    let (through_first, through_second) = tokio::join!(
        send_segments(&first, &task_id, &even, 500, base, 4),
        send_segments(&second, &task_id, &odd, 500, base, 4),
    );
    let resent = send_segments(&second, &task_id, &even[..5], 500, base, 5).await;
    let resent_too = send_segments(&first, &task_id, &odd[..5], 500, base, 5).await;
    for (segment, result) in through_first
        .iter()
        .chain(&through_second)
        .chain(&resent)
        .chain(&resent_too)
    {
        assert_eq!(*result, Ok(()), "stream of {segment}");
    }

    // Exactly 50,000 keys through the Distributed table, from either entry node.
    for node in [1, 4] {
        let final_rows = count_on_node(
            node,
            &format!("SELECT count() FROM {database}.profile_snapshot FINAL"),
        )
        .await;
        assert_eq!(final_rows, 50_000, "FINAL through node {node}");
        let keys = count_on_node(
            node,
            &format!(
                "SELECT uniqExact(task_id, segment_id, sequence) FROM {database}.profile_snapshot"
            ),
        )
        .await;
        assert_eq!(keys, 50_000, "keys through node {node}");
    }

    // Each (task, segment) lies on one shard only, and both shards hold some.
    let by_shard = segments_by_shard(&database).await;
    assert!(by_shard[&1].is_disjoint(&by_shard[&2]), "{by_shard:?}");
    let all: BTreeSet<String> = by_shard.values().flatten().cloned().collect();
    assert_eq!(all, segments.iter().cloned().collect::<BTreeSet<_>>());
    assert!(!by_shard[&1].is_empty() && !by_shard[&2].is_empty());

    // Both replicas of each shard end up equal, for the snapshots and the dictionary.
    let (shard_one, shard_two) =
        replicas_equal(&database, "profile_snapshot", Duration::from_secs(60)).await;
    assert_eq!(shard_one + shard_two, 50_000);
    assert_eq!(shard_one, by_shard[&1].len() as i64 * 500);
    replicas_equal(&database, "profile_stack", Duration::from_secs(60)).await;
    replicas_equal(&database, "profile_segment_task", Duration::from_secs(60)).await;
    // A stack is stored once in the cluster (once a day): on one shard.
    let stacks_total = count_on_node(
        1,
        &format!("SELECT count() FROM {database}.profile_stack FINAL"),
    )
    .await;
    let distinct_stacks = count_on_node(
        1,
        &format!("SELECT uniqExact(stack_id) FROM {database}.profile_stack"),
    )
    .await;
    assert_eq!(stacks_total, distinct_stacks);

    // The API of both receivers answers the same from the cluster.
    let path = format!("/api/v1/tasks/{task_id}/segments");
    let (_, listed_first) = first.get(&path).await;
    let (_, listed_second) = second.get(&path).await;
    assert_eq!(listed_first, listed_second);
    let listed = listed_first.as_array().unwrap();
    assert_eq!(listed.len(), 100);
    assert!(listed
        .iter()
        .all(|segment| segment["snapshot_count"] == 500));
    let path = format!("/api/v1/tasks/{task_id}/flamegraph");
    let (status, flame_first) = first.get(&path).await;
    assert_eq!(status, 200, "{flame_first}");
    assert_eq!(flame_first["value"], 50_000);
    assert_eq!(flame_first, second.get(&path).await.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_replica_killed_mid_load_loses_no_acknowledged_snapshot() {
    let _turn = CLUSTER.lock().await;
    let database = fresh_database("cluster_kill");
    // The first receiver talks to node 1, the replica that is killed, and has node 2
    // after it; the second talks to node 3, and its writes to shard 1 go to node 1
    // first too (in_order) until it is gone.
    let first = receiver(&database, &[1, 2], &[]);
    let second = receiver(&database, &[3, 4], &[]);
    let task_id = first.create_task("cluster-kill", "/pay").await["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Streams of 500 snapshots from 3 workers per receiver for 14 s; node 1 is
    // SIGKILLed at the 3rd second and started again at the 8th.
    let base = now_ms() - 60_000;
    let until = Instant::now() + Duration::from_secs(14);
    let outcomes: Arc<Mutex<Vec<StreamOutcome>>> = Arc::default();
    let mut workers = Vec::new();
    for (name, server) in [("a", &first), ("b", &second)] {
        for worker in 0..3 {
            let client = server.profile_client().await;
            let outcomes = outcomes.clone();
            let task_id = task_id.clone();
            workers.push(tokio::spawn(async move {
                let mut round = 0;
                while Instant::now() < until {
                    round += 1;
                    let segment = format!("kill-{name}{worker}-{round}");
                    let mut client = client.clone();
                    let messages: Vec<ThreadSnapshot> = (0..500)
                        .map(|sequence| varied_snapshot(&task_id, &segment, sequence, base))
                        .collect();
                    let result = client
                        .collect_snapshot(tokio_stream::iter(messages))
                        .await
                        .map(|_| ())
                        .map_err(|status| status.code());
                    let failed = result.is_err();
                    outcomes
                        .lock()
                        .unwrap()
                        .push((segment, Instant::now(), result));
                    if failed {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = Instant::now();
    tokio::task::spawn_blocking(|| cluster_node("kill-node", 1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restarted_at = Instant::now();
    tokio::task::spawn_blocking(|| cluster_node("start-node", 1))
        .await
        .unwrap();
    for worker in workers {
        worker.await.unwrap();
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());

    let acknowledged: Vec<&String> = outcomes
        .iter()
        .filter(|(_, _, result)| result.is_ok())
        .map(|(segment, _, _)| segment)
        .collect();
    let refused: HashMap<&String, tonic::Code> = outcomes
        .iter()
        .filter_map(|(segment, _, result)| result.err().map(|code| (segment, code)))
        .collect();
    // A refused stream is UNAVAILABLE, nothing else.
    assert!(
        refused
            .values()
            .all(|code| *code == tonic::Code::Unavailable),
        "{refused:?}"
    );
    // Writes went on while the replica was down: the other replica of its shard took
    // them (through both receivers).
    let while_down = outcomes
        .iter()
        .filter(|(_, at, result)| {
            result.is_ok() && *at > killed_at + Duration::from_secs(1) && *at < restarted_at
        })
        .map(|(segment, _, _)| segment.as_bytes()[5])
        .collect::<BTreeSet<u8>>();
    assert_eq!(
        while_down,
        BTreeSet::from([b'a', b'b']),
        "streams acknowledged by each receiver while node 1 was down"
    );
    assert!(acknowledged.len() >= 20, "{} streams", acknowledged.len());
    // The first receiver moved on from node 1 to node 2 of its list.
    assert!(
        first
            .stderr()
            .contains("moving to the next of clickhouse.url"),
        "{}",
        first.stderr()
    );

    // Restarted, node 1 catches up with node 2 (its old ZooKeeper session must expire
    // first: about 10 s).
    replicas_equal(&database, "profile_snapshot", Duration::from_secs(90)).await;
    replicas_equal(&database, "profile_stack", Duration::from_secs(60)).await;

    // Every acknowledged snapshot is there, through the Distributed table and on both
    // replicas of its shard.
    let stored: HashMap<String, i64> = on_node(
        1,
        &format!(
            "SELECT segment_id, count() FROM {database}.profile_snapshot FINAL GROUP BY segment_id"
        ),
    )
    .await
    .lines()
    .map(|line| {
        let (segment, count) = line.split_once('\t').unwrap();
        (segment.to_string(), count.parse().unwrap())
    })
    .collect();
    let missing: Vec<&&String> = acknowledged
        .iter()
        .filter(|segment| stored.get(segment.as_str()) != Some(&500))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged streams incomplete: {missing:?}",
        missing.len()
    );
    // Nothing twice: the keys are the stored rows with FINAL.
    let keys = count_on_node(
        2,
        &format!(
            "SELECT uniqExact(task_id, segment_id, sequence) FROM {database}.profile_snapshot"
        ),
    )
    .await;
    assert_eq!(keys, stored.values().sum::<i64>());
    // The API reads the same counts.
    let (_, listed) = second
        .get(&format!("/api/v1/tasks/{task_id}/segments"))
        .await;
    let listed_total: i64 = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|segment| segment["snapshot_count"].as_i64().unwrap())
        .sum();
    assert_eq!(listed_total, keys);
    eprintln!(
        "cluster kill: {} streams acknowledged, {} refused ({} while node 1 was down)",
        acknowledged.len(),
        refused.len(),
        outcomes
            .iter()
            .filter(|(_, at, result)| result.is_err() && *at > killed_at && *at < restarted_at)
            .count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_consume_stores_each_snapshot_once() {
    let _turn = CLUSTER.lock().await;
    let database = fresh_database("cluster_consume");
    let topic = fresh_topic("cluster-consume", 4).await;
    let brokers = kafka_brokers();
    let receiver = Server::start(&[
        ("SKYSNAP_PIPELINE_MODE", "kafka"),
        ("SKYSNAP_KAFKA_BROKERS", brokers.as_str()),
        ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
    ]);
    let task_id = "cluster-consume-task";
    let base = now_ms() - 60_000;
    let segments: Vec<String> = (0..20).map(|n| format!("cc-seg-{n:02}")).collect();
    for (segment, result) in send_segments(&receiver, task_id, &segments, 500, base, 4).await {
        assert_eq!(result, Ok(()), "{segment}");
    }
    // Re-sent streams are more messages for the same keys.
    for (segment, result) in send_segments(&receiver, task_id, &segments[..4], 500, base, 4).await {
        assert_eq!(result, Ok(()), "{segment}");
    }

    // Two consumers of one group, entering the cluster at different shards.
    let cluster = cluster_name();
    let dir = tempfile::tempdir().unwrap();
    let urls_first = urls(&[1, 2]);
    let urls_second = urls(&[4, 3]);
    let common_env = [
        ("SKYSNAP_KAFKA_TOPIC", topic.as_str()),
        ("SKYSNAP_KAFKA_GROUP_ID", "cluster-group"),
        ("SKYSNAP_KAFKA_CONSUME_BATCH_SNAPSHOTS", "1000"),
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database.as_str()),
        ("SKYSNAP_CLICKHOUSE_CLUSTER", cluster.as_str()),
    ];
    let mut env_first = common_env.to_vec();
    env_first.push(("SKYSNAP_CLICKHOUSE_URL", urls_first.as_str()));
    let mut env_second = common_env.to_vec();
    env_second.push(("SKYSNAP_CLICKHOUSE_URL", urls_second.as_str()));
    let mut consumer = Consumer::start(dir.path(), &env_first);
    let mut consumer_too = Consumer::start(dir.path(), &env_second);
    let table = format!("{database}.profile_snapshot");
    eventually(Duration::from_secs(90), || async {
        let tables = count_on_node(
            3,
            &format!(
                "SELECT count() FROM system.tables WHERE database = '{database}' AND name = 'profile_snapshot'"
            ),
        )
        .await;
        if tables == 0 {
            return None;
        }
        let stored = count_on_node(3, &format!("SELECT count() FROM {table} FINAL")).await;
        (stored == 10_000).then_some(())
    })
    .await;
    let keys = count_on_node(
        1,
        &format!("SELECT uniqExact(task_id, segment_id, sequence) FROM {table}"),
    )
    .await;
    assert_eq!(keys, 10_000);
    let by_shard = segments_by_shard(&database).await;
    assert!(by_shard[&1].is_disjoint(&by_shard[&2]), "{by_shard:?}");
    assert_eq!(by_shard[&1].len() + by_shard[&2].len(), 20);
    let (shard_one, shard_two) =
        replicas_equal(&database, "profile_snapshot", Duration::from_secs(60)).await;
    assert_eq!(shard_one + shard_two, 10_000);
    // The group committed every message (12,000 with the re-sent streams), whichever
    // member took which partitions.
    let committed = eventually(Duration::from_secs(30), || async {
        let (first, second) = (consumer.committed().await, consumer_too.committed().await);
        (first + second >= 12_000.0).then_some((first, second))
    })
    .await;
    eprintln!("cluster consume: the members committed {committed:?} snapshots");
    consumer.stop();
    consumer_too.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_shard_down_refuses_streams_unavailable_and_keeps_the_rest() {
    let _turn = CLUSTER.lock().await;
    let database = fresh_database("cluster_shard_down");
    let server = receiver(
        &database,
        &[1, 2],
        &[("SKYSNAP_SINK_RETRY_BUDGET_MS", "3000")],
    );
    let base = now_ms() - 60_000;
    let before: Vec<String> = (0..8).map(|n| format!("sd-before-{n}")).collect();
    for (segment, result) in send_segments(&server, "sd-task", &before, 200, base, 4).await {
        assert_eq!(result, Ok(()), "{segment}");
    }
    // Both replicas of shard 2 gone: a batch with rows for it cannot commit.
    tokio::task::spawn_blocking(|| {
        cluster_node("kill-node", 3);
        cluster_node("kill-node", 4);
    })
    .await
    .unwrap();
    let during: Vec<String> = (0..8).map(|n| format!("sd-during-{n}")).collect();
    let outcomes = send_segments(&server, "sd-task", &during, 200, base, 8).await;
    tokio::task::spawn_blocking(|| {
        cluster_node("start-node", 3);
        cluster_node("start-node", 4);
    })
    .await
    .unwrap();
    // Retriable (ALL_CONNECTION_TRIES_FAILED), so UNAVAILABLE after the sink's budget,
    // never a refusal of the data.
    let refused: Vec<&tonic::Code> = outcomes
        .iter()
        .filter_map(|(_, result)| result.as_ref().err())
        .collect();
    assert!(!refused.is_empty(), "{outcomes:?}");
    assert!(
        refused
            .iter()
            .all(|code| **code == tonic::Code::Unavailable),
        "{outcomes:?}"
    );
    // Back, the agents' re-sent streams are taken, and everything acknowledged is there
    // (the restarted replicas wait for their old ZooKeeper sessions to expire first).
    let resent = eventually(Duration::from_secs(60), || async {
        let outcomes = send_segments(&server, "sd-task", &during, 200, base, 8).await;
        outcomes
            .iter()
            .all(|(_, result)| result.is_ok())
            .then_some(outcomes.len())
    })
    .await;
    assert_eq!(resent, 8);
    let stored = count_on_node(
        1,
        &format!("SELECT count() FROM {database}.profile_snapshot FINAL"),
    )
    .await;
    assert_eq!(stored, 16 * 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_refuses_a_database_of_single_node_tables() {
    let _turn = CLUSTER.lock().await;
    let database = fresh_database("cluster_single_tables");
    // A single-node store on node 1: its tables hold the names the Distributed tables take.
    let single = Server::start(&[
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", nodes()[0].as_str()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database.as_str()),
    ]);
    drop(single);
    let url = urls(&[1]);
    let cluster = cluster_name();
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let mut child = skysnap_command()
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env("SKYSNAP_STORE_KIND", "clickhouse")
        .env("SKYSNAP_CLICKHOUSE_URL", &url)
        .env("SKYSNAP_CLICKHOUSE_DATABASE", &database)
        .env("SKYSNAP_CLICKHOUSE_CLUSTER", &cluster)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("skysnap starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("skysnap started on a database of single-node tables");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("holds a single-node store"), "{stderr}");
    on_node(1, &format!("DROP DATABASE {database}")).await;
}

/// The answers of the reading API for one task, with the task's id written as `TASK`,
/// so that the same data under two task ids compares equal.
async fn api_answers(server: &Server, task_id: &str, segments: &[String]) -> Vec<(String, String)> {
    let mut paths = vec![
        format!("/api/v1/tasks/{task_id}/segments"),
        format!("/api/v1/tasks/{task_id}/flamegraph"),
        format!("/api/v1/tasks/{task_id}/flamegraph?format=collapsed"),
        format!("/api/v1/tasks/{task_id}/flamegraph?segment={}", segments[3]),
        format!("/api/v1/analysis?task={task_id}"),
        format!(
            "/api/v1/flamegraph/diff?base={task_id}&base_segment={}&target={task_id}&target_segment={}",
            segments[0], segments[1]
        ),
    ];
    for segment in &segments[..4] {
        paths.push(format!("/api/v1/segments/{segment}/snapshots"));
        paths.push(format!(
            "/api/v1/analysis?segment={segment}&start=0&end=99999999999999"
        ));
    }
    let mut answers = Vec::new();
    for path in paths {
        let response = reqwest::get(format!("{}{path}", server.http))
            .await
            .expect("http get");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(status, 200, "{path}: {text}");
        answers.push((path.replace(task_id, "TASK"), text.replace(task_id, "TASK")));
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_api_answers_as_a_single_node_on_the_same_data() {
    let _turn = CLUSTER.lock().await;
    let cluster_database = fresh_database("cluster_api");
    let single_database = fresh_database("single_api");
    let on_cluster = receiver(&cluster_database, &[3, 4], &[]);
    let single_url = clickhouse_url();
    let on_single = Server::start(&[
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", single_url.as_str()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", single_database.as_str()),
    ]);
    let start_time = now_ms() - 120_000;
    let mut task_ids = Vec::new();
    for server in [&on_single, &on_cluster] {
        let (status, task) = server
            .post(
                "/api/v1/tasks",
                serde_json::json!({
                    "service": "same-shop",
                    "endpoint_name": "/same",
                    "start_time": start_time,
                    "duration": 10,
                    "min_duration_threshold": 0,
                    "dump_period": 20,
                    "max_sampling_count": 5,
                }),
            )
            .await;
        assert_eq!(status, 201, "{task}");
        task_ids.push(task["id"].as_str().unwrap().to_string());
    }
    // The same snapshots under each store's task, re-sent streams included, and the
    // same finish report.
    let segments: Vec<String> = (0..24).map(|n| format!("same-{n:02}")).collect();
    let base = start_time + 1_000;
    for (server, task_id) in [&on_single, &on_cluster].into_iter().zip(&task_ids) {
        for (segment, result) in send_segments(server, task_id, &segments, 300, base, 4).await {
            assert_eq!(result, Ok(()), "{segment}");
        }
        for (segment, result) in send_segments(server, task_id, &segments[..3], 300, base, 3).await
        {
            assert_eq!(result, Ok(()), "{segment}");
        }
        server
            .profile_client()
            .await
            .report_task_finish(ProfileTaskFinishReport {
                service: "same-shop".into(),
                service_instance: "same-shop-1".into(),
                task_id: task_id.clone(),
            })
            .await
            .unwrap();
    }
    let single = api_answers(&on_single, &task_ids[0], &segments).await;
    let cluster = api_answers(&on_cluster, &task_ids[1], &segments).await;
    for ((path, single_text), (_, cluster_text)) in single.iter().zip(&cluster) {
        assert_eq!(single_text, cluster_text, "{path}");
    }
    let flame: Value = serde_json::from_str(&cluster[1].1).unwrap();
    assert_eq!(flame["value"], 24 * 300);
    // The finish report's log, read back from both.
    for (server, task_id) in [&on_single, &on_cluster].into_iter().zip(&task_ids) {
        let logs = eventually(Duration::from_secs(10), || async {
            let (_, logs) = server.get(&format!("/api/v1/tasks/{task_id}/logs")).await;
            (logs.as_array().map(Vec::len) == Some(1)).then_some(logs)
        })
        .await;
        assert_eq!(logs[0]["operation"], "EXECUTION_FINISHED");
        assert_eq!(logs[0]["instance"], "same-shop-1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_cluster_retention_drops_expired_partitions_on_every_node() {
    let _turn = CLUSTER.lock().await;
    let database = fresh_database("cluster_retention");
    let server = receiver(
        &database,
        &[2, 1],
        &[("SKYSNAP_RETENTION_CHECK_INTERVAL_MS", "300")],
    );
    let day_ms = 86_400_000;
    // Segments of 5 days ago and of today, spread over both shards.
    let mut messages = Vec::new();
    for n in 0..8 {
        messages.extend(aged_segment(&format!("old-seg-{n}"), 5 * day_ms));
        messages.extend(aged_segment(&format!("new-seg-{n}"), 0));
    }
    server
        .profile_client()
        .await
        .collect_snapshot(tokio_stream::iter(messages))
        .await
        .unwrap();
    // On every node (both replicas of both shards), the expired day's rows go, in the
    // snapshots, their stacks and their look-up rows; today's stay.
    for node in 1..=4 {
        for (table, old_rows) in [
            ("profile_snapshot_local", "segment_id LIKE 'old-seg-%'"),
            ("profile_segment_task_local", "segment_id LIKE 'old-seg-%'"),
            (
                "profile_stack_local",
                "day < toInt64(formatDateTime(today() - 3, '%Y%m%d'))",
            ),
        ] {
            eventually(Duration::from_secs(30), || async {
                let old = count_on_node(
                    node,
                    &format!("SELECT count() FROM {database}.{table} WHERE {old_rows}"),
                )
                .await;
                (old == 0).then_some(())
            })
            .await;
        }
    }
    // One drop for the cluster took the old rows of both shards: 80 snapshots.
    let dropped: i64 = server
        .stderr()
        .lines()
        .filter(|line| {
            line.contains("expired partition dropped")
                && line.contains("table=profile_snapshot_local")
        })
        .filter_map(|line| {
            line.split("rows=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<i64>()
                .ok()
        })
        .sum();
    assert_eq!(dropped, 80, "{}", server.stderr());
    // Today's rows: 8 segments of 10 on the shards together, on both replicas.
    let (shard_one, shard_two) =
        replicas_equal(&database, "profile_snapshot", Duration::from_secs(30)).await;
    assert_eq!(shard_one + shard_two, 80);
    assert!(shard_one > 0 && shard_two > 0, "{shard_one} / {shard_two}");
}
