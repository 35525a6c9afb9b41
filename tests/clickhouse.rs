//! The ClickHouse store against the real server the test command starts (Debian's
//! ClickHouse 18.16 on loopback), a fresh database per test.

mod common;

use std::time::Duration;

use skysnap::proto::v3::{ProfileTaskCommandQuery, ProfileTaskFinishReport, ThreadSnapshot};

use common::{
    aged_segment, clickhouse, clickhouse_count, clickhouse_url, eventually, fresh_database,
    snapshot, wait_for_commands, Server,
};

fn clickhouse_env(database: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SKYSNAP_STORE_KIND", "clickhouse".to_string()),
        ("SKYSNAP_CLICKHOUSE_URL", clickhouse_url()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database.to_string()),
    ]
}

fn start(env: &[(&'static str, String)]) -> Server {
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Server::start(&pairs)
}

#[tokio::test]
async fn test_clickhouse_direct_50000_snapshots_over_20_streams() {
    let database = fresh_database("direct");
    let mut server = start(&clickhouse_env(&database));
    let task = server.create_task("shop", "/orders").await;
    let task_id = task["id"].as_str().unwrap().to_string();

    let stream_of = |stream: usize| -> Vec<ThreadSnapshot> {
        (0..2_500)
            .map(|n| snapshot(&task_id, &format!("ch-seg-{stream:02}"), n))
            .collect()
    };
    let mut senders = Vec::new();
    for stream in 0..20 {
        let mut client = server.profile_client().await;
        let messages = stream_of(stream);
        senders.push(tokio::spawn(async move {
            client.collect_snapshot(tokio_stream::iter(messages)).await
        }));
    }
    for sender in senders {
        sender.await.unwrap().expect("every stream acknowledged");
    }
    // Two streams sent again: acknowledged, and collapsed by key.
    let mut client = server.profile_client().await;
    for stream in [3, 17] {
        client
            .collect_snapshot(tokio_stream::iter(stream_of(stream)))
            .await
            .unwrap();
    }

    let table = format!("{database}.profile_snapshot");
    // Physically 55,000 rows until background merges collapse the re-sent ones.
    let physical = clickhouse_count(&format!("SELECT count() FROM {table}")).await;
    assert!((50_000..=55_000).contains(&physical), "{physical}");
    assert_eq!(
        clickhouse_count(&format!("SELECT count() FROM {table} FINAL")).await,
        50_000
    );
    let stacks = clickhouse(&format!(
        "SELECT stack FROM {database}.profile_thread_snapshot \
         WHERE segment_id = 'ch-seg-05' AND sequence = 7 LIMIT 1 FORMAT TSV"
    ))
    .await;
    assert!(
        stacks.starts_with("['com.example.Service0.method0:1'"),
        "{stacks}"
    );

    // Every API query is answered from ClickHouse.
    let (status, segments) = server
        .get(&format!("/api/v1/tasks/{task_id}/segments"))
        .await;
    assert_eq!(status, 200);
    let segments = segments.as_array().unwrap();
    assert_eq!(segments.len(), 20);
    assert!(
        segments.iter().all(|s| s["snapshot_count"] == 2_500),
        "{segments:?}"
    );
    let (_, rows) = server.get("/api/v1/segments/ch-seg-17/snapshots").await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2_500);
    assert!(rows
        .iter()
        .enumerate()
        .all(|(i, r)| r["sequence"] == i as i64));
    assert_eq!(rows[3]["stack"].as_array().unwrap().len(), 10);
    let (_, tasks) = server.get("/api/v1/tasks?service=shop").await;
    assert_eq!(tasks[0]["id"], task_id.as_str());
    assert_eq!(server.get(&format!("/api/v1/tasks/{task_id}")).await.0, 200);
    assert_eq!(server.get("/api/v1/tasks/none").await.0, 404);
    // Overlap is checked against ClickHouse too.
    let (status, body) = server
        .post(
            "/api/v1/tasks",
            serde_json::json!({"service": "shop", "endpoint_name": "/x", "duration": 1,
                "min_duration_threshold": 0, "dump_period": 10, "max_sampling_count": 1}),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (
            400,
            Some("current service already has monitor task execute at this time")
        )
    );

    let mut profile = server.profile_client().await;
    for _ in 0..3 {
        let commands = profile
            .get_profile_task_commands(ProfileTaskCommandQuery {
                service: "shop".into(),
                service_instance: "shop-1".into(),
                last_command_time: -1,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(commands.commands.len(), 1);
    }
    profile
        .report_task_finish(ProfileTaskFinishReport {
            service: "shop".into(),
            service_instance: "shop-1".into(),
            task_id: task_id.clone(),
        })
        .await
        .unwrap();
    let logs = eventually(Duration::from_secs(10), || async {
        let (_, logs) = server.get(&format!("/api/v1/tasks/{task_id}/logs")).await;
        let logs = logs.as_array().cloned().unwrap_or_default();
        (logs.len() == 2).then_some(logs)
    })
    .await;
    assert_eq!(logs[0]["operation"], "NOTIFIED");
    assert_eq!(logs[1]["operation"], "EXECUTION_FINISHED");
    assert_eq!(server.get("/readyz").await.1["store"], "clickhouse");
    server.stop();
    clickhouse(&format!("DROP DATABASE {database}")).await;
}

#[tokio::test]
async fn test_clickhouse_schema_for_old_server_has_no_ttl() {
    let database = fresh_database("schema");
    let mut server = start(&clickhouse_env(&database));
    let ddl = clickhouse(&format!(
        "SHOW CREATE TABLE {database}.profile_snapshot FORMAT TSVRaw"
    ))
    .await;
    assert!(ddl.contains("ReplacingMergeTree"), "{ddl}");
    assert!(
        ddl.contains("PARTITION BY intDiv(time_bucket, 1000000)"),
        "{ddl}"
    );
    assert!(!ddl.contains("TTL"), "18.16 has no TTL: {ddl}");
    server.stop();
    // A second start on the same database finds the tables there.
    let mut again = start(&clickhouse_env(&database));
    again.stop();
    clickhouse(&format!("DROP DATABASE {database}")).await;
}

#[tokio::test]
async fn test_clickhouse_retention_drops_expired_partitions() {
    let database = fresh_database("retention");
    let mut env = clickhouse_env(&database);
    env.push(("SKYSNAP_RETENTION_CHECK_INTERVAL_MS", "300".to_string()));
    let mut server = start(&env);
    let day_ms = 86_400_000;
    let mut messages = aged_segment("old-seg", 5 * day_ms);
    messages.extend(aged_segment("edge-seg", 2 * day_ms));
    messages.extend(aged_segment("new-seg", 0));
    let mut client = server.profile_client().await;
    client
        .collect_snapshot(tokio_stream::iter(messages))
        .await
        .unwrap();

    let table = format!("{database}.profile_thread_snapshot");
    eventually(Duration::from_secs(10), || async {
        let old = clickhouse_count(&format!(
            "SELECT count() FROM {table} WHERE segment_id = 'old-seg'"
        ))
        .await;
        (old == 0).then_some(())
    })
    .await;
    // The stacks of the expired day go with their day's partition; the same stacks
    // written again for the days still kept stay.
    let day_of = |age_ms: i64| {
        skysnap::model::second_bucket(chrono::Utc::now().timestamp_millis() - age_ms) / 1_000_000
    };
    let stacks = format!("{database}.profile_stack");
    eventually(Duration::from_secs(10), || async {
        let old = clickhouse_count(&format!(
            "SELECT count() FROM {stacks} WHERE day = {}",
            day_of(5 * day_ms)
        ))
        .await;
        (old == 0).then_some(())
    })
    .await;
    for kept_age in [2 * day_ms, 0] {
        assert!(
            clickhouse_count(&format!(
                "SELECT count() FROM {stacks} WHERE day = {}",
                day_of(kept_age)
            ))
            .await
                > 0,
            "each kept day has its stacks"
        );
    }
    // The segment index expires with the snapshots it stands for.
    eventually(Duration::from_secs(10), || async {
        let old = clickhouse_count(&format!(
            "SELECT count() FROM {database}.profile_segment_task WHERE segment_id = 'old-seg'"
        ))
        .await;
        (old == 0).then_some(())
    })
    .await;
    assert!(
        clickhouse_count(&format!(
            "SELECT count() FROM {database}.profile_segment_task WHERE segment_id = 'edge-seg'"
        ))
        .await
            >= 1
    );
    assert_eq!(
        clickhouse_count(&format!(
            "SELECT count() FROM {table} WHERE segment_id = 'edge-seg'"
        ))
        .await,
        10
    );
    assert_eq!(
        clickhouse_count(&format!(
            "SELECT count() FROM {table} WHERE segment_id = 'new-seg'"
        ))
        .await,
        10
    );
    assert!(
        server
            .metric("skysnap_retention_rows_removed_total", &[])
            .await
            >= 10.0
    );
    server.stop();
    clickhouse(&format!("DROP DATABASE {database}")).await;
}

/// Rows the server read for one query, from its query log.
async fn rows_read(sql: &str) -> u64 {
    let query_id = uuid::Uuid::new_v4().to_string();
    let response = reqwest::Client::new()
        .post(format!(
            "{}/?log_queries=1&query_id={query_id}",
            clickhouse_url()
        ))
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    clickhouse("SYSTEM FLUSH LOGS").await;
    clickhouse_count(&format!(
        "SELECT read_rows FROM system.query_log WHERE query_id = '{query_id}' \
         AND type = 2 FORMAT TSV"
    ))
    .await as u64
}

/// A store of the layout before the stack dictionary and the lookup indexes (full rows
/// in `profile_thread_snapshot`) is migrated at start-up: its snapshots move into the
/// dictionary with every frame, its tasks and segments are indexed; then a segment's
/// snapshots and a task by id are read through the tables' keys, not by scanning them.
#[tokio::test]
async fn test_clickhouse_store_of_the_earlier_layout_is_migrated_and_read_on_keys() {
    let database = fresh_database("segindex");
    // The layout of the previous release: everything but the index and its view.
    let mut server = start(&clickhouse_env(&database));
    server.stop();
    for table in [
        "profile_segment_task_mv",
        "profile_segment_task",
        "profile_task_service_mv",
        "profile_task_service",
        "profile_thread_snapshot",
        "profile_snapshot",
        "profile_stack",
    ] {
        clickhouse(&format!("DROP TABLE {database}.{table}")).await;
    }
    // The snapshot table as releases before the stack dictionary created it on 18.16.
    clickhouse(&format!(
        "CREATE TABLE {database}.profile_thread_snapshot (task_id String, segment_id String, \
         sequence Int32, dump_time Int64, time_bucket Int64, stack Array(String)) \
         ENGINE = ReplacingMergeTree() PARTITION BY intDiv(time_bucket, 1000000) \
         ORDER BY (task_id, segment_id, sequence)"
    ))
    .await;
    // 20,000 tasks of 200 services, and 200,000 snapshots of 100 of them (2,000
    // segments of 100 snapshots), all of today.
    let today = chrono::Utc::now().format("%Y%m%d").to_string();
    let start_ms = chrono::Utc::now().timestamp_millis();
    clickhouse(&format!(
        "INSERT INTO {database}.profile_task \
         SELECT concat('task-', toString(number)), concat('svc-', toString(number % 200)), '/e', \
         toInt64({start_ms} + number * 60000), toInt32(1), toInt32(0), toInt32(10), toInt32(5), \
         toInt64({start_ms}), toInt64({start_ms} + number * 60000 + 60000), \
         toInt64({today}0000 + number % 60) FROM system.numbers LIMIT 20000"
    ))
    .await;
    clickhouse(&format!(
        "INSERT INTO {database}.profile_thread_snapshot \
         SELECT concat('task-', toString(number % 100)), concat('seg-', toString(number % 2000)), \
         toInt32(intDiv(number, 2000)), toInt64(1000 + number), toInt64({today}000000 + number % 60), \
         ['main', concat('frame-', toString(number % 7))] FROM system.numbers LIMIT 200000"
    ))
    .await;

    let mut server = start(&clickhouse_env(&database));
    assert!(
        server.stderr().contains("indexing existing tasks"),
        "{}",
        server.stderr()
    );
    assert_eq!(
        clickhouse_count(&format!(
            "SELECT count() FROM {database}.profile_task_service"
        ))
        .await,
        20_000
    );
    let (status, task) = server.get("/api/v1/tasks/task-4321").await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["service"], "svc-121");
    assert_eq!(
        clickhouse_count(&format!(
            "SELECT uniqExact(segment_id) FROM {database}.profile_segment_task"
        ))
        .await,
        2_000
    );
    assert!(
        server
            .stderr()
            .contains("earlier layout migrated and dropped"),
        "{}",
        server.stderr()
    );
    assert_eq!(
        clickhouse_count(&format!(
            "SELECT count() FROM system.tables WHERE database = '{database}' \
             AND name = 'profile_thread_snapshot' AND engine = 'View'"
        ))
        .await,
        1,
        "the old table is gone, the view has its name"
    );
    assert_eq!(
        clickhouse_count(&format!(
            "SELECT uniqExact(stack_id) FROM {database}.profile_stack"
        ))
        .await,
        7
    );
    let (status, snapshots) = server.get("/api/v1/segments/seg-7/snapshots").await;
    assert_eq!(status, 200, "{snapshots}");
    let snapshots = snapshots.as_array().unwrap();
    assert_eq!(snapshots.len(), 100);
    assert!(snapshots.iter().all(|s| s["task_id"] == "task-7"));
    // Every frame as it was: snapshot n of the old table had frames ['main', 'frame-n%7'].
    for snapshot in snapshots {
        let number = snapshot["sequence"].as_i64().unwrap() * 2_000 + 7;
        assert_eq!(
            snapshot["stack"],
            serde_json::json!(["main", format!("frame-{}", number % 7)])
        );
    }
    // New snapshots are indexed by the view as they are inserted.
    let mut client = server.profile_client().await;
    client
        .collect_snapshot(tokio_stream::iter(
            (0..5)
                .map(|n| snapshot("task-new", "seg-new", n))
                .collect::<Vec<_>>(),
        ))
        .await
        .unwrap();
    let (_, snapshots) = server.get("/api/v1/segments/seg-new/snapshots").await;
    assert_eq!(snapshots.as_array().unwrap().len(), 5);

    // What the server reads for one segment: the granules of its task, not the table.
    let scanned = rows_read(&format!(
        "SELECT sequence FROM {database}.profile_snapshot FINAL \
         WHERE segment_id = 'seg-7' FORMAT Null"
    ))
    .await;
    let keyed = rows_read(&format!(
        "SELECT sequence FROM {database}.profile_snapshot FINAL \
         WHERE task_id IN (SELECT task_id FROM {database}.profile_segment_task \
         WHERE segment_id = 'seg-7') AND segment_id = 'seg-7' FORMAT Null"
    ))
    .await;
    eprintln!("rows read for one segment: scanning {scanned}, through the index {keyed}");
    assert!(scanned >= 200_000, "{scanned}");
    assert!(keyed <= 30_000, "{keyed}");
    let scanned = rows_read(&format!(
        "SELECT * FROM {database}.profile_task FINAL WHERE id = 'task-4321' FORMAT Null"
    ))
    .await;
    let keyed = rows_read(&format!(
        "SELECT * FROM {database}.profile_task FINAL WHERE service IN \
         (SELECT service FROM {database}.profile_task_service WHERE id = 'task-4321') \
         AND id = 'task-4321' FORMAT Null"
    ))
    .await;
    eprintln!("rows read for one task: scanning {scanned}, through the index {keyed}");
    assert!(scanned >= 20_000, "{scanned}");
    assert!(keyed <= 10_000, "{keyed}");
    server.stop();
    clickhouse(&format!("DROP DATABASE {database}")).await;
}

#[tokio::test]
async fn test_two_replicas_share_one_clickhouse() {
    let database = fresh_database("replicas");
    let mut env = clickhouse_env(&database);
    env.push(("SKYSNAP_TASKS_CACHE_REFRESH_INTERVAL_MS", "500".to_string()));
    let mut first = start(&env);
    let mut second = start(&env);

    // A task created through one replica reaches the other's agents within its refresh.
    let task = first.create_task("shop", "/orders").await;
    let task_id = task["id"].as_str().unwrap().to_string();
    let mut on_second = second.profile_client().await;
    let started = std::time::Instant::now();
    wait_for_commands(&on_second, "shop", "shop-2", Duration::from_secs(5)).await;
    eprintln!(
        "task visible on the other replica after {:?}",
        started.elapsed()
    );

    // The same stream sent to both replicas (an agent retrying after a failover), plus
    // one stream each: every snapshot lands once.
    let stream = |segment: &str| -> Vec<ThreadSnapshot> {
        (0..1_000).map(|n| snapshot(&task_id, segment, n)).collect()
    };
    let mut on_first = first.profile_client().await;
    on_first
        .collect_snapshot(tokio_stream::iter(stream("both")))
        .await
        .unwrap();
    on_second
        .collect_snapshot(tokio_stream::iter(stream("both")))
        .await
        .unwrap();
    on_first
        .collect_snapshot(tokio_stream::iter(stream("only-first")))
        .await
        .unwrap();
    on_second
        .collect_snapshot(tokio_stream::iter(stream("only-second")))
        .await
        .unwrap();
    let table = format!("{database}.profile_snapshot");
    assert_eq!(
        clickhouse_count(&format!("SELECT count() FROM {table} FINAL")).await,
        3_000
    );
    for server in [&first, &second] {
        let (_, segments) = server
            .get(&format!("/api/v1/tasks/{task_id}/segments"))
            .await;
        let counts: Vec<i64> = segments
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["snapshot_count"].as_i64().unwrap())
            .collect();
        assert_eq!(counts, [1_000, 1_000, 1_000]);
    }

    // A finish reported to the second replica shows through the first.
    on_second
        .report_task_finish(ProfileTaskFinishReport {
            service: "shop".into(),
            service_instance: "shop-2".into(),
            task_id: task_id.clone(),
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        let (_, logs) = first.get(&format!("/api/v1/tasks/{task_id}/logs")).await;
        let logs = logs.as_array().cloned().unwrap_or_default();
        logs.iter()
            .any(|l| l["operation"] == "EXECUTION_FINISHED")
            .then_some(())
    })
    .await;
    first.stop();
    second.stop();
    clickhouse(&format!("DROP DATABASE {database}")).await;
}

fn dictionary_dumps(
    task: &str,
    segment: &str,
    stacks: &[(&[&str], i64)],
) -> Vec<skysnap::proto::v3::ThreadSnapshot> {
    stacks
        .iter()
        .enumerate()
        .map(
            |(sequence, (frames, time))| skysnap::proto::v3::ThreadSnapshot {
                task_id: task.into(),
                trace_segment_id: segment.into(),
                time: *time,
                sequence: sequence as i32,
                stack: Some(skysnap::proto::v3::ThreadStack {
                    code_signatures: frames.iter().map(|frame| frame.to_string()).collect(),
                }),
            },
        )
        .collect()
}

/// Two replicas write the same stacks, around midnight: each (stack, day) is in the
/// dictionary once after merging, every snapshot reads back (API and view) with exactly
/// the frames it was sent with, and the flame graph counts them.
#[tokio::test]
async fn test_clickhouse_dictionary_reads_back_what_was_sent_from_two_replicas() {
    let database = fresh_database("dictionary");
    let env = clickhouse_env(&database);
    let mut first = start(&env);
    let mut second = start(&env);
    let day_ms = 86_400_000;
    let now = skysnap::model::now_ms();
    let midnight = now - now.rem_euclid(day_ms);
    let hot: &[&str] = &["Thread.run:1", "Servlet.service:2", "Orders.list:3"];
    let variant: &[&str] = &["Thread.run:1", "Servlet.service:2", "Orders.save:9"];
    let odd: &[&str] = &["Thread.run:1", "", "café.brûlée:7"];
    let task_one = first.create_task("shop", "/orders").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let task_two = second.create_task("billing", "/invoices").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sent_first = dictionary_dumps(
        &task_one,
        "seg-midnight",
        &[
            (hot, midnight - 10),
            (hot, midnight - 5),
            (variant, midnight + 10),
            (odd, midnight + 15),
        ],
    );
    let sent_second = dictionary_dumps(&task_two, "seg-other", &[(hot, now), (odd, now + 10)]);
    let mut client = first.profile_client().await;
    client
        .collect_snapshot(tokio_stream::iter(sent_first.clone()))
        .await
        .unwrap();
    let mut client = second.profile_client().await;
    client
        .collect_snapshot(tokio_stream::iter(sent_second.clone()))
        .await
        .unwrap();
    // The same stream again: re-sent snapshots and stacks collapse.
    client
        .collect_snapshot(tokio_stream::iter(sent_second.clone()))
        .await
        .unwrap();

    let stacks = format!("{database}.profile_stack");
    assert_eq!(
        clickhouse_count(&format!("SELECT uniqExact(stack_id) FROM {stacks}")).await,
        3
    );
    let needed = clickhouse_count(&format!(
        "SELECT count() FROM (SELECT DISTINCT stack_id, intDiv(time_bucket, 1000000) \
         FROM {database}.profile_snapshot)"
    ))
    .await;
    clickhouse(&format!("OPTIMIZE TABLE {stacks} FINAL")).await;
    assert_eq!(
        clickhouse_count(&format!("SELECT count() FROM {stacks}")).await,
        needed,
        "each (stack, day) once after merging"
    );

    for (server, segment, sent) in [
        (&first, "seg-midnight", &sent_first),
        (&second, "seg-midnight", &sent_first),
        (&first, "seg-other", &sent_second),
    ] {
        let (status, snapshots) = server
            .get(&format!("/api/v1/segments/{segment}/snapshots"))
            .await;
        assert_eq!(status, 200, "{snapshots}");
        let read: Vec<Vec<String>> = snapshots
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                s["stack"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect()
            })
            .collect();
        let expected: Vec<Vec<String>> = sent
            .iter()
            .map(|s| s.stack.clone().unwrap().code_signatures)
            .collect();
        assert_eq!(read, expected, "{segment}");
    }
    let view = clickhouse(&format!(
        "SELECT sequence, hex(stack_id), stack FROM {database}.profile_thread_snapshot \
         WHERE task_id = '{task_one}' AND segment_id = 'seg-midnight' \
         ORDER BY sequence LIMIT 1 BY sequence FORMAT JSONCompact"
    ))
    .await;
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    let rows = view["data"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[3][1], skysnap::model::StackId::of(odd).to_hex());
    assert_eq!(rows[3][2], serde_json::json!(odd));

    let task_flame = |task: &str| format!("/api/v1/tasks/{task}/flamegraph?format=collapsed");
    let collapsed = reqwest::get(format!("{}{}", first.http, task_flame(&task_one)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut lines: Vec<&str> = collapsed.lines().collect();
    lines.sort();
    assert_eq!(
        lines,
        [
            "Thread.run:1;;café.brûlée:7 1",
            "Thread.run:1;Servlet.service:2;Orders.list:3 2",
            "Thread.run:1;Servlet.service:2;Orders.save:9 1",
        ]
    );
    first.stop();
    second.stop();
    clickhouse(&format!("DROP DATABASE {database}")).await;
}
