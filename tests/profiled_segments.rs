//! Kept trace segments (SPEC §2, "Spans of profiled segments") in both real stores — the
//! SQLite file and the ClickHouse server the test command starts (a fresh database per
//! test) — through the `Store` trait, and `GET /api/v1/segments/{id}` of the real
//! `skysnap serve` on top of each.

mod common;

use std::sync::Arc;

use futures::StreamExt;
use serde_json::Value;
use skysnap::config::ClickHouseConfig;
use skysnap::model::{ProfiledSegment, ProfiledSpan, SnapshotRecord};
use skysnap::store::clickhouse::ClickHouseStore;
use skysnap::store::sqlite::SqliteStore;
use skysnap::store::{SnapshotFilter, Store};

use common::{clickhouse, clickhouse_count, clickhouse_url, fresh_database, Server};

const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn span(
    span_id: i32,
    parent_span_id: i32,
    operation_name: &str,
    span_type: &str,
    start_time: i64,
    end_time: i64,
) -> ProfiledSpan {
    ProfiledSpan {
        span_id,
        parent_span_id,
        operation_name: operation_name.to_string(),
        peer: if span_type == "Exit" {
            "mysql:3306".to_string()
        } else {
            String::new()
        },
        span_type: span_type.to_string(),
        span_layer: if span_type == "Exit" {
            "Database"
        } else {
            "Http"
        }
        .to_string(),
        component_id: if span_type == "Exit" { 5012 } else { 7002 },
        start_time,
        end_time,
        is_error: false,
    }
}

/// A request to `/orders` as an agent reports it: the entry span (id 0) last, a local
/// span with a database call under it, and a second database call.
fn segment(segment_id: &str, start_time: i64) -> ProfiledSegment {
    let spans = vec![
        span(
            2,
            1,
            "Mysql/JDBC/query",
            "Exit",
            start_time + 20,
            start_time + 60,
        ),
        span(
            1,
            0,
            "OrderService.list",
            "Local",
            start_time + 10,
            start_time + 90,
        ),
        ProfiledSpan {
            is_error: true,
            ..span(
                3,
                0,
                "Mysql/JDBC/update",
                "Exit",
                start_time + 95,
                start_time + 120,
            )
        },
        span(0, -1, "/orders", "Entry", start_time, start_time + 150),
    ];
    ProfiledSegment {
        segment_id: segment_id.to_string(),
        trace_id: format!("trace-of-{segment_id}"),
        service: "shop".to_string(),
        instance: "shop-1".to_string(),
        endpoint: "/orders".to_string(),
        start_time,
        end_time: start_time + 150,
        duration: 150,
        is_error: true,
        spans,
    }
}

fn snapshots(task_id: &str, segment_id: &str, first_dump: i64, count: i32) -> Vec<SnapshotRecord> {
    (0..count)
        .map(|sequence| SnapshotRecord {
            task_id: task_id.to_string(),
            segment_id: segment_id.to_string(),
            sequence,
            dump_time: first_dump + i64::from(sequence) * 20,
            stack: vec!["a.main:1".to_string(), "b.run:2".to_string()].into(),
            encoded: None,
        })
        .collect()
}

async fn read(store: &dyn Store, segment_id: &str) -> ProfiledSegment {
    store
        .profiled_segment(segment_id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("segment {segment_id} is kept"))
}

async fn check_round_trip(store: &dyn Store) {
    let start = now_ms() - 60_000;
    let kept = segment("rt-1", start);
    let other = segment("rt-2", start + 1);
    store
        .insert_profiled_segments(&[kept.clone(), other.clone()])
        .await
        .unwrap();
    assert_eq!(read(store, "rt-1").await, kept);
    assert_eq!(read(store, "rt-2").await, other);
    assert_eq!(store.profiled_segment("rt-none").await.unwrap(), None);
    store.insert_profiled_segments(&[]).await.unwrap();
}

