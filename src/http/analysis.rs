//! The reading side of the API: SkyWalking's stack-tree analysis of segments
//! (`/analysis`), a task's flame graph as JSON, folded stacks or pprof
//! (`/tasks/{id}/flamegraph`), and the differential flame graph (`/flamegraph/diff`).
//! Every answer is bounded: the analysis reads at most `analysis.max_snapshots`
//! snapshots, and a flame graph is counted by the store and held as at most
//! `analysis.max_flamegraph_nodes` nodes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::http::HeaderName;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt as _;
use tokio::sync::OwnedSemaphorePermit;

use super::api::find_task;
use super::error::{ApiError, ApiPath};
use super::AppState;
use crate::analysis::stack_tree::{self, Analysis};
use crate::analysis::{diff, folded, pprof, FlameTree};
use crate::store::{SnapshotFilter, Store, StoreError};

/// Most segments one analysis request may name: each is a store query (a full scan on
/// ClickHouse, whose key starts with the task).
const MAX_SEGMENTS_PER_ANALYSIS: usize = 100;

/// How long a request waits for one of the `analysis.max_concurrent_requests` slots.
const PERMIT_WAIT: Duration = Duration::from_secs(10);

/// Most frame references one pprof answer may hold (8 bytes each while it is built).
const MAX_PPROF_FRAMES: u64 = 8_000_000;

/// Samples of the answer that were cut short because the tree was full.
const TRUNCATED_HEADER: HeaderName = HeaderName::from_static("x-skysnap-truncated-samples");

/// Waits for an analysis slot: they bound the CPU, memory and blocking threads that
/// analyses take together, whatever the number of callers.
async fn analysis_permit(state: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    match tokio::time::timeout(PERMIT_WAIT, state.analysis_permits.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) => Err(ApiError::Unavailable("skysnap is shutting down".into())),
        Err(_) => Err(ApiError::Unavailable(format!(
            "too many analyses running (analysis.max_concurrent_requests = {}); try again",
            state.analysis.max_concurrent_requests
        ))),
    }
}

