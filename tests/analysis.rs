//! Reading snapshots back, against the real binary on SQLite and on the real ClickHouse
//! server: SkyWalking's stack-tree analysis, the task flame graph as JSON, folded stacks
//! and pprof (read back by `go tool pprof`), the diff, the CLI, and bad input. The
//! fixture is small and every expected number is worked out by hand in the comments.

mod common;

use std::io::Read as _;
use std::time::Duration;

use prost::Message as _;
use serde_json::{json, Value};
use skysnap::proto::pprof;
use skysnap::proto::v3::{ThreadSnapshot, ThreadStack};

use common::{clickhouse_url, eventually, fresh_database, skysnap_command, Server};

const MAIN: &str = "com.shop.Main.main:10";
const LIST: &str = "com.shop.Orders.list:20";
const SAVE: &str = "com.shop.Orders.save:30";
const QUERY: &str = "com.shop.Db.query:40";
const CACHE: &str = "com.shop.Cache.get:50";
const RUN: &str = "java.lang.Thread.run:60";
const POLL: &str = "com.shop.Worker.poll:70";
const SPIN: &str = "com.shop.Loop.spin:80";

struct Fixture {
    /// Task with segments s1 and s2 (dump period 20 ms).
    task: String,
    /// Task with one segment of 12,001 snapshots.
    big_task: String,
    /// Dump times are `base + offset`.
    base: i64,
    s1: String,
    s2: String,
    s3: String,
}

fn snapshot(task: &str, segment: &str, sequence: i32, time: i64, stack: &[&str]) -> ThreadSnapshot {
    ThreadSnapshot {
        task_id: task.to_string(),
        trace_segment_id: segment.to_string(),
        time,
        sequence,
        stack: Some(ThreadStack {
            code_signatures: stack.iter().map(|frame| frame.to_string()).collect(),
        }),
    }
}

/// s1: 0,1,2 then a gap, 4,5 (10 ms apart); s2: 6,7,8 four seconds later (so a run
/// must not continue from one segment into the next); sent
/// interleaved with s1's sequence 1 twice. s3: 12,001 snapshots of one stack.
async fn load_fixture(server: &Server) -> Fixture {
    let task = server.create_task("shop", "/orders").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let big_task = server.create_task("batch", "/loop").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let base = (skysnap::model::now_ms() / 1000 - 120) * 1000;
    let (s1, s2, s3) = (
        format!("s1-{task}"),
        format!("s2-{task}"),
        format!("s3-{big_task}"),
    );
    let task_id = task.as_str();
    let messages = vec![
        snapshot(task_id, &s2, 6, base + 4000, &[MAIN, LIST, QUERY]),
        snapshot(task_id, &s1, 0, base, &[MAIN, LIST, QUERY]),
        snapshot(task_id, &s1, 1, base + 10, &[MAIN, LIST, QUERY]),
        snapshot(task_id, &s2, 7, base + 4010, &[RUN, POLL]),
        snapshot(task_id, &s1, 2, base + 20, &[MAIN, SAVE, QUERY]),
        snapshot(task_id, &s1, 4, base + 40, &[MAIN, LIST]),
        snapshot(task_id, &s1, 1, base + 10, &[MAIN, LIST, QUERY]),
        snapshot(task_id, &s1, 5, base + 50, &[MAIN, LIST, CACHE]),
        snapshot(task_id, &s2, 8, base + 4020, &[MAIN, SAVE]),
    ];
    let mut client = server.profile_client().await;
    client
        .collect_snapshot(tokio_stream::iter(messages))
        .await
        .expect("fixture stream acknowledged");
    let big: Vec<ThreadSnapshot> = (0..12_001)
        .map(|sequence| {
            snapshot(
                &big_task,
                &s3,
                sequence,
                base + 10 * i64::from(sequence),
                &[MAIN, SPIN],
            )
        })
        .collect();
    client
        .collect_snapshot(tokio_stream::iter(big))
        .await
        .expect("12,001 snapshots acknowledged");
    Fixture {
        task,
        big_task,
        base,
        s1,
        s2,
        s3,
    }
}

