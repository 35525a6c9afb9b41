//! The snapshot paths: a `ThreadSnapshot` decoded from the wire and validated as the gRPC
//! receiver does, and a Kafka message value decoded as `skysnap consume` does; both read
//! in place by `skysnap::wire`, each checked against prost's generated decoder.

use bytes::Bytes;
use prost::Message as _;
use skysnap::consume::decode_value;
use skysnap::model::{to_record, wire_to_record, SnapshotRecord, StackId};
use skysnap::proto::v3::ThreadSnapshot;
use skysnap::wire::decode_snapshot;

/// 9999-12-31T23:59:59.999Z, the last instant whose second bucket has 14 digits.
const LAST_FOUR_DIGIT_YEAR_MS: i64 = 253_402_300_799_999;

/// `grpc.max_stack_depth`'s default.
const DEFAULT_MAX_STACK_DEPTH: usize = 2000;

/// The first byte picks the stack-depth limit, so that small limits reach
/// `stack_too_deep`; 0 stands for the default.
fn split_depth(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((&0, rest)) | Some((&0x80, rest)) => (DEFAULT_MAX_STACK_DEPTH, rest),
        Some((&depth, rest)) => (usize::from(depth & 0x7f), rest),
        None => (DEFAULT_MAX_STACK_DEPTH, data),
    }
}

/// The receiver's rules, written out again from SPEC and SkyWalking, in their order.
fn expected_reason(snapshot: &ThreadSnapshot, max_stack_depth: usize) -> Option<&'static str> {
    let depth = snapshot
        .stack
        .as_ref()
        .map_or(0, |stack| stack.code_signatures.len());
    [
        (snapshot.task_id.is_empty(), "empty_task_id"),
        (snapshot.trace_segment_id.is_empty(), "empty_segment_id"),
        (snapshot.sequence < 0, "negative_sequence"),
        (
            snapshot.time <= 0 || snapshot.time > LAST_FOUR_DIGIT_YEAR_MS,
            "invalid_time",
        ),
        (depth > max_stack_depth, "stack_too_deep"),
    ]
    .into_iter()
    .find_map(|(broken, reason)| broken.then_some(reason))
}

/// What the pipeline does with an accepted record (time bucket, batch byte size) must
/// hold for any value the rules let through.
fn check_record(snapshot: &ThreadSnapshot, record: &SnapshotRecord) {
    assert_eq!(record.task_id, snapshot.task_id);
    assert_eq!(record.segment_id, snapshot.trace_segment_id);
    assert_eq!(record.sequence, snapshot.sequence);
    assert_eq!(record.dump_time, snapshot.time);
    let stack = snapshot
        .stack
        .as_ref()
        .map(|stack| stack.code_signatures.as_slice())
        .unwrap_or_default();
    assert_eq!(record.stack.to_vec(), stack);
    assert_eq!(record.stack.id(), StackId::of(stack));
    // yyyyMMddHHmmss, 14 digits, up to the end of year 9999. Later dump times are
    // accepted today and get 15- or 16-digit buckets (and, past chrono's range, 1970's):
    // see fuzz/README.md, "Findings".
    let bucket = record.time_bucket();
    if record.dump_time <= LAST_FOUR_DIGIT_YEAR_MS {
        assert!(
            (19_700_101_000_000..=99_991_231_235_959).contains(&bucket),
            "time bucket {bucket} of dump time {}",
            record.dump_time
        );
    }
    let frames = record.stack.frame_bytes();
    assert!(record.approximate_bytes() >= record.task_id.len() + record.segment_id.len() + frames);
}

/// `ThreadSnapshot` bytes read in place as the gRPC receiver does (`skysnap::wire`),
/// which must agree with prost's generated decoder, then the receiver's rules.
pub fn snapshot(data: &[u8]) {
    let (max_stack_depth, bytes) = split_depth(data);
    let wire = decode_snapshot(Bytes::copy_from_slice(bytes));
    let snapshot = match (ThreadSnapshot::decode(bytes), wire) {
        (Ok(snapshot), Ok(wire)) => {
            assert_eq!(&wire.encoded[..], bytes);
            let kept = wire_to_record(wire.clone(), max_stack_depth, true);
            let plain = wire_to_record(wire, max_stack_depth, false);
            // The same record (or the same reason) as prost's message gives ...
            assert_eq!(plain, to_record(snapshot.clone(), max_stack_depth));
            // ... and, kept for Kafka, exactly the bytes that came.
            match (kept, plain) {
                (Ok(kept), Ok(plain)) => {
                    assert_eq!(kept.encoded.as_deref(), Some(bytes));
                    assert_eq!(
                        SnapshotRecord {
                            encoded: None,
                            ..kept
                        },
                        plain
                    );
                }
                (kept, plain) => assert_eq!(kept.err(), plain.err()),
            }
            snapshot
        }
        (Err(_), Err(_)) => return,
        (prost, wire) => panic!("prost {prost:?}, skysnap::wire {wire:?}"),
    };
    // What is stored is what was decoded: re-encoding gives the same message back.
    let again = ThreadSnapshot::decode(snapshot.encode_to_vec().as_slice())
        .expect("a decoded snapshot re-encodes to a decodable one");
    assert_eq!(again, snapshot);
    let result = to_record(snapshot.clone(), max_stack_depth);
    match (result, expected_reason(&snapshot, max_stack_depth)) {
        (Ok(record), None) => check_record(&snapshot, &record),
        (Err(reason), Some(expected)) => assert_eq!(reason, expected, "{snapshot:?}"),
        (result, expected) => {
            panic!("to_record answered {result:?}, the rules say {expected:?}: {snapshot:?}")
        }
    }
}

/// A Kafka message value (bit 7 of the first byte: a null value), then
/// `consume::decode_value`, which must agree with the receiver's path.
pub fn kafka_value(data: &[u8]) {
    let null_value = data.first().is_some_and(|flags| flags & 0x80 != 0);
    let (max_stack_depth, bytes) = split_depth(data);
    let payload_opt = (!null_value).then_some(bytes);
    let result = decode_value(payload_opt, max_stack_depth);
    match payload_opt.map(ThreadSnapshot::decode) {
        None | Some(Err(_)) => assert_eq!(result, Err("malformed")),
        Some(Ok(snapshot)) => {
            if let Ok(record) = &result {
                check_record(&snapshot, record);
            }
            assert_eq!(result, to_record(snapshot, max_stack_depth));
        }
    }
}
