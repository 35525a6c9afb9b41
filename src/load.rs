//! `skysnap load`: a load generator that speaks the agent protocol like real agents do.
//! A agents (service and instance names) each poll for their task and run S concurrent
//! `collectSnapshot` streams of B snapshots, with realistic stacks: Java-style frames
//! drawn from a fixed pool, and consecutive snapshots of a segment sharing most frames.
//! It reports snapshots/s, MB/s, stream ack latency percentiles and errors by gRPC code,
//! and at the end checks through the HTTP API that every acknowledged snapshot is there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::{BufMut as _, Bytes, BytesMut};
use prost::Message as _;
use serde_json::{json, Value};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Status;

use crate::grpc::raw::RawCodec;
use crate::load_stacks::{RealisticShape, Rng, StackMix};
use crate::proto::v3::profile_task_client::ProfileTaskClient;
use crate::proto::v3::{Commands, ProfileTaskCommandQuery, ThreadSnapshot, ThreadStack};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// gRPC address of skysnap, e.g. `http://127.0.0.1:11800`.
    pub target: String,
    /// HTTP API of skysnap for creating tasks and the final check; none = no check.
    pub http_opt: Option<String>,
    pub agent_token_opt: Option<String>,
    pub admin_token_opt: Option<String>,
    pub agents: usize,
    pub streams_per_agent: usize,
    pub snapshots_per_stream: i32,
    /// Which stacks the snapshots carry.
    pub stacks: StackChoice,
    /// Snapshots per second over all streams; 0 = as fast as possible.
    pub rate: u64,
    pub duration: Duration,
}

/// Which stacks `skysnap load` sends (see `crate::load_stacks`).
#[derive(Debug, Clone, PartialEq)]
pub enum StackChoice {
    /// Distinct segments over a Zipf-popular pool of stack shapes (the default).
    Realistic(RealisticShape),
    /// Each stream cycles through 4 segments' stacks of `depth` frames drawn from
    /// `frame_pool` signatures (the generator of earlier releases).
    Cycle { depth: usize, frame_pool: usize },
}

/// What one run measured.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LoadReport {
    pub snapshots_acknowledged: u64,
    pub streams_acknowledged: u64,
    pub bytes_acknowledged: u64,
    pub seconds: f64,
    pub snapshots_per_second: f64,
    pub megabytes_per_second: f64,
    pub ack_latency_ms_p50: f64,
    pub ack_latency_ms_p90: f64,
    pub ack_latency_ms_p99: f64,
    pub ack_latency_ms_max: f64,
    pub errors: HashMap<String, u64>,
    /// Acknowledged snapshots not found through the API; None when not checked.
    pub missing_opt: Option<u64>,
}

pub use crate::load_stacks::frame_pool;

/// The snapshots of one segment: a root-first stack of `depth` frames whose deepest
/// few frames change from one dump to the next, as a thread moves inside a request.
pub fn segment_snapshots(
    task_id: &str,
    segment_id: &str,
    count: i32,
    depth: usize,
    pool: &[String],
    seed: u64,
) -> Vec<ThreadSnapshot> {
    let mut rng = Rng::new(seed);
    let mut stack: Vec<String> = (0..depth)
        .map(|_| pool[rng.below(pool.len())].clone())
        .collect();
    let start_ms = crate::model::now_ms();
    (0..count)
        .map(|sequence| {
            let changing = 3.min(stack.len());
            let keep = stack.len() - changing;
            for frame in &mut stack[keep..] {
                if rng.below(2) == 0 {
                    *frame = pool[rng.below(pool.len())].clone();
                }
            }
            ThreadSnapshot {
                task_id: task_id.to_string(),
                trace_segment_id: segment_id.to_string(),
                time: start_ms + i64::from(sequence) * 10,
                sequence,
                stack: Some(ThreadStack {
                    code_signatures: stack.clone(),
                }),
            }
        })
        .collect()
}

