//! Every HTTP endpoint: any method, path, query, headers and body through the real
//! router (`skysnap::http::router`) in process, with the real pipeline over a real
//! SQLite store in a temp dir that holds a task, its segments and a kept trace segment.
//! Every answer must be a success or a JSON error (`{"error": "..."}`); a 500 or 503
//! (a store that refused a query, an actor or blocking task that died) is a finding.

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::sync::Arc;
use std::time::Duration;

use arbitrary::{Result, Unstructured};
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt as _;
use tower::ServiceExt as _;

use skysnap::config::Config;
use skysnap::http::{router, AppState};
use skysnap::model::{now_ms, ProfiledSegment, ProfiledSpan, SnapshotRecord, Task};
use skysnap::pipeline::{sinks_for, Pipeline};
use skysnap::store::Store;

use crate::gen;

pub const TASK_ID: &str = "task-1";
pub const SEGMENTS: &[&str] = &["seg-1", "seg-2"];
pub const ADMIN_TOKEN: &str = "fuzz-admin-token";

/// Longest an answer may take: past it, the request hangs, which is a finding too.
const ANSWER_LIMIT: Duration = Duration::from_secs(30);
/// Most body bytes read from one answer.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Ids that exist in the seeded store, and texts that look like ids.
const IDS: &[&str] = &[
    TASK_ID, "seg-1", "seg-2", "trace-1", "inst-1", "task-2", "missing",
];

const ROUTES: &[&str] = &[
    "/api/v1/tasks",
    "/api/v1/tasks/{id}",
    "/api/v1/tasks/{id}/logs",
    "/api/v1/tasks/{id}/segments",
    "/api/v1/tasks/{id}/flamegraph",
    "/api/v1/segments/{id}",
    "/api/v1/segments/{id}/snapshots",
    "/api/v1/services",
    "/api/v1/analysis",
    "/api/v1/flamegraph/diff",
    "/healthz",
    "/readyz",
    "/",
    "/assets/{id}",
    "/assets/app.js",
    "/api/v1/{id}",
    "/api/v1/tasks/{id}/{id}",
    "/{id}",
];

const QUERY_KEYS: &[&str] = &[
    "segment",
    "task",
    "start",
    "end",
    "format",
    "instance",
    "base",
    "target",
    "base_segment",
    "base_start",
    "base_end",
    "base_instance",
    "target_segment",
    "target_start",
    "target_end",
    "target_instance",
    "service",
    "endpoint_name",
    "limit",
];

const QUERY_VALUES: &[&str] = &[
    TASK_ID,
    "seg-1",
    "seg-2",
    "inst-1",
    "shop",
    "/orders",
    "json",
    "collapsed",
    "pprof",
    "1000",
    "1795635157000",
];

const TASK_FIELDS: &[&str] = &[
    "service",
    "endpoint_name",
    "start_time",
    "duration",
    "min_duration_threshold",
    "dump_period",
    "max_sampling_count",
];

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/json; charset=utf-8",
    "application/vnd.skysnap+json",
    "text/plain",
    "application/x-www-form-urlencoded",
    "json",
    "",
];

/// The pipeline, the routers (without and with an admin token) and the runtime they
/// run on, built once per process.
pub struct HttpHarness {
    system: actix_rt::SystemRunner,
    open: Router,
    guarded: Router,
    _pipeline: Pipeline,
    _folder: tempfile::TempDir,
}

thread_local! {
    /// Never dropped by the thread-local destructor, which runs after the runtime's own
    /// thread-locals are gone and would panic: `drop_harness` drops it before that.
    static HARNESS: RefCell<Option<ManuallyDrop<HttpHarness>>> = const { RefCell::new(None) };
}

/// Runs `work` with this thread's harness, built on first use. Lazily, so that under
/// AFL++ it is built in the forked child: threads do not survive a fork.
pub fn with_harness<T>(work: impl FnOnce(&HttpHarness) -> T) -> T {
    HARNESS.with(|harness| {
        let mut harness = harness.borrow_mut();
        work(harness.get_or_insert_with(|| ManuallyDrop::new(HttpHarness::new())))
    })
}

