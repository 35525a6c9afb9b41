//! `skywalking.v3.ProfileTask` and its package-less twin: task commands from the
//! downstream cache, snapshot streams into the shards, finish reports into the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status, Streaming};

use super::{status, InFlight};
use crate::actors::shard::{shard_for, Ingest};
use crate::actors::task_by_id::{GetTask, LookUpTask, PeekTask, Peeked};
use crate::actors::task_cache::GetServiceTasks;
use crate::actors::task_log::RecordLog;
use crate::config::Config;
use crate::model::{now_ms, wire_to_record, Operation, SnapshotRecord, Stack, Task, TaskLog};
use crate::pipeline::Handles;
use crate::proto::compat;
use crate::proto::v3::profile_task_server::ProfileTask;
use crate::proto::v3::{
    Command, Commands, KeyStringValuePair, ProfileTaskCommandQuery, ProfileTaskFinishReport,
    ThreadSnapshot,
};
use crate::telemetry;
use crate::wire::{decode_snapshot, WireSnapshot};

/// Name of the command SkyWalking agents read profile tasks from.
pub const PROFILE_TASK_COMMAND: &str = "ProfileTaskQuery";

#[derive(Clone)]
pub struct ProfileService {
    handles: Handles,
    in_flight: Arc<InFlight>,
    max_stack_depth: usize,
    /// Whether records keep the agent's message bytes (a sink sends them on as they are).
    keep_encoded: bool,
    /// Snapshots sent to a shard in one message at most.
    chunk_snapshots: usize,
    /// `skysnap_shard_mailbox_depth` of each shard.
    mailbox_depth: Arc<[metrics::Gauge]>,
    /// Handles resolved once: a `counter!` lookup per snapshot shows on the hot path.
    snapshots_received: metrics::Counter,
    snapshots_unknown_task: metrics::Counter,
    limits: Arc<StreamLimits>,
}

/// Task ids a stream remembers as known or not; more are asked again each time.
const KNOWN_TASKS_PER_STREAM: usize = 1_024;

/// What all snapshot streams share: the global stream and byte limits, and the rate of
/// store reads for unknown task ids.
pub struct StreamLimits {
    streams: Arc<Semaphore>,
    max_streams: usize,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    bytes_wait: Duration,
    lookups: RateLimit,
}

impl StreamLimits {
    pub fn from_config(config: &Config) -> StreamLimits {
        let max_bytes = config
            .grpc
            .max_snapshot_bytes_in_flight
            .min(u32::MAX as usize)
            .min(Semaphore::MAX_PERMITS);
        StreamLimits {
            streams: Arc::new(Semaphore::new(config.grpc.max_snapshot_streams.get())),
            max_streams: config.grpc.max_snapshot_streams.get(),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_bytes,
            bytes_wait: Duration::from_millis(config.grpc.snapshot_bytes_wait_ms.get()),
            lookups: RateLimit::per_second(config.tasks.unknown_lookups_per_second),
        }
    }
}

/// At most N events per wall-clock second.
struct RateLimit {
    per_second: u32,
    /// (second, events in it)
    window: std::sync::Mutex<(u64, u32)>,
}

impl RateLimit {
    fn per_second(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            window: std::sync::Mutex::new((0, 0)),
        }
    }

    fn try_take(&self) -> bool {
        let second = (now_ms() / 1000) as u64;
        let mut window = self.window.lock().expect("rate limit lock not poisoned");
        if window.0 != second {
            *window = (second, 0);
        }
        if window.1 >= self.per_second {
            return false;
        }
        window.1 += 1;
        true
    }
}

impl ProfileService {
    pub fn new(handles: Handles, in_flight: Arc<InFlight>, config: &Config) -> ProfileService {
        let max_stack_depth = config.grpc.max_stack_depth;
        let chunk_snapshots = config.pipeline.stream_chunk_snapshots;
        let keep_encoded = handles.sinks.iter().any(|sink| sink.wants_encoded());
        let mailbox_depth = (0..handles.shards.len())
            .map(|shard| metrics::gauge!(telemetry::SHARD_MAILBOX_DEPTH, "shard" => shard.to_string()))
            .collect();
        ProfileService {
            mailbox_depth,
            snapshots_received: metrics::counter!(telemetry::SNAPSHOTS_RECEIVED),
            snapshots_unknown_task: metrics::counter!(telemetry::SNAPSHOTS_UNKNOWN_TASK),
            handles,
            in_flight,
            max_stack_depth: max_stack_depth.get(),
            keep_encoded,
            chunk_snapshots: chunk_snapshots.get(),
            limits: Arc::new(StreamLimits::from_config(config)),
        }
    }
}

