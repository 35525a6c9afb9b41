//! Keeps the trace segments that were profiled. Trace segments pass through skysnap
//! (forwarded or not); the ones whose segment id has snapshots are kept with their spans,
//! so that a person can see a profiled request's span tree and analyse one span's range.
//!
//! Matching is cheap for the many segments that were not profiled: the segment id is
//! looked up in a bounded in-memory index of segment ids that recently had snapshots on
//! this replica. A segment the index does not know, but whose service and endpoint have a
//! profile task running, may still be profiled (its first snapshot can arrive after it,
//! or at another replica): it waits `segments.pending_delay_ms`, then is looked up in the
//! index again and then in the store. Everything else passes untouched.
//!
//! Nothing here can hold up a call: the tap decodes and hands over with `try_send`; the
//! writer task batches into the store. What is dropped is counted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::SegmentsConfig;
use crate::model::{ProfiledSegment, ProfiledSpan, Task};
use crate::proto::v3::{SegmentObject, SpanLayer, SpanType};
use crate::store::Store;
use crate::telemetry::{SEGMENTS_KEPT, SEGMENTS_SKIPPED};

/// A task's endpoint and time window, as the tap needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TaskWindow {
    endpoint: String,
    start_time: i64,
    end_time: i64,
}

/// How long after its task's end a segment may still start and count (clock skew
/// between agent and skysnap, and a task's last request).
const WINDOW_SLACK_MS: i64 = 60_000;

/// Segments handed to the writer at once before `try_send` refuses more.
const QUEUE_CAPACITY: usize = 4_096;
/// Segments written in one store call.
const BATCH_MAX: usize = 256;
const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Store attempts for one batch of segments before it is given up (and counted).
const WRITE_ATTEMPTS: u32 = 3;

enum Offer {
    /// Its segment id has snapshots here.
    Keep(ProfiledSegment),
    /// A task of its service and endpoint is running; its snapshots may come later.
    Maybe(ProfiledSegment),
}

/// The part of a `SegmentObject` read for every passing segment; the spans are skipped.
#[derive(Clone, PartialEq, prost::Message)]
struct SegmentHead {
    #[prost(string, tag = "2")]
    trace_segment_id: String,
    #[prost(string, tag = "4")]
    service: String,
}

struct Inner {
    /// Segment ids that recently had snapshots here, the most recent kept.
    index: Mutex<lru::LruCache<Box<str>, ()>>,
    /// Service → windows of its running tasks, published by the task cache actor.
    windows: RwLock<Arc<HashMap<String, Vec<TaskWindow>>>>,
    queue: mpsc::Sender<Offer>,
    max_spans: usize,
}

/// The tap's and the profile handler's handle; cheap to clone.
#[derive(Clone)]
pub struct SegmentCapture {
    inner: Arc<Inner>,
}

fn skipped(reason: &'static str) {
    metrics::counter!(SEGMENTS_SKIPPED, "reason" => reason).increment(1);
}

impl SegmentCapture {
    /// The handle and the writer; the caller spawns [`SegmentWriter::run`].
    pub fn new(config: &SegmentsConfig, store: Arc<dyn Store>) -> (SegmentCapture, SegmentWriter) {
        let (queue, offers) = mpsc::channel(QUEUE_CAPACITY);
        let capacity = config.index_capacity;
        let capture = SegmentCapture {
            inner: Arc::new(Inner {
                index: Mutex::new(lru::LruCache::new(capacity)),
                windows: RwLock::new(Arc::new(HashMap::new())),
                queue,
                max_spans: config.max_spans.get(),
            }),
        };
        let writer = SegmentWriter {
            capture: capture.clone(),
            store,
            offers,
            pending: VecDeque::new(),
            pending_max: config.pending_max_segments,
            pending_delay: Duration::from_millis(config.pending_delay_ms.get()),
        };
        (capture, writer)
    }

    /// A snapshot of this segment arrived. Callers skip repeats within a stream.
    pub fn note_snapshot(&self, segment_id: &str) {
        let mut index = self.inner.index.lock().expect("index lock not poisoned");
        if index.get(segment_id).is_none() {
            index.put(segment_id.into(), ());
        }
    }

    pub fn has_snapshots(&self, segment_id: &str) -> bool {
        self.inner
            .index
            .lock()
            .expect("index lock not poisoned")
            .contains(segment_id)
    }

