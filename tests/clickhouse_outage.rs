//! ClickHouse stopped for 15 s under load and started again: every acknowledged
//! snapshot is there, every refused stream was refused with UNAVAILABLE. Its own test
//! binary, because it stops the ClickHouse server the other tests share.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{
    clickhouse, clickhouse_url, fresh_database, load_through_outage, LoadOutcome, Server,
};

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
    let (
        acknowledged_before,
        LoadOutcome {
            acknowledged,
            refused,
        },
    ) = load_through_outage(
        &server,
        "out",
        Duration::from_secs(26),
        "clickhouse",
        Duration::from_secs(15),
    )
    .await;
    let counts_text = clickhouse(&format!(
        "SELECT segment_id, count() FROM {database}.profile_snapshot FINAL GROUP BY segment_id FORMAT TSV"
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
