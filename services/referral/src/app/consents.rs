//! Recording, withdrawing, expiring and listing consents.
//!
//! A consent is recorded by an agency holding the person's case (the
//! reporting agency or the competent authority), never by the agency it lets
//! in, for a person identification told us of; the child flag is
//! identification's; the caller's officer attests it. Its expiry is a timer
//! written in the recording transaction. A withdrawal (by the recording
//! agency or the national coordinator) and an expiry end it the same way, in
//! one transaction: a `ConsentWithdrawn` (reason `WITHDRAWN` or `EXPIRED`),
//! and every open referral under it cancelled. The `consents` row is what
//! concurrent referrals lock, so none slips in beside the end of a consent.

use chrono::{DateTime, Utc};
use nrm_kernel::command::{self, CallContext, Decided, OnConflict, Request};
use nrm_kernel::error::AppError;
use nrm_kernel::ids::{ConsentId, PersonId, ReferralId};
use nrm_kernel::permissions::Standing;
use nrm_kernel::store::{Appended, EventMetadata, UnitOfWork};
use nrm_kernel::{audit, timers, validate};
use nrm_proto::common::v1::CommandResult;
use nrm_proto::referral::v1 as pb;
use pb::referral_event::Event;
use uuid::Uuid;

use super::{CONSENT_EXPIRES, Referrals, concerning, rejected, to_new_events};
use crate::domain::consent::{self, Command, Consent};
use crate::domain::referral as referral_domain;
use crate::domain::{DomainError, parse};

/// Reason code of referrals cancelled by a withdrawn consent.
pub const CONSENT_WITHDRAWN: &str = "CONSENT_WITHDRAWN";
/// Reason code of referrals cancelled by an expired consent.
pub const CONSENT_EXPIRED: &str = "CONSENT_EXPIRED";

/// What ending a consent appended.
struct Ended {
    /// The consent's new version.
    version: u64,
    /// Every event ID appended (the consent's and its referrals').
    event_ids: Vec<String>,
    /// The referrals cancelled with it.
    cancelled: Vec<ReferralId>,
}

/// The consent as its readers see it (coded fields only).
#[must_use]
pub fn view(state: &Consent, now: &prost_types::Timestamp) -> pb::ConsentView {
    let recorded = state.recorded.clone().unwrap_or_default();
    pb::ConsentView {
        consent_id: recorded.consent_id,
        case_id: recorded.case_id,
        given_by: recorded.given_by,
        recipient_agency: recorded.recipient_agency,
        purposes: recorded.purposes,
        data_categories: recorded.data_categories,
        recorded_by_agency: recorded.recorded_by_agency,
        attestation: recorded.attestation,
        recorded_at: recorded.recorded_at,
        expires_at: recorded.expires_at,
        status: state.status(now) as i32,
        ended_at: state.ended_at,
    }
}