/// One request through this thread's harness.
pub fn http(data: &[u8]) {
    with_harness(|harness| harness.run(data));
}

/// Drops this thread's harness, if any, and with it the store's temp dir; call it before
/// `main` returns.
pub fn drop_harness() {
    if let Some(harness) = HARNESS.with(|harness| harness.borrow_mut().take()) {
        drop(ManuallyDrop::into_inner(harness));
    }
}

fn task(now: i64) -> Task {
    Task {
        id: TASK_ID.to_string(),
        service: "shop".to_string(),
        endpoint_name: "/orders".to_string(),
        start_time: now - 60_000,
        duration: 15,
        min_duration_threshold: 0,
        dump_period: 10,
        max_sampling_count: 5,
        create_time: now - 60_000,
    }
}

async fn seed(store: &dyn Store) {
    let now = now_ms();
    store.insert_task(&task(now)).await.expect("seed task");
    let mut snapshots = Vec::new();
    for (index, segment) in SEGMENTS.iter().enumerate() {
        for sequence in 0..20 {
            let mut stack = vec!["main".to_string(), "handle".to_string()];
            stack.push(format!("work{}", sequence % 3));
            if index == 1 {
                stack.push("db; \"query\"\n<x>".to_string());
            }
            snapshots.push(SnapshotRecord {
                task_id: TASK_ID.to_string(),
                segment_id: segment.to_string(),
                sequence,
                dump_time: now - 30_000 + i64::from(sequence) * 10,
                stack: stack.into(),
                encoded: None,
            });
        }
    }
    store
        .insert_snapshots(&snapshots)
        .await
        .expect("seed snapshots");
    let span = |span_id, parent_span_id, start_time, end_time| ProfiledSpan {
        span_id,
        parent_span_id,
        operation_name: format!("/orders/{span_id}"),
        peer: String::new(),
        span_type: "Entry".to_string(),
        span_layer: "Http".to_string(),
        component_id: 7002,
        start_time,
        end_time,
        is_error: false,
    };
    let start = now - 30_000;
    store
        .insert_profiled_segments(&[ProfiledSegment {
            segment_id: SEGMENTS[0].to_string(),
            trace_id: "trace-1".to_string(),
            service: "shop".to_string(),
            instance: "inst-1".to_string(),
            endpoint: "/orders".to_string(),
            start_time: start,
            end_time: start + 500,
            duration: 500,
            is_error: false,
            spans: vec![
                span(1, 0, start + 10, start + 400),
                span(0, -1, start, start + 500),
            ],
        }])
        .await
        .expect("seed profiled segment");
}

impl Default for HttpHarness {
    fn default() -> Self {
        HttpHarness::new()
    }
}

