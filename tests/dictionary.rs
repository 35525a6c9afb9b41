//! The stack dictionary (issue 13): snapshots read back through the API, the SQL view and
//! the analysis equal what was sent, across restarts, retention and a day boundary; a
//! store written by the previous release is migrated and answers exactly as it did.

mod common;

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;

use serde_json::Value;
use skysnap::proto::v3::{ThreadSnapshot, ThreadStack};

use common::Server;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn gunzip(path: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("fixture"))
        .read_to_end(&mut bytes)
        .expect("gzip");
    bytes
}

fn sqlite_count(db: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(sql, [], |row| row.get(0))
        .unwrap()
}

/// `tests/fixtures/sqlite-0.1-layout.db.gz` was written by skysnap at 9be355f, the last
/// layout with one row per snapshot and its stack as JSON text (2 tasks, 10 segments,
/// 600 snapshots, 420 distinct stacks); `…answers.json.gz` holds what that release
/// answered for every task, segment, flame graph and analysis of it.
#[tokio::test]
async fn test_sqlite_store_of_the_previous_release_is_migrated_and_answers_as_before() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("skysnap.db"),
        gunzip(&format!("{FIXTURES}/sqlite-0.1-layout.db.gz")),
    )
    .unwrap();
    // Its snapshots are of 2026-11-26: a retention that keeps them on any later day.
    let mut server = Server::start_in(dir.path(), &[("SKYSNAP_RETENTION_DAYS", "36500")]);
    let log = server.stderr();
    assert!(log.contains("earlier layout migrated"), "{log}");

    let answers: HashMap<String, Value> = serde_json::from_slice(&gunzip(&format!(
        "{FIXTURES}/sqlite-0.1-layout.answers.json.gz"
    )))
    .unwrap();
    assert_eq!(answers.len(), 29);
    for (path, before) in &answers {
        if path.ends_with("format=collapsed") {
            let now = reqwest::get(format!("{}{path}", server.http))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            assert_eq!(Some(now.as_str()), before.as_str(), "{path}");
        } else {
            let (status, now) = server.get(path).await;
            assert_eq!(status, 200, "{path}: {now}");
            assert_eq!(&now, before, "{path}");
        }
    }

    let db = server.db_path();
    assert_eq!(
        sqlite_count(
            &db,
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'profile_thread_snapshot' AND type = 'view'"
        ),
        1
    );
    assert_eq!(
        sqlite_count(
            &db,
            "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'profile_thread_snapshot_v1'"
        ),
        0,
        "the old table is gone"
    );
    assert_eq!(
        sqlite_count(&db, "SELECT COUNT(*) FROM profile_snapshot"),
        600
    );
    assert_eq!(sqlite_count(&db, "SELECT COUNT(*) FROM profile_stack"), 420);
    server.stop();
}

fn stack(frames: &[&str]) -> ThreadStack {
    ThreadStack {
        code_signatures: frames.iter().map(|frame| frame.to_string()).collect(),
    }
}

/// Snapshots of a segment with the given stacks, dumped at the given times.
fn dumps(task: &str, segment: &str, stacks: &[(&[&str], i64)]) -> Vec<ThreadSnapshot> {
    stacks
        .iter()
        .enumerate()
        .map(|(sequence, (frames, time))| ThreadSnapshot {
            task_id: task.into(),
            trace_segment_id: segment.into(),
            time: *time,
            sequence: sequence as i32,
            stack: Some(stack(frames)),
        })
        .collect()
}

