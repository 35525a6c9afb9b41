//! The handlers of `/api/v1`, `/healthz` and `/readyz`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::error::{ApiError, ApiPath};
use super::AppState;
use crate::actors::instances::ListServices;
use crate::actors::task_by_id::GetTask;
use crate::actors::task_registry::CreateTask;
use crate::analysis::span_tree::{span_tree, SpanNode};
use crate::model::{
    now_ms, ProfiledSegment, SegmentSummary, ServiceInstances, SnapshotRecord, Task, TaskLog,
};
use crate::store::TaskFilter;
use crate::tasks::NewTask;

pub async fn create_task(
    State(state): State<AppState>,
    body: Result<Json<NewTask>, JsonRejection>,
) -> Result<(StatusCode, Json<Task>), ApiError> {
    let Json(new_task) = body.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let task = state.handles.registry.send(CreateTask(new_task)).await??;
    Ok((StatusCode::CREATED, Json(task)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskQuery {
    service: Option<String>,
    endpoint_name: Option<String>,
}

pub async fn list_tasks(
    State(state): State<AppState>,
    query: Result<Query<TaskQuery>, QueryRejection>,
) -> Result<Json<Vec<Task>>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let filter = TaskFilter {
        service: query.service.filter(|s| !s.is_empty()),
        endpoint_name: query.endpoint_name.filter(|s| !s.is_empty()),
    };
    Ok(Json(state.handles.store.list_tasks(&filter).await?))
}

pub(super) async fn find_task(state: &AppState, id: &str) -> Result<Task, ApiError> {
    state
        .handles
        .by_id
        .send(GetTask { id: id.to_string() })
        .await??
        .ok_or_else(|| ApiError::NotFound(format!("task {id} not found")))
}

pub async fn get_task(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(find_task(&state, &id).await?))
}

pub async fn task_logs(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<TaskLog>>, ApiError> {
    find_task(&state, &id).await?;
    Ok(Json(state.handles.store.task_logs(&id).await?))
}

pub async fn task_segments(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<SegmentSummary>>, ApiError> {
    // Snapshots of a task this replica does not know are still stored; list them too.
    Ok(Json(state.handles.store.task_segments(&id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotQuery {
    limit: Option<usize>,
}

pub async fn segment_snapshots(
    State(state): State<AppState>,
    ApiPath(segment_id): ApiPath<String>,
    query: Result<Query<SnapshotQuery>, QueryRejection>,
) -> Result<Json<Vec<SnapshotRecord>>, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let limit = query
        .limit
        .unwrap_or(state.max_snapshots_per_response)
        .min(state.max_snapshots_per_response);
    Ok(Json(
        state
            .handles
            .store
            .segment_snapshots(&segment_id, limit)
            .await?,
    ))
}

/// A kept segment without its spans: what the span tree belongs to.
#[derive(Debug, Serialize)]
pub struct SegmentHead {
    segment_id: String,
    trace_id: String,
    service: String,
    instance: String,
    endpoint: String,
    start_time: i64,
    end_time: i64,
    duration: i64,
    is_error: bool,
}

#[derive(Debug, Serialize)]
pub struct SegmentWithSpans {
    segment: SegmentHead,
    spans: Vec<SpanNode>,
}

pub async fn segment(
    State(state): State<AppState>,
    ApiPath(segment_id): ApiPath<String>,
) -> Result<Json<SegmentWithSpans>, ApiError> {
    let Some(segment) = state.handles.store.profiled_segment(&segment_id).await? else {
        return Err(ApiError::NotFound(format!(
            "segment {segment_id} not found"
        )));
    };
    let spans = span_tree(&segment.spans);
    let ProfiledSegment {
        segment_id,
        trace_id,
        service,
        instance,
        endpoint,
        start_time,
        end_time,
        duration,
        is_error,
        spans: _,
    } = segment;
    Ok(Json(SegmentWithSpans {
        segment: SegmentHead {
            segment_id,
            trace_id,
            service,
            instance,
            endpoint,
            start_time,
            end_time,
            duration,
            is_error,
        },
        spans,
    }))
}

pub async fn services(
    State(state): State<AppState>,
) -> Result<Json<Vec<ServiceInstances>>, ApiError> {
    Ok(Json(
        state
            .handles
            .instances
            .send(ListServices { now_ms: now_ms() })
            .await?,
    ))
}

pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let store = state.handles.store.ping().await;
    ready &= store.is_ok();
    checks.insert(
        format!("store:{}", state.handles.store.kind()),
        json!(store
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "ok".to_string())),
    );
    for sink in state.handles.sinks.iter() {
        let outcome = sink.ready().await;
        ready &= outcome.is_ok();
        checks.insert(
            format!("sink:{}", sink.name()),
            json!(outcome
                .err()
                .map(|e| e.to_string())
                .unwrap_or_else(|| "ok".to_string())),
        );
    }
    let (status, word) = if ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    (
        status,
        Json(json!({ "status": word, "store": state.handles.store.kind(), "checks": checks })),
    )
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".to_string())
}

/// A known path with a method it does not serve (found by fuzzing: axum's own answer
/// had no body).
pub async fn method_not_allowed() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        Json(serde_json::json!({"error": "method not allowed on this path"})),
    )
        .into_response()
}