impl HttpHarness {
    pub fn new() -> HttpHarness {
        let folder = tempfile::tempdir().expect("temp dir");
        let mut config = Config::default();
        config.sqlite.path = folder.path().join("skysnap.db");
        config.pipeline.shards = 1;
        let system = actix_rt::System::with_tokio_rt(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("tokio runtime")
        });
        let (pipeline, open, guarded) = system.block_on(async {
            let store = skysnap::process::open_store(&config)
                .await
                .expect("sqlite store opens");
            seed(store.as_ref()).await;
            let sinks = sinks_for(&config, store.clone()).expect("sinks");
            let pipeline = Pipeline::spawn(&config, store, sinks);
            pipeline.warm_up().await;
            let state = AppState {
                handles: pipeline.handles.clone(),
                admin_token: None,
                max_snapshots_per_response: config.http.max_snapshots_per_response,
                analysis: config.analysis.clone(),
                analysis_permits: Arc::new(tokio::sync::Semaphore::new(
                    config.analysis.max_concurrent_requests.get(),
                )),
            };
            let guarded = AppState {
                admin_token: Some(Arc::from(ADMIN_TOKEN)),
                ..state.clone()
            };
            (pipeline, router(state), router(guarded))
        });
        HttpHarness {
            system,
            open,
            guarded,
            _pipeline: pipeline,
            _folder: folder,
        }
    }

    /// One request from the fuzzer's bytes; panics on an answer that breaks the rules.
    pub fn run(&self, data: &[u8]) {
        let mut u = Unstructured::new(data);
        let Ok(Some((request, guarded))) = build_request(&mut u) else {
            return;
        };
        let description = format!("{} {}", request.method(), request.uri());
        let router = if guarded { &self.guarded } else { &self.open };
        let answer = self.system.block_on(async {
            tokio::time::timeout(ANSWER_LIMIT, async {
                let response = router.clone().oneshot(request).await.expect("infallible");
                let (parts, body) = response.into_parts();
                let body = http_body_util::Limited::new(body, MAX_BODY_BYTES)
                    .collect()
                    .await
                    .map(|collected| collected.to_bytes());
                (parts, body)
            })
            .await
        });
        let Ok((parts, body)) = answer else {
            panic!("{description}: no answer within {ANSWER_LIMIT:?}");
        };
        let body = body.unwrap_or_else(|error| panic!("{description}: body failed: {error}"));
        if std::env::var_os("FUZZ_VERBOSE").is_some() {
            eprintln!("{description} -> {} ({} bytes)", parts.status, body.len());
        }
        check_answer(&description, &parts, &body);
    }
}

/// Success with a body of the type it claims, or a JSON error.
fn check_answer(description: &str, parts: &axum::http::response::Parts, body: &[u8]) {
    let status = parts.status;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let text = String::from_utf8_lossy(&body[..body.len().min(2_000)]);
    assert!(
        !matches!(
            status,
            StatusCode::INTERNAL_SERVER_ERROR | StatusCode::SERVICE_UNAVAILABLE
        ),
        "{description}: {status} {text}"
    );
    // A HEAD answer has the headers of the GET and no body.
    if description.starts_with("HEAD ") {
        return;
    }
    if status.is_success() {
        let kind = content_type.split(';').next().unwrap_or("").trim();
        match kind {
            "application/json" => {
                if let Err(error) = serde_json::from_slice::<serde_json::Value>(body) {
                    panic!("{description}: {status} with a body that is not JSON ({error}): {text}")
                }
            }
            "text/plain" => assert!(
                std::str::from_utf8(body).is_ok(),
                "{description}: text that is not UTF-8"
            ),
            "application/octet-stream" => assert!(
                body.starts_with(&[0x1f, 0x8b]),
                "{description}: pprof that is not gzip"
            ),
            "text/html" | "text/javascript" | "text/css" => {}
            other => panic!("{description}: {status} with content type {other:?}"),
        }
        return;
    }
    assert!(
        status.is_client_error(),
        "{description}: unexpected status {status}: {text}"
    );
    let error = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.get("error")?.as_str().map(str::to_string));
    match error {
        Some(reason) if !reason.is_empty() && content_type.starts_with("application/json") => {}
        _ => panic!(
            "{description}: {status} is not a JSON error (content type {content_type:?}): {text:?}"
        ),
    }
}

fn path_segment(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 | 1 => u.choose(IDS)?.to_string(),
        2 => gen::percent_encode(gen::text(u, IDS)?.as_bytes()),
        3 => gen::percent_encode(u.arbitrary::<&[u8]>()?),
        // Raw text: may hold '/', '?', '%' or characters a URI refuses.
        _ => gen::text(u, &["a/b", "%", "%ZZ", "%ff", ".", "..", ""])?,
    })
}

fn query_value(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=4u8)? {
        0 | 1 => u.choose(QUERY_VALUES)?.to_string(),
        2 => gen::number_text(u)?,
        _ => gen::text(u, IDS)?,
    })
}