/// The query string as (key, value) pairs in order, percent-decoded.
fn pairs(raw: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or("").as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

fn epoch_ms(name: &str, text: &str) -> Result<i64, ApiError> {
    text.trim().parse::<i64>().map_err(|_| {
        ApiError::BadRequest(format!(
            "{name}: {text:?} is not a time in epoch milliseconds"
        ))
    })
}

/// Checks a filter's range: both ends or none, and not backwards.
fn check_range(filter: &SnapshotFilter, prefix: &str, what: &str) -> Result<(), ApiError> {
    match (filter.start_opt, filter.end_opt) {
        (Some(start), Some(end)) if end < start => Err(ApiError::BadRequest(format!(
            "{prefix}end: {end} is before {prefix}start {start} ({what})"
        ))),
        (Some(_), None) => Err(ApiError::BadRequest(format!(
            "{prefix}end: missing, {what} has a {prefix}start"
        ))),
        (None, Some(_)) => Err(ApiError::BadRequest(format!(
            "{prefix}start: missing, {what} has an {prefix}end"
        ))),
        _ => Ok(()),
    }
}

/// What one analysis request covers.
#[derive(Debug, PartialEq, Eq)]
enum AnalysisTarget {
    /// `segment=…[&start=…&end=…]`, repeated: one range per segment.
    Segments(Vec<SnapshotFilter>),
    /// `task=…[&start=…&end=…]`: every segment of the task.
    Task(SnapshotFilter),
}

fn parse_analysis_query(raw: Option<&str>) -> Result<AnalysisTarget, ApiError> {
    let mut filters: Vec<SnapshotFilter> = Vec::new();
    let mut task_opt: Option<SnapshotFilter> = None;
    let mut segments_seen = HashSet::new();
    for (key, value) in pairs(raw) {
        match key.as_str() {
            "segment" => {
                if value.is_empty() {
                    return Err(ApiError::BadRequest("segment: must not be empty".into()));
                }
                if !segments_seen.insert(value.clone()) {
                    return Err(ApiError::BadRequest(format!(
                        "segment: {value} is given twice (one time range per segment)"
                    )));
                }
                filters.push(SnapshotFilter {
                    segment_id_opt: Some(value),
                    ..SnapshotFilter::default()
                });
            }
            "task" => {
                if task_opt.is_some() || value.is_empty() {
                    return Err(ApiError::BadRequest(
                        "task: give one task id, or segments instead".into(),
                    ));
                }
                task_opt = Some(SnapshotFilter {
                    task_id_opt: Some(value),
                    ..SnapshotFilter::default()
                });
            }
            "start" | "end" => {
                let time = epoch_ms(&key, &value)?;
                let current = match (filters.last_mut(), task_opt.as_mut()) {
                    (Some(filter), None) => filter,
                    (None, Some(task)) => task,
                    _ => {
                        return Err(ApiError::BadRequest(format!(
                            "{key}: must follow the segment (or task) it belongs to"
                        )))
                    }
                };
                let slot = if key == "start" {
                    &mut current.start_opt
                } else {
                    &mut current.end_opt
                };
                if slot.replace(time).is_some() {
                    return Err(ApiError::BadRequest(format!(
                        "{key}: given twice for one segment"
                    )));
                }
            }
            _ => {
                return Err(ApiError::BadRequest(format!(
                    "{key}: unknown parameter (segment, start, end or task)"
                )))
            }
        }
    }
    match (task_opt, filters.is_empty()) {
        (Some(_), false) => Err(ApiError::BadRequest(
            "task: give either a task or segments, not both".into(),
        )),
        (Some(task), true) => {
            check_range(&task, "", "the task")?;
            Ok(AnalysisTarget::Task(task))
        }
        (None, true) => Err(ApiError::BadRequest(
            "segment: at least one segment (or a task) is required".into(),
        )),
        (None, false) => {
            if filters.len() > MAX_SEGMENTS_PER_ANALYSIS {
                return Err(ApiError::BadRequest(format!(
                    "segment: at most {MAX_SEGMENTS_PER_ANALYSIS} segments per analysis"
                )));
            }
            for filter in &filters {
                let segment = filter.segment_id_opt.as_deref().unwrap_or_default();
                check_range(filter, "", &format!("segment {segment}"))?;
            }
            Ok(AnalysisTarget::Segments(filters))
        }
    }
}

/// `GET /api/v1/analysis?segment=&start=&end=` (repeatable) or `?task=`: SkyWalking's
/// stack trees.
pub async fn analysis(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Analysis>, ApiError> {
    let target = parse_analysis_query(raw.as_deref())?;
    let _permit = analysis_permit(&state).await?;
    let store = &state.handles.store;
    let limit = state.analysis.max_snapshots.get();
    let filters = match target {
        AnalysisTarget::Task(filter) => {
            find_task(&state, filter.task_id_opt.as_deref().unwrap_or_default()).await?;
            vec![filter]
        }
        AnalysisTarget::Segments(filters) => filters,
    };
    let mut found = 0u64;
    let mut snapshots = Vec::new();
    for filter in &filters {
        let count = store.count_snapshots(filter).await?;
        if count == 0 {
            if let Some(segment) = &filter.segment_id_opt {
                ensure_segment_exists(store.as_ref(), None, segment).await?;
            }
            continue;
        }
        found += count;
        let room = limit.saturating_sub(snapshots.len());
        if room > 0 {
            snapshots.extend(store.snapshots(filter, room).await?);
        }
    }
    let analysis =
        tokio::task::spawn_blocking(move || stack_tree::analyze(&snapshots, found, limit))
            .await
            .map_err(|error| ApiError::Internal(format!("analysis failed: {error}")))?;
    Ok(Json(analysis))
}

/// A segment with no snapshot at all (of the task, when one is given) is unknown: 404.
/// One whose time range is empty is not.
async fn ensure_segment_exists(
    store: &dyn Store,
    task_id_opt: Option<&str>,
    segment: &str,
) -> Result<(), ApiError> {
    let whole = SnapshotFilter {
        task_id_opt: task_id_opt.map(str::to_string),
        segment_id_opt: Some(segment.to_string()),
        ..SnapshotFilter::default()
    };
    if store.count_snapshots(&whole).await? > 0 {
        return Ok(());
    }
    Err(ApiError::NotFound(match task_id_opt {
        Some(task_id) => format!("segment {segment} of task {task_id} not found"),
        None => format!("segment {segment} not found"),
    }))
}

/// After counting: a side whose tree is empty and that named a segment must name one
/// that exists.
async fn ensure_segments_exist(
    store: &dyn Store,
    filters: &[SnapshotFilter],
    trees: &[FlameTree],
) -> Result<(), ApiError> {
    for (filter, tree) in filters.iter().zip(trees) {
        if let (Some(segment), 0) = (&filter.segment_id_opt, tree.total()) {
            ensure_segment_exists(store, filter.task_id_opt.as_deref(), segment).await?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlameFormat {
    Json,
    Collapsed,
    Pprof,
}

/// One side's filters: `segment`, `start`, `end`, each given at most once (with a
/// prefix such as `base_` for the sides of a diff).
fn side_filter(
    pairs: &[(String, String)],
    prefix: &str,
    task_id: &str,
) -> Result<SnapshotFilter, ApiError> {
    let mut filter = SnapshotFilter {
        task_id_opt: Some(task_id.to_string()),
        ..SnapshotFilter::default()
    };
    for (key, value) in pairs {
        let Some(name) = key.strip_prefix(prefix) else {
            continue;
        };
        let twice = || ApiError::BadRequest(format!("{key}: given twice"));
        match name {
            "segment" => {
                if value.is_empty() {
                    return Err(ApiError::BadRequest(format!("{key}: must not be empty")));
                }
                if filter.segment_id_opt.replace(value.clone()).is_some() {
                    return Err(twice());
                }
            }
            "start" | "end" => {
                let slot = if name == "start" {
                    &mut filter.start_opt
                } else {
                    &mut filter.end_opt
                };
                if slot.replace(epoch_ms(key, value)?).is_some() {
                    return Err(twice());
                }
            }
            "instance" => {
                if value.is_empty() {
                    return Err(ApiError::BadRequest(format!("{key}: must not be empty")));
                }
                if filter.instance_opt.replace(value.clone()).is_some() {
                    return Err(twice());
                }
            }
            _ => {}
        }
    }
    check_range(&filter, prefix, &format!("task {task_id}"))?;
    Ok(filter)
}

fn check_known_keys(pairs: &[(String, String)], known: &[&str]) -> Result<(), ApiError> {
    for (key, _) in pairs {
        if !known.contains(&key.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "{key}: unknown parameter ({})",
                known.join(", ")
            )));
        }
    }
    Ok(())
}

/// Counts each filter's stacks in the store into a bounded tree, off the async threads
/// (the tree is CPU work). The caller holds an analysis permit, which bounds how many
/// blocking threads wait here on their store streams at once.
async fn build_flame_trees(
    store: Arc<dyn Store>,
    filters: Vec<SnapshotFilter>,
    max_nodes: usize,
) -> Result<Vec<FlameTree>, ApiError> {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let mut trees = Vec::with_capacity(filters.len());
        for filter in &filters {
            let mut tree = FlameTree::new(max_nodes);
            let mut stacks = store.stack_counts(filter);
            runtime.block_on(async {
                while let Some(stack_count) = stacks.next().await {
                    let stack_count = stack_count?;
                    tree.add(&stack_count.stack, stack_count.count);
                }
                Ok::<(), StoreError>(())
            })?;
            trees.push(tree);
        }
        Ok::<Vec<FlameTree>, ApiError>(trees)
    })
    .await
    .map_err(|error| ApiError::Internal(format!("flame graph failed: {error}")))?
}

