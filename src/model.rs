//! The records skysnap keeps: profile tasks, their lifecycle logs and thread snapshots,
//! with the time buckets that retention works on (SPEC §4).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::{Deserialize, Serialize};

use crate::proto::v3::ThreadSnapshot;
use crate::wire::WireSnapshot;

/// Milliseconds in one minute, the unit of a task's `duration`.
pub const MINUTE_MS: i64 = 60_000;

/// A profile task: "profile endpoint E of service S for D minutes".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub service: String,
    pub endpoint_name: String,
    /// Epoch milliseconds at which agents start profiling.
    pub start_time: i64,
    /// Minutes the task runs.
    pub duration: i32,
    /// Milliseconds a request must already have run before its thread is dumped.
    pub min_duration_threshold: i32,
    /// Milliseconds between two dumps of one thread.
    pub dump_period: i32,
    /// Segments an agent instance samples at most for this task.
    pub max_sampling_count: i32,
    /// Epoch milliseconds of creation; agents poll with the newest one they know.
    pub create_time: i64,
}

impl Task {
    /// Epoch milliseconds at which the task stops profiling.
    pub fn end_time(&self) -> i64 {
        self.start_time + i64::from(self.duration) * MINUTE_MS
    }

    /// Whether `[start, end]` of the two tasks share an instant (SkyWalking treats a
    /// task that ends exactly when the next starts as overlapping).
    pub fn overlaps(&self, start_time: i64, end_time: i64) -> bool {
        self.start_time <= end_time && self.end_time() >= start_time
    }

    /// Minute bucket of `start_time`, the task row's time bucket.
    pub fn time_bucket(&self) -> i64 {
        minute_bucket(self.start_time)
    }

    /// Second bucket of the task's end, shared by its log rows so that they expire with it.
    pub fn log_time_bucket(&self) -> i64 {
        second_bucket(self.end_time())
    }
}

/// What an agent instance did with a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Operation {
    /// The task was handed to the instance in a `ProfileTaskQuery` command.
    Notified = 1,
    /// The instance reported that it finished the task.
    ExecutionFinished = 2,
}

impl Operation {
    pub fn code(self) -> i32 {
        self as i32
    }

    pub fn name(self) -> &'static str {
        match self {
            Operation::Notified => "NOTIFIED",
            Operation::ExecutionFinished => "EXECUTION_FINISHED",
        }
    }

    pub fn from_code(code: i64) -> Option<Operation> {
        match code {
            1 => Some(Operation::Notified),
            2 => Some(Operation::ExecutionFinished),
            _ => None,
        }
    }
}

/// One lifecycle event of a task on one agent instance; keyed by (task, instance, operation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLog {
    pub task_id: String,
    pub service: String,
    pub instance: String,
    pub operation: Operation,
    /// Epoch milliseconds at which skysnap saw the event.
    pub operation_time: i64,
    /// Second bucket of the task's end (`Task::log_time_bucket`).
    pub time_bucket: i64,
}

impl TaskLog {
    pub fn new(task: &Task, instance: &str, operation: Operation, operation_time: i64) -> TaskLog {
        TaskLog {
            task_id: task.id.clone(),
            service: task.service.clone(),
            instance: instance.to_string(),
            operation,
            operation_time,
            time_bucket: task.log_time_bucket(),
        }
    }

    /// The log's identity: one row per key in every store.
    pub fn key(&self) -> TaskLogKey {
        (self.task_id.clone(), self.instance.clone(), self.operation)
    }
}

/// (task id, instance, operation).
pub type TaskLogKey = (String, String, Operation);

/// A stack's id in the stack dictionary: the 128-bit XXH3 hash of its frames, each
/// written as its length (u32, little endian) and then its bytes, so that no two frame
/// lists share an encoding. 128 bits put the chance of any collision among a billion
/// distinct stacks near 10^-21 (birthday bound n²/2^129); XXH3 hashes a 3 KB stack in
/// about 100 ns. It is not a cryptographic hash: an agent that wanted to could craft two
/// stacks with one id, and then the two would share one stored stack. Anything that can
/// send snapshots can already write any stack it likes, so that gives it nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StackId(pub [u8; 16]);

impl StackId {
    pub fn of<F: AsRef<[u8]>>(frames: &[F]) -> StackId {
        StackId::of_slices(frames.iter().map(AsRef::as_ref))
    }