async fn check_resent_segment_replaces(store: &dyn Store) {
    let start = now_ms() - 60_000;
    let first = segment("again-1", start);
    store
        .insert_profiled_segments(std::slice::from_ref(&first))
        .await
        .unwrap();
    // Sent again with other content: the later one is what is read, and only once.
    let mut second = segment("again-1", start);
    second.trace_id = "trace-second".to_string();
    second.is_error = false;
    second.spans.truncate(2);
    store
        .insert_profiled_segments(std::slice::from_ref(&second))
        .await
        .unwrap();
    assert_eq!(read(store, "again-1").await, second);
    // Twice in one batch: the later one wins.
    let mut third = segment("again-2", start);
    third.trace_id = "trace-third".to_string();
    store
        .insert_profiled_segments(&[segment("again-2", start), third.clone()])
        .await
        .unwrap();
    assert_eq!(read(store, "again-2").await, third);
    // A task's segment list carries each kept segment once.
    store
        .insert_snapshots(&snapshots("task-again", "again-1", start, 3))
        .await
        .unwrap();
    let listed = store.task_segments("task-again").await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].trace_id.as_deref(), Some("trace-second"));
    assert_eq!(listed[0].is_error, Some(false));
}

async fn check_segments_with_snapshots(store: &dyn Store) {
    let start = now_ms() - 60_000;
    store
        .insert_snapshots(&snapshots("task-a", "with-1", start, 2))
        .await
        .unwrap();
    store
        .insert_snapshots(&snapshots("task-b", "with-2", start, 1))
        .await
        .unwrap();
    // A kept segment is not a snapshot.
    store
        .insert_profiled_segments(&[segment("kept-only", start)])
        .await
        .unwrap();
    let asked: Vec<String> = [
        "with-1",
        "none-1",
        "with-2",
        "with-1",
        "kept-only",
        "none-2",
    ]
    .iter()
    .map(|id| id.to_string())
    .collect();
    assert_eq!(
        store.segments_with_snapshots(&asked).await.unwrap(),
        ["with-1", "with-2"]
    );
    assert!(store.segments_with_snapshots(&[]).await.unwrap().is_empty());
    // More ids than one look-up carries: the answer spans the chunks.
    let mut many: Vec<String> = (0..1_250).map(|n| format!("absent-{n}")).collect();
    many[3] = "with-2".to_string();
    many[1_100] = "with-1".to_string();
    assert_eq!(
        store.segments_with_snapshots(&many).await.unwrap(),
        ["with-2", "with-1"]
    );
}

async fn check_task_segments_carry_trace_fields(store: &dyn Store) {
    let start = now_ms() - 60_000;
    store
        .insert_snapshots(&snapshots("task-t", "t-kept", start, 4))
        .await
        .unwrap();
    store
        .insert_snapshots(&snapshots("task-t", "t-bare", start + 5, 2))
        .await
        .unwrap();
    store
        .insert_profiled_segments(&[segment("t-kept", start - 3)])
        .await
        .unwrap();
    let listed = store.task_segments("task-t").await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let kept = &listed[0];
    assert_eq!(
        (kept.segment_id.as_str(), kept.snapshot_count),
        ("t-kept", 4)
    );
    assert_eq!(kept.trace_id.as_deref(), Some("trace-of-t-kept"));
    assert_eq!(kept.endpoint.as_deref(), Some("/orders"));
    assert_eq!(kept.start_time, Some(start - 3));
    assert_eq!(kept.duration, Some(150));
    assert_eq!(kept.is_error, Some(true));
    let bare = &listed[1];
    assert_eq!(
        (bare.segment_id.as_str(), bare.snapshot_count),
        ("t-bare", 2)
    );
    assert_eq!(
        (
            &bare.trace_id,
            &bare.endpoint,
            bare.start_time,
            bare.duration,
            bare.is_error
        ),
        (&None, &None, None, None, None)
    );
}

/// Answers whether the store removes rows itself (false: ClickHouse with table TTL).
async fn check_remove_expired(store: &dyn Store, removes_itself: bool) {
    let now = now_ms();
    store
        .insert_profiled_segments(&[
            segment("exp-old", now - 5 * DAY_MS),
            segment("exp-new", now - 60_000),
        ])
        .await
        .unwrap();
    let removed = store.remove_expired(now - 3 * DAY_MS).await.unwrap();
    if !removes_itself {
        return;
    }
    assert!(removed >= 1, "{removed}");
    assert_eq!(store.profiled_segment("exp-old").await.unwrap(), None);
    assert_eq!(read(store, "exp-new").await.segment_id, "exp-new");
}