/// A query the route understands: the keys it reads, mostly with values that exist.
fn route_query(u: &mut Unstructured, template: &str) -> Result<String> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    let time = |u: &mut Unstructured| -> Result<String> {
        Ok(if u.ratio(3, 4)? {
            (now_ms() - u.int_in_range(-60_000..=120_000i64)?).to_string()
        } else {
            gen::number_text(u)?
        })
    };
    let range = |u: &mut Unstructured,
                 query: &mut form_urlencoded::Serializer<String>,
                 prefix: &str|
     -> Result<()> {
        if u.ratio(1, 2)? {
            query.append_pair(&format!("{prefix}start"), &time(u)?);
            query.append_pair(&format!("{prefix}end"), &time(u)?);
        }
        Ok(())
    };
    if template.ends_with("/analysis") {
        if u.ratio(1, 3)? {
            query.append_pair("task", u.choose(&[TASK_ID, "task-2", ""])?);
            range(u, &mut query, "")?;
        } else {
            for _ in 0..u.int_in_range(1..=3usize)? {
                query.append_pair("segment", u.choose(IDS)?);
                range(u, &mut query, "")?;
            }
        }
    } else if template.ends_with("/flamegraph") {
        if u.ratio(2, 3)? {
            query.append_pair("format", u.choose(&["json", "collapsed", "pprof", "svg"])?);
        }
        if u.ratio(1, 2)? {
            query.append_pair("segment", u.choose(IDS)?);
        }
        if u.ratio(1, 4)? {
            query.append_pair("instance", u.choose(&["inst-1", "inst-2"])?);
        }
        range(u, &mut query, "")?;
    } else if template.ends_with("/diff") {
        for side in ["base", "target"] {
            query.append_pair(side, u.choose(&[TASK_ID, TASK_ID, "task-2", ""])?);
            if u.ratio(1, 2)? {
                query.append_pair(&format!("{side}_segment"), u.choose(IDS)?);
            }
            if u.ratio(1, 4)? {
                query.append_pair(&format!("{side}_instance"), u.choose(&["inst-1", "x"])?);
            }
            range(u, &mut query, &format!("{side}_"))?;
        }
    } else if template.ends_with("/snapshots") {
        query.append_pair("limit", &gen::number_text(u)?);
    } else if template == "/api/v1/tasks" {
        query.append_pair(
            u.choose(&["service", "endpoint_name"])?,
            u.choose(QUERY_VALUES)?,
        );
    }
    Ok(query.finish())
}

fn query_opt(u: &mut Unstructured, template: &str) -> Result<Option<String>> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => None,
        1 => Some(gen::text(u, &["a=%zz", "=&=", "segment", "&&&", "a=b=c"])?),
        2..=4 => Some(route_query(u, template)?),
        _ => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for _ in 0..u.int_in_range(0..=6usize)? {
                let key = if u.ratio(7, 8)? {
                    u.choose(QUERY_KEYS)?.to_string()
                } else {
                    gen::text(u, QUERY_KEYS)?
                };
                query.append_pair(&key, &query_value(u)?);
            }
            Some(query.finish())
        }
    })
}

fn json_value(u: &mut Unstructured, depth: u32) -> Result<serde_json::Value> {
    use serde_json::Value;
    Ok(match u.int_in_range(0..=9u8)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 | 3 => Value::from(u.arbitrary::<i64>()?),
        4 => Value::from(u.arbitrary::<u64>()?),
        5 => serde_json::Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        6 => Value::String(gen::text(u, &["shop", "/orders", " "])?),
        7 if depth < 3 => Value::Array(
            (0..u.int_in_range(0..=3usize)?)
                .map(|_| json_value(u, depth + 1))
                .collect::<Result<_>>()?,
        ),
        8 if depth < 3 => task_body(u, depth + 1)?,
        // Texts that parse as numbers at the edges: `1e3`, `9223372036854775808`, …
        _ => serde_json::from_str(&gen::number_text(u)?).unwrap_or(Value::Null),
    })
}