    pub fn of_slices<'a>(frames: impl Iterator<Item = &'a [u8]>) -> StackId {
        let mut hasher = twox_hash::XxHash3_128::new();
        for frame in frames {
            hasher.write(&(frame.len() as u32).to_le_bytes());
            hasher.write(frame);
        }
        StackId(hasher.finish_128().to_be_bytes())
    }

    /// Lower-case hex, as SQL shows a 16-byte id (`hex()` in SQLite and ClickHouse).
    pub fn to_hex(self) -> String {
        self.0.iter().map(|byte| format!("{byte:02X}")).collect()
    }
}

/// A thread's stack, root first, as formatted by the agent, with its `StackId` worked
/// out once. Cloning shares it: the snapshots of a thread parked in the same frames hold
/// one copy. The frames are ranges of one buffer: the agent's message as it came (see
/// `crate::wire`), or a buffer of their own; each is checked as UTF-8 once, when the
/// stack is made, and read as `&str` without another check.
#[derive(Clone)]
pub struct Stack(Arc<StackData>);

struct StackData {
    id: StackId,
    buffer: Bytes,
    /// Each frame's bytes in `buffer`, root first; every one valid UTF-8.
    frames: Vec<Range<usize>>,
    /// Bytes of all frames together, summed once (batch byte limits ask per record).
    frame_bytes: usize,
}

impl Stack {
    pub fn from_frames<F: AsRef<str>>(frames: &[F]) -> Stack {
        let mut buffer = Vec::with_capacity(frames.iter().map(|f| f.as_ref().len()).sum());
        let mut ranges = Vec::with_capacity(frames.len());
        for frame in frames {
            let start = buffer.len();
            buffer.extend_from_slice(frame.as_ref().as_bytes());
            ranges.push(start..buffer.len());
        }
        Stack::new(Bytes::from(buffer), ranges)
    }

    /// A stack of `buffer`'s ranges; fails unless every range lies in the buffer and
    /// holds UTF-8. The only way in besides `from_frames` (whose frames are `str`), so
    /// every `Stack` has frames that are valid UTF-8.
    pub fn from_ranges(buffer: Bytes, frames: Vec<Range<usize>>) -> Result<Stack, InvalidFrame> {
        for range in &frames {
            let bytes = buffer.get(range.clone()).ok_or(InvalidFrame)?;
            std::str::from_utf8(bytes).map_err(|_| InvalidFrame)?;
        }
        Ok(Stack::new(buffer, frames))
    }

    /// Callers hold that every range is in `buffer` and valid UTF-8.
    fn new(buffer: Bytes, frames: Vec<Range<usize>>) -> Stack {
        let id = StackId::of_slices(frames.iter().map(|range| &buffer[range.clone()]));
        let frame_bytes = frames.iter().map(|range| range.len()).sum();
        Stack(Arc::new(StackData {
            id,
            buffer,
            frames,
            frame_bytes,
        }))
    }

    pub fn id(&self) -> StackId {
        self.0.id
    }

    pub fn len(&self) -> usize {
        self.0.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.frames.is_empty()
    }

    /// The frames, root first.
    pub fn frames(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.0.frames.iter().map(|range| self.frame_at(range))
    }

    pub fn frame(&self, index: usize) -> Option<&str> {
        self.0.frames.get(index).map(|range| self.frame_at(range))
    }

    fn frame_at(&self, range: &Range<usize>) -> &str {
        let bytes = &self.0.buffer[range.clone()];
        // SAFETY: a `Stack` is made only by `from_frames` (bytes of `str`s) or by
        // `from_ranges`, which checks every range as UTF-8; buffer and ranges never change.
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }

    pub fn to_vec(&self) -> Vec<String> {
        self.frames().map(str::to_string).collect()
    }

    /// Bytes of all frames together.
    pub fn frame_bytes(&self) -> usize {
        self.0.frame_bytes
    }

    /// Whether the two share one allocation (the same stack handed on, not an equal one).
    pub fn shares_with(&self, other: &Stack) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// A frame range outside its buffer, or not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a frame is not valid UTF-8")]
pub struct InvalidFrame;

impl FromIterator<String> for Stack {
    fn from_iter<I: IntoIterator<Item = String>>(frames: I) -> Stack {
        Stack::from(frames.into_iter().collect::<Vec<String>>())
    }
}

impl From<Vec<String>> for Stack {
    fn from(frames: Vec<String>) -> Stack {
        Stack::from_frames(&frames)
    }
}

impl PartialEq for Stack {
    fn eq(&self, other: &Stack) -> bool {
        self.id() == other.id() && self.frames().eq(other.frames())
    }
}

impl Eq for Stack {}

impl<F: AsRef<str>> PartialEq<[F]> for Stack {
    fn eq(&self, other: &[F]) -> bool {
        self.len() == other.len() && self.frames().zip(other).all(|(a, b)| a == b.as_ref())
    }
}

impl<F: AsRef<str>> PartialEq<Vec<F>> for Stack {
    fn eq(&self, other: &Vec<F>) -> bool {
        *self == other[..]
    }
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_list().entries(self.frames()).finish()
    }
}