async fn check_edge_segments(store: &dyn Store) {
    let start = now_ms() - 60_000;
    let mut empty = segment("edge-empty", start);
    empty.spans.clear();
    let mut odd = segment("edge-odd", start);
    let unicode = "订单/查询 — ünïcödé 🚀 'quoted' \"double\" back\\slash\ttab\nnewline";
    odd.endpoint = unicode.to_string();
    odd.trace_id = "ट्रेस-🚀".to_string();
    odd.spans[3].operation_name = unicode.to_string();
    // A megabyte of operation name, and a peer with a NUL byte.
    odd.spans[0].operation_name = "x".repeat(1 << 20);
    odd.spans[1].peer = "host\0with-nul:1".to_string();
    odd.spans[2].component_id = i32::MAX;
    odd.spans[2].start_time = i64::MIN / 2;
    store
        .insert_profiled_segments(&[empty.clone(), odd.clone()])
        .await
        .unwrap();
    assert_eq!(read(store, "edge-empty").await, empty);
    assert_eq!(read(store, "edge-odd").await, odd);
}

/// The flame graph's `instance` filter: snapshots carry no instance, so a segment's
/// instance comes from its kept trace segment; segments not kept match no instance.
async fn check_instance_filter(store: &dyn Store) {
    let start = now_ms() - 60_000;
    let mut rows = snapshots("inst-task", "inst-a", start, 3);
    rows.extend(snapshots("inst-task", "inst-b", start, 5));
    rows.extend(snapshots("inst-task", "inst-unkept", start, 7));
    store.insert_snapshots(&rows).await.unwrap();
    let on_b = ProfiledSegment {
        instance: "shop-2".to_string(),
        ..segment("inst-b", start)
    };
    store
        .insert_profiled_segments(&[segment("inst-a", start), on_b])
        .await
        .unwrap();
    let filter = |instance: &str| SnapshotFilter {
        task_id_opt: Some("inst-task".to_string()),
        instance_opt: Some(instance.to_string()),
        ..SnapshotFilter::default()
    };
    assert_eq!(store.count_snapshots(&filter("shop-1")).await.unwrap(), 3);
    assert_eq!(store.count_snapshots(&filter("shop-2")).await.unwrap(), 5);
    assert_eq!(store.count_snapshots(&filter("shop-9")).await.unwrap(), 0);
    let counted: u64 = store
        .stack_counts(&filter("shop-2"))
        .map(|count| count.unwrap().count)
        .fold(0, |sum, count| async move { sum + count })
        .await;
    assert_eq!(counted, 5);
    let whole = SnapshotFilter {
        task_id_opt: Some("inst-task".to_string()),
        ..SnapshotFilter::default()
    };
    assert_eq!(store.count_snapshots(&whole).await.unwrap(), 15);
}

async fn check_store(store: &dyn Store, removes_itself: bool) {
    check_round_trip(store).await;
    check_instance_filter(store).await;
    check_resent_segment_replaces(store).await;
    check_segments_with_snapshots(store).await;
    check_task_segments_carry_trace_fields(store).await;
    check_edge_segments(store).await;
    check_remove_expired(store, removes_itself).await;
}

#[tokio::test]
async fn test_profiled_segments_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("skysnap.db");
    let store = SqliteStore::open(&path, 2).unwrap();
    check_store(&store, true).await;

    // One row per segment, the spans readable with json_each.
    let connection = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = connection
        .query_row(
            "SELECT COUNT(*) FROM profiled_segment WHERE segment_id = 'again-1'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1);
    let names: Vec<String> = connection
        .prepare(
            "SELECT json_extract(span.value, '$.operation_name') \
             FROM profiled_segment, json_each(profiled_segment.spans) AS span \
             WHERE segment_id = 'rt-1' ORDER BY json_extract(span.value, '$.start_time')",
        )
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        names,
        [
            "/orders",
            "OrderService.list",
            "Mysql/JDBC/query",
            "Mysql/JDBC/update"
        ]
    );
}

async fn clickhouse_store(database: &str) -> ClickHouseStore {
    let config = ClickHouseConfig {
        url: clickhouse_url(),
        database: database.to_string(),
        ..ClickHouseConfig::default()
    };
    ClickHouseStore::connect(&config, 3)
        .await
        .unwrap_or_else(|error| {
            panic!(
                "ClickHouse is not reachable at {} ({error}); run the tests through \
                 ./scripts/test.sh, which starts it",
                clickhouse_url()
            )
        })
}

