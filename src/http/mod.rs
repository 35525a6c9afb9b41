//! The JSON API for people and scripts (SPEC §6), `/healthz`, `/readyz` and the
//! Prometheus `/metrics` endpoint (served on its own port).

pub mod analysis;
pub mod api;
pub mod error;
pub mod page;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::config::AnalysisConfig;
use crate::grpc::constant_time_eq;
use crate::pipeline::Handles;
use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    pub handles: Handles,
    pub admin_token: Option<Arc<str>>,
    pub max_snapshots_per_response: usize,
    /// Bounds of the analysis and flame-graph answers.
    pub analysis: AnalysisConfig,
    /// `analysis.max_concurrent_requests` slots shared by every analysis answer.
    pub analysis_permits: Arc<tokio::sync::Semaphore>,
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/tasks", post(api::create_task).get(api::list_tasks))
        .route("/tasks/{id}", get(api::get_task))
        .route("/tasks/{id}/logs", get(api::task_logs))
        .route("/tasks/{id}/segments", get(api::task_segments))
        .route("/segments/{segment_id}", get(api::segment))
        .route(
            "/segments/{segment_id}/snapshots",
            get(api::segment_snapshots),
        )
        .route("/services", get(api::services))
        .route("/analysis", get(analysis::analysis))
        .route("/tasks/{id}/flamegraph", get(analysis::task_flamegraph))
        .route("/flamegraph/diff", get(analysis::flamegraph_diff))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_token,
        ));
    Router::new()
        .nest("/api/v1", api)
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/", get(page::index))
        .route("/assets/{*path}", get(page::asset))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(state)
}

async fn require_admin_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let Some(expected) = &state.admin_token else {
        return next.run(request).await;
    };
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// `/metrics` on its own listener, as Prometheus expects.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    handle.render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