fn frames_of(snapshots: &Value) -> Vec<Vec<String>> {
    snapshots
        .as_array()
        .unwrap()
        .iter()
        .map(|snapshot| {
            snapshot["stack"]
                .as_array()
                .unwrap()
                .iter()
                .map(|frame| frame.as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

/// Each distinct stack is stored once; what the API, the SQL view and a restarted
/// server read back is what was sent, over a day boundary and after retention.
#[tokio::test]
async fn test_sqlite_dictionary_reads_back_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let day_ms = 86_400_000;
    let now = skysnap::model::now_ms();
    // 23:59:59.990 of yesterday and 00:00:00.010 of today, UTC.
    let midnight = now - now.rem_euclid(day_ms);
    let (before_midnight, after_midnight) = (midnight - 10, midnight + 10);
    let old = now - 10 * day_ms;
    let hot: &[&str] = &["Thread.run:1", "Servlet.service:2", "Orders.list:3"];
    let variant: &[&str] = &["Thread.run:1", "Servlet.service:2", "Orders.save:9"];
    let only_old: &[&str] = &["Thread.run:1", "Cron.tick:4"];
    // "é" and an empty frame: frames are bytes, stored and read back as they came.
    let odd: &[&str] = &["Thread.run:1", "", "café.brûlée:7"];
    let env = [("SKYSNAP_RETENTION_CHECK_INTERVAL_MS", "200")];

    let mut server = Server::start_in(dir.path(), &env);
    let mut client = server.profile_client().await;
    let sent = [
        dumps(
            "t1",
            "seg-midnight",
            &[
                (hot, before_midnight),
                (hot, before_midnight + 5),
                (variant, after_midnight),
                (odd, after_midnight + 5),
            ],
        ),
        dumps("t1", "seg-old", &[(only_old, old), (hot, old + 10)]),
    ];
    for stream in &sent {
        client
            .collect_snapshot(tokio_stream::iter(stream.clone()))
            .await
            .unwrap();
    }
    server.stop();

    // Another process, with nothing remembered, sends the same stacks again.
    let mut server = Server::start_in(dir.path(), &env);
    let mut client = server.profile_client().await;
    client
        .collect_snapshot(tokio_stream::iter(dumps(
            "t2",
            "seg-again",
            &[(hot, now), (variant, now + 10), (odd, now + 20)],
        )))
        .await
        .unwrap();
    let db = server.db_path();
    // Retention (3 days) has removed seg-old and the stack only it used; the hot stack
    // that seg-old shared with the kept segments stays.
    common::eventually(std::time::Duration::from_secs(10), || {
        let gone = sqlite_count(
            &db,
            "SELECT COUNT(*) FROM profile_thread_snapshot WHERE segment_id = 'seg-old'",
        ) == 0
            && sqlite_count(&db, "SELECT COUNT(*) FROM profile_stack") == 3;
        std::future::ready(gone.then_some(()))
    })
    .await;
    assert_eq!(
        sqlite_count(&db, "SELECT COUNT(*) FROM profile_snapshot"),
        7
    );

    let expected_midnight: Vec<Vec<String>> = [hot, hot, variant, odd]
        .iter()
        .map(|frames| frames.iter().map(|frame| frame.to_string()).collect())
        .collect();
    let (status, snapshots) = server.get("/api/v1/segments/seg-midnight/snapshots").await;
    assert_eq!(status, 200);
    assert_eq!(frames_of(&snapshots), expected_midnight);
    let (_, snapshots) = server.get("/api/v1/segments/seg-again/snapshots").await;
    assert_eq!(frames_of(&snapshots)[2], expected_midnight[3]);

    // The view gives SQL users the frames, and the id skysnap computes.
    let connection = rusqlite::Connection::open(&db).unwrap();
    let (frames_json, stack_id, time_bucket): (String, String, i64) = connection
        .query_row(
            "SELECT stack, stack_id, time_bucket FROM profile_thread_snapshot \
             WHERE segment_id = 'seg-midnight' AND sequence = 3",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Vec<String>>(&frames_json).unwrap(),
        expected_midnight[3]
    );
    assert_eq!(stack_id, skysnap::model::StackId::of(odd).to_hex());
    assert_eq!(
        time_bucket,
        skysnap::model::second_bucket(after_midnight + 5),
        "the view computes the time bucket the rows used to carry"
    );

    // The flame graph counts each stack's snapshots across both tasks' segments.
    let (_, analysis) = server
        .get("/api/v1/analysis?segment=seg-midnight&segment=seg-again")
        .await;
    let roots = analysis["trees"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{analysis}");
    assert_eq!(roots[0]["elements"][0]["count"], 7);
    server.stop();
}
