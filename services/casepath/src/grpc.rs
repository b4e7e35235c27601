//! The gRPC face of the service: take the caller the gate admitted, call the
//! application, map back. No rules live here.

use nrm_kernel::gate;
use nrm_kernel::grpc::reply;
use nrm_proto::casepath::v1 as pb;
use pb::casepath_service_server::CasepathService;
use tonic::{Request, Response, Status};

use crate::app::Casepath;
use crate::app::watch::{Answers, token_expiry};

/// The tonic service.
#[derive(Debug, Clone)]
pub struct CasepathGrpc {
    app: Casepath,
}

impl CasepathGrpc {
    /// Serves `app`.
    #[must_use]
    pub fn new(app: Casepath) -> Self {
        Self { app }
    }
}

/// When the caller's token expires. The gate verified it and requires its
/// `exp`; a watch whose end cannot be read is refused rather than left open
/// for ever.
fn expiry<T>(request: &Request<T>) -> Result<Option<chrono::DateTime<chrono::Utc>>, Status> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(token_expiry)
        .map(Some)
        .ok_or_else(|| Status::unauthenticated("the token's expiry cannot be read; a watch needs one"))
}

#[tonic::async_trait]
impl CasepathService for CasepathGrpc {
    type WatchPathStream = Answers<pb::Path>;
    type WatchInboxStream = Answers<pb::Inbox>;

    async fn get_path(&self, request: Request<pb::GetPathRequest>) -> Result<Response<pb::Path>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.get_path(&ctx, request.get_ref()).await)
    }

    async fn watch_path(
        &self,
        request: Request<pb::GetPathRequest>,
    ) -> Result<Response<Self::WatchPathStream>, Status> {
        let ctx = gate::context(&request)?;
        let expires_at = expiry(&request)?;
        reply(self.app.watch_path(ctx, request.get_ref(), expires_at).await)
    }

    async fn list_inbox(&self, request: Request<pb::ListInboxRequest>) -> Result<Response<pb::Inbox>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.list_inbox(&ctx, request.get_ref()).await)
    }

    async fn watch_inbox(
        &self,
        request: Request<pb::ListInboxRequest>,
    ) -> Result<Response<Self::WatchInboxStream>, Status> {
        let ctx = gate::context(&request)?;
        let expires_at = expiry(&request)?;
        reply(self.app.watch_inbox(ctx, request.get_ref(), expires_at).await)
    }

    async fn list_paths(
        &self,
        request: Request<pb::ListPathsRequest>,
    ) -> Result<Response<pb::ListPathsResponse>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.list_paths(&ctx, request.get_ref()).await)
    }

    async fn get_statistics(
        &self,
        request: Request<pb::GetStatisticsRequest>,
    ) -> Result<Response<pb::Statistics>, Status> {
        let ctx = gate::context(&request)?;
        reply(self.app.get_statistics(&ctx, request.get_ref()).await)
    }
}