/// As a list of strings, like the `Vec<String>` it replaces.
impl Serialize for Stack {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.frames())
    }
}

impl<'de> Deserialize<'de> for Stack {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Stack, D::Error> {
        Vec::<String>::deserialize(deserializer).map(Stack::from)
    }
}

/// One thread dump of a profiled segment; keyed by (task, segment, sequence).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub task_id: String,
    pub segment_id: String,
    pub sequence: i32,
    /// Epoch milliseconds of the dump.
    pub dump_time: i64,
    /// Frames, root first, as formatted by the agent.
    pub stack: Stack,
    /// The `ThreadSnapshot` bytes the agent sent, kept only when a sink sends them on as
    /// they came (Kafka), so that nothing is encoded twice.
    #[serde(skip)]
    pub encoded: Option<Bytes>,
}

impl SnapshotRecord {
    /// Second bucket of the dump time, the row's time bucket.
    pub fn time_bucket(&self) -> i64 {
        second_bucket(self.dump_time)
    }

    /// The day (yyyyMMdd, UTC) of the dump: what partitions and retention count in.
    pub fn day(&self) -> i64 {
        self.time_bucket() / 1_000_000
    }

    pub fn stack_id(&self) -> StackId {
        self.stack.id()
    }

    /// Approximate bytes the record holds, for batch byte limits. A stack shared with
    /// other records counts in each (an upper bound).
    pub fn approximate_bytes(&self) -> usize {
        self.task_id.len()
            + self.segment_id.len()
            + 16
            + self.stack.frame_bytes()
            + 16 * self.stack.len()
            + self.encoded.as_ref().map_or(0, Bytes::len)
    }
}

/// The last millisecond of 9999-12-31 UTC.
const MAX_DUMP_TIME_MS: i64 = 253_402_300_799_999;

/// The receiver's rules for one snapshot, in SkyWalking's order; the error is the
/// `reason` label of the rejection.
fn check_snapshot(
    task_id: &str,
    segment_id: &str,
    sequence: i32,
    time: i64,
    depth: usize,
    max_stack_depth: usize,
) -> Result<(), &'static str> {
    if task_id.is_empty() {
        return Err("empty_task_id");
    }
    if segment_id.is_empty() {
        return Err("empty_segment_id");
    }
    if sequence < 0 {
        return Err("negative_sequence");
    }
    // Past 9999-12-31 a time bucket is no longer yyyyMMddHHmmss (partitions and
    // retention count on it); found by fuzzing.
    if time <= 0 || time > MAX_DUMP_TIME_MS {
        return Err("invalid_time");
    }
    if depth > max_stack_depth {
        return Err("stack_too_deep");
    }
    Ok(())
}

/// Checks one decoded snapshot and makes its record; the error is the `reason` label of
/// the rejection.
pub fn to_record(
    snapshot: ThreadSnapshot,
    max_stack_depth: usize,
) -> Result<SnapshotRecord, &'static str> {
    let frames = snapshot
        .stack
        .map(|stack| stack.code_signatures)
        .unwrap_or_default();
    check_snapshot(
        &snapshot.task_id,
        &snapshot.trace_segment_id,
        snapshot.sequence,
        snapshot.time,
        frames.len(),
        max_stack_depth,
    )?;
    Ok(SnapshotRecord {
        task_id: snapshot.task_id,
        segment_id: snapshot.trace_segment_id,
        sequence: snapshot.sequence,
        dump_time: snapshot.time,
        stack: Stack::from(frames),
        encoded: None,
    })
}

