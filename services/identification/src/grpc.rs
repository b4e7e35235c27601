//! The gRPC face of the service: take the caller the gate admitted, call the application,
//! map back. No rules live here.

use nrm_kernel::gate;
use nrm_kernel::grpc::reply;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::identification::v1 as pb;
use pb::identification_service_server::IdentificationService;
use tonic::{Request, Response, Status};

use crate::app::Identification;

/// The tonic service.
#[derive(Debug, Clone)]
pub struct IdentificationGrpc {
    app: Identification,
}

impl IdentificationGrpc {
    /// Serves `app`.
    #[must_use]
    pub fn new(app: Identification) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl IdentificationService for IdentificationGrpc {
    async fn report_presumed_victim(
        &self,
        request: Request<pb::ReportPresumedVictimRequest>,
    ) -> Result<Response<pb::ReportPresumedVictimResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.report(&ctx, request.get_ref()).await)
    }

    async fn complete_screening(
        &self,
        request: Request<pb::CompleteScreeningRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.screen(&ctx, request.get_ref()).await)
    }

    async fn decide_identification(
        &self,
        request: Request<pb::DecideIdentificationRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.decide(&ctx, request.get_ref()).await)
    }

    async fn request_review(
        &self,
        request: Request<pb::RequestReviewRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.review(&ctx, request.get_ref()).await)
    }

    async fn erase_personal_data(
        &self,
        request: Request<pb::ErasePersonalDataRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.erase(&ctx, request.get_ref()).await)
    }

    async fn get_case(&self, request: Request<pb::GetCaseRequest>) -> Result<Response<pb::Case>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.get_case(&ctx, request.get_ref()).await)
    }

    async fn get_personal_data(
        &self,
        request: Request<pb::GetPersonalDataRequest>,
    ) -> Result<Response<pb::GetPersonalDataResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.get_personal_data(&ctx, request.get_ref()).await)
    }

    async fn list_cases(
        &self,
        request: Request<pb::ListCasesRequest>,
    ) -> Result<Response<pb::ListCasesResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.list_cases(&ctx, request.get_ref()).await)
    }

    async fn file_anonymous_notification(
        &self,
        request: Request<pb::FileAnonymousNotificationRequest>,
    ) -> Result<Response<pb::FileAnonymousNotificationResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.notify(&ctx, request.get_ref()).await)
    }
}