#[tokio::test]
async fn test_profiled_segments_in_clickhouse() {
    let database = fresh_database("profiled");
    let store = clickhouse_store(&database).await;
    let removes_itself = !store.version().is_modern();
    check_store(&store, removes_itself).await;

    // Re-sent segments are stored twice until a merge; FINAL reads each once.
    let table = format!("{database}.profiled_segment");
    assert_eq!(
        clickhouse_count(&format!(
            "SELECT count() FROM {table} FINAL WHERE segment_id = 'again-1'"
        ))
        .await,
        1
    );
    let spans = clickhouse(&format!(
        "SELECT span_id, span_operation_name FROM {table} FINAL \
         ARRAY JOIN span_id, span_operation_name WHERE segment_id = 'rt-1' \
         ORDER BY span_id FORMAT TSV"
    ))
    .await;
    assert_eq!(
        spans,
        "0\t/orders\n1\tOrderService.list\n2\tMysql/JDBC/query\n3\tMysql/JDBC/update\n"
    );
    let ddl = clickhouse(&format!("SHOW CREATE TABLE {table} FORMAT TSVRaw")).await;
    assert!(ddl.contains("ReplacingMergeTree"), "{ddl}");
    assert!(
        ddl.contains("PARTITION BY intDiv(time_bucket, 1000000)"),
        "{ddl}"
    );
    assert_eq!(ddl.contains("TTL"), store.version().is_modern(), "{ddl}");
    clickhouse(&format!("DROP DATABASE {database}")).await;
}

/// The same through the loopback cluster (2 shards x 2 replicas): kept segments are
/// sharded by segment, snapshots by task and segment, so the instance filter and the
/// task's segment list read across shards (GLOBAL IN).
#[tokio::test]
async fn test_profiled_segments_in_clickhouse_cluster() {
    let urls = std::env::var("SKYSNAP_TEST_CLICKHOUSE_CLUSTER_URLS").unwrap_or_else(|_| {
        (1..=4)
            .map(|node| format!("http://127.0.0.1:1813{node}"))
            .collect::<Vec<_>>()
            .join(",")
    });
    let config = ClickHouseConfig {
        url: urls.clone(),
        database: fresh_database("profiled_cluster"),
        cluster: std::env::var("SKYSNAP_TEST_CLICKHOUSE_CLUSTER")
            .unwrap_or_else(|_| "skysnap_cluster".to_string()),
        ..ClickHouseConfig::default()
    };
    let store = ClickHouseStore::connect(&config, 3)
        .await
        .unwrap_or_else(|error| {
            panic!("the ClickHouse cluster is not reachable at {urls} ({error}); run the tests through ./scripts/test.sh")
        });
    let removes_itself = !store.version().is_modern();
    check_store(&store, removes_itself).await;
}