/// The `ProfileTaskQuery` command for a task: all nine args, always, as strings.
pub fn task_command(task: &Task) -> Command {
    let arg = |key: &str, value: String| KeyStringValuePair {
        key: key.to_string(),
        value,
    };
    Command {
        command: PROFILE_TASK_COMMAND.to_string(),
        args: vec![
            arg("SerialNumber", uuid::Uuid::new_v4().to_string()),
            arg("TaskId", task.id.clone()),
            arg("EndpointName", task.endpoint_name.clone()),
            arg("Duration", task.duration.to_string()),
            arg(
                "MinDurationThreshold",
                task.min_duration_threshold.to_string(),
            ),
            arg("DumpPeriod", task.dump_period.to_string()),
            arg("MaxSamplingCount", task.max_sampling_count.to_string()),
            arg("StartTime", task.start_time.to_string()),
            arg("CreateTime", task.create_time.to_string()),
        ],
    }
}

/// Decrements the open-stream gauge however the stream ends.
struct StreamGauge;

impl StreamGauge {
    fn open() -> StreamGauge {
        metrics::gauge!(telemetry::STREAMS_ACTIVE).increment(1.0);
        StreamGauge
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!(telemetry::STREAMS_ACTIVE).decrement(1.0);
    }
}

impl ProfileService {
    async fn commands(&self, query: ProfileTaskCommandQuery) -> Result<Commands, Status> {
        let _call = self.in_flight.enter();
        if query.service.is_empty() {
            return Err(Status::invalid_argument("service must not be empty"));
        }
        let tasks = self
            .handles
            .task_cache
            .send(GetServiceTasks {
                service: query.service.clone(),
            })
            .await
            .map_err(|error| status::from_mailbox(&error))?;
        let now = now_ms();
        let mut commands = Vec::new();
        for task in tasks
            .iter()
            .filter(|task| task.create_time > query.last_command_time)
        {
            // The NOTIFIED log is handed off without waiting: the writer takes it at once
            // or its mailbox is full. Full, the command is held back to the agent's next
            // poll (its lastCommandTime stays older than the task), so no task reaches an
            // agent without its log; NOTIFIED is idempotent.
            let log = TaskLog::new(task, &query.service_instance, Operation::Notified, now);
            if self.handles.task_log.try_send(RecordLog(log)).is_err() {
                metrics::counter!(telemetry::TASKS_NOTIFY_DEFERRED).increment(1);
                continue;
            }
            commands.push(task_command(task));
            metrics::counter!(telemetry::TASKS_NOTIFIED).increment(1);
        }
        Ok(Commands { commands })
    }

