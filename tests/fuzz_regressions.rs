//! Inputs found by the fuzz targets in `fuzz/` (see fuzz/README.md), pinned as tests.

mod common;

use common::Server;
use prost::Message as _;
use skysnap::consume::decode_value;
use skysnap::model::to_record;
use skysnap::proto::v3::{ThreadSnapshot, ThreadStack};

fn snapshot(time: i64) -> ThreadSnapshot {
    ThreadSnapshot {
        task_id: "t1".into(),
        trace_segment_id: "seg-1".into(),
        time,
        sequence: 0,
        stack: Some(ThreadStack {
            code_signatures: vec!["main".into(), "run".into()],
        }),
    }
}

/// (method, path) → (status, content type, body).
async fn request(server: &Server, method: &str, path: &str) -> (u16, String, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let response = reqwest::Client::new()
        .request(method, format!("{}{path}", server.http))
        .send()
        .await
        .expect("http request");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    (
        status,
        content_type,
        response.text().await.unwrap_or_default(),
    )
}

fn assert_json_error(status: u16, content_type: &str, body: &str, what: &str) {
    assert!(
        content_type.starts_with("application/json"),
        "{what}: {status} with content type {content_type:?}: {body:?}"
    );
    let value: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|error| panic!("{what}: {status} body is not JSON ({error}): {body:?}"));
    assert!(
        value["error"]
            .as_str()
            .is_some_and(|reason| !reason.is_empty()),
        "{what}: {status} {body}"
    );
}

#[test]
fn test_fuzz_kafka_value_null_empty_and_garbage() {
    // A null value (a tombstone) and bytes that are not protobuf: `malformed`.
    assert_eq!(decode_value(None, 2000), Err("malformed"));
    assert_eq!(
        decode_value(Some(&[0xff, 0xff, 0xff]), 2000),
        Err("malformed")
    );
    // A truncated length-delimited field (the seed `valid` cut in half).
    let bytes = snapshot(1_795_635_157_123).encode_to_vec();
    assert_eq!(decode_value(Some(&bytes[..7]), 2000), Err("malformed"));
    // An empty value is a valid, empty ThreadSnapshot: refused by the rules, not the codec.
    assert_eq!(decode_value(Some(&[]), 2000), Err("empty_task_id"));
    // The consumer and the receiver agree on a valid one and on a deep stack.
    let record = decode_value(Some(&bytes), 2000).expect("a valid snapshot");
    assert_eq!(Ok(record), to_record(snapshot(1_795_635_157_123), 2000));
    assert_eq!(decode_value(Some(&bytes), 1), Err("stack_too_deep"));
}

#[test]
fn test_fuzz_snapshot_time_buckets_up_to_year_9999() {
    // 9999-12-31T23:59:59.999Z, the last dump time whose bucket is yyyyMMddHHmmss.
    let record = to_record(snapshot(253_402_300_799_999), 2000).expect("accepted");
    assert_eq!(record.time_bucket(), 99_991_231_235_959);
    let record = to_record(snapshot(1), 2000).expect("accepted");
    assert_eq!(record.time_bucket(), 19_700_101_000_000);
}

/// Finding (fuzz target `snapshot`, input `\0` + a ThreadSnapshot with time
/// 488183162732538): any positive dump time is accepted. Past year 9999 the time
/// bucket has 15 or 16 digits (year 17439 gives 174391129020532), which ClickHouse's
/// `PARTITION BY intDiv(time_bucket, 1000000)` and TTL `makeDate(…)` do not expect; past
/// chrono's range (about year 262143) it falls back to 1970, so retention deletes the
/// snapshot at its next check.
#[test]
fn test_fuzz_snapshot_dump_time_past_year_9999_is_invalid() {
    assert_eq!(
        to_record(snapshot(253_402_300_800_000), 2000),
        Err("invalid_time")
    );
    assert_eq!(to_record(snapshot(i64::MAX), 2000), Err("invalid_time"));
}

/// Finding (fuzz target `http`): a known route with a method it does not serve answers
/// axum's bare 405, no body and no content type, not `{"error": …}`.
#[tokio::test]
async fn test_fuzz_http_wrong_method_is_a_json_error() {
    let server = Server::start(&[]);
    for (method, path) in [
        ("DELETE", "/api/v1/tasks"),
        ("POST", "/"),
        ("PUT", "/api/v1/tasks/task-1"),
        ("POST", "/healthz"),
    ] {
        let (status, content_type, body) = request(&server, method, path).await;
        assert_eq!(status, 405, "{method} {path}");
        assert_json_error(status, &content_type, &body, &format!("{method} {path}"));
    }
}

/// Finding (fuzz target `http`): a path parameter that percent-decodes to bytes that
/// are not UTF-8 was refused by axum's `Path` extractor with a `text/plain` 400,
/// "Invalid URL: Invalid UTF-8 in `id`", not `{"error": …}`.
#[tokio::test]
async fn test_fuzz_http_non_utf8_path_parameter_is_a_json_error() {
    let server = Server::start(&[]);
    for path in [
        "/api/v1/tasks/%FF",
        "/api/v1/tasks/%C3%28/logs",
        "/api/v1/segments/%FF",
        "/api/v1/segments/%FF/snapshots",
        "/api/v1/tasks/%FF/flamegraph",
        "/assets/%FF",
    ] {
        let (status, content_type, body) = request(&server, "GET", path).await;
        assert_eq!(status, 400, "GET {path}: {body}");
        assert_json_error(status, &content_type, &body, &format!("GET {path}"));
    }
}

/// The neighbours of the findings above, which the fuzz target checked: bad ids, bad
/// queries and bad bodies are JSON errors.
#[tokio::test]
async fn test_fuzz_http_bad_ids_queries_and_bodies_are_json_errors() {
    let server = Server::start(&[]);
    for (method, path, expected) in [
        ("GET", "/api/v1/tasks/%C3%A9-missing", 404),
        ("GET", "/api/v1/nowhere", 404),
        ("GET", "/api/v1/analysis?segment=%FF", 404),
        ("GET", "/api/v1/analysis?start=1", 400),
        ("GET", "/api/v1/segments/x/snapshots?limit=-1", 400),
        ("GET", "/api/v1/tasks?unknown=1", 400),
        ("POST", "/api/v1/tasks", 400),
    ] {
        let (status, content_type, body) = request(&server, method, path).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
        assert_json_error(status, &content_type, &body, &format!("{method} {path}"));
    }
}
