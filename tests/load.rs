//! A short `skysnap load` against the real binary on SQLite: the load generator speaks
//! the agent protocol and every acknowledged snapshot is found through the API. No
//! timing is asserted here; figures come from the benchmark runs.

mod common;

use common::{skysnap_command, Server};

#[tokio::test]
async fn test_load_generator_against_sqlite_misses_nothing() {
    let mut server = Server::start(&[]);
    let (grpc, http) = (server.grpc.clone(), server.http.clone());
    let output = tokio::task::spawn_blocking(move || {
        skysnap_command()
            .args([
                "load",
                "--target",
                &grpc,
                "--server",
                &http,
                "--duration",
                "10s",
                "--json",
            ])
            .output()
            .expect("skysnap load runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    eprintln!("{report}");
    assert_eq!(report["missing_opt"], 0);
    assert!(report["snapshots_acknowledged"].as_u64().unwrap() >= 500);
    assert_eq!(report["errors"], serde_json::json!({}));
    assert_eq!(
        server
            .metric("skysnap_snapshots_committed_total", &[])
            .await,
        report["snapshots_acknowledged"].as_f64().unwrap()
    );
    server.stop();
}