impl Referrals {
    /// The consent folded from its events.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn load_consent(&self, consent_id: ConsentId) -> Result<Consent, AppError> {
        self.fold(&consent::stream_id(consent_id), consent::evolve).await
    }

    /// As [`Referrals::load_consent`], read inside `uow`.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub(crate) async fn load_consent_in(uow: &mut UnitOfWork, consent_id: ConsentId) -> Result<Consent, AppError> {
        Self::fold_in(uow, &consent::stream_id(consent_id), consent::evolve).await
    }

    /// Records a consent, and its expiry timer, in one transaction.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming bad fields (also the attestation a child's
    /// consent needs), `PERMISSION_DENIED` (not an agency holding the case),
    /// `FAILED_PRECONDITION` (`UNKNOWN_PERSON`, `CASE_MISMATCH`, `SELF_GRANT`,
    /// `CHILD_NEEDS_GUARDIAN`).
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty, consent_id = tracing::field::Empty))]
    pub async fn record_consent(
        &self,
        ctx: &CallContext,
        req: &pb::RecordConsentRequest,
    ) -> Result<pb::RecordConsentResponse, AppError> {
        let valid = parse::record_consent(req, Utc::now())?;
        concerning(ctx, valid.person_id);
        let consent_id = ConsentId::new();
        tracing::Span::current().record("consent_id", tracing::field::display(consent_id));
        let request = Request {
            method: "RecordConsent",
            request_id: &valid.request_id,
            message: req,
        };
        // The attempt owns what it uses: a future that borrows from the
        // handler is not known to be `Send` (rust-lang/rust#110338).
        let (app, caller) = (self.clone(), ctx.clone());
        let (person_id, given) = (valid.person_id, valid.consent);
        command::run(&self.store, ctx, request, OnConflict::Retry, async move |uow| {
            let person = app.case_held(uow.conn(), &caller, person_id).await?;
            let mut recorded = given.clone();
            recorded.consent_id = consent_id.to_string();
            caller.agency().clone_into(&mut recorded.recorded_by_agency);
            if let Some(attestation) = recorded.attestation.as_mut() {
                caller
                    .caller
                    .actor
                    .officer
                    .clone_into(&mut attestation.attesting_officer);
            }
            let command = Command::Record {
                consent: Box::new(recorded),
                person,
            };
            let events = consent::decide(&Consent::default(), &command).map_err(rejected("person", person_id))?;
            let (_, appended) = app
                .append_new_consent(uow, consent_id, person_id, &events, &caller.metadata())
                .await?;
            Ok(Decided {
                answer: pb::RecordConsentResponse {
                    consent_id: consent_id.to_string(),
                    result: Some(command::result(consent_id, &appended)),
                },
                subject: consent_id.to_string(),
                purpose: "command",
                linked: Vec::new(),
            })
        })
        .await
    }

    /// Appends the events of a new consent (its `ConsentRecorded`) and
    /// writes its row and its expiry timer beside them; the consent as
    /// recorded and what the append wrote.
    pub(crate) async fn append_new_consent(
        &self,
        uow: &mut UnitOfWork,
        consent_id: ConsentId,
        person_id: PersonId,
        events: &[Event],
        metadata: &EventMetadata,
    ) -> Result<(Consent, Appended), AppError> {
        let state = events.iter().fold(Consent::default(), consent::evolve);
        let recorded = state
            .recorded
            .as_ref()
            .ok_or_else(|| AppError::Internal("no consent recorded".into()))?;
        let expires_at = recorded.expires_at.as_ref().and_then(validate::to_datetime);
        let appended = uow
            .append(
                &consent::stream_id(consent_id),
                0,
                &to_new_events(events),
                metadata,
                &self.subject(consent::NAME, &consent_id),
            )
            .await?;
        sqlx::query(
            "INSERT INTO consents (consent_id, person_id, recipient_agency, withdrawn, recording_agency, expires_at)
             VALUES ($1, $2, $3, false, $4, $5)",
        )
        .bind(consent_id.as_uuid())
        .bind(person_id.as_uuid())
        .bind(&recorded.recipient_agency)
        .bind(&recorded.recorded_by_agency)
        .bind(expires_at)
        .execute(uow.conn())
        .await?;
        if let Some(expires_at) = expires_at {
            timers::schedule(uow.conn(), CONSENT_EXPIRES, &consent_id.to_string(), expires_at, &[]).await?;
        }
        Ok((state, appended))
    }

    /// Withdraws a consent (the recording agency, or the national
    /// coordinator) and cancels every open referral under it, in one
    /// transaction; decided again on the consent as it stands when another
    /// writer moved it on.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `PERMISSION_DENIED` (another agency), `NOT_FOUND`,
    /// `FAILED_PRECONDITION` (`ALREADY_WITHDRAWN`: withdrawn or expired).
    #[tracing::instrument(skip_all, fields(consent_id = tracing::field::Empty))]
    pub async fn withdraw_consent(
        &self,
        ctx: &CallContext,
        req: &pb::WithdrawConsentRequest,
    ) -> Result<CommandResult, AppError> {
        let valid = parse::withdraw_consent(req)?;
        let consent_id = valid.consent_id;
        tracing::Span::current().record("consent_id", tracing::field::display(consent_id));
        ctx.concerns(consent_id);
        let request = Request {
            method: "WithdrawConsent",
            request_id: &valid.request_id,
            message: req,
        };
        // Owned, as in `record_consent`.
        let (app, caller) = (self.clone(), ctx.clone());
        command::run(&self.store, ctx, request, OnConflict::Retry, async move |uow| {
            let state = Self::fold_in(uow, &consent::stream_id(consent_id), consent::evolve).await?;
            let Some(recorded) = &state.recorded else {
                return Err(rejected(consent::NAME, consent_id)(DomainError::NotFound(
                    consent::NAME,
                )));
            };
            if let Ok(person_id) = Uuid::parse_str(&recorded.person_id) {
                caller.concerns_person(person_id);
            }
            let owner = Self::recording_agency(uow, consent_id, recorded).await?;
            caller.check(&Standing {
                owner: Some(owner.as_str()).filter(|a| !a.is_empty()),
                ..Standing::default()
            })?;
            let now = validate::timestamp(Utc::now());
            let events =
                consent::decide(&state, &Command::Withdraw { now }).map_err(rejected(consent::NAME, consent_id))?;
            let ended = app
                .end_consent(uow, consent_id, &state, &events, &caller.metadata(), CONSENT_WITHDRAWN)
                .await?;
            let (version, event_ids) = (ended.version, ended.event_ids);
            Ok(Decided {
                answer: CommandResult {
                    aggregate_id: consent_id.to_string(),
                    version,
                    event_ids,
                    replayed: false,
                },
                subject: consent_id.to_string(),
                purpose: "command",
                linked: Vec::new(),
            })
        })
        .await
    }

    /// Appends the end of a consent (`events`: its `ConsentWithdrawn`) to a
    /// consent standing at `state`, marks its row ended, cancels its expiry
    /// timer and every open referral under it with `reason`; returns the
    /// consent's new version, every event ID appended and the referrals
    /// cancelled.
    ///
    /// Locks in one order on both paths, the timer row first: a firing
    /// expiry holds it (`FOR UPDATE`) before it appends, so a withdrawal
    /// waits for it here, before its own append (which then conflicts and
    /// is decided again), instead of holding the consent's next version
    /// while it waits for the timer row.
    async fn end_consent(
        &self,
        uow: &mut UnitOfWork,
        consent_id: ConsentId,
        state: &Consent,
        events: &[Event],
        metadata: &EventMetadata,
        reason: &str,
    ) -> Result<Ended, AppError> {
        timers::cancel(uow.conn(), CONSENT_EXPIRES, &consent_id.to_string()).await?;
        let appended = uow
            .append(
                &consent::stream_id(consent_id),
                state.version,
                &to_new_events(events),
                metadata,
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
        let mut cancelled_referrals = Vec::with_capacity(open.len());
        for referral_id in open.into_iter().map(ReferralId::from_uuid) {
            let referral =
                Self::fold_in(uow, &referral_domain::stream_id(referral_id), referral_domain::evolve).await?;
            let command = referral_domain::Command::Cancel { reason: reason.into() };
            let cancelled =
                referral_domain::decide(&referral, &command).map_err(rejected(referral_domain::NAME, referral_id))?;
            let ids = self
                .append_referral(uow, referral_id, &referral, &cancelled, metadata)
                .await?;
            event_ids.extend(ids);
            tracing::info!(referral_id = %referral_id, reason, "referral cancelled: its consent ended");
            cancelled_referrals.push(referral_id);
        }
        Ok(Ended {
            version: appended.version,
            event_ids,
            cancelled: cancelled_referrals,
        })
    }

    /// The agency that recorded a consent (it may withdraw it): on its
    /// `ConsentRecorded` since issue 9; on an older one, the agency of the
    /// event's actor, who recorded it.
    async fn recording_agency(
        uow: &mut UnitOfWork,
        consent_id: ConsentId,
        recorded: &pb::ConsentRecorded,
    ) -> Result<String, AppError> {
        if !recorded.recorded_by_agency.is_empty() {
            return Ok(recorded.recorded_by_agency.clone());
        }
        let agency: Option<String> =
            sqlx::query_scalar("SELECT metadata #>> '{actor,agency}' FROM events WHERE stream_id = $1 AND version = 1")
                .bind(consent::stream_id(consent_id))
                .fetch_optional(uow.conn())
                .await?
                .flatten();
        Ok(agency.unwrap_or_default())
    }

    /// Upgrades the consents recorded before issue 9 (their rows have no
    /// recording agency and no expiry, and they have no expiry timer): fills
    /// both from each one's events and schedules its expiry timer, for a
    /// consent that has an expiry and has not ended. One already past its
    /// expiry gets a timer due at once, so it ends on the timer's path (its
    /// open referrals cancelled, audited) at the runner's next poll; until
    /// then its row's expiry already keeps referrals and plan reads off it.
    /// Run at start, before serving; idempotent (an upgraded row has its
    /// agency and is not read again) and safe with several replicas (a
    /// transaction-scoped advisory lock queues them, and the second finds
    /// nothing left). Returns how many rows it upgraded.
    ///
    /// # Errors
    /// When the store fails or an event does not decode.
    pub async fn upgrade_consents(&self) -> Result<usize, AppError> {
        const BATCH: i64 = 100;
        let mut upgraded = 0;
        let mut after = Uuid::nil();
        loop {
            let mut uow = self.store.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('referral.upgrade_consents', 0))")
                .execute(uow.conn())
                .await?;
            let ids: Vec<Uuid> = sqlx::query_scalar(
                "SELECT consent_id FROM consents WHERE recording_agency = '' AND consent_id > $1
                 ORDER BY consent_id LIMIT $2 FOR UPDATE",
            )
            .bind(after)
            .bind(BATCH)
            .fetch_all(uow.conn())
            .await?;
            let Some(last) = ids.last() else {
                return Ok(upgraded);
            };
            after = *last;
            for consent_id in ids.into_iter().map(ConsentId::from_uuid) {
                let state = Self::fold_in(&mut uow, &consent::stream_id(consent_id), consent::evolve).await?;
                let Some(recorded) = &state.recorded else {
                    tracing::warn!(consent_id = %consent_id, "consent row without its events; not upgraded");
                    continue;
                };
                let agency = Self::recording_agency(&mut uow, consent_id, recorded).await?;
                let expires_at = recorded.expires_at.as_ref().and_then(validate::to_datetime);
                sqlx::query("UPDATE consents SET recording_agency = $2, expires_at = $3 WHERE consent_id = $1")
                    .bind(consent_id.as_uuid())
                    .bind(&agency)
                    .bind(expires_at)
                    .execute(uow.conn())
                    .await?;
                if let Some(expires_at) = expires_at.filter(|_| !state.withdrawn) {
                    timers::schedule(uow.conn(), CONSENT_EXPIRES, &consent_id.to_string(), expires_at, &[]).await?;
                }
                upgraded += 1;
                tracing::info!(consent_id = %consent_id, expires = expires_at.is_some(), "consent recorded before issue 9 upgraded");
            }
            uow.commit().await?;
        }
    }

    /// The expiry of a consent came: it ends exactly as on withdrawal
    /// (reason `EXPIRED`), unless it ended before; inside the timer's unit of work.
    ///
    /// # Errors
    /// When the store fails (the timer then stays pending).
    pub async fn consent_expires(
        &self,
        uow: &mut UnitOfWork,
        consent_id: ConsentId,
        due_at: DateTime<Utc>,
    ) -> Result<bool, AppError> {
        let state = Self::fold_in(uow, &consent::stream_id(consent_id), consent::evolve).await?;
        // The timer's due time, never this machine's clock (see `answer_due`).
        let command = Command::Expire {
            now: validate::timestamp(due_at + chrono::Duration::nanoseconds(999)),
        };
        let events = match consent::decide(&state, &command) {
            Ok(events) => events,
            Err(DomainError::NotFound(_)) => {
                tracing::warn!(consent_id = %consent_id, "expiry timer for an unknown consent");
                return Ok(false);
            }
            Err(err) => return Err(AppError::Internal(err.to_string())),
        };
        if events.is_empty() {
            return Ok(false);
        }
        let metadata = EventMetadata::system(CONSENT_EXPIRES, None);
        let ended = self
            .end_consent(uow, consent_id, &state, &events, &metadata, CONSENT_EXPIRED)
            .await?;
        let person = state.recorded.as_ref().and_then(|r| Uuid::parse_str(&r.person_id).ok());
        // Audited as the system actor, as a hold's expiry is: the consent
        // and each referral it cancelled, under the person.
        let entries = std::iter::once(("ConsentExpired", consent_id.to_string())).chain(
            ended
                .cancelled
                .iter()
                .map(|referral_id| ("ReferralCancelled:consent_expired", referral_id.to_string())),
        );
        for (action, subject) in entries {
            let entry = audit::Entry::new(&metadata.actor, action, &subject, "timer");
            let entry = person.map_or(entry, |person| entry.person(person));
            audit::append(uow.conn(), &entry).await?;
        }
        tracing::info!(consent_id = %consent_id, "consent expired: sharing under it ended");
        Ok(true)
    }

    /// The consents of a person, for the agencies holding the case and the national coordinator.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `PERMISSION_DENIED`, `FAILED_PRECONDITION` (`UNKNOWN_PERSON`).
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty))]
    pub async fn list_consents(
        &self,
        ctx: &CallContext,
        req: &pb::ListConsentsRequest,
    ) -> Result<pb::ListConsentsResponse, AppError> {
        let person_id = PersonId::parse("person_id", &req.person_id).map_err(|v| AppError::InvalidArgument(vec![v]))?;
        concerning(ctx, person_id);
        if self.case_held(self.store.pool(), ctx, person_id).await?.is_none() {
            return Err(rejected("person", person_id)(DomainError::UnknownPerson));
        }
        // The row's recording agency: a consent recorded before issue 9 has
        // it there only (see `upgrade_consents`).
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT consent_id, recording_agency FROM consents WHERE person_id = $1 ORDER BY consent_id",
        )
        .bind(person_id.as_uuid())
        .fetch_all(self.store.pool())
        .await?;
        let now = validate::timestamp(Utc::now());
        let mut consents = Vec::with_capacity(rows.len());
        for (id, recording_agency) in rows {
            let state = self.load_consent(ConsentId::from_uuid(id)).await?;
            if state.recorded.is_some() {
                let mut view = view(&state, &now);
                if view.recorded_by_agency.is_empty() {
                    view.recorded_by_agency = recording_agency;
                }
                consents.push(view);
            }
        }
        Ok(pb::ListConsentsResponse { consents })
    }

    /// Whether the consent is still active inside `uow` (not ended, not past
    /// its expiry), locking its row against a concurrent withdrawal or expiry
    /// until the transaction ends.
    pub(crate) async fn lock_consent(&self, uow: &mut UnitOfWork, consent_id: ConsentId) -> Result<bool, AppError> {
        let active: Option<bool> = sqlx::query_scalar(
            "SELECT NOT withdrawn AND (expires_at IS NULL OR expires_at > now()) FROM consents
             WHERE consent_id = $1 FOR SHARE",
        )
        .bind(consent_id.as_uuid())
        .fetch_optional(uow.conn())
        .await?;
        Ok(active == Some(true))
    }
}
