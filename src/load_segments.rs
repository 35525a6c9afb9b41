//! `skysnap load --trace-segments`: the trace load an agent puts on a collector, to
//! measure forwarding. C concurrent callers each send `TraceSegmentReportService/collect`
//! streams of B realistic segments (an entry span and a few exit and local spans, with
//! tags) to any SkyWalking collector, skysnap or OAP alike, and time each stream's
//! answer. Run it against OAP directly and through skysnap in the same run to compare.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::proto::v3::trace_segment_report_service_client::TraceSegmentReportServiceClient;
use crate::proto::v3::{KeyStringValuePair, SegmentObject, SpanObject};

#[derive(Debug, Clone)]
pub struct SegmentLoadOptions {
    /// gRPC address of the collector, e.g. `http://127.0.0.1:11800`.
    pub target: String,
    pub agent_token_opt: Option<String>,
    /// Callers sending at once (each its own stream after stream).
    pub concurrency: usize,
    /// Segments per `collect` stream.
    pub segments_per_stream: usize,
    /// Spans per segment (at least 1: the entry span).
    pub spans_per_segment: usize,
    /// Service name the segments carry.
    pub service: String,
    pub duration: Duration,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SegmentLoadReport {
    pub segments_acknowledged: u64,
    pub streams_acknowledged: u64,
    pub seconds: f64,
    pub segments_per_second: f64,
    pub ack_latency_ms_p50: f64,
    pub ack_latency_ms_p90: f64,
    pub ack_latency_ms_p99: f64,
    pub errors: HashMap<String, u64>,
}

/// One segment as a Python or Java agent reports an HTTP request: the entry span (id 0,
/// sent last, as agents send spans when they end), exit spans to a database and an HTTP
/// peer, and local spans.
pub fn segment(
    run: &str,
    service: &str,
    instance: &str,
    number: u64,
    spans: usize,
) -> SegmentObject {
    let now = crate::model::now_ms();
    let trace_id = format!("{run}.{number}.trace");
    let segment_id = format!("{run}.{number}.segment");
    let mut objects = Vec::with_capacity(spans.max(1));
    for span_id in 1..spans.max(1) as i32 {
        let exit = span_id % 2 == 1;
        objects.push(SpanObject {
            span_id,
            parent_span_id: 0,
            start_time: now - 40 + i64::from(span_id),
            end_time: now - 20 + i64::from(span_id),
            operation_name: if exit {
                "SELECT orders".to_string()
            } else {
                format!("OrderService.step{span_id}")
            },
            peer: if exit {
                "db:5432".into()
            } else {
                String::new()
            },
            span_type: if exit { 1 } else { 2 },
            span_layer: if exit { 1 } else { 0 },
            component_id: if exit { 22 } else { 0 },
            tags: vec![KeyStringValuePair {
                key: "db.statement".into(),
                value: "SELECT * FROM orders WHERE id = ?".into(),
            }],
            ..Default::default()
        });
    }
    objects.push(SpanObject {
        span_id: 0,
        parent_span_id: -1,
        start_time: now - 50,
        end_time: now,
        operation_name: "/orders".into(),
        span_type: 0,
        span_layer: 3,
        component_id: 7002,
        tags: vec![
            KeyStringValuePair {
                key: "http.method".into(),
                value: "GET".into(),
            },
            KeyStringValuePair {
                key: "url".into(),
                value: "http://shop/orders?id=42".into(),
            },
        ],
        ..Default::default()
    });
    SegmentObject {
        trace_id,
        trace_segment_id: segment_id,
        spans: objects,
        service: service.into(),
        service_instance: instance.into(),
        is_size_limited: false,
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

pub async fn run(options: SegmentLoadOptions) -> anyhow::Result<SegmentLoadReport> {
    let channel = Channel::from_shared(options.target.clone())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let token_opt: Option<MetadataValue<_>> = match &options.agent_token_opt {
        Some(token) => Some(token.parse()?),
        None => None,
    };
    // Segment ids unique to this run: a collector refuses (and the OAP logs) a segment id
    // it already has.
    let run_id: Arc<str> = Arc::from(uuid::Uuid::new_v4().simple().to_string());
    let numbers = Arc::new(AtomicU64::new(0));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let streams = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let started = Instant::now();
    let until = started + options.duration;
    let mut callers = Vec::new();
    for caller in 0..options.concurrency.max(1) {
        let client = TraceSegmentReportServiceClient::new(channel.clone());
        let (numbers, acknowledged, streams) =
            (numbers.clone(), acknowledged.clone(), streams.clone());
        let (latencies, errors) = (latencies.clone(), errors.clone());
        let (options, token_opt, run_id) = (options.clone(), token_opt.clone(), run_id.clone());
        callers.push(tokio::spawn(async move {
            let mut client = client;
            let instance = format!("load-{caller}");
            let mut own = Vec::new();
            while Instant::now() < until {
                let batch: Vec<SegmentObject> = (0..options.segments_per_stream.max(1))
                    .map(|_| {
                        let number = numbers.fetch_add(1, Ordering::Relaxed);
                        segment(
                            &run_id,
                            &options.service,
                            &instance,
                            number,
                            options.spans_per_segment,
                        )
                    })
                    .collect();
                let count = batch.len() as u64;
                let mut request = tonic::Request::new(tokio_stream::iter(batch));
                // A collector that never answers must not hang the run.
                request.set_timeout(Duration::from_secs(30));
                if let Some(token) = &token_opt {
                    request
                        .metadata_mut()
                        .insert("authentication", token.clone());
                }
                let sent = Instant::now();
                match client.collect(request).await {
                    Ok(_) => {
                        own.push(sent.elapsed());
                        acknowledged.fetch_add(count, Ordering::Relaxed);
                        streams.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(status) => {
                        *errors
                            .lock()
                            .expect("not poisoned")
                            .entry(format!("{:?}", status.code()))
                            .or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            latencies.lock().expect("not poisoned").extend(own);
        }));
    }
    for caller in callers {
        caller.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = std::mem::take(&mut *latencies.lock().expect("not poisoned"));
    latencies.sort();
    let segments = acknowledged.load(Ordering::Relaxed);
    let errors = std::mem::take(&mut *errors.lock().expect("not poisoned"));
    Ok(SegmentLoadReport {
        segments_acknowledged: segments,
        streams_acknowledged: streams.load(Ordering::Relaxed),
        seconds,
        segments_per_second: segments as f64 / seconds,
        ack_latency_ms_p50: percentile(&latencies, 0.50),
        ack_latency_ms_p90: percentile(&latencies, 0.90),
        ack_latency_ms_p99: percentile(&latencies, 0.99),
        errors,
    })
}

pub fn render(report: &SegmentLoadReport) -> String {
    format!(
        "segments acknowledged: {} in {} streams over {:.1} s\n\
         throughput: {:.0} segments/s\n\
         stream ack latency: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms\n\
         errors: {:?}",
        report.segments_acknowledged,
        report.streams_acknowledged,
        report.seconds,
        report.segments_per_second,
        report.ack_latency_ms_p50,
        report.ack_latency_ms_p90,
        report.ack_latency_ms_p99,
        report.errors
    )
}