/// `GET /api/v1/segments/{id}` and the task's segment list of a server whose store holds
/// a kept segment (written through a second handle on the same store).
async fn check_http(server: &Server, store: &dyn Store) {
    let start = now_ms() - 60_000;
    let task = server.create_task("shop", "/orders").await;
    let task_id = task["id"].as_str().unwrap();
    store
        .insert_snapshots(&snapshots(task_id, "http-seg", start + 15, 3))
        .await
        .unwrap();
    store
        .insert_profiled_segments(&[segment("http-seg", start)])
        .await
        .unwrap();

    let (status, body) = server.get("/api/v1/segments/http-seg").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["segment"],
        serde_json::json!({
            "segment_id": "http-seg",
            "trace_id": "trace-of-http-seg",
            "service": "shop",
            "instance": "shop-1",
            "endpoint": "/orders",
            "start_time": start,
            "end_time": start + 150,
            "duration": 150,
            "is_error": true,
        })
    );
    let spans = body["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 1, "{body}");
    let root = &spans[0];
    assert_eq!(
        root,
        &serde_json::json!({
            "span_id": 0, "parent_span_id": -1, "operation_name": "/orders", "peer": "",
            "span_type": "Entry", "span_layer": "Http", "component_id": 7002,
            "start_time": start, "end_time": start + 150, "duration": 150, "is_error": false,
            "children": root["children"].clone(),
        })
    );
    let ids = |nodes: &Value| -> Vec<i64> {
        nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["span_id"].as_i64().unwrap())
            .collect()
    };
    // Children by start time: the local span (10 ms in), then the update (95 ms in).
    assert_eq!(ids(&root["children"]), [1, 3]);
    let local = &root["children"][0];
    assert_eq!(ids(&local["children"]), [2]);
    let query = &local["children"][0];
    assert_eq!(
        (
            &query["peer"],
            &query["span_layer"],
            &query["duration"],
            &query["children"]
        ),
        (
            &serde_json::json!("mysql:3306"),
            &serde_json::json!("Database"),
            &serde_json::json!(40),
            &serde_json::json!([])
        )
    );
    assert_eq!(root["children"][1]["is_error"], true);

    let (status, body) = server.get("/api/v1/segments/no-such-segment").await;
    assert_eq!(
        (status, body),
        (
            404,
            serde_json::json!({"error": "segment no-such-segment not found"})
        )
    );
    // Snapshots alone do not make a kept segment; the snapshot route stays.
    store
        .insert_snapshots(&snapshots(task_id, "http-bare", start, 2))
        .await
        .unwrap();
    assert_eq!(server.get("/api/v1/segments/http-bare").await.0, 404);
    let (status, rows) = server.get("/api/v1/segments/http-seg/snapshots").await;
    assert_eq!((status, rows.as_array().unwrap().len()), (200, 3));

    let (_, listed) = server
        .get(&format!("/api/v1/tasks/{task_id}/segments"))
        .await;
    assert_eq!(
        listed,
        serde_json::json!([
            {"segment_id": "http-bare", "snapshot_count": 2, "first_dump_time": start,
             "last_dump_time": start + 20, "trace_id": null, "endpoint": null,
             "start_time": null, "duration": null, "is_error": null},
            {"segment_id": "http-seg", "snapshot_count": 3, "first_dump_time": start + 15,
             "last_dump_time": start + 55, "trace_id": "trace-of-http-seg",
             "endpoint": "/orders", "start_time": start, "duration": 150, "is_error": true},
        ])
    );

    // A hostile segment: 5,000 spans each under the one before. Every span is in the
    // answer, nested 50 levels at most, and the answer parses with serde_json's limit.
    let mut deep = segment("http-deep", start);
    deep.spans = (0..5_000)
        .map(|id| {
            span(
                id,
                id - 1,
                "deep",
                "Local",
                start + i64::from(id),
                start + 10_000,
            )
        })
        .collect();
    store.insert_profiled_segments(&[deep]).await.unwrap();
    let (status, body) = server.get("/api/v1/segments/http-deep").await;
    assert_eq!(status, 200);
    let (mut count, mut deepest) = (0, 0);
    let mut pending: Vec<(&Value, usize)> = body["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| (node, 1))
        .collect();
    while let Some((node, level)) = pending.pop() {
        count += 1;
        deepest = deepest.max(level);
        pending.extend(
            node["children"]
                .as_array()
                .unwrap()
                .iter()
                .map(|child| (child, level + 1)),
        );
    }
    assert_eq!((count, deepest), (5_000, 50));

    // A kept segment without spans.
    let mut empty = segment("http-empty", start);
    empty.spans.clear();
    store.insert_profiled_segments(&[empty]).await.unwrap();
    let (status, body) = server.get("/api/v1/segments/http-empty").await;
    assert_eq!((status, &body["spans"]), (200, &serde_json::json!([])));
}

#[tokio::test]
async fn test_segment_api_on_sqlite() {
    let server = Server::start(&[]);
    let store = SqliteStore::open(&server.db_path(), 1).unwrap();
    check_http(&server, &store).await;
}

#[tokio::test]
async fn test_segment_api_on_clickhouse() {
    let database = fresh_database("segment_api");
    let url = clickhouse_url();
    let mut server = Server::start(&[
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", url.as_str()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database.as_str()),
    ]);
    let store: Arc<dyn Store> = Arc::new(clickhouse_store(&database).await);
    check_http(&server, store.as_ref()).await;
    server.stop();
    clickhouse(&format!("DROP DATABASE {database}")).await;
}
