//! What skysnap reads from calls it passes on: heartbeats for the live instance list,
//! and trace segments, of which it keeps the profiled ones. A tap never holds a call up
//! and never fails it: what it cannot read or hand on is counted and skipped.

use std::io::Read;

use actix::Addr;
use bytes::Bytes;
use prost::Message as _;

use super::frames::Message;
use super::routes::Tap;
use crate::actors::instances::{Heartbeat, InstanceRegistry};
use crate::model::now_ms;
use crate::proto::v3::{InstancePingPkg, InstanceProperties};
use crate::segments::SegmentCapture;
use crate::telemetry::TAP_ERRORS;

/// `SegmentCollection` with its segments left as bytes, so each is read like a
/// `collect` message.
#[derive(Clone, PartialEq, prost::Message)]
struct RawSegmentCollection {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    segments: Vec<Bytes>,
}

#[derive(Clone)]
pub struct Taps {
    instances: Addr<InstanceRegistry>,
    segments: SegmentCapture,
    /// A compressed message that inflates past this is skipped.
    max_message_bytes: usize,
}

fn tap_error(kind: &'static str) {
    metrics::counter!(TAP_ERRORS, "kind" => kind).increment(1);
}

impl Taps {
    pub fn new(
        instances: Addr<InstanceRegistry>,
        segments: SegmentCapture,
        max_message_bytes: usize,
    ) -> Taps {
        Taps {
            instances,
            segments,
            max_message_bytes,
        }
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Reads one request message of a tapped call.
    pub fn on_message(&self, tap: Tap, gzip: bool, message: Message) {
        if tap == Tap::None {
            return;
        }
        let Some(bytes) = message.bytes_opt else {
            tap_error("too_large");
            return;
        };
        let bytes = if message.compressed {
            match self.inflate(gzip, &bytes) {
                Some(bytes) => bytes,
                None => {
                    tap_error("compressed");
                    return;
                }
            }
        } else {
            bytes
        };
        match tap {
            Tap::None => {}
            Tap::InstanceProperties => match InstanceProperties::decode(bytes) {
                Ok(properties) => self.heartbeat(Heartbeat {
                    service: properties.service,
                    instance: properties.service_instance,
                    layer: properties.layer,
                    properties_opt: Some(
                        properties
                            .properties
                            .into_iter()
                            .map(|pair| (pair.key, pair.value))
                            .collect(),
                    ),
                    time_ms: now_ms(),
                }),
                Err(_) => tap_error("management"),
            },
            Tap::InstancePing => match InstancePingPkg::decode(bytes) {
                Ok(ping) => self.heartbeat(Heartbeat {
                    service: ping.service,
                    instance: ping.service_instance,
                    layer: ping.layer,
                    properties_opt: None,
                    time_ms: now_ms(),
                }),
                Err(_) => tap_error("management"),
            },
            Tap::Segment => self.segments.offer(bytes),
            Tap::SegmentCollection => match RawSegmentCollection::decode(bytes) {
                Ok(collection) => {
                    for segment in collection.segments {
                        self.segments.offer(segment);
                    }
                }
                Err(_) => tap_error("trace_segment"),
            },
        }
    }

    fn heartbeat(&self, heartbeat: Heartbeat) {
        if heartbeat.service.is_empty() || heartbeat.instance.is_empty() {
            tap_error("management");
            return;
        }
        if self.instances.try_send(heartbeat).is_err() {
            tap_error("instances_busy");
        }
    }

    /// gzip is the one encoding agents use; anything else is counted, not read.
    fn inflate(&self, gzip: bool, bytes: &[u8]) -> Option<Bytes> {
        if !gzip {
            return None;
        }
        let mut inflated = Vec::new();
        let limit = self.max_message_bytes as u64 + 1;
        flate2::read::GzDecoder::new(bytes)
            .take(limit)
            .read_to_end(&mut inflated)
            .ok()?;
        (inflated.len() <= self.max_message_bytes).then(|| Bytes::from(inflated))
    }
}
