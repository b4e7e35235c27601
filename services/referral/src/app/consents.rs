//! Recording and withdrawing consents. A withdrawal cancels every open
//! referral under the consent in the same transaction; the `consents` row is
//! what concurrent referrals lock, so none slips in beside a withdrawal.

use chrono::Utc;
use nrm_kernel::audit;
use nrm_kernel::command::{self, CallContext};
use nrm_kernel::error::AppError;
use nrm_kernel::ids::{ConsentId, ReferralId};
use nrm_kernel::validate;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::referral::v1 as pb;
use uuid::Uuid;

use super::{REFERRERS, Referrals, rejected, retry_on_conflict, to_new_events};
use crate::domain::consent::{self, Command, Consent};
use crate::domain::parse;
use crate::domain::referral as referral_domain;

/// Reason code of referrals cancelled by a withdrawn consent.
pub const CONSENT_WITHDRAWN: &str = "CONSENT_WITHDRAWN";

impl Referrals {
    /// The consent folded from its events.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load_consent(&self, consent_id: ConsentId) -> Result<Consent, AppError> {
        self.fold(&consent::stream_id(consent_id), consent::evolve).await
    }

    /// Records a consent.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming bad fields, `PERMISSION_DENIED`,
    /// `FAILED_PRECONDITION` (`CHILD_NEEDS_GUARDIAN`).
    #[tracing::instrument(skip_all, fields(consent_id = tracing::field::Empty))]
    pub async fn record_consent(
        &self,
        ctx: &CallContext,
        req: &pb::RecordConsentRequest,
    ) -> Result<pb::RecordConsentResponse, AppError> {
        ctx.caller.require("record a consent", REFERRERS)?;
        let valid = parse::record_consent(req, Utc::now())?;
        let key = ctx.request_key(&valid.request_id);
        let fp = command::fingerprint("RecordConsent", req);
        if let Some(mut previous) = command::replay::<pb::RecordConsentResponse>(&self.store, &key, &fp).await? {
            if let Some(r) = previous.result.as_mut() {
                r.replayed = true;
            }
            return Ok(previous);
        }
        let consent_id = ConsentId::new();
        tracing::Span::current().record("consent_id", tracing::field::display(consent_id));
        // A child is a child whether the request or identification says so.
        let child = req.child || self.person(valid.person_id).await?.is_some_and(|p| p.child);
        let mut recorded = valid.consent;
        recorded.consent_id = consent_id.to_string();
        let command = Command::Record {
            consent: Box::new(recorded.clone()),
            child,
        };
        let events = consent::decide(&Consent::default(), &command).map_err(rejected(consent::NAME, consent_id))?;
        let mut uow = self.store.begin().await?;
        let appended = uow
            .append(
                &consent::stream_id(consent_id),
                0,
                &to_new_events(&events),
                &ctx.metadata(),
                &self.subject(consent::NAME, &consent_id),
            )
            .await?;
        sqlx::query(
            "INSERT INTO consents (consent_id, person_id, recipient_agency, withdrawn) VALUES ($1, $2, $3, false)",
        )
        .bind(consent_id.as_uuid())
        .bind(valid.person_id.as_uuid())
        .bind(&recorded.recipient_agency)
        .execute(uow.conn())
        .await?;
        audit::record(
            uow.conn(),
            &ctx.caller.actor,
            "RecordConsent",
            &consent_id.to_string(),
            "command",
        )
        .await?;
        let response = pb::RecordConsentResponse {
            consent_id: consent_id.to_string(),
            result: Some(command::result(consent_id, &appended)),
        };
        command::finish(&self.store, uow, &key, &fp, response).await
    }

    /// Withdraws a consent and cancels every open referral under it, in one transaction.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `PERMISSION_DENIED`, `NOT_FOUND`, `FAILED_PRECONDITION` (`ALREADY_WITHDRAWN`).
    #[tracing::instrument(skip_all, fields(consent_id = %req.consent_id))]
    pub async fn withdraw_consent(
        &self,
        ctx: &CallContext,
        req: &pb::WithdrawConsentRequest,
    ) -> Result<CommandResult, AppError> {
        ctx.caller.require("withdraw a consent", REFERRERS)?;
        let valid = parse::withdraw_consent(req)?;
        let key = ctx.request_key(&valid.request_id);
        let fp = command::fingerprint("WithdrawConsent", req);
        if let Some(previous) = command::replay::<CommandResult>(&self.store, &key, &fp).await? {
            return Ok(command::replayed(previous));
        }
        let result = retry_on_conflict(|| self.withdraw_once(ctx, &key, &fp, valid.consent_id)).await;
        match result {
            // A twin of this request may have withdrawn first: answer as it did.
            Err(AppError::FailedPrecondition { .. }) | Err(AppError::Conflict { .. }) => {
                match command::replay::<CommandResult>(&self.store, &key, &fp).await? {
                    Some(previous) => Ok(command::replayed(previous)),
                    None => result,
                }
            }
            other => other,
        }
    }

    async fn withdraw_once(
        &self,
        ctx: &CallContext,
        key: &str,
        fp: &[u8],
        consent_id: ConsentId,
    ) -> Result<CommandResult, AppError> {
        let state = self.load_consent(consent_id).await?;
        let now = validate::timestamp(Utc::now());
        let events =
            consent::decide(&state, &Command::Withdraw { now }).map_err(rejected(consent::NAME, consent_id))?;
        let metadata = ctx.metadata();
        let mut uow = self.store.begin().await?;
        let appended = uow
            .append(
                &consent::stream_id(consent_id),
                state.version,
                &to_new_events(&events),
                &metadata,
                &self.subject(consent::NAME, &consent_id),
            )
            .await?;
        let mut event_ids: Vec<String> = appended.event_ids.iter().map(ToString::to_string).collect();
        // The row lock waits for referrals being created under the consent;
        // the query after it sees them.
        sqlx::query("UPDATE consents SET withdrawn = true WHERE consent_id = $1")
            .bind(consent_id.as_uuid())
            .execute(uow.conn())
            .await?;
        let open: Vec<Uuid> =
            sqlx::query_scalar("SELECT referral_id FROM open_referrals WHERE consent_id = $1 ORDER BY referral_id")
                .bind(consent_id.as_uuid())
                .fetch_all(uow.conn())
                .await?;
        for referral_id in open.into_iter().map(ReferralId::from_uuid) {
            let referral = Self::fold_in(
                &mut uow,
                &referral_domain::stream_id(referral_id),
                referral_domain::evolve,
            )
            .await?;
            let command = referral_domain::Command::Cancel {
                reason: CONSENT_WITHDRAWN.into(),
            };
            let cancelled =
                referral_domain::decide(&referral, &command).map_err(rejected(referral_domain::NAME, referral_id))?;
            let ids = self
                .append_referral(&mut uow, referral_id, &referral, &cancelled, &metadata)
                .await?;
            event_ids.extend(ids);
            tracing::info!(referral_id = %referral_id, "referral cancelled: consent withdrawn");
        }
        audit::record(
            uow.conn(),
            &ctx.caller.actor,
            "WithdrawConsent",
            &consent_id.to_string(),
            "command",
        )
        .await?;
        let response = CommandResult {
            aggregate_id: consent_id.to_string(),
            version: appended.version,
            event_ids,
            replayed: false,
        };
        command::finish(&self.store, uow, key, fp, response).await
    }

    /// Whether the consent is still active inside `uow`, locking its row
    /// against a concurrent withdrawal until the transaction ends.
    pub(crate) async fn lock_consent(
        &self,
        uow: &mut nrm_kernel::store::UnitOfWork,
        consent_id: ConsentId,
    ) -> Result<bool, AppError> {
        let withdrawn: Option<bool> =
            sqlx::query_scalar("SELECT withdrawn FROM consents WHERE consent_id = $1 FOR SHARE")
                .bind(consent_id.as_uuid())
                .fetch_optional(uow.conn())
                .await?;
        Ok(withdrawn == Some(false))
    }
}
