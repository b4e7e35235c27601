//! The gRPC face of the service: take the caller the gate admitted, call the application,
//! map back. No rules live here.

use nrm_kernel::gate;
use nrm_kernel::grpc::reply;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::shelter::v1 as pb;
use pb::shelter_service_server::ShelterService;
use tonic::{Request, Response, Status};

use crate::app::Shelters;

/// The tonic service.
#[derive(Debug, Clone)]
pub struct ShelterGrpc {
    app: Shelters,
}

impl ShelterGrpc {
    /// Serves `app`.
    #[must_use]
    pub fn new(app: Shelters) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl ShelterService for ShelterGrpc {
    async fn register_shelter(
        &self,
        request: Request<pb::RegisterShelterRequest>,
    ) -> Result<Response<pb::RegisterShelterResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.register(&ctx, request.get_ref()).await)
    }

    async fn change_capacity(
        &self,
        request: Request<pb::ChangeCapacityRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.change_capacity(&ctx, request.get_ref()).await)
    }

    async fn hold_bed(&self, request: Request<pb::HoldBedRequest>) -> Result<Response<pb::HoldBedResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.hold_bed(&ctx, request.get_ref()).await)
    }

    async fn release_hold(&self, request: Request<pb::ReleaseHoldRequest>) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.release_hold(&ctx, request.get_ref()).await)
    }

    async fn admit(&self, request: Request<pb::AdmitRequest>) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.admit(&ctx, request.get_ref()).await)
    }

    async fn discharge(&self, request: Request<pb::DischargeRequest>) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.discharge(&ctx, request.get_ref()).await)
    }

    async fn get_shelter(&self, request: Request<pb::GetShelterRequest>) -> Result<Response<pb::Shelter>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.get_shelter(&ctx, request.get_ref()).await)
    }

    async fn list_free_capacity(
        &self,
        request: Request<pb::ListFreeCapacityRequest>,
    ) -> Result<Response<pb::ListFreeCapacityResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.list_free_capacity(&ctx, request.get_ref()).await)
    }

    async fn approve_shelter(
        &self,
        request: Request<pb::ApproveShelterRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.approve_shelter(&ctx, request.get_ref()).await)
    }

    async fn list_arrivals(
        &self,
        request: Request<pb::ListArrivalsRequest>,
    ) -> Result<Response<pb::ListArrivalsResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.list_arrivals(&ctx, request.get_ref()).await)
    }
}
