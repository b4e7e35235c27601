//! Opening the case of a person identified abroad, on the handover of their
//! return: the service acts by itself, through the one command path.
//!
//! Nobody calls: the handover crossed the border ([`crate::homecoming`]).
//! The command runs as the system actor `identification.handover` under a
//! request key made of the return (`system:homecoming-<from>-<return_id>`),
//! so every later delivery of the same handover (a redelivery, a second
//! snapshot, a replay of the stream) finds the recorded answer and adds
//! nothing. The permission it acts under is the matrix row of
//! `ReportPresumedVictim` for the role of the agency that receives the
//! person (IOM, scope any): what that agency could report itself.

use nrm_kernel::auth::Role;
use nrm_kernel::command::{self, CallContext, OnConflict, Request};
use nrm_kernel::error::AppError;
use nrm_kernel::ids::{CaseId, PersonId};
use nrm_kernel::permissions;
use nrm_kernel::store::EventMetadata;
use nrm_proto::identification::v1 as pb;

use super::Identification;
use crate::domain::Command;
use crate::domain::abroad::{self, Homecoming};

/// The system actor's task name when a handover opens a case.
pub const HANDOVER: &str = "identification.handover";
/// The command's name in fingerprints and the audit trail.
const METHOD: &str = "OpenCaseFromAbroad";

/// What the service acts as when a handover opens a case: the system actor,
/// under the receiving agency's row of `ReportPresumedVictim`; the
/// correlation continues the handover's.
///
/// # Errors
/// Never with the kernel's matrix (IOM may report, scope any).
fn system_context(cause: Option<&EventMetadata>) -> Result<CallContext, AppError> {
    CallContext::system(
        HANDOVER,
        permissions::IDENTIFICATION,
        "ReportPresumedVictim",
        Role::Iom,
        cause,
    )
}

/// Who handles the cases that returns open here.
#[derive(Debug, Clone)]
pub struct HomecomingRules {
    /// This country's code (lower case).
    pub country: String,
    /// The agency code of the competent authority for cases opened on a
    /// return (police or a prosecutor).
    pub competent_authority: String,
    /// The agencies that receive persons at a handover, comma-separated.
    pub receivers: String,
}

/// The request ID of the case a return opens: one per return and country.
#[must_use]
pub fn request_id(abroad: &pb::IdentifiedAbroad) -> String {
    format!("homecoming-{}-{}", abroad.from_country, abroad.return_id)
}

impl Identification {
    /// The competent authority here for cases opened on a return.
    #[must_use]
    pub fn here(&self) -> abroad::Here<'_> {
        abroad::Here {
            country: &self.homecoming.country,
            competent_authority: &self.homecoming.competent_authority,
            receivers: &self.homecoming.receivers,
        }
    }

    /// Opens the case of a person handed over from abroad, or answers as the
    /// first opening for the same return did (`replayed`). The identifiers
    /// that crossed are sealed under a new data key of the person; their
    /// match keys flag earlier cases of the same person (to the competent
    /// authority and the coordinator, as for reports).
    ///
    /// # Errors
    /// The store's errors (the delivery is then tried again);
    /// [`AppError::RequestIdReused`] when the case was opened and its
    /// person erased since (the erasure clears the record's fingerprint).
    #[tracing::instrument(skip_all, fields(return_id = %home.abroad.return_id, from = %home.abroad.from_country, case_id = tracing::field::Empty))]
    pub async fn open_from_abroad(
        &self,
        home: Homecoming,
        cause: Option<&EventMetadata>,
    ) -> Result<pb::ReportPresumedVictimResponse, AppError> {
        let ctx = system_context(cause)?;
        let request_id = request_id(&home.abroad);
        // The request is the return's handover: the same for every snapshot of it.
        let message = pb::IdentifiedAbroad {
            from_country: home.abroad.from_country.clone(),
            return_id: home.abroad.return_id.clone(),
            ..Default::default()
        };
        let request = Request {
            method: METHOD,
            request_id: &request_id,
            message: &message,
        };
        let case_id = CaseId::new();
        let person_id = PersonId::new();
        tracing::Span::current().record("case_id", tracing::field::display(case_id));
        ctx.concerns(case_id);
        ctx.concerns_person(person_id.as_uuid());
        // Owned, as in `report`.
        let (app, caller) = (self.clone(), ctx.clone());
        let answer = command::run(&self.store, &ctx, request, OnConflict::Retry, async move |uow| {
            let mut report = home.report.clone();
            app.new_person(uow, case_id, person_id, &home.identifiers, &mut report)
                .await?;
            let command = Command::OpenFromAbroad {
                opened: Box::new(pb::CaseOpenedFromAbroad {
                    report: Some(report),
                    identified_abroad: Some(home.abroad.clone()),
                }),
            };
            app.open_case(uow, &caller, (case_id, person_id), &command, "handover")
                .await
        })
        .await?;
        let replayed = answer.result.as_ref().is_some_and(|r| r.replayed);
        tracing::info!(opened_case = %answer.case_id, replayed, "case of a person handed over from abroad");
        Ok(answer)
    }
}
