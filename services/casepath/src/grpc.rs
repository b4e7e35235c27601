//! The gRPC face of the service: take the caller the gate admitted, call the
//! application, map back. No rules live here.
//!
//! STUB: the query helper replaces this file.

use std::pin::Pin;

use futures::Stream;
use nrm_proto::casepath::v1 as pb;
use pb::casepath_service_server::CasepathService;
use tonic::{Request, Response, Status};

use crate::app::Casepath;

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

type Watch<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl CasepathService for CasepathGrpc {
    type WatchPathStream = Watch<pb::Path>;
    type WatchInboxStream = Watch<pb::Inbox>;

    async fn get_path(&self, _request: Request<pb::GetPathRequest>) -> Result<Response<pb::Path>, Status> {
        let _ = &self.app;
        Err(Status::unimplemented("GetPath"))
    }

    async fn watch_path(
        &self,
        _request: Request<pb::GetPathRequest>,
    ) -> Result<Response<Self::WatchPathStream>, Status> {
        Err(Status::unimplemented("WatchPath"))
    }

    async fn list_inbox(&self, _request: Request<pb::ListInboxRequest>) -> Result<Response<pb::Inbox>, Status> {
        Err(Status::unimplemented("ListInbox"))
    }

    async fn watch_inbox(
        &self,
        _request: Request<pb::ListInboxRequest>,
    ) -> Result<Response<Self::WatchInboxStream>, Status> {
        Err(Status::unimplemented("WatchInbox"))
    }

    async fn list_paths(
        &self,
        _request: Request<pb::ListPathsRequest>,
    ) -> Result<Response<pb::ListPathsResponse>, Status> {
        Err(Status::unimplemented("ListPaths"))
    }

    async fn get_statistics(
        &self,
        _request: Request<pb::GetStatisticsRequest>,
    ) -> Result<Response<pb::Statistics>, Status> {
        Err(Status::unimplemented("GetStatistics"))
    }
}
