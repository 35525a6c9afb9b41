//! `skywalking.v3.ManagementService`: instance properties and heartbeats feed the live
//! instance list of `GET /api/v1/services`.

use tonic::{Request, Response, Status};

use std::sync::Arc;

use super::{status, InFlight};
use crate::actors::instances::Heartbeat;
use crate::model::now_ms;
use crate::pipeline::Handles;
use crate::proto::v3::management_service_server::ManagementService;
use crate::proto::v3::{Commands, InstancePingPkg, InstanceProperties};

pub struct ManagementHandler {
    handles: Handles,
    in_flight: Arc<InFlight>,
}

impl ManagementHandler {
    pub fn new(handles: Handles, in_flight: Arc<InFlight>) -> ManagementHandler {
        ManagementHandler { handles, in_flight }
    }

    async fn heartbeat(&self, heartbeat: Heartbeat) -> Result<Response<Commands>, Status> {
        let _call = self.in_flight.enter();
        if heartbeat.service.is_empty() || heartbeat.instance.is_empty() {
            return Err(Status::invalid_argument(
                "service and serviceInstance must not be empty",
            ));
        }
        self.handles
            .instances
            .send(heartbeat)
            .await
            .map_err(|error| status::from_mailbox(&error))?;
        Ok(Response::new(Commands::default()))
    }
}

#[tonic::async_trait]
impl ManagementService for ManagementHandler {
    async fn report_instance_properties(
        &self,
        request: Request<InstanceProperties>,
    ) -> Result<Response<Commands>, Status> {
        let properties = request.into_inner();
        self.heartbeat(Heartbeat {
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
        })
        .await
    }

    async fn keep_alive(
        &self,
        request: Request<InstancePingPkg>,
    ) -> Result<Response<Commands>, Status> {
        let ping = request.into_inner();
        self.heartbeat(Heartbeat {
            service: ping.service,
            instance: ping.service_instance,
            layer: ping.layer,
            properties_opt: None,
            time_ms: now_ms(),
        })
        .await
    }
}