/// Distinct segments' stacks each stream cycles through.
const STACK_TEMPLATES_PER_STREAM: u64 = 4;

/// Stacks of one segment, each already encoded as the `stack` field of a
/// `ThreadSnapshot`: the generator builds its stacks once and sends them many times,
/// so that the figures measure the server, not the generator's string copies.
pub struct EncodedStacks(Vec<Bytes>);

impl EncodedStacks {
    pub fn new(snapshots: &[ThreadSnapshot]) -> EncodedStacks {
        EncodedStacks(
            snapshots
                .iter()
                .map(|snapshot| {
                    let mut field = BytesMut::new();
                    let stack = snapshot.stack.as_ref();
                    prost::encoding::message::encode(
                        crate::load_stacks::STACK_FIELD,
                        stack.unwrap_or(&ThreadStack::default()),
                        &mut field,
                    );
                    field.freeze()
                })
                .collect(),
        )
    }

    /// The wire bytes of each snapshot of a segment.
    pub fn messages(&self, task_id: &str, segment_id: &str, start_ms: i64) -> Vec<Bytes> {
        segment_messages(self.0.iter(), task_id, segment_id, start_ms)
    }
}

/// The wire bytes of each snapshot of a segment, one per stack field given: the small
/// fields encoded fresh, then the stack field; byte for byte what
/// `ThreadSnapshot::encode` writes. Dumps are 10 ms apart.
pub fn segment_messages<'a>(
    stack_fields: impl Iterator<Item = &'a Bytes>,
    task_id: &str,
    segment_id: &str,
    start_ms: i64,
) -> Vec<Bytes> {
    stack_fields
        .enumerate()
        .map(|(sequence, stack_field)| {
            let sequence = sequence as i32;
            let head = ThreadSnapshot {
                task_id: task_id.to_string(),
                trace_segment_id: segment_id.to_string(),
                time: start_ms + i64::from(sequence) * 10,
                sequence,
                stack: None,
            };
            let mut message = BytesMut::with_capacity(head.encoded_len() + stack_field.len());
            head.encode(&mut message).expect("a BytesMut grows");
            message.put_slice(stack_field);
            message.freeze()
        })
        .collect()
}

/// One `collectSnapshot` stream of already-encoded snapshots.
async fn collect_encoded(
    channel: Channel,
    messages: Vec<Bytes>,
    token_opt: &Option<String>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(format!("channel not ready: {error}")))?;
    let request = with_token(tokio_stream::iter(messages), token_opt)
        .map_err(|error| Status::invalid_argument(error.to_string()))?;
    let path = PathAndQuery::from_static("/skywalking.v3.ProfileTask/collectSnapshot");
    // The snapshots go as they were encoded once; the server sees the bytes a prost
    // client would send. The `Commands` reply is checked to be one.
    let reply = grpc.client_streaming(request, path, RawCodec).await?;
    Commands::decode(reply.into_inner())
        .map(|_| ())
        .map_err(|error| Status::internal(format!("cannot decode Commands: {error}")))
}

fn with_token<T>(message: T, token_opt: &Option<String>) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token_opt {
        request.metadata_mut().insert(
            "authentication",
            MetadataValue::try_from(token.as_str()).context("agent token")?,
        );
    }
    Ok(request)
}

