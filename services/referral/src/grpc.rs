//! The gRPC face of the service: take the caller the gate admitted, call the application,
//! map back. No rules live here.

use nrm_kernel::gate;
use nrm_kernel::grpc::reply;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::referral::v1 as pb;
use pb::referral_service_server::ReferralService;
use tonic::{Request, Response, Status};

use crate::app::Referrals;

/// The tonic service.
#[derive(Debug, Clone)]
pub struct ReferralGrpc {
    app: Referrals,
}

impl ReferralGrpc {
    /// Serves `app`.
    #[must_use]
    pub fn new(app: Referrals) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl ReferralService for ReferralGrpc {
    async fn record_consent(
        &self,
        request: Request<pb::RecordConsentRequest>,
    ) -> Result<Response<pb::RecordConsentResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.record_consent(&ctx, request.get_ref()).await)
    }

    async fn withdraw_consent(
        &self,
        request: Request<pb::WithdrawConsentRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.withdraw_consent(&ctx, request.get_ref()).await)
    }

    async fn list_consents(
        &self,
        request: Request<pb::ListConsentsRequest>,
    ) -> Result<Response<pb::ListConsentsResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.list_consents(&ctx, request.get_ref()).await)
    }

    async fn create_referral(
        &self,
        request: Request<pb::CreateReferralRequest>,
    ) -> Result<Response<pb::CreateReferralResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.create_referral(&ctx, request.get_ref()).await)
    }

    async fn accept_referral(
        &self,
        request: Request<pb::AcceptReferralRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.accept(&ctx, request.get_ref()).await)
    }

    async fn decline_referral(
        &self,
        request: Request<pb::DeclineReferralRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.decline(&ctx, request.get_ref()).await)
    }

    async fn redirect_referral(
        &self,
        request: Request<pb::RedirectReferralRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.redirect(&ctx, request.get_ref()).await)
    }

    async fn record_service_delivered(
        &self,
        request: Request<pb::RecordServiceDeliveredRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.service_delivered(&ctx, request.get_ref()).await)
    }

    async fn close_referral(
        &self,
        request: Request<pb::CloseReferralRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.close(&ctx, request.get_ref()).await)
    }

    async fn add_plan_goal(
        &self,
        request: Request<pb::AddPlanGoalRequest>,
    ) -> Result<Response<pb::AddPlanGoalResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.add_goal(&ctx, request.get_ref()).await)
    }

    async fn record_follow_up(
        &self,
        request: Request<pb::RecordFollowUpRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.follow_up(&ctx, request.get_ref()).await)
    }

    async fn mark_goal_met(&self, request: Request<pb::MarkGoalMetRequest>) -> Result<Response<CommandResult>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.goal_met(&ctx, request.get_ref()).await)
    }

    async fn get_referral(&self, request: Request<pb::GetReferralRequest>) -> Result<Response<pb::Referral>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.get_referral(&ctx, request.get_ref()).await)
    }

    async fn get_plan(&self, request: Request<pb::GetPlanRequest>) -> Result<Response<pb::Plan>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.get_plan(&ctx, request.get_ref()).await)
    }

    async fn list_inbox(
        &self,
        request: Request<pb::ListInboxRequest>,
    ) -> Result<Response<pb::ListInboxResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.list_inbox(&ctx, request.get_ref()).await)
    }
}
