//! The `collectSnapshot` route (both names) with a codec of its own: each message is
//! read in place by `crate::wire` instead of prost's generated decoder, so a snapshot
//! costs no `String` per frame and its stack id is hashed from the bytes as they came.
//! The generated `ProfileTask` servers keep the other two methods.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use prost::Message as _;
use tonic::body::Body;
use tonic::codec::{
    Codec, CompressionEncoding, DecodeBuf, Decoder, EnabledCompressionEncodings, EncodeBuf, Encoder,
};
use tonic::server::{ClientStreamingService, Grpc};
use tonic::{Request, Response, Status, Streaming};

use super::profile::ProfileService;
use crate::proto::v3::Commands;
use crate::wire::{decode_snapshot, WireSnapshot};

/// The two paths agents send snapshot streams on (v3, and the package-less one of
/// SkyWalking's `ProfileCompat.proto`).
pub const COLLECT_SNAPSHOT_PATHS: [&str; 2] = [
    "/skywalking.v3.ProfileTask/collectSnapshot",
    "/ProfileTask/collectSnapshot",
];

/// `ThreadSnapshot` in (read in place), `Commands` out (prost).
#[derive(Debug, Default, Clone, Copy)]
pub struct SnapshotCodec;

impl Codec for SnapshotCodec {
    type Encode = Commands;
    type Decode = WireSnapshot;
    type Encoder = SnapshotCodec;
    type Decoder = SnapshotCodec;

    fn encoder(&mut self) -> SnapshotCodec {
        *self
    }

    fn decoder(&mut self) -> SnapshotCodec {
        *self
    }
}

impl Encoder for SnapshotCodec {
    type Item = Commands;
    type Error = Status;

    fn encode(&mut self, item: Commands, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|error| Status::internal(format!("cannot encode Commands: {error}")))
    }
}

impl Decoder for SnapshotCodec {
    type Item = WireSnapshot;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<WireSnapshot>, Status> {
        // The message's own bytes, split off tonic's buffer without a copy.
        let message = src.copy_to_bytes(src.remaining());
        decode_snapshot(message).map(Some).map_err(|error| {
            Status::invalid_argument(format!("malformed ThreadSnapshot stream: {error}"))
        })
    }
}

/// Serves `collectSnapshot` through `ProfileService::collect`.
#[derive(Clone)]
pub struct CollectSnapshotRoute {
    profile: ProfileService,
    max_message_bytes: usize,
}

impl CollectSnapshotRoute {
    pub fn new(profile: ProfileService, max_message_bytes: usize) -> CollectSnapshotRoute {
        CollectSnapshotRoute {
            profile,
            max_message_bytes,
        }
    }
}

struct CollectSnapshot(ProfileService);

impl ClientStreamingService<WireSnapshot> for CollectSnapshot {
    type Response = Commands;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Commands>, Status>> + Send>>;

    fn call(&mut self, request: Request<Streaming<WireSnapshot>>) -> Self::Future {
        let profile = self.0.clone();
        Box::pin(async move {
            profile
                .collect(request.into_inner())
                .await
                .map(Response::new)
        })
    }
}

type RouteFuture = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl tower::Service<http::Request<axum::body::Body>> for CollectSnapshotRoute {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = RouteFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<axum::body::Body>) -> RouteFuture {
        // As the generated servers are configured: gzip accepted, replies uncompressed,
        // messages over `grpc.max_message_bytes` refused.
        let mut accept = EnabledCompressionEncodings::default();
        accept.enable(CompressionEncoding::Gzip);
        let mut grpc = Grpc::new(SnapshotCodec)
            .apply_compression_config(accept, EnabledCompressionEncodings::default())
            .apply_max_message_size_config(Some(self.max_message_bytes), None);
        let method = CollectSnapshot(self.profile.clone());
        Box::pin(async move { Ok(grpc.client_streaming(method, request).await) })
    }
}
