//! Filing an anonymous notification: coded fields only, on its own stream
//! (`notification-<uuid>`), on the kernel's command path so that a retry with
//! the same request ID answers as the first run did and appends nothing.
//! The audit entry names the notification ID only; it concerns no person.
//! Its events carry a correlation of their own, never the caller's.

use chrono::Utc;
use nrm_kernel::AppError;
use nrm_kernel::command::{self, CallContext, OnConflict, Planned, Request};
use nrm_kernel::validate;
use nrm_proto::identification::v1 as pb;
use uuid::Uuid;

use super::{CONTEXT, Identification, to_new_events};
use crate::domain::notification::{self, Command, Notification, NotificationError, NotificationId};
use crate::domain::parse;

impl From<NotificationError> for AppError {
    fn from(err: NotificationError) -> Self {
        AppError::precondition(err.code(), "notification", err.to_string())
    }
}

impl Identification {
    /// Files an anonymous notification (every reporting role; scope any).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming bad fields; `FAILED_PRECONDITION`
    /// (`CHILD_MUST_BE_REPORTED`) for a child's age band; `ALREADY_EXISTS`
    /// for a request ID used for another request; the store's errors.
    #[tracing::instrument(skip_all, fields(notification_id = tracing::field::Empty))]
    pub async fn notify(
        &self,
        ctx: &CallContext,
        req: &pb::FileAnonymousNotificationRequest,
    ) -> Result<pb::FileAnonymousNotificationResponse, AppError> {
        let valid = parse::notification(req)?;
        let id = NotificationId::new();
        let command = Command::File {
            id,
            coded: valid.coded,
            now: validate::timestamp(Utc::now()),
        };
        // A new aggregate: decided before the command path, so that a refusal
        // names no notification that never was.
        let events = notification::decide(&Notification::default(), &command)?;
        tracing::Span::current().record("notification_id", tracing::field::display(id));
        ctx.concerns(id);
        // A correlation of its own: the caller's (`x-correlation-id`) may be
        // that of a case's commands, and would link the notification to it.
        let ctx = &CallContext::new(ctx.caller.clone(), Uuid::now_v7(), *ctx.permit());
        ctx.concerns(id);
        let request = Request {
            method: "FileAnonymousNotification",
            request_id: &valid.request_id,
            message: req,
        };
        let events = to_new_events(&events);
        let subject = self.bus.subject(CONTEXT, notification::NAME, &id.to_string());
        // The stream is new: another writer on it is a conflict to refuse.
        let result = command::run_append(&self.store, ctx, request, OnConflict::Refuse, async move || {
            Ok(Planned {
                stream_id: notification::stream_id(id),
                expected_version: 0,
                events: events.clone(),
                subject: subject.clone(),
                audit_subject: id.to_string(),
                answer: Box::new(move |appended| command::result(id, appended)),
            })
        })
        .await?;
        // A retry answers the first run's result, whose aggregate is the first notification.
        Ok(pb::FileAnonymousNotificationResponse {
            notification_id: result.aggregate_id.clone(),
            result: Some(result),
        })
    }
}