/// A task for the service: an existing one that still runs, or a new 15-minute one.
async fn task_for(
    http: &str,
    admin_token_opt: &Option<String>,
    service: &str,
) -> anyhow::Result<String> {
    let client = reqwest::Client::new();
    let authorized = |request: reqwest::RequestBuilder| match admin_token_opt {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    let body = json!({"service": service, "endpoint_name": "/load", "duration": 15,
        "min_duration_threshold": 0, "dump_period": 10, "max_sampling_count": 9});
    let response = authorized(client.post(format!("{http}/api/v1/tasks")).json(&body))
        .send()
        .await?;
    if response.status().is_success() {
        let task: Value = response.json().await?;
        return Ok(task["id"].as_str().unwrap_or_default().to_string());
    }
    // Overlap: the service already has a running task; use the newest.
    let tasks: Value = authorized(
        client
            .get(format!("{http}/api/v1/tasks"))
            .query(&[("service", service)]),
    )
    .send()
    .await?
    .json()
    .await?;
    tasks[0]["id"]
        .as_str()
        .map(str::to_string)
        .context("no task for the load service")
}

/// Segment snapshot counts of a task, through the API.
async fn stored_counts(
    http: &str,
    admin_token_opt: &Option<String>,
    task_id: &str,
) -> anyhow::Result<HashMap<String, u64>> {
    let mut request = reqwest::Client::new().get(format!("{http}/api/v1/tasks/{task_id}/segments"));
    if let Some(token) = admin_token_opt {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status();
    let segments: Value = response.json().await?;
    // An error answer (the store not back yet, say) is no count: never read it as zero.
    anyhow::ensure!(
        status.is_success(),
        "GET /api/v1/tasks/{task_id}/segments answered {status}: {segments}"
    );
    Ok(segments
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| {
                    (
                        s["segment_id"].as_str().unwrap_or_default().to_string(),
                        s["snapshot_count"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1_000.0
}

/// The stacks of a run, built once and shared by its streams.
enum StreamStacks {
    Realistic(Arc<StackMix>),
    /// Per stream, its segments' stacks.
    Cycle(Vec<Arc<Vec<EncodedStacks>>>, usize),
}

/// What one stream sends: its own draw from the realistic mix, or its cycle.
enum OneStream {
    Realistic(Arc<StackMix>, Rng),
    Cycle(Arc<Vec<EncodedStacks>>, usize),
}

impl StreamStacks {
    fn build(options: &LoadOptions) -> StreamStacks {
        match &options.stacks {
            StackChoice::Realistic(shape) => {
                StreamStacks::Realistic(Arc::new(StackMix::realistic(*shape, 1)))
            }
            StackChoice::Cycle { depth, frame_pool } => {
                let pool = crate::load_stacks::frame_pool(*frame_pool);
                let mut streams = Vec::new();
                for agent in 0..options.agents {
                    for stream in 0..options.streams_per_agent {
                        let templates: Vec<EncodedStacks> = (0..STACK_TEMPLATES_PER_STREAM)
                            .map(|template| {
                                let seed = (agent as u64) << 40 ^ (stream as u64) << 20 ^ template;
                                EncodedStacks::new(&segment_snapshots(
                                    "",
                                    "",
                                    options.snapshots_per_stream,
                                    *depth,
                                    &pool,
                                    seed,
                                ))
                            })
                            .collect();
                        streams.push(Arc::new(templates));
                    }
                }
                StreamStacks::Cycle(streams, options.streams_per_agent)
            }
        }
    }

    fn for_stream(&self, agent: usize, stream: usize) -> OneStream {
        match self {
            StreamStacks::Realistic(mix) => OneStream::Realistic(
                mix.clone(),
                Rng::new((agent as u64) << 32 ^ stream as u64 ^ 0x5eed),
            ),
            StreamStacks::Cycle(streams, per_agent) => {
                OneStream::Cycle(streams[agent * per_agent + stream].clone(), 0)
            }
        }
    }
}

impl OneStream {
    /// The wire bytes of the next segment's snapshots.
    fn next_segment(&mut self, task_id: &str, segment_id: &str, count: usize) -> Vec<Bytes> {
        let now = crate::model::now_ms();
        match self {
            OneStream::Realistic(mix, rng) => {
                let stacks = mix.segment(rng, count);
                segment_messages(
                    stacks.iter().map(|&index| mix.encoded(index)),
                    task_id,
                    segment_id,
                    now,
                )
            }
            OneStream::Cycle(templates, round) => {
                *round += 1;
                templates[*round % templates.len()].messages(task_id, segment_id, now)
            }
        }
    }
}

pub async fn run(options: LoadOptions) -> anyhow::Result<LoadReport> {
    if options.agents == 0 || options.streams_per_agent == 0 || options.snapshots_per_stream <= 0 {
        bail!("--agents, --streams and --batch must be greater than zero");
    }
    let endpoint = Channel::from_shared(options.target.clone())
        .context("--target must be a URL such as http://127.0.0.1:11800")?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();

    // Each agent has its own connection and polls like a real one; tasks come from the
    // API when it is given.
    let mut agents = Vec::new();
    for agent in 0..options.agents {
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach skysnap at {}", options.target))?;
        let service = format!("load-service-{agent}");
        let task_id = match &options.http_opt {
            Some(http) => task_for(http, &options.admin_token_opt, &service).await?,
            None => format!("load-task-{run_id}-{agent}"),
        };
        let query = ProfileTaskCommandQuery {
            service: service.clone(),
            service_instance: format!("load-instance-{agent}"),
            last_command_time: -1,
        };
        ProfileTaskClient::new(channel.clone())
            .get_profile_task_commands(with_token(query, &options.agent_token_opt)?)
            .await
            .context("getProfileTaskCommands")?;
        agents.push((task_id, channel));
    }

    // Every stack is encoded once, before the clock starts, so that each round costs the
    // generator a few copies.
    let stacks = StreamStacks::build(&options);
    let started = Instant::now();
    let deadline = started + options.duration;
    let sent = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let errors: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let acknowledged: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    let bytes = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for (agent, (task_id, channel)) in agents.iter().enumerate() {
        for stream in 0..options.streams_per_agent {
            let mut stream_stacks = stacks.for_stream(agent, stream);
            let (channel, options) = (channel.clone(), options.clone());
            let (sent, latencies, errors, acknowledged, bytes) = (
                sent.clone(),
                latencies.clone(),
                errors.clone(),
                acknowledged.clone(),
                bytes.clone(),
            );
            let task_id = task_id.clone();
            let run_id = run_id.clone();
            workers.push(tokio::spawn(async move {
                let mut round: u64 = 0;
                while Instant::now() < deadline {
                    round += 1;
                    let batch = options.snapshots_per_stream as u64;
                    if options.rate > 0 {
                        // Wait until the run's total rate allows this stream.
                        let due =
                            sent.fetch_add(batch, Ordering::Relaxed) as f64 / options.rate as f64;
                        let wait = started + Duration::from_secs_f64(due);
                        if wait >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(wait.into()).await;
                    }
                    let segment = format!("{run_id}.{agent}.{stream}.{round}");
                    let messages = stream_stacks.next_segment(
                        &task_id,
                        &segment,
                        options.snapshots_per_stream as usize,
                    );
                    let size: u64 = messages.iter().map(|m| m.len() as u64).sum();
                    let begun = Instant::now();
                    match collect_encoded(channel.clone(), messages, &options.agent_token_opt).await
                    {
                        Ok(()) => {
                            latencies.lock().unwrap().push(begun.elapsed());
                            bytes.fetch_add(size, Ordering::Relaxed);
                            acknowledged.lock().unwrap().push((agent, segment));
                        }
                        Err(status) => {
                            *errors
                                .lock()
                                .unwrap()
                                .entry(format!("{:?}", status.code()))
                                .or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }));
        }
    }
    for worker in workers {
        worker.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    latencies.sort();
    let snapshots = acknowledged.len() as u64 * options.snapshots_per_stream as u64;
    let bytes = bytes.load(Ordering::Relaxed);
    let mut report = LoadReport {
        snapshots_acknowledged: snapshots,
        streams_acknowledged: acknowledged.len() as u64,
        bytes_acknowledged: bytes,
        seconds,
        snapshots_per_second: snapshots as f64 / seconds,
        megabytes_per_second: bytes as f64 / seconds / 1_000_000.0,
        ack_latency_ms_p50: percentile(&latencies, 0.50),
        ack_latency_ms_p90: percentile(&latencies, 0.90),
        ack_latency_ms_p99: percentile(&latencies, 0.99),
        ack_latency_ms_max: latencies
            .last()
            .map(|d| d.as_secs_f64() * 1_000.0)
            .unwrap_or(0.0),
        errors: std::mem::take(&mut *errors.lock().unwrap()),
        missing_opt: None,
    };
    if let Some(http) = &options.http_opt {
        let mut stored: HashMap<usize, HashMap<String, u64>> = HashMap::new();
        for (agent, (task_id, _)) in agents.iter().enumerate() {
            // The store may still be coming back (a test stopped it): ask again for a
            // while before giving up.
            let mut attempt = 0;
            let counts = loop {
                attempt += 1;
                match stored_counts(http, &options.admin_token_opt, task_id).await {
                    Ok(counts) => break counts,
                    Err(error) if attempt < 30 => {
                        tracing::warn!(%error, attempt, "cannot count what was stored yet");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(error) => return Err(error),
                }
            };
            stored.insert(agent, counts);
        }
        let expected = options.snapshots_per_stream as u64;
        let missing = acknowledged
            .iter()
            .map(|(agent, segment)| {
                expected.saturating_sub(stored[agent].get(segment).copied().unwrap_or(0))
            })
            .sum();
        report.missing_opt = Some(missing);
    }
    Ok(report)
}

/// The report as a person reads it.
pub fn render(report: &LoadReport) -> String {
    let mut errors: Vec<_> = report
        .errors
        .iter()
        .map(|(code, count)| format!("{code}={count}"))
        .collect();
    errors.sort();
    format!(
        "snapshots acknowledged: {} in {} streams over {:.1} s\n\
         throughput: {:.0} snapshots/s, {:.1} MB/s\n\
         stream ack latency ms: p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}\n\
         errors: {}\n\
         missing: {}",
        report.snapshots_acknowledged,
        report.streams_acknowledged,
        report.seconds,
        report.snapshots_per_second,
        report.megabytes_per_second,
        report.ack_latency_ms_p50,
        report.ack_latency_ms_p90,
        report.ack_latency_ms_p99,
        report.ack_latency_ms_max,
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(", ")
        },
        report
            .missing_opt
            .map(|m| m.to_string())
            .unwrap_or_else(|| "not checked".to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_load_segments_share_most_frames() {
        let pool = frame_pool(3_000);
        let snapshots = segment_snapshots("t", "s", 20, 40, &pool, 7);
        assert_eq!(snapshots.len(), 20);
        for pair in snapshots.windows(2) {
            let a = &pair[0].stack.as_ref().unwrap().code_signatures;
            let b = &pair[1].stack.as_ref().unwrap().code_signatures;
            assert_eq!(a.len(), 40);
            assert_eq!(a[..37], b[..37], "only the deepest frames move");
            assert!(pair[1].time > pair[0].time && pair[1].sequence == pair[0].sequence + 1);
        }
        // Reproducible from the seed.
        assert_eq!(
            snapshots[5].stack,
            segment_snapshots("t", "s", 20, 40, &pool, 7)[5].stack
        );
    }

    #[test]
    fn test_load_encoded_messages_are_prost_bytes() {
        let pool = frame_pool(100);
        let snapshots = segment_snapshots("", "", 5, 40, &pool, 3);
        let stacks = EncodedStacks::new(&snapshots);
        let messages = stacks.messages("task-1", "segment-1", 1_000);
        assert_eq!(messages.len(), 5);
        for (sequence, (bytes, original)) in messages.iter().zip(&snapshots).enumerate() {
            let expected = ThreadSnapshot {
                task_id: "task-1".into(),
                trace_segment_id: "segment-1".into(),
                time: 1_000 + sequence as i64 * 10,
                sequence: sequence as i32,
                stack: original.stack.clone(),
            };
            assert_eq!(bytes.as_ref(), expected.encode_to_vec().as_slice());
        }
    }

    #[test]
    fn test_load_percentiles() {
        let sorted: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&sorted, 0.5), 51.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
