//! `ThreadSnapshot` read in place from the bytes an agent sent: no `String` per frame.
//! The ids and frames are checked as UTF-8 once, here, and the stack is kept as ranges
//! of the message's own buffer, hashed into its `StackId` on the way. The gRPC receiver
//! and `skysnap consume` both read snapshots through this, and Kafka gets the message's
//! bytes as they came.
//!
//! It reads what prost's generated decoder reads (tested against it on random input,
//! and by the `snapshot` fuzz target): fields in any order, a repeated scalar or string
//! field's last value, repeated `stack` fields merged, unknown fields (groups included)
//! skipped; a wrong wire type for a known field, a truncated field or invalid UTF-8 is
//! an error.

use bytes::Bytes;

use crate::model::Stack;

/// A `ThreadSnapshot` as decoded, before the receiver's rules (`model::to_record`).
#[derive(Debug, Clone)]
pub struct WireSnapshot {
    /// The message as it came; what Kafka is sent.
    pub encoded: Bytes,
    pub task_id: String,
    pub segment_id: String,
    pub time: i64,
    pub sequence: i32,
    /// Frames root first, as ranges of `encoded`.
    pub stack: Stack,
}

/// Why bytes are not a `ThreadSnapshot`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(&'static str);

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_START_GROUP: u8 = 3;
const WIRE_END_GROUP: u8 = 4;
const WIRE_FIXED32: u8 = 5;

/// Groups nested deeper than this are refused (prost's recursion limit).
const MAX_GROUP_DEPTH: u32 = 100;

