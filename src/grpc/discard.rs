//! Report services skysnap does not keep (segments, logs, meters, JVM metrics, events,
//! configuration discovery): accepted, counted by service, dropped, so that agents do
//! not log an error every few seconds.

use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::DISCARDED_MESSAGES;
use crate::proto::v3::configuration_discovery_service_server::ConfigurationDiscoveryService;
use crate::proto::v3::event_service_server::EventService;
use crate::proto::v3::jvm_metric_report_service_server::JvmMetricReportService;
use crate::proto::v3::log_report_service_server::LogReportService;
use crate::proto::v3::meter_report_service_server::MeterReportService;
use crate::proto::v3::trace_segment_report_service_server::TraceSegmentReportService;
use crate::proto::v3::{Commands, Discarded};

#[derive(Clone, Copy, Default)]
pub struct DiscardService;

fn count(service: &'static str, messages: u64) {
    ::metrics::counter!(DISCARDED_MESSAGES, "service" => service).increment(messages);
}

async fn drain(
    service: &'static str,
    stream: Streaming<Discarded>,
) -> Result<Response<Commands>, Status> {
    let mut stream = stream;
    while let Some(message) = stream.next().await {
        message?;
        count(service, 1);
    }
    Ok(Response::new(Commands::default()))
}

fn one(service: &'static str) -> Result<Response<Commands>, Status> {
    count(service, 1);
    Ok(Response::new(Commands::default()))
}

#[tonic::async_trait]
impl TraceSegmentReportService for DiscardService {
    async fn collect(
        &self,
        request: Request<Streaming<Discarded>>,
    ) -> Result<Response<Commands>, Status> {
        drain("trace_segment", request.into_inner()).await
    }

    async fn collect_in_sync(
        &self,
        _request: Request<Discarded>,
    ) -> Result<Response<Commands>, Status> {
        one("trace_segment")
    }
}

#[tonic::async_trait]
impl LogReportService for DiscardService {
    async fn collect(
        &self,
        request: Request<Streaming<Discarded>>,
    ) -> Result<Response<Commands>, Status> {
        drain("log", request.into_inner()).await
    }
}

#[tonic::async_trait]
impl MeterReportService for DiscardService {
    async fn collect(
        &self,
        request: Request<Streaming<Discarded>>,
    ) -> Result<Response<Commands>, Status> {
        drain("meter", request.into_inner()).await
    }

    async fn collect_batch(
        &self,
        request: Request<Streaming<Discarded>>,
    ) -> Result<Response<Commands>, Status> {
        drain("meter", request.into_inner()).await
    }
}

#[tonic::async_trait]
impl JvmMetricReportService for DiscardService {
    async fn collect(&self, _request: Request<Discarded>) -> Result<Response<Commands>, Status> {
        one("jvm_metric")
    }
}

#[tonic::async_trait]
impl EventService for DiscardService {
    async fn collect(
        &self,
        request: Request<Streaming<Discarded>>,
    ) -> Result<Response<Commands>, Status> {
        drain("event", request.into_inner()).await
    }
}

#[tonic::async_trait]
impl ConfigurationDiscoveryService for DiscardService {
    async fn fetch_configurations(
        &self,
        _request: Request<Discarded>,
    ) -> Result<Response<Commands>, Status> {
        one("configuration_discovery")
    }
}