fn element(
    id: u32,
    parent_id: u32,
    code_signature: &str,
    count: u32,
    duration: i64,
    excluded: i64,
) -> Value {
    json!({"id": id, "parent_id": parent_id, "code_signature": code_signature, "count": count,
           "duration": duration, "duration_child_excluded": excluded})
}

/// A diff node; shares of 1 and 0 are written as integers, as the API writes them.
fn diff_node(
    name: &str,
    base: u64,
    target: u64,
    base_share: f64,
    target_share: f64,
    delta: f64,
    children: Vec<Value>,
) -> Value {
    let number = |share: f64| {
        if share.fract() == 0.0 {
            json!(share as i64)
        } else {
            json!(share)
        }
    };
    json!({"name": name, "base": base, "target": target, "base_share": number(base_share),
           "target_share": number(target_share), "delta": number(delta), "children": children})
}

fn node(name: &str, value: u64, self_samples: u64, children: Vec<Value>) -> Value {
    json!({"name": name, "value": value, "self": self_samples, "wall_ms": value * 20, "children": children})
}

async fn get_text(server: &Server, path: &str) -> (u16, Vec<u8>) {
    let response = reqwest::get(format!("{}{path}", server.http))
        .await
        .expect("http get");
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

async fn check_analysis(server: &Server, fixture: &Fixture) {
    // s1 + s2. main: s1 runs 0-2 (20 ms) and 4-5 (10 ms), s2 6 and 8 alone → 30
    // (s2's 6 does not continue s1's 4-5: runs are per segment).
    // list: s1 0-1 (10), 4-5 (10), s2 6 → 20; save: s1 2, s2 8 → 0.
    // list/query: s1 0-1 (10), s2 6 → 10; list/cache 0; save/query 0.
    let expected_main = json!({"elements": [
        element(1, 0, MAIN, 7, 30, 10),
        element(2, 1, LIST, 5, 20, 10),
        element(3, 1, SAVE, 2, 0, 0),
        element(4, 2, QUERY, 3, 10, 10),
        element(5, 2, CACHE, 1, 0, 0),
        element(6, 3, QUERY, 1, 0, 0),
    ]});
    let expected_run =
        json!({"elements": [element(1, 0, RUN, 1, 0, 0), element(2, 1, POLL, 1, 0, 0)]});
    let (status, body) = server
        .get(&format!(
            "/api/v1/analysis?segment={}&segment={}",
            fixture.s1, fixture.s2
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"trees": [expected_main, expected_run], "tip": null})
    );

    // The whole task reads the same two segments.
    let (status, by_task) = server
        .get(&format!("/api/v1/analysis?task={}", fixture.task))
        .await;
    assert_eq!(status, 200);
    assert_eq!(by_task, body);

    // s1 within [base+10, base+40]: sequences 1, 2, 4. main: run 1-2 (10) + 4 (0).
    let (status, ranged) = server
        .get(&format!(
            "/api/v1/analysis?segment={}&start={}&end={}",
            fixture.s1,
            fixture.base + 10,
            fixture.base + 40
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        ranged,
        json!({"trees": [{"elements": [
            element(1, 0, MAIN, 3, 10, 10),
            element(2, 1, LIST, 2, 0, 0),
            element(3, 1, SAVE, 1, 0, 0),
            element(4, 2, QUERY, 1, 0, 0),
            element(5, 3, QUERY, 1, 0, 0),
        ]}], "tip": null})
    );

    // 12,001 snapshots: the first 12,000 (sequences 0..11999, 10 ms apart) → 119,990 ms.
    let (status, big) = server
        .get(&format!("/api/v1/analysis?segment={}", fixture.s3))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        big,
        json!({"trees": [{"elements": [
            element(1, 0, MAIN, 12_000, 119_990, 0),
            element(2, 1, SPIN, 12_000, 119_990, 119_990),
        ]}], "tip": "Out of snapshot analyze limit, 12001 snapshots found, but analysis first 12000 snapshots only."})
    );

    // A known segment with an empty range, and an unknown segment.
    let (status, empty) = server
        .get(&format!(
            "/api/v1/analysis?segment={}&start=1&end=2",
            fixture.s1
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(empty, json!({"trees": [], "tip": "Data not found"}));
    let (status, unknown) = server.get("/api/v1/analysis?segment=no-such-segment").await;
    assert_eq!(status, 404);
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("no-such-segment"),
        "{unknown}"
    );
}

async fn check_flamegraph(server: &Server, fixture: &Fixture) {
    // Eight snapshots (the re-sent one once): main;list;query ×3, main;save;query,
    // main;list, main;list;cache, run;poll, main;save.
    let (status, tree) = server
        .get(&format!("/api/v1/tasks/{}/flamegraph", fixture.task))
        .await;
    assert_eq!(status, 200, "{tree}");
    let mut expected = node(
        "all",
        8,
        0,
        vec![
            node(
                MAIN,
                7,
                0,
                vec![
                    node(
                        LIST,
                        5,
                        1,
                        vec![node(QUERY, 3, 3, vec![]), node(CACHE, 1, 1, vec![])],
                    ),
                    node(SAVE, 2, 1, vec![node(QUERY, 1, 1, vec![])]),
                ],
            ),
            node(RUN, 1, 0, vec![node(POLL, 1, 1, vec![])]),
        ],
    );
    expected["dump_period_ms"] = json!(20);
    expected["truncated_samples"] = json!(0);
    assert_eq!(tree, expected);

    let (status, folded) = get_text(
        server,
        &format!("/api/v1/tasks/{}/flamegraph?format=collapsed", fixture.task),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(folded).unwrap(),
        format!(
            "{MAIN};{LIST} 1\n{MAIN};{LIST};{QUERY} 3\n{MAIN};{LIST};{CACHE} 1\n{MAIN};{SAVE} 1\n\
             {MAIN};{SAVE};{QUERY} 1\n{RUN};{POLL} 1\n"
        )
    );

    // Filters: one segment; a dump-time range (s1's 1, 2, 4 and nothing of s2).
    let (_, s2_only) = server
        .get(&format!(
            "/api/v1/tasks/{}/flamegraph?segment={}",
            fixture.task, fixture.s2
        ))
        .await;
    assert_eq!(s2_only["value"], 3);
    let (_, ranged) = server
        .get(&format!(
            "/api/v1/tasks/{}/flamegraph?start={}&end={}",
            fixture.task,
            fixture.base + 10,
            fixture.base + 40
        ))
        .await;
    assert_eq!(ranged["value"], 3);
    assert_eq!(ranged["children"][0]["children"][0]["name"], LIST);
    assert_eq!(ranged["children"][0]["children"][0]["value"], 2);

    // pprof, decoded here and read by `go tool pprof`.
    let (status, gzipped) = get_text(
        server,
        &format!("/api/v1/tasks/{}/flamegraph?format=pprof", fixture.task),
    )
    .await;
    assert_eq!(status, 200);
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gzipped.as_slice())
        .read_to_end(&mut bytes)
        .expect("pprof is gzipped");
    let profile = pprof::Profile::decode(bytes.as_slice()).expect("pprof decodes");
    let text = |index: i64| profile.string_table[index as usize].clone();
    assert_eq!(profile.string_table[0], "");
    assert_eq!(
        profile
            .sample_type
            .iter()
            .map(|value_type| (text(value_type.r#type), text(value_type.unit)))
            .collect::<Vec<_>>(),
        [
            ("samples".to_string(), "count".to_string()),
            ("wall".to_string(), "nanoseconds".to_string())
        ]
    );
    assert_eq!(text(profile.default_sample_type), "wall");
    let period_type = profile.period_type.as_ref().unwrap();
    assert_eq!(
        (text(period_type.r#type), text(period_type.unit)),
        ("wall".into(), "nanoseconds".into())
    );
    assert_eq!(profile.period, 20_000_000);
    let samples: u64 = profile.sample.iter().map(|s| s.value[0] as u64).sum();
    assert_eq!(samples, 8);
    // Db.query appears under two parents but is one function and one location.
    let query_functions: Vec<_> = profile
        .function
        .iter()
        .filter(|function| text(function.name) == "com.shop.Db.query")
        .collect();
    assert_eq!(query_functions.len(), 1);
    let query_locations: Vec<u64> = profile
        .location
        .iter()
        .filter(|location| location.line[0].function_id == query_functions[0].id)
        .map(|location| location.id)
        .collect();
    assert_eq!(query_locations.len(), 1);
    let samples_through_query = profile
        .sample
        .iter()
        .filter(|sample| sample.location_id[0] == query_locations[0])
        .count();
    assert_eq!(
        samples_through_query, 2,
        "the location is shared by both stacks"
    );
    let leaf_counts: Vec<(String, i64, i64)> = profile
        .sample
        .iter()
        .map(|sample| {
            let location = &profile.location[sample.location_id[0] as usize - 1];
            let function = &profile.function[location.line[0].function_id as usize - 1];
            (
                format!("{}:{}", text(function.name), location.line[0].line),
                sample.value[0],
                sample.value[1],
            )
        })
        .collect();
    assert!(
        leaf_counts.contains(&("com.shop.Db.query:40".to_string(), 3, 60_000_000)),
        "{leaf_counts:?}"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &gzipped).unwrap();
    let output = std::process::Command::new("go")
        .args(["tool", "pprof", "-top", "-sample_index=samples"])
        .arg(file.path())
        .output()
        .expect("`go tool pprof` runs (Go is part of the test machine)");
    let top = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pprof failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The hot frame first: 4 of 8 samples end in Db.query (3 under list, 1 under save).
    let first_row = top
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("flat"))
        .nth(1)
        .unwrap_or_default()
        .to_string();
    assert!(
        first_row.contains("com.shop.Db.query") && first_row.trim_start().starts_with('4'),
        "{top}"
    );
}

async fn check_diff(server: &Server, fixture: &Fixture) {
    // s1: main 5 (list 4, save 1); s2: main 2 (list 1, save 1) and run 1.
    let (status, diff) = server
        .get(&format!(
            "/api/v1/flamegraph/diff?base={task}&base_segment={}&target={task}&target_segment={}",
            fixture.s1,
            fixture.s2,
            task = fixture.task
        ))
        .await;
    assert_eq!(status, 200, "{diff}");
    // Shares of 5 (s1) and 3 (s2), rounded to six places; delta = target − base.
    assert_eq!(
        diff,
        json!({"base_total": 5, "target_total": 3, "tip": null, "tree":
            diff_node("all", 5, 3, 1.0, 1.0, 0.0, vec![
                diff_node(MAIN, 5, 2, 1.0, 0.666667, -0.333333, vec![
                    diff_node(LIST, 4, 1, 0.8, 0.333333, -0.466667, vec![
                        diff_node(QUERY, 2, 1, 0.4, 0.333333, -0.066667, vec![]),
                        diff_node(CACHE, 1, 0, 0.2, 0.0, -0.2, vec![]),
                    ]),
                    diff_node(SAVE, 1, 1, 0.2, 0.333333, 0.133333, vec![
                        diff_node(QUERY, 1, 0, 0.2, 0.0, -0.2, vec![]),
                    ]),
                ]),
                diff_node(RUN, 0, 1, 0.0, 0.333333, 0.333333, vec![
                    diff_node(POLL, 0, 1, 0.0, 0.333333, 0.333333, vec![]),
                ]),
            ])
        })
    );

    // Both sides empty: a result that says so, not an error.
    let (status, empty) = server
        .get(&format!(
            "/api/v1/flamegraph/diff?base={task}&base_start=1&base_end=2&target={task}&target_start=1&target_end=2",
            task = fixture.task
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(empty["tip"], "Data not found");
    assert_eq!(empty["tree"]["children"], json!([]));
    // Two tasks.
    let (status, two) = server
        .get(&format!(
            "/api/v1/flamegraph/diff?base={}&target={}",
            fixture.task, fixture.big_task
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        (two["base_total"].as_u64(), two["target_total"].as_u64()),
        (Some(8), Some(12_001))
    );
}

async fn check_bad_input(server: &Server, fixture: &Fixture) {
    let cases = [
        (
            "/api/v1/tasks/no-such-task/flamegraph".to_string(),
            404,
            "no-such-task",
        ),
        (
            format!("/api/v1/tasks/{}/flamegraph?format=svg", fixture.task),
            400,
            "format:",
        ),
        (
            format!("/api/v1/tasks/{}/flamegraph?start=1", fixture.task),
            400,
            "end: missing",
        ),
        (
            format!("/api/v1/tasks/{}/flamegraph?start=9&end=1", fixture.task),
            400,
            "end: 1 is before start 9",
        ),
        (
            format!("/api/v1/tasks/{}/flamegraph?start=x&end=1", fixture.task),
            400,
            "start: \"x\"",
        ),
        (
            format!("/api/v1/tasks/{}/flamegraph?instance=", fixture.task),
            400,
            "instance: must not be empty",
        ),
        (
            format!(
                "/api/v1/tasks/{}/flamegraph?instance=a&instance=b",
                fixture.task
            ),
            400,
            "instance",
        ),
        (
            format!("/api/v1/tasks/{}/flamegraph?depth=3", fixture.task),
            400,
            "depth: unknown parameter",
        ),
        ("/api/v1/analysis".to_string(), 400, "segment:"),
        (
            format!("/api/v1/analysis?segment={}&start=9&end=1", fixture.s1),
            400,
            "end: 1 is before start 9",
        ),
        (
            format!("/api/v1/analysis?segment={s}&segment={s}", s = fixture.s1),
            400,
            "given twice",
        ),
        (
            format!(
                "/api/v1/tasks/{}/flamegraph?format=json&format=pprof",
                fixture.task
            ),
            400,
            "format: given twice",
        ),
        (
            format!(
                "/api/v1/tasks/{}/flamegraph?segment=no-such-segment",
                fixture.task
            ),
            404,
            "no-such-segment",
        ),
        (
            format!(
                "/api/v1/tasks/{}/flamegraph?segment={}",
                fixture.task, fixture.s3
            ),
            404,
            fixture.s3.as_str(),
        ),
        (
            format!(
                "/api/v1/flamegraph/diff?base={task}&target={task}&target_segment=gone",
                task = fixture.task
            ),
            404,
            "gone",
        ),
        (
            format!("/api/v1/analysis?segment={}&start=5", fixture.s1),
            400,
            "end: missing",
        ),
        (
            "/api/v1/analysis?start=5&end=6".to_string(),
            400,
            "start: must follow",
        ),
        (
            "/api/v1/analysis?task=no-such-task".to_string(),
            404,
            "no-such-task",
        ),
        (
            format!("/api/v1/flamegraph/diff?base={}", fixture.task),
            400,
            "target:",
        ),
        (
            format!("/api/v1/flamegraph/diff?base={}&target=nope", fixture.task),
            404,
            "nope",
        ),
        (
            format!(
                "/api/v1/flamegraph/diff?base={task}&target={task}&target_end=3",
                task = fixture.task
            ),
            400,
            "target_start: missing",
        ),
    ];
    for (path, status, reason) in cases {
        let (got, body) = server.get(&path).await;
        assert_eq!(got, status, "{path}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{path}: {error:?} lacks {reason:?}");
    }
}

fn cli(server: &Server, args: &[&str]) -> (bool, String, String) {
    let output = skysnap_command()
        .arg("task")
        .args(args)
        .args(["--server", &server.http])
        .output()
        .expect("skysnap task runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn check_cli(server: &Server, fixture: &Fixture) {
    let (ok, out, err) = cli(server, &["analyze", &fixture.task, "--depth", "2"]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], " SAMPLES    DURATION        SELF  FRAME", "{out}");
    assert_eq!(
        lines[1],
        format!("       7        30ms        10ms  {MAIN}"),
        "{out}"
    );
    assert_eq!(
        lines[2],
        format!("       5        20ms        10ms    {LIST}"),
        "{out}"
    );
    assert!(lines[3].trim() == "… 2 more", "{out}");
    assert!(
        out.contains(&format!("       1         0ms         0ms  {RUN}")),
        "{out}"
    );

    let (ok, out, err) = cli(server, &["top", &fixture.task, "-n", "2"]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        format!(
            "8 snapshots, 7 frames, showing the top 2\n\
             SELF  SELF%   SUM%    TOTAL  TOTAL%  FRAME\n\
             4     50.00%  50.00%  4      50.00%  {QUERY}\n\
             1     12.50%  62.50%  5      62.50%  {LIST}\n"
        )
    );

    let dir = tempfile::tempdir().unwrap();
    for format in ["collapsed", "pprof", "json"] {
        let path = dir.path().join(format!("flame.{format}"));
        let (ok, out, err) = cli(
            server,
            &[
                "flamegraph",
                &fixture.task,
                "--format",
                format,
                "-o",
                path.to_str().unwrap(),
            ],
        );
        assert!(ok, "{err}");
        assert!(out.starts_with("wrote "), "{out}");
        let (status, from_api) = get_text(
            server,
            &format!("/api/v1/tasks/{}/flamegraph?format={format}", fixture.task),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            from_api,
            "{format} file is the API's answer"
        );
    }
    let (ok, _, err) = cli(
        server,
        &["analyze", &fixture.task, "--segment", &fixture.s3],
    );
    assert!(!ok);
    assert!(err.contains("is not a profiled segment of task"), "{err}");

    let (ok, _, err) = cli(server, &["analyze", "no-such-task"]);
    assert!(!ok);
    assert!(err.contains("404") && err.contains("no-such-task"), "{err}");
    let (ok, _, err) = cli(server, &["top", "no-such-task"]);
    assert!(!ok);
    assert!(err.contains("404") && err.contains("no-such-task"), "{err}");
}

async fn check_everything(server: &Server) {
    let fixture = load_fixture(server).await;
    // Stored means readable: wait until all 12,001 + 8 are counted.
    eventually(Duration::from_secs(20), || async {
        let (_, segments) = server
            .get(&format!("/api/v1/tasks/{}/segments", fixture.big_task))
            .await;
        (segments[0]["snapshot_count"] == 12_001).then_some(())
    })
    .await;
    check_analysis(server, &fixture).await;
    check_flamegraph(server, &fixture).await;
    check_diff(server, &fixture).await;
    check_bad_input(server, &fixture).await;
    check_cli(server, &fixture).await;
}

#[tokio::test]
async fn test_analysis_on_sqlite() {
    let server = Server::start(&[]);
    check_everything(&server).await;
}

#[tokio::test]
async fn test_analysis_on_clickhouse() {
    let database = fresh_database("analysis");
    let url = clickhouse_url();
    let server = Server::start(&[
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", url.as_str()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database.as_str()),
    ]);
    check_everything(&server).await;
    common::clickhouse(&format!("DROP DATABASE IF EXISTS {database}")).await;
}

/// A limit of 2: the analysis reads the first two snapshots by sequence even where the
/// store has to fall back from its fast read (ClickHouse reads at most 2 × limit + 1
/// rows as they lie, and s1 has 6 with its re-sent one).
async fn check_small_limit(server: &Server) {
    let fixture = load_fixture(server).await;
    let (status, body) = server
        .get(&format!("/api/v1/analysis?segment={}", fixture.s1))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"trees": [{"elements": [
            element(1, 0, MAIN, 2, 10, 0),
            element(2, 1, LIST, 2, 10, 0),
            element(3, 2, QUERY, 2, 10, 10),
        ]}], "tip": "Out of snapshot analyze limit, 5 snapshots found, but analysis first 2 snapshots only."})
    );
}

#[tokio::test]
async fn test_analysis_limit_on_sqlite() {
    let server = Server::start(&[("SKYSNAP_ANALYSIS_MAX_SNAPSHOTS", "2")]);
    check_small_limit(&server).await;
}

#[tokio::test]
async fn test_analysis_limit_on_clickhouse() {
    let database = fresh_database("analysis_limit");
    let url = clickhouse_url();
    let server = Server::start(&[
        ("SKYSNAP_STORE_KIND", "clickhouse"),
        ("SKYSNAP_CLICKHOUSE_URL", url.as_str()),
        ("SKYSNAP_CLICKHOUSE_DATABASE", database.as_str()),
        ("SKYSNAP_ANALYSIS_MAX_SNAPSHOTS", "2"),
    ]);
    check_small_limit(&server).await;
    common::clickhouse(&format!("DROP DATABASE IF EXISTS {database}")).await;
}