/// A `POST /api/v1/tasks` body: mostly the right fields, with values that test the rules.
fn task_body(u: &mut Unstructured, depth: u32) -> Result<serde_json::Value> {
    let mut object = serde_json::Map::new();
    for field in TASK_FIELDS {
        if u.ratio(1, 6)? {
            continue;
        }
        let value = if u.ratio(1, 2)? {
            match *field {
                "service" => serde_json::json!(u.choose(&["shop", "cart", "", " "])?),
                "endpoint_name" => serde_json::json!(u.choose(&["/orders", "  /x ", ""])?),
                "start_time" => serde_json::json!(u.choose(&[
                    0i64,
                    -1,
                    now_ms(),
                    i64::MAX,
                    i64::MIN,
                    i64::MAX / 2
                ])?),
                "duration" => serde_json::json!(u.int_in_range(-1..=16i64)?),
                "min_duration_threshold" => {
                    serde_json::json!(u.choose(&[0i64, -1, 200, i64::from(i32::MAX) + 1])?)
                }
                "dump_period" => serde_json::json!(u.choose(&[9i64, 10, 20, 1 << 40])?),
                _ => serde_json::json!(u.int_in_range(-1..=10i64)?),
            }
        } else {
            json_value(u, depth + 1)?
        };
        object.insert(field.to_string(), value);
    }
    if u.ratio(1, 10)? {
        object.insert(gen::text(u, &["extra"])?, json_value(u, depth + 1)?);
    }
    Ok(serde_json::Value::Object(object))
}

fn body(u: &mut Unstructured) -> Result<Vec<u8>> {
    Ok(match u.int_in_range(0..=5u8)? {
        0 => Vec::new(),
        1 => u.arbitrary::<Vec<u8>>()?,
        2 => {
            // JSON cut short or with a byte changed.
            let mut text = serde_json::to_vec(&task_body(u, 0)?).unwrap_or_default();
            if !text.is_empty() {
                let index = u.choose_index(text.len())?;
                if u.ratio(1, 2)? {
                    text.truncate(index);
                } else {
                    text[index] = u.arbitrary()?;
                }
            }
            text
        }
        3 => serde_json::to_vec(&json_value(u, 0)?).unwrap_or_default(),
        _ => serde_json::to_vec(&task_body(u, 0)?).unwrap_or_default(),
    })
}

/// A request and whether it goes to the router with an admin token.
fn build_request(u: &mut Unstructured) -> Result<Option<(Request<Body>, bool)>> {
    let method = match u.int_in_range(0..=11u8)? {
        0..=5 => Method::GET,
        6 | 7 => Method::POST,
        8 => Method::HEAD,
        9 => u
            .choose(&[Method::PUT, Method::DELETE, Method::PATCH, Method::OPTIONS])?
            .clone(),
        _ => Method::from_bytes(gen::text(u, &["GET", "get", "TRACE"])?.as_bytes())
            .unwrap_or(Method::GET),
    };
    let mut path = String::new();
    let template = u.choose(ROUTES)?;
    for (index, piece) in template.split("{id}").enumerate() {
        if index > 0 {
            path.push_str(&path_segment(u)?);
        }
        path.push_str(piece);
    }
    if u.ratio(1, 16)? {
        path.push('/');
    }
    let uri = match query_opt(u, template)? {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let mut builder = Request::builder().method(method.clone()).uri(uri);
    let guarded = u.ratio(1, 8)?;
    if guarded || u.ratio(1, 16)? {
        let token = match u.int_in_range(0..=3u8)? {
            0 => format!("Bearer {ADMIN_TOKEN}"),
            1 => ADMIN_TOKEN.to_string(),
            2 => format!("Bearer {}", gen::text(u, &[ADMIN_TOKEN, ""])?),
            _ => gen::text(u, &["Bearer", "bearer x"])?,
        };
        builder = builder.header(header::AUTHORIZATION, token);
    }
    let body = if method == Method::POST || u.ratio(1, 8)? {
        let content_type = u.choose(CONTENT_TYPES)?;
        if !content_type.is_empty() {
            builder = builder.header(header::CONTENT_TYPE, *content_type);
        }
        body(u)?
    } else {
        Vec::new()
    };
    // A request the `http` crate refuses (a URI with a space, a header with a newline)
    // never reaches the router: hyper refuses it on the wire.
    Ok(builder
        .body(Body::from(body))
        .ok()
        .map(|request| (request, guarded)))
}
