//! What an acknowledgement survives when the process dies without a word: `kill -9` of
//! `skysnap serve` under load, on SQLite and on the real ClickHouse server, loses only
//! snapshots of streams that had not been acknowledged. The store is whole afterwards,
//! and a restarted server takes the broken streams when the agents send them again.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use skysnap::proto::v3::ThreadSnapshot;

use common::{
    clickhouse, clickhouse_url, fresh_database, snapshot, snapshot_rows, PacedAgents, Server,
};

const PER_STREAM: i32 = 200;

fn stream_of(segment: &str) -> Vec<ThreadSnapshot> {
    (0..PER_STREAM)
        .map(|n| snapshot("task-kill", segment, n))
        .collect()
}

/// Streams from 8 agents, paced so that some are always open, until the server dies;
/// SIGKILL after 1.5 s. Answers the acknowledged streams and the broken ones.
async fn kill_under_load(server: &mut Server, prefix: &str) -> (Vec<String>, Vec<String>) {
    let agents = PacedAgents::start(&server.grpc, "task-kill", prefix, 8, PER_STREAM, None);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    server.signal("KILL");
    let status = server.wait(Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "killed: {status}"
    );
    let (acknowledged, broken) = agents.finish(Duration::from_secs(30)).await;
    assert!(
        acknowledged.len() >= 8,
        "load ran: {} streams acknowledged",
        acknowledged.len()
    );
    eprintln!(
        "{prefix}: {} streams acknowledged, {} broken by the kill",
        acknowledged.len(),
        broken.len()
    );
    (acknowledged, broken)
}

/// The agents send their broken streams again to a restarted server.
async fn resend(server: &Server, segments: &[String]) {
    let mut client = server.profile_client().await;
    for segment in segments {
        client
            .collect_snapshot(tokio_stream::iter(stream_of(segment)))
            .await
            .expect("a re-sent stream is acknowledged");
    }
}

fn integrity(db: &Path) -> String {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap()
}

#[tokio::test]
async fn test_sigkill_under_load_sqlite_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    // The strictest level: an acknowledgement survives a power loss too. (A process
    // kill cannot tell the levels apart; the README says what each one survives.)
    let env = [("SKYSNAP_SQLITE_SYNCHRONOUS", "full")];
    let mut server = Server::start_in(dir.path(), &env);
    let (acknowledged, broken) = kill_under_load(&mut server, "kill-sqlite").await;
    let db = server.db_path();
    for segment in &acknowledged {
        assert_eq!(
            snapshot_rows(&db, segment),
            i64::from(PER_STREAM),
            "acknowledged stream {segment}"
        );
    }
    // A broken stream may have committed a batch or two; never a row twice.
    for segment in &broken {
        assert!(snapshot_rows(&db, segment) <= i64::from(PER_STREAM));
    }
    assert_eq!(integrity(&db), "ok");

    let mut restarted = Server::start_in(dir.path(), &env);
    assert!(
        restarted.stderr().contains("synchronous=\"FULL\"")
            || restarted.stderr().contains("synchronous=FULL"),
        "{}",
        restarted.stderr()
    );
    resend(&restarted, &broken).await;
    for segment in acknowledged.iter().chain(&broken) {
        assert_eq!(
            snapshot_rows(&db, segment),
            i64::from(PER_STREAM),
            "{segment}"
        );
    }
    restarted.stop();
}

async fn clickhouse_rows_by_segment(database: &str, prefix: &str) -> HashMap<String, i64> {
    let text = clickhouse(&format!(
        "SELECT segment_id, count() FROM {database}.profile_snapshot FINAL \
         WHERE segment_id LIKE '{prefix}-%' GROUP BY segment_id FORMAT TSV"
    ))
    .await;
    text.lines()
        .filter_map(|line| line.split_once('\t'))
        .map(|(segment, count)| (segment.to_string(), count.parse().unwrap()))
        .collect()
}

#[tokio::test]
async fn test_sigkill_under_load_clickhouse_loses_nothing_acknowledged() {
    let database = fresh_database("kill");
    let url = clickhouse_url();
    let env = [
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", url.as_str()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database.as_str()),
    ];
    let mut server = Server::start(&env);
    let (acknowledged, broken) = kill_under_load(&mut server, "kill-ch").await;
    let rows = clickhouse_rows_by_segment(&database, "kill-ch").await;
    for segment in &acknowledged {
        assert_eq!(
            rows.get(segment).copied().unwrap_or(0),
            i64::from(PER_STREAM),
            "acknowledged stream {segment}"
        );
    }
    for segment in &broken {
        assert!(rows.get(segment).copied().unwrap_or(0) <= i64::from(PER_STREAM));
    }

    let mut restarted = Server::start(&env);
    resend(&restarted, &broken).await;
    let rows = clickhouse_rows_by_segment(&database, "kill-ch").await;
    for segment in acknowledged.iter().chain(&broken) {
        assert_eq!(
            rows.get(segment).copied().unwrap_or(0),
            i64::from(PER_STREAM),
            "{segment}"
        );
    }
    restarted.stop();
}
