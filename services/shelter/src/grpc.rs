//! The gRPC face of the service: authenticate, map, call the application,
//! map back. No rules live here.

use nrm_kernel::auth::Authenticator;
use nrm_kernel::grpc::{call_context, reply};
use nrm_proto::common::v1::CommandResult;
use nrm_proto::shelter::v1 as pb;
use pb::shelter_service_server::ShelterService;
use tonic::{Request, Response, Status};

use crate::app::Shelters;

/// The tonic service.
#[derive(Debug, Clone)]
pub struct ShelterGrpc {
    app: Shelters,
    auth: Authenticator,
}

impl ShelterGrpc {
    /// Serves `app`, verifying callers with `auth`.
    #[must_use]
    pub fn new(app: Shelters, auth: Authenticator) -> Self {
        Self { app, auth }
    }
}

#[tonic::async_trait]
impl ShelterService for ShelterGrpc {
    async fn register_shelter(
        &self,
        request: Request<pb::RegisterShelterRequest>,
    ) -> Result<Response<pb::RegisterShelterResponse>, Status> {
        let ctx = call_context(&self.auth, &request).await?;
        reply(self.app.register(&ctx, request.get_ref()).await)
    }

    async fn change_capacity(
        &self,
        request: Request<pb::ChangeCapacityRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = call_context(&self.auth, &request).await?;
        reply(self.app.change_capacity(&ctx, request.get_ref()).await)
    }

    async fn hold_bed(&self, request: Request<pb::HoldBedRequest>) -> Result<Response<pb::HoldBedResponse>, Status> {
        let ctx = call_context(&self.auth, &request).await?;
        reply(self.app.hold_bed(&ctx, request.get_ref()).await)
    }

    async fn release_hold(&self, request: Request<pb::ReleaseHoldRequest>) -> Result<Response<CommandResult>, Status> {
        let ctx = call_context(&self.auth, &request).await?;
        reply(self.app.release_hold(&ctx, request.get_ref()).await)
    }

    async fn admit(&self, request: Request<pb::AdmitRequest>) -> Result<Response<CommandResult>, Status> {
        let ctx = call_context(&self.auth, &request).await?;
        reply(self.app.admit(&ctx, request.get_ref()).await)
    }

    async fn discharge(&self, request: Request<pb::DischargeRequest>) -> Result<Response<CommandResult>, Status> {
        let ctx = call_context(&self.auth, &request).await?;
        reply(self.app.discharge(&ctx, request.get_ref()).await)
    }

    async fn get_shelter(&self, request: Request<pb::GetShelterRequest>) -> Result<Response<pb::Shelter>, Status> {
        let ctx = call_context(&self.auth, &request).await?;
        reply(self.app.get_shelter(&ctx, request.get_ref()).await)
    }

    async fn list_free_capacity(
        &self,
        request: Request<pb::ListFreeCapacityRequest>,
    ) -> Result<Response<pb::ListFreeCapacityResponse>, Status> {
        let ctx = call_context(&self.auth, &request).await?;
        reply(self.app.list_free_capacity(&ctx, request.get_ref()).await)
    }
}