/// The same for a snapshot read in place (`crate::wire`): the stack stays in the
/// message's bytes, and the bytes themselves are kept only with `keep_encoded`.
pub fn wire_to_record(
    snapshot: WireSnapshot,
    max_stack_depth: usize,
    keep_encoded: bool,
) -> Result<SnapshotRecord, &'static str> {
    check_snapshot(
        &snapshot.task_id,
        &snapshot.segment_id,
        snapshot.sequence,
        snapshot.time,
        snapshot.stack.len(),
        max_stack_depth,
    )?;
    Ok(SnapshotRecord {
        task_id: snapshot.task_id,
        segment_id: snapshot.segment_id,
        sequence: snapshot.sequence,
        dump_time: snapshot.time,
        stack: snapshot.stack,
        encoded: keep_encoded.then_some(snapshot.encoded),
    })
}

/// A profiled segment of a task, as listed by the API. The trace fields come from the
/// kept trace segment and are `None` until (unless) it has passed through skysnap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSummary {
    pub segment_id: String,
    pub snapshot_count: i64,
    pub first_dump_time: i64,
    pub last_dump_time: i64,
    pub trace_id: Option<String>,
    /// Operation name of the segment's first span.
    pub endpoint: Option<String>,
    /// Segment start time, ms since the epoch.
    pub start_time: Option<i64>,
    /// Milliseconds from the segment's start to its end.
    pub duration: Option<i64>,
    pub is_error: Option<bool>,
}

/// A trace segment with snapshots, kept with its spans as the agent reported them
/// (SkyWalking's `SegmentObject`), so that a person can see a profiled request's span
/// tree and analyse one span's time range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfiledSegment {
    pub segment_id: String,
    pub trace_id: String,
    pub service: String,
    pub instance: String,
    /// Operation name of the first span (span id 0), which SkyWalking calls the
    /// segment's endpoint and which profile tasks are matched against.
    pub endpoint: String,
    /// Earliest span start, ms since the epoch.
    pub start_time: i64,
    /// Latest span end, ms since the epoch.
    pub end_time: i64,
    /// `end_time - start_time`, ms.
    pub duration: i64,
    /// Any span flagged as an error.
    pub is_error: bool,
    /// In the order the agent sent them (SkyWalking agents send a span when it ends, so
    /// the first span usually comes last).
    pub spans: Vec<ProfiledSpan>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfiledSpan {
    pub span_id: i32,
    /// -1 for the segment's first span.
    pub parent_span_id: i32,
    pub operation_name: String,
    /// Remote address of an exit span; empty otherwise.
    pub peer: String,
    /// `Entry`, `Exit` or `Local`.
    pub span_type: String,
    /// `Unknown`, `Database`, `RPCFramework`, `Http`, `MQ`, `Cache` or `FAAS`.
    pub span_layer: String,
    /// SkyWalking's component id (e.g. 7002 for Python's http.server).
    pub component_id: i32,
    pub start_time: i64,
    pub end_time: i64,
    pub is_error: bool,
}

impl ProfiledSegment {
    /// The time bucket it is stored and expired under: the second of its start, like a
    /// snapshot's.
    pub fn time_bucket(&self) -> i64 {
        second_bucket(self.start_time)
    }
}

/// A service and the agent instances that reported to this replica lately.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInstances {
    pub service: String,
    pub instances: Vec<InstanceInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub name: String,
    /// Epoch milliseconds of the last `keepAlive` or `reportInstanceProperties`.
    pub last_seen: i64,
    pub layer: String,
    /// Properties from `reportInstanceProperties` (language, host name, …).
    pub properties: Vec<(String, String)>,
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn utc(epoch_ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(epoch_ms).unwrap_or(DateTime::UNIX_EPOCH)
}

/// `yyyyMMddHHmm` in UTC, SkyWalking's minute time bucket.
pub fn minute_bucket(epoch_ms: i64) -> i64 {
    let t = utc(epoch_ms);
    i64::from(t.year()) * 100_000_000
        + i64::from(t.month()) * 1_000_000
        + i64::from(t.day()) * 10_000
        + i64::from(t.hour()) * 100
        + i64::from(t.minute())
}