    /// Replaces the running tasks the tap matches segments against.
    pub fn publish_tasks<'a>(&self, tasks: impl Iterator<Item = &'a Task>) {
        let mut windows: HashMap<String, Vec<TaskWindow>> = HashMap::new();
        for task in tasks {
            windows
                .entry(task.service.clone())
                .or_default()
                .push(TaskWindow {
                    endpoint: task.endpoint_name.clone(),
                    start_time: task.start_time,
                    end_time: task.end_time(),
                });
        }
        *self
            .inner
            .windows
            .write()
            .expect("windows lock not poisoned") = Arc::new(windows);
    }

    fn windows(&self) -> Arc<HashMap<String, Vec<TaskWindow>>> {
        self.inner
            .windows
            .read()
            .expect("windows lock not poisoned")
            .clone()
    }

    /// One `SegmentObject` passing by. Decides cheaply whether it may be profiled;
    /// never blocks.
    pub fn offer(&self, bytes: Bytes) {
        let Ok(head) = SegmentHead::decode(bytes.clone()) else {
            skipped("undecodable");
            return;
        };
        let known = self.has_snapshots(&head.trace_segment_id);
        let windows = self.windows();
        let service_windows = windows.get(&head.service);
        if !known && service_windows.is_none() {
            return;
        }
        let Ok(object) = SegmentObject::decode(bytes) else {
            skipped("undecodable");
            return;
        };
        let segment = to_profiled(object, self.inner.max_spans);
        let offer = if known {
            Offer::Keep(segment)
        } else {
            let matches = service_windows.is_some_and(|windows| {
                windows.iter().any(|window| {
                    window.endpoint == segment.endpoint
                        && segment.end_time >= window.start_time
                        && segment.start_time <= window.end_time + WINDOW_SLACK_MS
                })
            });
            if !matches {
                return;
            }
            Offer::Maybe(segment)
        };
        if self.inner.queue.try_send(offer).is_err() {
            skipped("queue_full");
        }
    }
}

/// A `SegmentObject` as skysnap keeps it.
pub fn to_profiled(object: SegmentObject, max_spans: usize) -> ProfiledSegment {
    let start_time = object
        .spans
        .iter()
        .map(|span| span.start_time)
        .min()
        .unwrap_or(0);
    let end_time = object
        .spans
        .iter()
        .map(|span| span.end_time)
        .max()
        .unwrap_or(0);
    let first = object
        .spans
        .iter()
        .find(|span| span.span_id == 0)
        .or_else(|| object.spans.first());
    let endpoint = first
        .map(|span| span.operation_name.clone())
        .unwrap_or_default();
    let is_error = object.spans.iter().any(|span| span.is_error);
    let spans = object
        .spans
        .into_iter()
        .take(max_spans)
        .map(|span| ProfiledSpan {
            span_id: span.span_id,
            parent_span_id: span.parent_span_id,
            span_type: SpanType::try_from(span.span_type)
                .map(|kind| kind.as_str_name().to_string())
                .unwrap_or_else(|_| span.span_type.to_string()),
            span_layer: SpanLayer::try_from(span.span_layer)
                .map(|layer| layer.as_str_name().to_string())
                .unwrap_or_else(|_| span.span_layer.to_string()),
            operation_name: span.operation_name,
            peer: span.peer,
            component_id: span.component_id,
            start_time: span.start_time,
            end_time: span.end_time,
            is_error: span.is_error,
        })
        .collect();
    ProfiledSegment {
        segment_id: object.trace_segment_id,
        trace_id: object.trace_id,
        service: object.service,
        instance: object.service_instance,
        endpoint,
        start_time,
        end_time,
        duration: end_time.saturating_sub(start_time),
        is_error,
        spans,
    }
}

/// Batches kept segments into the store and gives waiting ones their second look.
pub struct SegmentWriter {
    capture: SegmentCapture,
    store: Arc<dyn Store>,
    offers: mpsc::Receiver<Offer>,
    pending: VecDeque<(Instant, ProfiledSegment)>,
    pending_max: usize,
    pending_delay: Duration,
}

impl SegmentWriter {
    /// Runs until every [`SegmentCapture`] is dropped, then writes what it holds.
    pub async fn run(mut self) {
        let mut batch: Vec<ProfiledSegment> = Vec::new();
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                offer = self.offers.recv() => match offer {
                    Some(Offer::Keep(segment)) => batch.push(segment),
                    Some(Offer::Maybe(segment)) => {
                        if self.pending.len() < self.pending_max {
                            self.pending.push_back((Instant::now(), segment));
                        } else {
                            skipped("pending_full");
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    self.second_look(&mut batch).await;
                    self.write(&mut batch).await;
                }
            }
            if batch.len() >= BATCH_MAX {
                self.write(&mut batch).await;
            }
        }
        self.write(&mut batch).await;
    }