/// Runs CPU work (an encoding) on a blocking thread.
async fn off_async<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| ApiError::Internal(format!("flame graph encoding failed: {error}")))
}

/// Folded stacks as a streamed body: the text of a large tree is written in chunks as
/// the client reads it, never held whole. The permit lives until the last chunk.
fn collapsed_body(tree: FlameTree, permit: OwnedSemaphorePermit) -> Body {
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        folded::write_collapsed(&tree, |chunk| {
            sender
                .blocking_send(Ok(bytes::Bytes::copy_from_slice(chunk.as_bytes())))
                .is_ok()
        });
    });
    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
}

/// `GET /api/v1/tasks/{id}/flamegraph?format=json|collapsed|pprof&segment=&start=&end=`.
pub async fn task_flamegraph(
    State(state): State<AppState>,
    ApiPath(task_id): ApiPath<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = pairs(raw.as_deref());
    check_known_keys(&pairs, &["format", "segment", "start", "end", "instance"])?;
    let mut format_opt = None;
    for (key, value) in &pairs {
        if key != "format" {
            continue;
        }
        let format = match value.as_str() {
            "json" => FlameFormat::Json,
            "collapsed" => FlameFormat::Collapsed,
            "pprof" => FlameFormat::Pprof,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "format: unknown format {other:?} (json, collapsed or pprof)"
                )))
            }
        };
        if format_opt.replace(format).is_some() {
            return Err(ApiError::BadRequest("format: given twice".into()));
        }
    }
    let format = format_opt.unwrap_or(FlameFormat::Json);
    let filter = side_filter(&pairs, "", &task_id)?;
    let task = find_task(&state, &task_id).await?;
    let permit = analysis_permit(&state).await?;
    let filters = vec![filter];
    let mut trees = build_flame_trees(
        state.handles.store.clone(),
        filters.clone(),
        state.analysis.max_flamegraph_nodes,
    )
    .await?;
    ensure_segments_exist(state.handles.store.as_ref(), &filters, &trees).await?;
    let tree = trees.remove(0);
    let truncated = tree.truncated_samples().to_string();
    let dump_period = i64::from(task.dump_period);
    let response = match format {
        FlameFormat::Json => {
            let body = off_async(move || tree.to_json(dump_period)).await?;
            ([(CONTENT_TYPE, "application/json")], body).into_response()
        }
        FlameFormat::Collapsed => (
            [(CONTENT_TYPE, "text/plain; charset=utf-8")],
            collapsed_body(tree, permit),
        )
            .into_response(),
        FlameFormat::Pprof => {
            let frames = tree.stack_frames();
            if frames > MAX_PPROF_FRAMES {
                return Err(ApiError::BadRequest(format!(
                    "format: the pprof of this selection would hold {frames} frames, more than \
                     {MAX_PPROF_FRAMES}; narrow it by segment or time range, or use collapsed"
                )));
            }
            let (start_time, duration_ms) = (task.start_time, task.end_time() - task.start_time);
            let body =
                off_async(move || pprof::encode(&tree, dump_period, start_time, duration_ms))
                    .await?;
            let disposition = format!(
                "attachment; filename=\"skysnap-{}.pb.gz\"",
                safe_file_name(&task_id)
            );
            (
                [
                    (CONTENT_TYPE, "application/octet-stream".to_string()),
                    (CONTENT_DISPOSITION, disposition),
                ],
                body,
            )
                .into_response()
        }
    };
    Ok(with_truncated_header(response, truncated))
}

