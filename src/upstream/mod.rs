//! Every gRPC call skysnap does not own (all but `ProfileTask`): forwarded byte for byte
//! to the upstream OAP when `upstream.addresses` is set, otherwise answered here with an
//! empty reply and counted, so agents log no errors. Either way the calls skysnap reads
//! (heartbeats, trace segments) pass through a tap on the way.
//!
//! Routing is by path, not by a list of services, so methods skysnap has never heard of
//! are forwarded too. Forwarded calls take nothing from the profiling path: they have
//! their own in-flight limit, their own timeouts, and no actor or store on their way.

pub mod frames;
pub mod pool;
pub mod routes;
pub mod tap;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::{Code, Status};
use tower::ServiceExt;

use crate::config::UpstreamConfig;
use crate::grpc::{InFlight, InFlightGuard, AUTH_METADATA_KEY};
use crate::telemetry::{
    DISCARDED_MESSAGES, UPSTREAM_BYTES, UPSTREAM_CALLS, UPSTREAM_LATENCY, UPSTREAM_MESSAGES,
    UPSTREAM_REFUSED,
};
use frames::FrameSplitter;
use pool::{Upstream, UpstreamPool};
use routes::{Route, Tap};
use tap::Taps;

pub use pool::UpstreamConfigError;

/// The tower service behind every path the gRPC router does not own.
#[derive(Clone)]
pub struct Passthrough {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None`: no upstream configured, calls are answered here.
    pool_opt: Option<Arc<UpstreamPool>>,
    calls: Arc<Semaphore>,
    timeout: Duration,
    token_opt: Option<HeaderValue>,
    taps: Taps,
    in_flight: Arc<InFlight>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl tower::Service<http::Request<axum::body::Body>> for Passthrough {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<axum::body::Body>) -> ResponseFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let route = routes::classify(request.uri().path());
            Ok(match &inner.pool_opt {
                Some(pool) => inner.clone().forward(pool.clone(), route, request).await,
                None => inner.answer_here(route, request).await,
            })
        })
    }
}

impl Passthrough {
    /// Must run inside a tokio runtime (the channels are built here, not connected).
    pub fn new(
        config: &UpstreamConfig,
        taps: Taps,
        in_flight: Arc<InFlight>,
    ) -> Result<Passthrough, UpstreamConfigError> {
        let pool_opt = if config.addresses.is_empty() {
            None
        } else {
            Some(UpstreamPool::new(config)?)
        };
        let token_opt = match &config.token {
            Some(token) => Some(HeaderValue::from_str(token).map_err(|_| {
                UpstreamConfigError::Tls("upstream.token is not a valid metadata value".into())
            })?),
            None => None,
        };
        if let Some(pool) = &pool_opt {
            for upstream in pool.upstreams() {
                tracing::info!(upstream = %upstream.address, "forwarding agent calls skysnap does not own");
            }
            for direction in ["sent", "received"] {
                metrics::counter!(UPSTREAM_BYTES, "direction" => direction).absolute(0);
            }
            for reason in ["no_upstream_up", "too_many_calls"] {
                metrics::counter!(UPSTREAM_REFUSED, "reason" => reason).absolute(0);
            }
        }
        Ok(Passthrough {
            inner: Arc::new(Inner {
                pool_opt,
                calls: Arc::new(Semaphore::new(config.max_concurrent_calls.get())),
                timeout: Duration::from_millis(config.timeout_ms.get()),
                token_opt,
                taps,
                in_flight,
            }),
        })
    }

    pub fn pool(&self) -> Option<&Arc<UpstreamPool>> {
        self.inner.pool_opt.as_ref()
    }
}

fn is_gzip(headers: &HeaderMap) -> bool {
    headers
        .get("grpc-encoding")
        .is_some_and(|value| value.as_bytes() == b"gzip")
}

/// A gRPC reply that carries only a status (a "trailers-only" response).
fn status_response(status: Status) -> http::Response<Body> {
    status.into_http()
}

/// The name of a gRPC status code, for the `code` label.
fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

fn status_code_of(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
        .map(Code::from_i32)
}

fn count_call(route: &Route, code: Code) {
    metrics::counter!(UPSTREAM_CALLS, "service" => route.service, "method" => route.method, "code" => code_label(code))
        .increment(1);
}

/// The agent's `grpc-timeout` (`<digits><unit>`), if it sent one.
fn agent_deadline(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// What the request pump tells the call about the agent's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestEnd {
    /// Every request frame was handed to the upstream connection.
    Sent,
    /// The upstream did not take offered data within the timeout.
    Stalled,
    /// The agent broke its stream off.
    AgentFailed,
}

/// Shared between the pump, the waiting call and the reply body.
struct CallState {
    request_done: AtomicBool,
    /// When the agent's last request frame went on (for the latency histogram).
    request_done_at: std::sync::Mutex<Option<Instant>>,
}

impl Inner {
    /// No upstream: read what is tapped, count, answer with an empty message (a valid
    /// reply of every SkyWalking method, e.g. an empty async-profiler command list).
    async fn answer_here(
        &self,
        route: Route,
        request: http::Request<axum::body::Body>,
    ) -> http::Response<Body> {
        let _call = self.in_flight.enter();
        let gzip = is_gzip(request.headers());
        let mut splitter =
            FrameSplitter::new(route.tap != Tap::None, self.taps.max_message_bytes());
        let mut body = request.into_body();
        let mut messages = 0u64;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return status_response(Status::cancelled("the request stream broke off"));
            };
            if let Some(data) = frame.data_ref() {
                splitter.push(data, |message| {
                    messages += 1;
                    self.taps.on_message(route.tap, gzip, message);
                });
            }
        }
        metrics::counter!(DISCARDED_MESSAGES, "service" => route.service, "method" => route.method)
            .increment(messages);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames = [
            Ok::<_, Status>(Frame::data(frames::frame(false, b""))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut response = http::Response::new(Body::new(http_body_util::StreamBody::new(
            futures::stream::iter(frames),
        )));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        response
    }

    async fn forward(
        self: Arc<Self>,
        pool: Arc<UpstreamPool>,
        route: Route,
        request: http::Request<axum::body::Body>,
    ) -> http::Response<Body> {
        let Ok(permit) = self.calls.clone().try_acquire_owned() else {
            metrics::counter!(UPSTREAM_REFUSED, "reason" => "too_many_calls").increment(1);
            count_call(&route, Code::ResourceExhausted);
            return status_response(Status::resource_exhausted(
                "too many calls in flight to the upstream OAP",
            ));
        };
        let Some(upstream) = pool.pick() else {
            metrics::counter!(UPSTREAM_REFUSED, "reason" => "no_upstream_up").increment(1);
            count_call(&route, Code::Unavailable);
            return status_response(Status::unavailable(
                "no upstream OAP reachable; retrying in the background",
            ));
        };
        let guard = self.in_flight.enter();
        let (mut parts, body) = request.into_parts();
        if let Some(token) = &self.token_opt {
            parts.headers.insert(AUTH_METADATA_KEY, token.clone());
        }
        let deadline_opt = agent_deadline(&parts.headers).map(|limit| Instant::now() + limit);
        let gzip = is_gzip(&parts.headers);
        let state = Arc::new(CallState {
            request_done: AtomicBool::new(false),
            request_done_at: std::sync::Mutex::new(None),
        });
        let (frames_tx, frames_rx) = mpsc::channel::<Result<Frame<Bytes>, Status>>(2);
        let (end_tx, mut end_rx) = tokio::sync::oneshot::channel::<RequestEnd>();
        tokio::spawn(pump_request(
            body,
            frames_tx,
            end_tx,
            state.clone(),
            PumpContext {
                route,
                gzip,
                taps: self.taps.clone(),
                timeout: self.timeout,
            },
        ));
        let upstream_body = Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(frames_rx),
        ));
        let upstream_request = http::Request::from_parts(parts, upstream_body);
        let call = upstream.channel().oneshot(upstream_request);
        tokio::pin!(call);

        // Waits for the reply's headers. The clock runs only while skysnap waits on the
        // upstream: from the agent's end of stream, or while offered data is not taken.
        let mut answer_by: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut request_end_known = false;
        let agent_deadline = async {
            match deadline_opt {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(agent_deadline);
        let result = loop {
            tokio::select! {
                result = &mut call => break result,
                end = &mut end_rx, if !request_end_known => {
                    request_end_known = true;
                    match end {
                        Ok(RequestEnd::Sent) => {
                            answer_by = Some(Box::pin(tokio::time::sleep(self.timeout)));
                        }
                        Ok(RequestEnd::Stalled) => {
                            pool.mark_down(&upstream, "stopped taking request data");
                            return self.timed_out(&route, "the upstream OAP stopped taking the request");
                        }
                        Ok(RequestEnd::AgentFailed) | Err(_) => {
                            count_call(&route, Code::Cancelled);
                            return status_response(Status::cancelled("the request stream broke off"));
                        }
                    }
                }
                _ = async { answer_by.as_mut().expect("guarded").await }, if answer_by.is_some() => {
                    pool.mark_down(&upstream, "no reply within upstream.timeout_ms");
                    return self.timed_out(&route, "the upstream OAP did not answer in time");
                }
                _ = &mut agent_deadline => {
                    return self.timed_out(&route, "the call's deadline passed");
                }
            }
        };
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                pool.mark_down(&upstream, "call failed");
                count_call(&route, Code::Unavailable);
                let mut message = format!("upstream OAP {} unreachable: {error}", upstream.address);
                let mut source = std::error::Error::source(&error);
                while let Some(cause) = source {
                    message.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                tracing::debug!(%message);
                return status_response(Status::unavailable(message));
            }
        };
        pool.mark_up(&upstream);
        let (parts, body) = response.into_parts();
        // A trailers-only reply carries its status in the headers.
        let header_code_opt = status_code_of(&parts.headers);
        let reply = ReplyBody {
            inner: body,
            route,
            splitter: FrameSplitter::new(false, 0),
            state,
            timeout: self.timeout,
            idle: Box::pin(tokio::time::sleep(self.timeout)),
            deadline_opt,
            header_code_opt,
            finished: false,
            upstream,
            pool,
            _permit: permit,
            _guard: guard,
        };
        http::Response::from_parts(parts, Body::new(reply))
    }

    fn timed_out(&self, route: &Route, message: &str) -> http::Response<Body> {
        count_call(route, Code::DeadlineExceeded);
        status_response(Status::deadline_exceeded(message.to_string()))
    }
}

struct PumpContext {
    route: Route,
    gzip: bool,
    taps: Taps,
    timeout: Duration,
}

/// Moves the agent's request frames to the upstream connection, reading the tapped
/// messages on the way; says how the request side ended.
async fn pump_request(
    mut body: axum::body::Body,
    frames_tx: mpsc::Sender<Result<Frame<Bytes>, Status>>,
    end_tx: tokio::sync::oneshot::Sender<RequestEnd>,
    state: Arc<CallState>,
    context: PumpContext,
) {
    let PumpContext {
        route,
        gzip,
        taps,
        timeout,
    } = context;
    let mut splitter = FrameSplitter::new(route.tap != Tap::None, taps.max_message_bytes());
    let mut messages = 0u64;
    let mut bytes = 0u64;
    let end = loop {
        let frame = match body.frame().await {
            None => break RequestEnd::Sent,
            Some(Ok(frame)) => frame,
            Some(Err(_)) => {
                let _ = frames_tx
                    .send(Err(Status::cancelled("the agent broke its stream off")))
                    .await;
                break RequestEnd::AgentFailed;
            }
        };
        if let Some(data) = frame.data_ref() {
            // The agent's empty end-of-stream DATA frame shows up as an empty chunk. Sent
            // on, it would be an empty DATA frame without END_STREAM, which HTTP/2 servers
            // count as abuse (h2 sends GOAWAY ENHANCE_YOUR_CALM after a few hundred).
            if data.is_empty() {
                continue;
            }
            bytes += data.len() as u64;
            splitter.push(data, |message| {
                messages += 1;
                taps.on_message(route.tap, gzip, message);
            });
        }
        match tokio::time::timeout(timeout, frames_tx.send(Ok(frame))).await {
            Ok(Ok(())) => {}
            // The call is over (the upstream answered early or the agent went away).
            Ok(Err(_)) => break RequestEnd::Sent,
            Err(_) => break RequestEnd::Stalled,
        }
    };
    metrics::counter!(UPSTREAM_MESSAGES, "service" => route.service, "method" => route.method, "direction" => "request")
        .increment(messages);
    metrics::counter!(UPSTREAM_BYTES, "direction" => "sent").increment(bytes);
    if end == RequestEnd::Sent {
        *state.request_done_at.lock().expect("not poisoned") = Some(Instant::now());
        state.request_done.store(true, Ordering::Release);
    }
    let _ = end_tx.send(end);
    // Dropping the sender ends the upstream request stream (END_STREAM), unless an error
    // was sent first, which resets it.
    drop(frames_tx);
}

/// The upstream's reply on its way to the agent: counted, and cut off with
/// DEADLINE_EXCEEDED when the upstream goes quiet after the agent has sent everything.
struct ReplyBody {
    inner: Body,
    route: Route,
    splitter: FrameSplitter,
    state: Arc<CallState>,
    timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    deadline_opt: Option<Instant>,
    header_code_opt: Option<Code>,
    finished: bool,
    upstream: Arc<Upstream>,
    pool: Arc<UpstreamPool>,
    /// Held until the reply ends: the call counts against `max_concurrent_calls`.
    _permit: OwnedSemaphorePermit,
    /// Held until the reply ends: shutdown waits for forwarded calls too.
    _guard: InFlightGuard,
}

impl ReplyBody {
    fn finish(&mut self, code: Code) {
        if self.finished {
            return;
        }
        self.finished = true;
        count_call(&self.route, code);
        let done_at = *self.state.request_done_at.lock().expect("not poisoned");
        if let Some(done_at) = done_at {
            metrics::histogram!(UPSTREAM_LATENCY, "service" => self.route.service)
                .record(done_at.elapsed().as_secs_f64());
        }
    }

    fn cut_off(&mut self, code: Code, message: &str) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.finish(code);
        let mut trailers = HeaderMap::new();
        let _ = Status::new(code, message.to_string()).add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}

impl HttpBody for ReplyBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    metrics::counter!(UPSTREAM_BYTES, "direction" => "received")
                        .increment(data.len() as u64);
                    let mut messages = 0u64;
                    this.splitter.push(data, |_| messages += 1);
                    metrics::counter!(UPSTREAM_MESSAGES, "service" => this.route.service, "method" => this.route.method, "direction" => "response")
                        .increment(messages);
                }
                if let Some(trailers) = frame.trailers_ref() {
                    // The last frame: the server does not ask for more after trailers.
                    let code = status_code_of(trailers).unwrap_or(Code::Unknown);
                    this.finish(code);
                    return Poll::Ready(Some(Ok(frame)));
                }
                let deadline = tokio::time::Instant::now() + this.timeout;
                this.idle.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.pool.mark_down(&this.upstream, "reply broke off");
                let message = format!("the upstream OAP's reply broke off: {error}");
                this.cut_off(Code::Unavailable, &message)
            }
            Poll::Ready(None) => {
                let code = this.header_code_opt.unwrap_or(Code::Unknown);
                this.finish(code);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this
                    .deadline_opt
                    .is_some_and(|deadline| Instant::now() >= deadline)
                {
                    return this.cut_off(Code::DeadlineExceeded, "the call's deadline passed");
                }
                if this.idle.as_mut().poll(cx).is_ready() {
                    if this.state.request_done.load(Ordering::Acquire) {
                        this.pool.mark_down(&this.upstream, "reply stalled");
                        return this
                            .cut_off(Code::DeadlineExceeded, "the upstream OAP stopped replying");
                    }
                    // The agent is still sending: the upstream may rightly wait for it.
                    let deadline = tokio::time::Instant::now() + this.timeout;
                    this.idle.as_mut().reset(deadline);
                    let _ = this.idle.as_mut().poll(cx);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for ReplyBody {
    fn drop(&mut self) {
        // The agent went away before the reply ended.
        self.finish(Code::Cancelled);
    }
}