/// A cursor over one message's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for index in 0..10 {
            let Some(&byte) = self.bytes.get(self.at) else {
                return Err(WireError("truncated varint"));
            };
            self.at += 1;
            // The tenth byte holds the top bit only (prost refuses more).
            if index == 9 && byte > 1 {
                return Err(WireError("invalid varint"));
            }
            value |= u64::from(byte & 0x7f) << (7 * index);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(WireError("invalid varint"))
    }

    /// A field's tag: (field number, wire type).
    fn key(&mut self) -> Result<(u32, u8), WireError> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return Err(WireError("invalid key value"));
        }
        let wire_type = (key & 7) as u8;
        if wire_type > WIRE_FIXED32 {
            return Err(WireError("invalid wire type value"));
        }
        let field = (key >> 3) as u32;
        if field == 0 {
            return Err(WireError("invalid field number: 0"));
        }
        Ok((field, wire_type))
    }

    /// A length-delimited field's body, as a range of the message.
    fn length_delimited(&mut self) -> Result<std::ops::Range<usize>, WireError> {
        let length = self.varint()?;
        let remaining = (self.bytes.len() - self.at) as u64;
        if length > remaining {
            return Err(WireError("buffer underflow"));
        }
        let start = self.at;
        self.at += length as usize;
        Ok(start..self.at)
    }

    fn advance(&mut self, count: usize) -> Result<(), WireError> {
        if self.bytes.len() - self.at < count {
            return Err(WireError("buffer underflow"));
        }
        self.at += count;
        Ok(())
    }

    /// Skips a field this reader does not know.
    fn skip(&mut self, field: u32, wire_type: u8, depth: u32) -> Result<(), WireError> {
        match wire_type {
            WIRE_VARINT => self.varint().map(drop),
            WIRE_FIXED64 => self.advance(8),
            WIRE_LEN => self.length_delimited().map(drop),
            WIRE_FIXED32 => self.advance(4),
            WIRE_START_GROUP => {
                if depth >= MAX_GROUP_DEPTH {
                    return Err(WireError("recursion limit reached"));
                }
                loop {
                    let (inner_field, inner_type) = self.key()?;
                    if inner_type == WIRE_END_GROUP {
                        if inner_field != field {
                            return Err(WireError("unexpected end group tag"));
                        }
                        return Ok(());
                    }
                    self.skip(inner_field, inner_type, depth + 1)?;
                }
            }
            _ => Err(WireError("unexpected end group tag")),
        }
    }

    fn expect(wire_type: u8, expected: u8) -> Result<(), WireError> {
        if wire_type == expected {
            Ok(())
        } else {
            Err(WireError("invalid wire type for a ThreadSnapshot field"))
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, WireError> {
    std::str::from_utf8(bytes)
        .map_err(|_| WireError("invalid string value: data is not UTF-8 encoded"))
}

/// Decodes one `ThreadSnapshot`; the stack's frames stay in `encoded`.
pub fn decode_snapshot(encoded: Bytes) -> Result<WireSnapshot, WireError> {
    let mut task_id = String::new();
    let mut segment_id = String::new();
    let mut time = 0i64;
    let mut sequence = 0i32;
    let mut frames: Vec<std::ops::Range<usize>> = Vec::new();
    let mut reader = Reader::new(&encoded);
    while !reader.done() {
        let (field, wire_type) = reader.key()?;
        match field {
            1 => {
                Reader::expect(wire_type, WIRE_LEN)?;
                task_id = utf8(&encoded[reader.length_delimited()?])?.to_string();
            }
            2 => {
                Reader::expect(wire_type, WIRE_LEN)?;
                segment_id = utf8(&encoded[reader.length_delimited()?])?.to_string();
            }
            3 => {
                Reader::expect(wire_type, WIRE_VARINT)?;
                time = reader.varint()? as i64;
            }
            4 => {
                Reader::expect(wire_type, WIRE_VARINT)?;
                sequence = reader.varint()? as i32;
            }
            5 => {
                Reader::expect(wire_type, WIRE_LEN)?;
                let body = reader.length_delimited()?;
                read_stack(&encoded, body, &mut frames)?;
            }
            _ => reader.skip(field, wire_type, 0)?,
        }
    }
    // The frames' one UTF-8 check.
    let stack = Stack::from_ranges(encoded.clone(), frames)
        .map_err(|_| WireError("invalid string value: data is not UTF-8 encoded"))?;
    Ok(WireSnapshot {
        encoded,
        task_id,
        segment_id,
        time,
        sequence,
        stack,
    })
}

/// Reads a `ThreadStack` body (message bytes `body` of `encoded`), adding its frames.
fn read_stack(
    encoded: &[u8],
    body: std::ops::Range<usize>,
    frames: &mut Vec<std::ops::Range<usize>>,
) -> Result<(), WireError> {
    let offset = body.start;
    let mut reader = Reader::new(&encoded[body]);
    while !reader.done() {
        let (field, wire_type) = reader.key()?;
        if field != 1 {
            reader.skip(field, wire_type, 0)?;
            continue;
        }
        Reader::expect(wire_type, WIRE_LEN)?;
        let frame = reader.length_delimited()?;
        frames.push(offset + frame.start..offset + frame.end);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load_stacks::Rng;
    use crate::proto::v3::{ThreadSnapshot, ThreadStack};
    use prost::Message as _;

    fn snapshot() -> ThreadSnapshot {
        ThreadSnapshot {
            task_id: "task".into(),
            trace_segment_id: "segment".into(),
            time: 1_795_635_157_123,
            sequence: 7,
            stack: Some(ThreadStack {
                code_signatures: vec!["main.py.run: 1".into(), "é.handler: 20".into(), "".into()],
            }),
        }
    }

    fn as_prost(wire: &WireSnapshot) -> ThreadSnapshot {
        ThreadSnapshot {
            task_id: wire.task_id.clone(),
            trace_segment_id: wire.segment_id.clone(),
            time: wire.time,
            sequence: wire.sequence,
            stack: None,
        }
    }

    /// Both decoders agree: the same values, or both an error.
    fn agree(bytes: &[u8]) {
        let ours = decode_snapshot(Bytes::copy_from_slice(bytes));
        let theirs = ThreadSnapshot::decode(bytes);
        match (ours, theirs) {
            (Ok(ours), Ok(theirs)) => {
                let frames = theirs
                    .stack
                    .as_ref()
                    .map(|stack| stack.code_signatures.clone())
                    .unwrap_or_default();
                assert_eq!(ours.stack.to_vec(), frames, "{bytes:?}");
                assert_eq!(ours.stack.id(), crate::model::StackId::of(&frames));
                let mut theirs = theirs;
                theirs.stack = None;
                assert_eq!(as_prost(&ours), theirs, "{bytes:?}");
            }
            (Err(_), Err(_)) => {}
            (ours, theirs) => panic!("{bytes:?}: ours {ours:?}, prost {theirs:?}"),
        }
    }

    #[test]
    fn test_wire_decodes_what_prost_encodes() {
        let encoded = snapshot().encode_to_vec();
        let wire = decode_snapshot(Bytes::from(encoded.clone())).unwrap();
        assert_eq!(wire.task_id, "task");
        assert_eq!(wire.segment_id, "segment");
        assert_eq!(wire.time, 1_795_635_157_123);
        assert_eq!(wire.sequence, 7);
        assert_eq!(
            wire.stack.to_vec(),
            snapshot().stack.unwrap().code_signatures
        );
        assert_eq!(&wire.encoded[..], &encoded[..]);
        agree(&encoded);
    }

    #[test]
    fn test_wire_merges_repeated_fields_as_prost_does() {
        let mut bytes = snapshot().encode_to_vec();
        // A second message appended: scalars and strings take the last value, the two
        // stacks merge, as protobuf concatenation means.
        let second = ThreadSnapshot {
            task_id: "other".into(),
            sequence: -3,
            stack: Some(ThreadStack {
                code_signatures: vec!["z".into()],
            }),
            ..ThreadSnapshot::default()
        };
        bytes.extend(second.encode_to_vec());
        let wire = decode_snapshot(Bytes::from(bytes.clone())).unwrap();
        assert_eq!(wire.task_id, "other");
        assert_eq!(wire.sequence, -3);
        assert_eq!(wire.stack.len(), 4);
        agree(&bytes);
    }

    #[test]
    fn test_wire_refuses_what_prost_refuses() {
        let good = snapshot().encode_to_vec();
        let cases: Vec<Vec<u8>> = vec![
            good[..good.len() - 1].to_vec(),          // truncated
            vec![0x0a, 0x02, 0xff, 0xfe],             // task id not UTF-8
            vec![0x2a, 0x04, 0x0a, 0x02, 0xc3, 0x28], // a frame not UTF-8
            vec![0x18, 0x80, 0x80],                   // truncated varint
            vec![0x1a, 0x00],                         // time with wire type 2
            vec![0x00],                               // field 0
            vec![0x0f],                               // wire type 7
            vec![0x33, 0x3c],                         // group ended by another field
            vec![0x34],                               // a lone end group
            vec![
                0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ], // 11 bytes
        ];
        for bytes in cases {
            assert!(
                decode_snapshot(Bytes::from(bytes.clone())).is_err(),
                "{bytes:?}"
            );
            agree(&bytes);
        }
        // Unknown fields of every wire type, groups included, are skipped.
        let mut unknown = vec![0x30, 0x01, 0x39, 0, 0, 0, 0, 0, 0, 0, 0, 0x42, 0x01, 0x00];
        unknown.extend([0x4d, 0, 0, 0, 0, 0x53, 0x58, 0x01, 0x54]);
        unknown.extend(&good);
        assert!(decode_snapshot(Bytes::from(unknown.clone())).is_ok());
        agree(&unknown);
    }

    #[test]
    fn test_wire_agrees_with_prost_on_random_input() {
        let mut rng = Rng::new(0x5eed);
        let good = snapshot().encode_to_vec();
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                good.clone()
            } else {
                (0..rng.below(40)).map(|_| rng.below(256) as u8).collect()
            };
            // Flip, cut or splice a few bytes.
            for _ in 0..rng.below(4) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.below(bytes.len());
                match rng.below(3) {
                    0 => bytes[at] = rng.below(256) as u8,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, rng.below(256) as u8),
                }
            }
            agree(&bytes);
        }
    }
}