fn with_truncated_header(mut response: Response, truncated: String) -> Response {
    if let Ok(value) = truncated.parse() {
        response.headers_mut().insert(TRUNCATED_HEADER, value);
    }
    response
}

fn safe_file_name(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `GET /api/v1/flamegraph/diff?base=&target=` with `base_segment`, `base_start`,
/// `base_end` and the same for `target_`: both sides merged into one tree.
pub async fn flamegraph_diff(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = pairs(raw.as_deref());
    check_known_keys(
        &pairs,
        &[
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
        ],
    )?;
    let task_of = |side: &str| -> Result<String, ApiError> {
        let mut ids = pairs.iter().filter(|(key, _)| key == side);
        match (ids.next(), ids.next()) {
            (Some((_, id)), None) if !id.is_empty() => Ok(id.clone()),
            (Some(_), Some(_)) => Err(ApiError::BadRequest(format!("{side}: given twice"))),
            _ => Err(ApiError::BadRequest(format!(
                "{side}: a task id is required"
            ))),
        }
    };
    let (base_task, target_task) = (task_of("base")?, task_of("target")?);
    let base = side_filter(&pairs, "base_", &base_task)?;
    let target = side_filter(&pairs, "target_", &target_task)?;
    find_task(&state, &base_task).await?;
    find_task(&state, &target_task).await?;
    let _permit = analysis_permit(&state).await?;
    let filters = vec![base, target];
    let trees = build_flame_trees(
        state.handles.store.clone(),
        filters.clone(),
        state.analysis.max_flamegraph_nodes,
    )
    .await?;
    ensure_segments_exist(state.handles.store.as_ref(), &filters, &trees).await?;
    let truncated = (trees[0].truncated_samples() + trees[1].truncated_samples()).to_string();
    let body = off_async(move || diff::diff_json(&trees[0], &trees[1])).await?;
    Ok(with_truncated_header(
        ([(CONTENT_TYPE, "application/json")], body).into_response(),
        truncated,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(id: &str, start_opt: Option<i64>, end_opt: Option<i64>) -> SnapshotFilter {
        SnapshotFilter {
            segment_id_opt: Some(id.into()),
            start_opt,
            end_opt,
            ..SnapshotFilter::default()
        }
    }

    fn reason(raw: &str) -> String {
        match parse_analysis_query(Some(raw)) {
            Err(ApiError::BadRequest(reason)) => reason,
            other => panic!("{raw}: expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn test_analysis_query_pairs_ranges_with_segments() {
        assert_eq!(
            parse_analysis_query(Some("segment=a&start=1&end=2&segment=b%2Fc")).unwrap(),
            AnalysisTarget::Segments(vec![
                segment("a", Some(1), Some(2)),
                segment("b/c", None, None)
            ])
        );
        assert_eq!(
            parse_analysis_query(Some("task=t&start=5&end=5")).unwrap(),
            AnalysisTarget::Task(SnapshotFilter {
                task_id_opt: Some("t".into()),
                start_opt: Some(5),
                end_opt: Some(5),
                ..SnapshotFilter::default()
            })
        );
    }

    #[test]
    fn test_analysis_query_bad_input_names_the_parameter() {
        assert!(reason("").starts_with("segment:"));
        assert!(reason("start=1&segment=a").starts_with("start:"));
        assert!(reason("segment=a&start=1").starts_with("end: missing"));
        assert!(reason("segment=a&end=1").starts_with("start: missing"));
        assert!(reason("segment=a&start=x&end=1").starts_with("start: \"x\""));
        assert!(reason("segment=a&start=5&end=1").starts_with("end: 1 is before"));
        assert!(reason("segment=a&start=1&start=2").starts_with("start: given twice"));
        assert!(reason("segment=a&limit=2").starts_with("limit: unknown"));
        assert!(reason("segment=a&task=t").starts_with("task:"));
        assert!(reason("segment=").starts_with("segment:"));
    }

    #[test]
    fn test_flame_side_filter() {
        let pairs = vec![
            ("base_segment".to_string(), "s".to_string()),
            ("base_start".to_string(), "1".to_string()),
            ("base_end".to_string(), "3".to_string()),
            ("target_start".to_string(), "9".to_string()),
        ];
        let base = side_filter(&pairs, "base_", "t").unwrap();
        assert_eq!(base.segment_id_opt.as_deref(), Some("s"));
        assert_eq!((base.start_opt, base.end_opt), (Some(1), Some(3)));
        match side_filter(&pairs, "target_", "t") {
            Err(ApiError::BadRequest(reason)) => assert!(reason.starts_with("target_end: missing")),
            other => panic!("expected a 400, got {other:?}"),
        }
        let instance = vec![("instance".to_string(), "i".to_string())];
        assert_eq!(
            side_filter(&instance, "", "t")
                .unwrap()
                .instance_opt
                .as_deref(),
            Some("i")
        );
        let empty = vec![("instance".to_string(), String::new())];
        assert!(matches!(
            side_filter(&empty, "", "t"),
            Err(ApiError::BadRequest(_))
        ));
    }
}