    /// Reads a snapshot stream (decoded in place by `grpc::snapshots`), hands its
    /// snapshots to the shards, and answers once every one of them is committed.
    pub async fn collect<S>(&self, stream: S) -> Result<Commands, Status>
    where
        S: futures::Stream<Item = Result<WireSnapshot, Status>> + Unpin,
    {
        let _call = self.in_flight.enter();
        let Ok(_stream_permit) = self.limits.streams.clone().try_acquire_owned() else {
            metrics::counter!(telemetry::STREAMS_REFUSED, "reason" => "streams").increment(1);
            metrics::counter!(telemetry::STREAMS_FAILED, "code" => "resource_exhausted")
                .increment(1);
            return Err(Status::resource_exhausted(format!(
                "too many snapshot streams open at once (grpc.max_snapshot_streams = {}); \
                 send this batch again later",
                self.limits.max_streams
            )));
        };
        let _gauge = StreamGauge::open();
        let shards = self.handles.shards.clone();
        let mut by_shard: Vec<Vec<SnapshotRecord>> = vec![Vec::new(); shards.len()];
        let mut receipts = Vec::new();
        // Room under `grpc.max_snapshot_bytes_in_flight`, held until the stream's
        // snapshots are acknowledged.
        let mut byte_permits = Vec::new();
        // Whether each task id of this stream is known; asked once per task per stream
        // (for at most `KNOWN_TASKS_PER_STREAM` ids, so random ids cannot grow it).
        let mut known_tasks: HashMap<String, bool> = HashMap::new();
        let mut stream_error: Option<Status> = None;
        // Why snapshots decoded but not handed over were dropped, if the read stops early.
        let mut leftover_reason = "stream_broken";
        // Agents send a segment's snapshots together: the index is told once per run.
        let mut last_segment: Option<String> = None;
        // A thread parked in the same frames repeats its stack: consecutive equal stacks
        // of a stream share one copy (the later message's bytes are let go at once).
        let mut last_stack: Option<Stack> = None;
        let mut chunks = stream.ready_chunks(self.chunk_snapshots);

        'read: while let Some(chunk) = chunks.next().await {
            let decoded = chunk.iter().take_while(|item| item.is_ok()).count();
            self.snapshots_received.increment(decoded as u64);
            for item in chunk {
                let snapshot = match item {
                    Ok(snapshot) => snapshot,
                    Err(error) => {
                        stream_error = Some(decode_failure(error));
                        break 'read;
                    }
                };
                let mut record =
                    match wire_to_record(snapshot, self.max_stack_depth, self.keep_encoded) {
                        Ok(record) => record,
                        Err(reason) => {
                            telemetry::snapshot_rejected(reason);
                            continue;
                        }
                    };
                match &last_stack {
                    Some(last) if last.id() == record.stack.id() => record.stack = last.clone(),
                    _ => last_stack = Some(record.stack.clone()),
                }
                if last_segment.as_deref() != Some(record.segment_id.as_str()) {
                    self.handles.segments.note_snapshot(&record.segment_id);
                    last_segment = Some(record.segment_id.clone());
                }
                if !self.is_known_task(&record.task_id, &mut known_tasks).await {
                    self.snapshots_unknown_task.increment(1);
                }
                let shard = shard_for(&record.task_id, &record.segment_id, shards.len());
                by_shard[shard].push(record);
            }
            // Hand over what this read gathered; `send` waits while a shard's mailbox
            // is full, which stops reading the stream: backpressure to the agent.
            for (shard, records) in by_shard.iter_mut().enumerate() {
                if records.is_empty() {
                    continue;
                }
                let records = std::mem::take(records);
                let count = records.len();
                let bytes = records
                    .iter()
                    .map(SnapshotRecord::approximate_bytes)
                    .sum::<usize>()
                    .clamp(1, self.limits.max_bytes) as u32;
                let room = tokio::time::timeout(
                    self.limits.bytes_wait,
                    self.limits.bytes.clone().acquire_many_owned(bytes),
                )
                .await;
                match room {
                    Ok(Ok(permit)) => byte_permits.push(permit),
                    _ => {
                        telemetry::snapshots_refused("overloaded", count);
                        metrics::counter!(telemetry::STREAMS_REFUSED, "reason" => "bytes")
                            .increment(1);
                        leftover_reason = "overloaded";
                        stream_error.get_or_insert(Status::resource_exhausted(format!(
                            "too many snapshot bytes waiting for the store \
                             (grpc.max_snapshot_bytes_in_flight = {}); send the rest later",
                            self.limits.max_bytes
                        )));
                        break 'read;
                    }
                }
                // Counts the message from the send until the shard took it: queued in
                // the mailbox or waiting for room there.
                self.mailbox_depth[shard].increment(1.0);
                let sent = shards[shard].send(Ingest { records }).await;
                self.mailbox_depth[shard].decrement(1.0);
                match sent {
                    Ok(receipt) => receipts.push(receipt),
                    Err(error) => {
                        telemetry::snapshots_refused("shutting_down", count);
                        leftover_reason = "shutting_down";
                        stream_error.get_or_insert(status::from_mailbox(&error));
                        break 'read;
                    }
                }
            }
        }
        // Snapshots decoded but not handed over (the stream broke mid-read, or the read
        // stopped) are counted, so that received = committed + rejected + refused.
        let leftover: usize = by_shard.iter().map(Vec::len).sum();
        if leftover > 0 {
            telemetry::snapshots_refused(leftover_reason, leftover);
        }
        // Every handed-over snapshot is committed (or failed) before the stream is
        // answered, also when the stream itself broke.
        let mut commit_error: Option<Status> = None;
        for receipt in receipts {
            let outcome = receipt.await.unwrap_or_else(|_| {
                Err(crate::actors::sink::SinkError {
                    sink: "shard",
                    message: "shard stopped before the commit".to_string(),
                    retriable: true,
                })
            });
            if let Err(error) = outcome {
                commit_error.get_or_insert(status::from_sink(&error));
            }
        }
        drop(byte_permits);
        if let Some(error) = stream_error.or(commit_error) {
            metrics::counter!(telemetry::STREAMS_FAILED, "code" => code_label(error.code()))
                .increment(1);
            return Err(error);
        }
        Ok(Commands::default())
    }

    /// Whether this replica knows the task, from memory only: the by-id cache answers
    /// from memory, so a stream never waits on the store for it. An id no cache knows
    /// counts as unknown now and is looked up in the background (filling the cache or
    /// its short negative cache), at most `tasks.unknown_lookups_per_second`.
    async fn is_known_task(&self, task_id: &str, known_tasks: &mut HashMap<String, bool>) -> bool {
        if let Some(known) = known_tasks.get(task_id) {
            return *known;
        }
        let peeked = self
            .handles
            .by_id
            .send(PeekTask {
                id: task_id.to_string(),
            })
            .await
            .unwrap_or(Peeked::NotCached);
        let known = match peeked {
            Peeked::Known => true,
            Peeked::Missing => false,
            Peeked::NotCached => {
                let looked_up = self.limits.lookups.try_take()
                    && self
                        .handles
                        .by_id
                        .try_send(LookUpTask {
                            id: task_id.to_string(),
                        })
                        .is_ok();
                if !looked_up {
                    metrics::counter!(telemetry::TASK_LOOKUPS, "result" => "skipped").increment(1);
                }
                false
            }
        };
        if known_tasks.len() < KNOWN_TASKS_PER_STREAM {
            known_tasks.insert(task_id.to_string(), known);
        }
        known
    }

    async fn finish(&self, report: ProfileTaskFinishReport) -> Result<Commands, Status> {
        let _call = self.in_flight.enter();
        let task = self
            .handles
            .by_id
            .send(GetTask {
                id: report.task_id.clone(),
            })
            .await
            .map_err(|error| status::from_mailbox(&error))?
            .map_err(|error| status::from_store(&error))?;
        let Some(task) = task else {
            tracing::info!(task_id = %report.task_id, "finish report for an unknown task");
            metrics::counter!(telemetry::TASK_FINISH_UNKNOWN).increment(1);
            return Ok(Commands::default());
        };
        let log = TaskLog::new(
            &task,
            &report.service_instance,
            Operation::ExecutionFinished,
            now_ms(),
        );
        self.handles
            .task_log
            .send(RecordLog(log))
            .await
            .map_err(|error| status::from_mailbox(&error))?;
        Ok(Commands::default())
    }
}