    /// Waiting segments whose delay is over: kept when their id now has snapshots (in
    /// the index, else in the store), dropped and counted otherwise.
    async fn second_look(&mut self, batch: &mut Vec<ProfiledSegment>) {
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some((arrived, _)) = self.pending.front() {
            if now.duration_since(*arrived) < self.pending_delay {
                break;
            }
            let (_, segment) = self.pending.pop_front().expect("front exists");
            if self.capture.has_snapshots(&segment.segment_id) {
                batch.push(segment);
            } else {
                due.push(segment);
            }
        }
        if due.is_empty() {
            return;
        }
        let ids: Vec<String> = due
            .iter()
            .map(|segment| segment.segment_id.clone())
            .collect();
        match self.store.segments_with_snapshots(&ids).await {
            Ok(found) => {
                let found: std::collections::HashSet<String> = found.into_iter().collect();
                for segment in due {
                    if found.contains(&segment.segment_id) {
                        batch.push(segment);
                    } else {
                        skipped("no_snapshots");
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot look up profiled segments; dropping {}", ids.len());
                for _ in &ids {
                    skipped("store_failed");
                }
            }
        }
    }

    async fn write(&self, batch: &mut Vec<ProfiledSegment>) {
        if batch.is_empty() {
            return;
        }
        let segments = std::mem::take(batch);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.store.insert_profiled_segments(&segments).await {
                Ok(()) => {
                    metrics::counter!(SEGMENTS_KEPT).increment(segments.len() as u64);
                    return;
                }
                Err(error) if attempt < WRITE_ATTEMPTS && error.is_retriable() => {
                    tracing::debug!(%error, attempt, "writing profiled segments failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "writing {} profiled segments failed", segments.len());
                    metrics::counter!(SEGMENTS_SKIPPED, "reason" => "store_failed")
                        .increment(segments.len() as u64);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v3::SpanObject;

    fn span(span_id: i32, parent: i32, name: &str, start: i64, end: i64) -> SpanObject {
        SpanObject {
            span_id,
            parent_span_id: parent,
            start_time: start,
            end_time: end,
            operation_name: name.into(),
            span_type: if span_id == 0 { 0 } else { 1 },
            span_layer: 3,
            component_id: 7002,
            ..Default::default()
        }
    }

    #[test]
    fn test_segments_first_span_names_the_endpoint() {
        // Agents send a span when it ends, so the entry span (id 0) comes last.
        let object = SegmentObject {
            trace_id: "t".into(),
            trace_segment_id: "s".into(),
            spans: vec![
                span(1, 0, "GET /db", 110, 150),
                span(0, -1, "/busy", 100, 300),
            ],
            service: "shop".into(),
            service_instance: "shop-1".into(),
            is_size_limited: false,
        };
        let segment = to_profiled(object, 10);
        assert_eq!(segment.endpoint, "/busy");
        assert_eq!(
            (segment.start_time, segment.end_time, segment.duration),
            (100, 300, 200)
        );
        assert_eq!(segment.spans[0].span_type, "Exit");
        assert_eq!(segment.spans[1].span_type, "Entry");
        assert_eq!(segment.spans[1].span_layer, "Http");
        assert!(!segment.is_error);
        let segment = to_profiled(
            SegmentObject {
                spans: (0..50).map(|id| span(id, id - 1, "x", 0, 1)).collect(),
                ..Default::default()
            },
            5,
        );
        assert_eq!(segment.spans.len(), 5);
    }

    #[tokio::test]
    async fn test_segments_offer_keeps_indexed_and_candidates_only() {
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(
                &tempfile::tempdir().unwrap().path().join("t.db"),
                1,
            )
            .unwrap(),
        );
        let (capture, mut writer) = SegmentCapture::new(&SegmentsConfig::default(), store);
        let encode = |id: &str, service: &str, endpoint: &str| {
            Bytes::from(
                SegmentObject {
                    trace_id: "t".into(),
                    trace_segment_id: id.into(),
                    spans: vec![span(0, -1, endpoint, 1_000, 2_000)],
                    service: service.into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        };
        capture.note_snapshot("profiled");
        capture.publish_tasks(
            [Task {
                id: "task".into(),
                service: "shop".into(),
                endpoint_name: "/busy".into(),
                start_time: 0,
                duration: 1,
                min_duration_threshold: 0,
                dump_period: 10,
                max_sampling_count: 5,
                create_time: 0,
            }]
            .iter(),
        );
        capture.offer(encode("profiled", "other-service", "/x"));
        capture.offer(encode("plain", "other-service", "/busy"));
        capture.offer(encode("other-endpoint", "shop", "/other"));
        capture.offer(encode("candidate", "shop", "/busy"));
        capture.offer(Bytes::from_static(b"\xff\xff not protobuf"));
        let mut seen = Vec::new();
        while let Ok(offer) = writer.offers.try_recv() {
            seen.push(match offer {
                Offer::Keep(segment) => format!("keep {}", segment.segment_id),
                Offer::Maybe(segment) => format!("maybe {}", segment.segment_id),
            });
        }
        assert_eq!(seen, ["keep profiled", "maybe candidate"]);
    }
}
