//! The reintegration referral of a person identified abroad who came home:
//! the service acts by itself, through the one command path, when
//! identification opens their case (`CaseOpenedFromAbroad`).
//!
//! In one unit of work, as the system actor `referral.homecoming`, under a
//! request key made of the case (`system:homecoming-<case_id>`): the person
//! as identification's event gives them (the persons read model is fed by
//! another runner and may not have them yet), the consent the person gave
//! abroad, recorded by this country's competent authority, and the referral
//! to the reintegration agency under it ([`crate::domain::homecoming`]). A
//! redelivery or a replay of the identification stream finds the recorded
//! answer and adds nothing. The permission it acts under is the matrix row
//! of `CreateReferral` for the competent authority's role (police, scope
//! case holders, which the competent authority is).

use chrono::Utc;
use nrm_kernel::auth::Role;
use nrm_kernel::command::{self, CallContext, Decided, OnConflict, Request};
use nrm_kernel::error::AppError;
use nrm_kernel::ids::{CaseId, ConsentId, PersonId, ReferralId};
use nrm_kernel::permissions;
use nrm_kernel::store::EventMetadata;
use nrm_kernel::validate;
use nrm_proto::common::v1::CommandResult;
use nrm_proto::identification::v1 as idpb;

use super::{Referrals, concerning, rejected};
use crate::domain::consent::{self, Consent};
use crate::domain::homecoming;
use crate::domain::referral::{self, Referral};
use crate::projections::insert_person;

/// The system actor's task name when a case from abroad is referred.
pub const HOMECOMING: &str = "referral.homecoming";
/// The command's name in fingerprints and the audit trail.
const METHOD: &str = "OpenReintegrationReferral";

/// What the service acts as when a case from abroad is referred: the system
/// actor, under the competent authority's row of `CreateReferral`; the
/// correlation continues the case's.
///
/// # Errors
/// Never with the kernel's matrix (police create referrals, scope case holders).
fn system_context(cause: Option<&EventMetadata>) -> Result<CallContext, AppError> {
    CallContext::system(HOMECOMING, permissions::REFERRAL, "CreateReferral", Role::Police, cause)
}

fn malformed(what: &str) -> AppError {
    AppError::Internal(format!("a case from abroad with a malformed {what}"))
}

impl Referrals {
    /// Records the consent the person gave abroad and refers them to the
    /// reintegration agency, in one unit of work, when the case `opened`
    /// (at case stream `version`) asks for it; or answers as the first
    /// referral of the case did (`replayed`). `None` when the case asks for
    /// no referral (the person did not agree, or is a child).
    ///
    /// # Errors
    /// The store's errors (the delivery is then tried again); a domain
    /// refusal (`FAILED_PRECONDITION`, for example `SELF_GRANT` when the
    /// reintegration agency is the competent authority), which parks it.
    #[tracing::instrument(skip_all, fields(case_id = tracing::field::Empty, person_id = tracing::field::Empty))]
    pub async fn refer_home(
        &self,
        opened: &idpb::CaseOpenedFromAbroad,
        version: i64,
        cause: Option<&EventMetadata>,
    ) -> Result<Option<CommandResult>, AppError> {
        let now = validate::timestamp(Utc::now());
        let plan = match homecoming::plan(opened, &self.policy.reintegration_agency, now) {
            Ok(plan) => plan,
            Err(why) => {
                tracing::info!(
                    reason = why.code(),
                    "case from abroad: no reintegration referral by itself"
                );
                return Ok(None);
            }
        };
        let case_id = CaseId::parse("case_id", &plan.person.case_id).map_err(|_| malformed("case ID"))?;
        let person_id = PersonId::parse("person_id", &plan.consent.person_id).map_err(|_| malformed("person ID"))?;
        tracing::Span::current().record("case_id", tracing::field::display(case_id));
        let ctx = system_context(cause)?;
        concerning(&ctx, person_id);
        let request_id = format!("homecoming-{case_id}");
        // The request is the case's origin: the same for every delivery of it.
        let abroad = opened.identified_abroad.clone().unwrap_or_default();
        let message = idpb::IdentifiedAbroad {
            from_country: abroad.from_country,
            return_id: abroad.return_id,
            ..Default::default()
        };
        let request = Request {
            method: METHOD,
            request_id: &request_id,
            message: &message,
        };
        let report = opened.report.clone().unwrap_or_default();
        let (consent_id, referral_id) = (ConsentId::new(), ReferralId::new());
        let (app, caller) = (self.clone(), ctx.clone());
        let answer = command::run(&self.store, &ctx, request, OnConflict::Retry, async move |uow| {
            insert_person(uow.conn(), person_id.as_uuid(), case_id.as_uuid(), &report, version).await?;
            let metadata = caller.metadata();
            let mut recorded = plan.consent.clone();
            recorded.consent_id = consent_id.to_string();
            let command = consent::Command::Record {
                consent: Box::new(recorded),
                person: Some(plan.person.clone()),
            };
            let events = consent::decide(&Consent::default(), &command).map_err(rejected("person", person_id))?;
            let (consent, appended) = app
                .append_new_consent(uow, consent_id, person_id, &events, &metadata)
                .await?;
            let mut created = plan.referral.clone();
            created.referral_id = referral_id.to_string();
            created.consent_id = consent_id.to_string();
            let command = referral::Command::Create {
                referral: Box::new(created),
                person: Some(plan.person.clone()),
                consent: Box::new(consent),
                allow_not_identified: app.policy.allow_not_identified,
                deadlines: app.policy.deadlines,
            };
            let events =
                referral::decide(&Referral::default(), &command).map_err(rejected(referral::NAME, referral_id))?;
            let mut event_ids: Vec<String> = appended.event_ids.iter().map(ToString::to_string).collect();
            event_ids.extend(
                app.append_referral(uow, referral_id, &Referral::default(), &events, &metadata)
                    .await?,
            );
            Ok(Decided {
                answer: CommandResult {
                    aggregate_id: referral_id.to_string(),
                    version: events.len() as u64,
                    event_ids,
                    replayed: false,
                },
                subject: referral_id.to_string(),
                purpose: "handover",
                linked: vec![consent_id.to_string()],
            })
        })
        .await?;
        tracing::info!(referral_id = %answer.aggregate_id, replayed = answer.replayed, "person from abroad referred for reintegration");
        Ok(Some(answer))
    }
}