/// A broken stream (bad protobuf, oversized message): the client's fault, said so.
fn decode_failure(error: Status) -> Status {
    telemetry::snapshot_rejected("malformed");
    match error.code() {
        tonic::Code::Internal | tonic::Code::Unknown => Status::invalid_argument(format!(
            "malformed ThreadSnapshot stream: {}",
            error.message()
        )),
        _ => error,
    }
}

fn code_label(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::OutOfRange => "out_of_range",
        tonic::Code::ResourceExhausted => "resource_exhausted",
        tonic::Code::Cancelled => "cancelled",
        _ => "other",
    }
}

/// Both generated `ProfileTask` traits (v3 and the package-less compat one) have the
/// same methods over the same messages; one body serves both.
macro_rules! impl_profile_task {
    ($trait_path:path) => {
        #[tonic::async_trait]
        impl $trait_path for ProfileService {
            async fn get_profile_task_commands(
                &self,
                request: Request<ProfileTaskCommandQuery>,
            ) -> Result<Response<Commands>, Status> {
                self.commands(request.into_inner()).await.map(Response::new)
            }

            /// Not reached while `grpc::snapshots` serves this path; kept working
            /// (each message encoded again and read in place) for the generated route.
            async fn collect_snapshot(
                &self,
                request: Request<Streaming<ThreadSnapshot>>,
            ) -> Result<Response<Commands>, Status> {
                let stream = request.into_inner().map(|item| {
                    item.and_then(|snapshot| {
                        decode_snapshot(prost::Message::encode_to_vec(&snapshot).into())
                            .map_err(|error| Status::invalid_argument(error.to_string()))
                    })
                });
                self.collect(stream).await.map(Response::new)
            }

            async fn report_task_finish(
                &self,
                request: Request<ProfileTaskFinishReport>,
            ) -> Result<Response<Commands>, Status> {
                self.finish(request.into_inner()).await.map(Response::new)
            }
        }
    };
}

impl_profile_task!(ProfileTask);
impl_profile_task!(compat::profile_task_server::ProfileTask);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_task_command_has_all_nine_args() {
        let task = Task {
            id: "t1".into(),
            service: "svc".into(),
            endpoint_name: "/slow".into(),
            start_time: 10,
            duration: 2,
            min_duration_threshold: 100,
            dump_period: 20,
            max_sampling_count: 5,
            create_time: 9,
        };
        let command = task_command(&task);
        assert_eq!(command.command, "ProfileTaskQuery");
        let args: HashMap<_, _> = command
            .args
            .iter()
            .map(|a| (a.key.as_str(), a.value.as_str()))
            .collect();
        assert_eq!(args.len(), 9);
        assert_eq!(args["TaskId"], "t1");
        assert_eq!(args["EndpointName"], "/slow");
        assert_eq!(args["Duration"], "2");
        assert_eq!(args["MinDurationThreshold"], "100");
        assert_eq!(args["DumpPeriod"], "20");
        assert_eq!(args["MaxSamplingCount"], "5");
        assert_eq!(args["StartTime"], "10");
        assert_eq!(args["CreateTime"], "9");
        assert!(uuid::Uuid::parse_str(args["SerialNumber"]).is_ok());
    }
}
