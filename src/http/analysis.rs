//! The reading side of the API: SkyWalking's stack-tree analysis of segments
//! (`/analysis`), a task's flame graph as JSON, folded stacks or pprof
//! (`/tasks/{id}/flamegraph`), and the differential flame graph (`/flamegraph/diff`).
//! Every answer is bounded: the analysis reads at most `analysis.max_snapshots`
//! snapshots, and a flame graph is counted by the store and held as at most
//! `analysis.max_flamegraph_nodes` nodes.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt as _;

use super::api::find_task;
use super::error::ApiError;
use super::AppState;
use crate::analysis::stack_tree::{self, Analysis};
use crate::analysis::{diff, folded, pprof, FlameTree};
use crate::store::{SnapshotFilter, Store, StoreError};

/// Most segments one analysis request may name.
const MAX_SEGMENTS_PER_ANALYSIS: usize = 1_000;

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
    for (key, value) in pairs(raw) {
        match key.as_str() {
            "segment" => {
                if value.is_empty() {
                    return Err(ApiError::BadRequest("segment: must not be empty".into()));
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
    let store = &state.handles.store;
    let limit = state.analysis.max_snapshots;
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
                ensure_segment_exists(store.as_ref(), segment).await?;
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

/// A segment with no snapshot at all is unknown (404); one whose range is empty is not.
async fn ensure_segment_exists(store: &dyn Store, segment: &str) -> Result<(), ApiError> {
    let whole = SnapshotFilter {
        segment_id_opt: Some(segment.to_string()),
        ..SnapshotFilter::default()
    };
    if store.count_snapshots(&whole).await? == 0 {
        return Err(ApiError::NotFound(format!("segment {segment} not found")));
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
                return Err(ApiError::BadRequest(format!(
                    "{key}: filtering by agent instance is not available: snapshots do not \
                     carry the instance (the agent's ThreadSnapshot has none); filter by segment"
                )))
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

/// Counts a filter's stacks in the store into a bounded tree, then hands the tree to
/// `finish`, both off the async threads: the tree and its encodings are CPU work.
async fn with_flame_trees<T: Send + 'static>(
    store: Arc<dyn Store>,
    filters: Vec<SnapshotFilter>,
    max_nodes: usize,
    finish: impl FnOnce(Vec<FlameTree>) -> T + Send + 'static,
) -> Result<T, ApiError> {
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
        Ok::<T, ApiError>(finish(trees))
    })
    .await
    .map_err(|error| ApiError::Internal(format!("flame graph failed: {error}")))?
}

/// `GET /api/v1/tasks/{id}/flamegraph?format=json|collapsed|pprof&segment=&start=&end=`.
pub async fn task_flamegraph(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = pairs(raw.as_deref());
    check_known_keys(&pairs, &["format", "segment", "start", "end", "instance"])?;
    let mut format = FlameFormat::Json;
    for (key, value) in &pairs {
        if key == "format" {
            format = match value.as_str() {
                "json" => FlameFormat::Json,
                "collapsed" => FlameFormat::Collapsed,
                "pprof" => FlameFormat::Pprof,
                other => {
                    return Err(ApiError::BadRequest(format!(
                        "format: unknown format {other:?} (json, collapsed or pprof)"
                    )))
                }
            };
        }
    }
    let filter = side_filter(&pairs, "", &task_id)?;
    let task = find_task(&state, &task_id).await?;
    let (dump_period, start_time, duration_ms) = (
        i64::from(task.dump_period),
        task.start_time,
        task.end_time() - task.start_time,
    );
    let body = with_flame_trees(
        state.handles.store.clone(),
        vec![filter],
        state.analysis.max_flamegraph_nodes,
        move |trees| match format {
            FlameFormat::Json => trees[0].to_json(dump_period).into_bytes(),
            FlameFormat::Collapsed => folded::collapsed(&trees[0]).into_bytes(),
            FlameFormat::Pprof => pprof::encode(&trees[0], dump_period, start_time, duration_ms),
        },
    )
    .await?;
    let response = match format {
        FlameFormat::Json => ([(CONTENT_TYPE, "application/json")], body).into_response(),
        FlameFormat::Collapsed => {
            ([(CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
        }
        FlameFormat::Pprof => (
            [
                (CONTENT_TYPE, "application/octet-stream".to_string()),
                (
                    CONTENT_DISPOSITION,
                    format!(
                        "attachment; filename=\"skysnap-{}.pb.gz\"",
                        safe_file_name(&task_id)
                    ),
                ),
            ],
            body,
        )
            .into_response(),
    };
    Ok(response)
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
    let body = with_flame_trees(
        state.handles.store.clone(),
        vec![base, target],
        state.analysis.max_flamegraph_nodes,
        |trees| diff::diff_json(&trees[0], &trees[1]),
    )
    .await?;
    Ok(([(CONTENT_TYPE, "application/json")], body).into_response())
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
        assert!(matches!(
            side_filter(&instance, "", "t"),
            Err(ApiError::BadRequest(_))
        ));
    }
}