/// `yyyyMMddHHmmss` in UTC, SkyWalking's second time bucket.
pub fn second_bucket(epoch_ms: i64) -> i64 {
    minute_bucket(epoch_ms) * 100 + i64::from(utc(epoch_ms).second())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v3::ThreadStack;

    fn snapshot() -> ThreadSnapshot {
        ThreadSnapshot {
            task_id: "t".into(),
            trace_segment_id: "s".into(),
            time: 1,
            sequence: 0,
            stack: Some(ThreadStack {
                code_signatures: vec!["a".into(), "b".into()],
            }),
        }
    }

    #[test]
    fn test_snapshot_validation_reasons() {
        assert!(to_record(snapshot(), 2).is_ok());
        type Change = fn(&mut ThreadSnapshot);
        let cases: [(Change, &str); 5] = [
            (|s| s.task_id.clear(), "empty_task_id"),
            (|s| s.trace_segment_id.clear(), "empty_segment_id"),
            (|s| s.sequence = -1, "negative_sequence"),
            (|s| s.time = 0, "invalid_time"),
            (
                |s| s.stack.as_mut().unwrap().code_signatures.push("c".into()),
                "stack_too_deep",
            ),
        ];
        for (change, reason) in cases {
            let mut s = snapshot();
            change(&mut s);
            assert_eq!(to_record(s, 2).unwrap_err(), reason);
        }
    }

    #[test]
    fn test_wire_record_same_rules_and_bytes_kept_only_when_asked() {
        use prost::Message as _;
        let encoded = bytes::Bytes::from(snapshot().encode_to_vec());
        let wire = crate::wire::decode_snapshot(encoded.clone()).unwrap();
        let plain = wire_to_record(wire.clone(), 2, false).unwrap();
        assert_eq!(plain, to_record(snapshot(), 2).unwrap());
        assert_eq!(plain.encoded, None);
        let kept = wire_to_record(wire.clone(), 2, true).unwrap();
        assert_eq!(kept.encoded.as_deref(), Some(&encoded[..]));
        assert_eq!(kept.stack.id(), StackId::of(&["a", "b"]));
        assert_eq!(wire_to_record(wire, 1, true).unwrap_err(), "stack_too_deep");
    }

    #[test]
    fn test_stack_shares_and_compares_by_frames() {
        let a = Stack::from_frames(&["x", "y"]);
        let b = Stack::from(vec!["x".to_string(), "y".to_string()]);
        assert_eq!(a, b);
        assert!(!a.shares_with(&b));
        assert!(a.shares_with(&a.clone()));
        assert_ne!(a, Stack::from_frames(&["x", "yy"]));
        // The length prefix keeps ["ab", "c"] and ["a", "bc"] apart.
        assert_ne!(
            Stack::from_frames(&["ab", "c"]).id(),
            Stack::from_frames(&["a", "bc"]).id()
        );
        assert_eq!(serde_json::to_string(&a).unwrap(), r#"["x","y"]"#);
        let bytes = bytes::Bytes::from_static(b"ok\xff");
        assert!(Stack::from_ranges(bytes.clone(), vec![0..1, 1..2]).is_ok());
        assert!(Stack::from_ranges(bytes.clone(), vec![0..1, 1..3]).is_err());
        assert!(Stack::from_ranges(bytes, vec![0..1, 2..9]).is_err());
    }

    fn task(start_time: i64, duration: i32) -> Task {
        Task {
            id: "t".into(),
            service: "s".into(),
            endpoint_name: "/e".into(),
            start_time,
            duration,
            min_duration_threshold: 0,
            dump_period: 10,
            max_sampling_count: 5,
            create_time: start_time,
        }
    }

    #[test]
    fn test_time_bucket_minute_and_second() {
        // 2026-11-25T19:32:37.123Z
        let ms = 1_795_635_157_123;
        assert_eq!(minute_bucket(ms), 202611251932);
        assert_eq!(second_bucket(ms), 20261125193237);
        assert_eq!(minute_bucket(0), 197001010000);
    }

    #[test]
    fn test_time_bucket_log_aligned_with_task_end() {
        let t = task(1_795_635_157_123, 5);
        assert_eq!(t.time_bucket(), 202611251932);
        assert_eq!(t.log_time_bucket(), 20261125193737);
        let log = TaskLog::new(&t, "i", Operation::Notified, 1);
        assert_eq!(log.time_bucket, t.log_time_bucket());
    }

    #[test]
    fn test_task_overlap_is_inclusive() {
        let t = task(0, 1);
        assert!(t.overlaps(60_000, 120_000));
        assert!(!t.overlaps(60_001, 120_000));
        assert!(t.overlaps(-10, 0));
        assert!(!t.overlaps(-10, -1));
    }

    #[test]
    fn test_operation_codes_round_trip() {
        for op in [Operation::Notified, Operation::ExecutionFinished] {
            assert_eq!(Operation::from_code(i64::from(op.code())), Some(op));
        }
        assert_eq!(Operation::from_code(3), None);
        assert_eq!(Operation::Notified.name(), "NOTIFIED");
    }
}
