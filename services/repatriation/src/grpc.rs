//! The gRPC face of the service: take the caller the gate admitted, call the
//! application, map back. No rules live here.

use nrm_kernel::gate;
use nrm_kernel::grpc::reply;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::repatriation::v1 as pb;
use pb::repatriation_service_server::RepatriationService;
use tonic::{Request, Response, Status};

use crate::app::Returns;

/// The tonic service.
#[derive(Debug, Clone)]
pub struct RepatriationGrpc {
    app: Returns,
}

impl RepatriationGrpc {
    /// Serves `app`.
    #[must_use]
    pub fn new(app: Returns) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl RepatriationService for RepatriationGrpc {
    async fn open_return(
        &self,
        request: Request<pb::OpenReturnRequest>,
    ) -> Result<Response<pb::OpenReturnResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.open(&ctx, request.get_ref()).await)
    }

    async fn record_return_consent(
        &self,
        request: Request<pb::RecordReturnConsentRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.record_consent(&ctx, request.get_ref()).await)
    }

    async fn record_risk_assessment(
        &self,
        request: Request<pb::RecordRiskAssessmentRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.record_risk(&ctx, request.get_ref()).await)
    }

    async fn request_travel_document(
        &self,
        request: Request<pb::RequestTravelDocumentRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.request_document(&ctx, request.get_ref()).await)
    }

    async fn record_travel_document(
        &self,
        request: Request<pb::RecordTravelDocumentRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.record_document(&ctx, request.get_ref()).await)
    }

    async fn book_itinerary(
        &self,
        request: Request<pb::BookItineraryRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.book_itinerary(&ctx, request.get_ref()).await)
    }

    async fn assign_escort(
        &self,
        request: Request<pb::AssignEscortRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.assign_escort(&ctx, request.get_ref()).await)
    }

    async fn record_departure(
        &self,
        request: Request<pb::RecordDepartureRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.record_departure(&ctx, request.get_ref()).await)
    }

    async fn record_arrival(
        &self,
        request: Request<pb::RecordArrivalRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.record_arrival(&ctx, request.get_ref()).await)
    }

    async fn record_handover(
        &self,
        request: Request<pb::RecordHandoverRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.record_handover(&ctx, request.get_ref()).await)
    }

    async fn halt_return(&self, request: Request<pb::HaltReturnRequest>) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.halt(&ctx, request.get_ref()).await)
    }

    async fn get_return(&self, request: Request<pb::GetReturnRequest>) -> Result<Response<pb::Return>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.get_return(&ctx, request.get_ref()).await)
    }

    async fn list_returns(
        &self,
        request: Request<pb::ListReturnsRequest>,
    ) -> Result<Response<pb::ListReturnsResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.list_returns(&ctx, request.get_ref()).await)
    }
}
