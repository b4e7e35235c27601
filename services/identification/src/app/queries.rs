//! Reading one case (from its events, so it is always current) and listing
//! cases (from the `case_list` read model, a few milliseconds behind).

use chrono::{DateTime, Utc};
use nrm_kernel::audit;
use nrm_kernel::auth::Role;
use nrm_kernel::command::CallContext;
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::ids::{CaseId, PersonId};
use nrm_kernel::paging::{self, Cursor, Pager};
use nrm_kernel::permissions::{PERSONAL_DATA, Scope};
use nrm_kernel::seal::DataKey;
use nrm_kernel::validate::{self, to_datetime};
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as pb;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::{Identification, person_of, sees_erasure_requests, standing};
use crate::domain::{Case, parse};

impl Identification {
    /// One case as the caller may see it: the coded case to whoever the
    /// matrix admits; with `include_personal_data`, the identifiers too, for
    /// an agency holding the case or the coordinator with a purpose from the
    /// fixed list (the read is recorded in the audit trail with its code).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`.
    #[tracing::instrument(skip_all, fields(case_id = tracing::field::Empty, personal = req.include_personal_data))]
    pub async fn get_case(&self, ctx: &CallContext, req: &pb::GetCaseRequest) -> Result<pb::Case, AppError> {
        let mut v = Violations::new();
        let case_id = v.check(CaseId::parse("case_id", &req.case_id));
        let purpose = if req.include_personal_data {
            v.check(parse::read_purpose(
                req.read_purpose,
                &req.purpose,
                ctx.caller.role == Role::Coordinator,
            ))
        } else {
            None
        };
        let (Some(case_id), true) = (case_id, v.is_empty()) else {
            return Err(v.into_error());
        };
        tracing::Span::current().record("case_id", tracing::field::display(case_id));
        ctx.concerns(case_id);
        let case = self.load(case_id).await?;
        let Some(report) = case.report.clone() else {
            return Err(AppError::NotFound {
                kind: "case",
                id: case_id.to_string(),
            });
        };
        if let Some(person) = person_of(&report) {
            ctx.concerns_person(person);
        }
        let standing = standing(&report);
        ctx.check(&standing)?;
        let personal = if !req.include_personal_data {
            common::personal_data_view::View::Withheld(common::Withheld {
                reason: "NOT_REQUESTED".into(),
            })
        } else {
            ctx.part(PERSONAL_DATA)?.check(ctx.agency(), &standing)?;
            if case.erased {
                common::personal_data_view::View::Erased(common::Erased {})
            } else {
                let purpose = purpose.unwrap_or(pb::ReadPurpose::Unspecified);
                self.open_personal(ctx, case_id, &report, parse::purpose_code(purpose))
                    .await?
            }
        };
        let duplicates = ctx.sees_possible_duplicates(&report.reporting_agency, &report.competent_authority);
        let erasure_requested =
            sees_erasure_requests(ctx, &report.reporting_agency, &report.competent_authority) && !case.erased && {
                sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM erasure_requests WHERE case_id = $1)")
                    .bind(case_id.as_uuid())
                    .fetch_one(self.store().pool())
                    .await?
            };
        let mut case = view(case_id, &case, report, personal, duplicates);
        case.erasure_requested = erasure_requested;
        Ok(case)
    }

    async fn open_personal(
        &self,
        ctx: &CallContext,
        case_id: CaseId,
        report: &pb::PresumedVictimReported,
        purpose_code: &str,
    ) -> Result<common::personal_data_view::View, AppError> {
        let person_id = PersonId::parse("person_id", &report.person_id)
            .map_err(|_| AppError::Internal("case without person".into()))?;
        // The read is recorded before the data leave the service: the
        // purpose's code, never the caller's text, and the person read (for
        // `nrmctl audit person`).
        ctx.concerns_person(person_id.as_uuid());
        let mut conn = self.store().pool().acquire().await?;
        audit::append(
            &mut conn,
            &ctx.audit_entry("ReadPersonalData", &case_id.to_string(), purpose_code),
        )
        .await?;
        drop(conn);
        let key = DataKey::load(self.store().pool(), &self.master, person_id).await?;
        let (Some(key), Some(sealed)) = (key, report.personal.as_ref()) else {
            return Ok(common::personal_data_view::View::Erased(common::Erased {}));
        };
        let identifiers = key.open(sealed).map_err(|e| AppError::Internal(e.to_string()))?;
        Ok(common::personal_data_view::View::Identifiers(identifiers))
    }

    /// The identifiers of a person that the caller's agency may read: under
    /// a consent (after accepting a referral), restricted to the consented
    /// categories; or, where the matrix grants it, as an agency holding the
    /// case, all of them. Every read is recorded in the audit trail.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`; `PERMISSION_DENIED` without an accepted referral
    /// under an active consent (or the case), and for an unknown person
    /// (`NOT_FOUND` only to a caller whose permit covers any person): an
    /// unknown person and another agency's look alike.
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty))]
    pub async fn get_personal_data(
        &self,
        ctx: &CallContext,
        req: &pb::GetPersonalDataRequest,
    ) -> Result<pb::GetPersonalDataResponse, AppError> {
        let mut v = Violations::new();
        let person_id = v.check(PersonId::parse("person_id", &req.person_id));
        let purpose = v.check(parse::read_purpose(
            req.read_purpose,
            &req.purpose,
            ctx.caller.role == Role::Coordinator,
        ));
        let (Some(person_id), Some(purpose)) = (person_id, purpose) else {
            return Err(v.into_error());
        };
        tracing::Span::current().record("person_id", tracing::field::display(person_id));
        ctx.concerns(person_id);
        let grant = sqlx::query(
            "SELECT c.consent_id, c.data_categories FROM referrals r
             JOIN consents c ON c.consent_id = r.consent_id
             WHERE r.person_id = $1 AND r.receiving_agency = $2 AND r.state = 'accepted'
               AND c.person_id = $1 AND c.recipient_agency = $2 AND NOT c.withdrawn
               AND (c.expires_at IS NULL OR c.expires_at > now())
             ORDER BY c.consent_id LIMIT 1",
        )
        .bind(person_id.as_uuid())
        .bind(ctx.agency())
        .fetch_optional(self.store().pool())
        .await?;
        let no_grant = || {
            AppError::PermissionDenied(
                "the agency has no accepted referral of this person under an active consent, nor holds the case".into(),
            )
        };
        let case_id: Option<Uuid> = sqlx::query_scalar("SELECT case_id FROM persons WHERE person_id = $1")
            .bind(person_id.as_uuid())
            .fetch_optional(self.store().pool())
            .await?;
        let Some(case_id) = case_id else {
            // An unknown person and a refused one look alike to any caller
            // whose permit does not cover every person.
            return Err(if ctx.permit().any() {
                AppError::NotFound {
                    kind: "person",
                    id: person_id.to_string(),
                }
            } else {
                no_grant()
            });
        };
        ctx.concerns_person(person_id.as_uuid());
        let case_id = CaseId::from_uuid(case_id);
        let case = self.load(case_id).await?;
        let report = case
            .report
            .clone()
            .ok_or_else(|| AppError::Internal("person without report".into()))?;
        let mut standing = standing(&report);
        standing.consented = grant.is_some();
        if !ctx.permit().admits(ctx.agency(), &standing) {
            return Err(no_grant());
        }
        let holder = ctx.permit().has(Scope::CaseHolders) && standing.case_holders.contains(&ctx.agency());
        let (consent_id, categories) = match (&grant, holder) {
            // An agency holding the case reads all it holds.
            (_, true) => (String::new(), all_categories()),
            (Some(grant), false) => (
                grant.get::<Uuid, _>("consent_id").to_string(),
                grant.get::<Vec<i32>, _>("data_categories"),
            ),
            (None, false) => return Err(no_grant()),
        };
        let view = if case.erased {
            common::personal_data_view::View::Erased(common::Erased {})
        } else {
            match self
                .open_personal(ctx, case_id, &report, parse::purpose_code(purpose))
                .await?
            {
                common::personal_data_view::View::Identifiers(all) => {
                    common::personal_data_view::View::Identifiers(only_categories(all, &categories))
                }
                other => other,
            }
        };
        Ok(pb::GetPersonalDataResponse {
            person_id: person_id.to_string(),
            personal: Some(common::PersonalDataView { view: Some(view) }),
            data_categories: categories,
            consent_id,
        })
    }

    /// Cases matching the filters, newest first, a page at a time: every
    /// case for a caller whose permit covers any case, otherwise the cases
    /// the caller's agency holds (reported, or handles as competent authority).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a bad page size, token, agency or date range.
    #[tracing::instrument(skip_all)]
    pub async fn list_cases(
        &self,
        ctx: &CallContext,
        req: &pb::ListCasesRequest,
    ) -> Result<pb::ListCasesResponse, AppError> {
        let mut v = Violations::new();
        let page_size = paging::page_size(req.page_size, &mut v);
        if req.status != 0 && pb::CaseStatus::try_from(req.status).is_err() {
            v.add("status", "is not a known value");
        }
        if req.exploitation_form != 0 && pb::ExploitationForm::try_from(req.exploitation_form).is_err() {
            v.add("exploitation_form", "is not a known value");
        }
        let after = req.reported_after.as_ref().map(to_datetime);
        let before = req.reported_before.as_ref().map(to_datetime);
        if matches!(after, Some(None)) {
            v.add("reported_after", "is not a valid time");
        }
        if matches!(before, Some(None)) {
            v.add("reported_before", "is not a valid time");
        }
        let (after, before) = (after.flatten(), before.flatten());
        if let (Some(a), Some(b)) = (after, before)
            && a >= b
        {
            v.add("reported_before", "must be later than reported_after");
        }
        let agency = if req.reporting_agency.is_empty() {
            String::new()
        } else {
            v.check(parse::agency("reporting_agency", &req.reporting_agency))
                .unwrap_or_default()
        };
        // Past the cases its agency holds only with a permit for any case.
        let holder = (!ctx.permit().any()).then(|| ctx.agency().to_owned());
        let pager = Pager::new(&format!(
            "{}|{}|{}|{:?}|{:?}|{}",
            req.status,
            agency,
            req.exploitation_form,
            after,
            before,
            holder.as_deref().unwrap_or("*")
        ));
        let cursor = pager.cursor(&req.page_token, &mut v);
        v.finish(|| ())?;

        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
            "SELECT case_id, status, reporting_agency, competent_authority, matching_case_ids, reported_at, exploitation_forms, child, citizenship, version, identified_abroad,
             EXISTS (SELECT 1 FROM erasure_requests e WHERE e.case_id = case_list.case_id) AS erasure_requested
             FROM case_list WHERE true",
        );
        if let Some(holder) = &holder {
            q.push(" AND (reporting_agency = ")
                .push_bind(holder.clone())
                .push(" OR competent_authority = ")
                .push_bind(holder.clone())
                .push(")");
        }
        if req.status != 0 {
            q.push(" AND status = ").push_bind(req.status);
        }
        if !agency.is_empty() {
            q.push(" AND reporting_agency = ").push_bind(agency.clone());
        }
        if req.exploitation_form != 0 {
            q.push(" AND ")
                .push_bind(req.exploitation_form)
                .push(" = ANY(exploitation_forms)");
        }
        if let Some(a) = after {
            q.push(" AND reported_at >= ").push_bind(a);
        }
        if let Some(b) = before {
            q.push(" AND reported_at < ").push_bind(b);
        }
        if let Some(c) = &cursor {
            let t = c.time;
            q.push(" AND (reported_at, case_id) < (")
                .push_bind(t)
                .push(", ")
                .push_bind(c.id)
                .push(")");
        }
        q.push(" ORDER BY reported_at DESC, case_id DESC LIMIT ")
            .push_bind(i64::from(page_size) + 1);
        let rows = q.build().fetch_all(self.store().pool()).await?;
        let more = rows.len() > usize::try_from(page_size).unwrap_or(0);
        let mut cases = Vec::with_capacity(rows.len());
        let mut last: Option<(DateTime<Utc>, Uuid)> = None;
        for row in rows.iter().take(usize::try_from(page_size).unwrap_or(0)) {
            let case_id: Uuid = row.get("case_id");
            let reported_at: DateTime<Utc> = row.get("reported_at");
            last = Some((reported_at, case_id));
            let competent_authority: String = row.get("competent_authority");
            let reporting_agency: String = row.get("reporting_agency");
            let erasure_requested = sees_erasure_requests(ctx, &reporting_agency, &competent_authority)
                && row.get::<bool, _>("erasure_requested");
            let matching: Vec<Uuid> = if ctx.sees_possible_duplicates(&reporting_agency, &competent_authority) {
                row.get("matching_case_ids")
            } else {
                Vec::new()
            };
            cases.push(pb::CaseSummary {
                case_id: case_id.to_string(),
                status: row.get("status"),
                reporting_agency,
                competent_authority,
                possible_duplicate: !matching.is_empty(),
                matching_case_ids: matching.iter().map(ToString::to_string).collect(),
                reported_at: Some(validate::timestamp(reported_at)),
                exploitation_forms: row.get("exploitation_forms"),
                child: row.get("child"),
                citizenship: row.get("citizenship"),
                version: u64::try_from(row.get::<i64, _>("version")).unwrap_or_default(),
                erasure_requested,
                identified_abroad: row.get("identified_abroad"),
            });
        }
        let next_page_token = pager.next_token(more, last.map(|(time, id)| Cursor { time, id }));
        Ok(pb::ListCasesResponse { cases, next_page_token })
    }
}

/// Every category of identifiers.
fn all_categories() -> Vec<i32> {
    use nrm_proto::referral::v1::DataCategory as C;
    [C::Name, C::DateOfBirth, C::Documents, C::Phone, C::Address]
        .iter()
        .map(|c| *c as i32)
        .collect()
}

/// The identifiers of the consented categories; the rest stays empty.
fn only_categories(all: common::PersonalIdentifiers, categories: &[i32]) -> common::PersonalIdentifiers {
    use nrm_proto::referral::v1::DataCategory as C;
    let has = |c: C| categories.contains(&(c as i32));
    common::PersonalIdentifiers {
        full_name: if has(C::Name) { all.full_name } else { String::new() },
        date_of_birth: if has(C::DateOfBirth) {
            all.date_of_birth
        } else {
            String::new()
        },
        documents: if has(C::Documents) { all.documents } else { Vec::new() },
        phone: if has(C::Phone) { all.phone } else { String::new() },
        address: if has(C::Address) { all.address } else { String::new() },
    }
}

/// The case as the caller sees it; possible duplicates only when `duplicates`.
fn view(
    case_id: CaseId,
    case: &Case,
    report: pb::PresumedVictimReported,
    personal: common::personal_data_view::View,
    duplicates: bool,
) -> pb::Case {
    let decision = case.decision.clone().unwrap_or_default();
    pb::Case {
        case_id: case_id.to_string(),
        person_id: report.person_id,
        status: case.status.to_proto() as i32,
        version: case.version,
        reporting_agency: report.reporting_agency,
        reported_at: report.reported_at,
        found_at: report.found_at,
        found_country: report.found_country,
        found_region: report.found_region,
        country_of_exploitation: report.country_of_exploitation,
        exploitation_forms: report.exploitation_forms,
        means_of_control: report.means_of_control,
        recruitment_method: report.recruitment_method,
        recruiter_relationship: report.recruiter_relationship,
        child: report.child,
        gender: report.gender,
        age_years: report.age_years,
        age_band: report.age_band,
        citizenship: report.citizenship,
        screened: case.screened,
        indicators: case.indicators.clone(),
        decision: decision.decision,
        not_identified_reason: decision.reason,
        non_punishment: decision.non_punishment,
        decided_at: decision.decided_at,
        reflection_period_ends_at: decision.reflection_period_ends_at,
        possible_duplicate: duplicates && case.possible_duplicate,
        under_review: case.under_review,
        personal: Some(common::PersonalDataView { view: Some(personal) }),
        competent_authority: report.competent_authority,
        matching_case_ids: if duplicates {
            case.matching_case_ids.clone()
        } else {
            Vec::new()
        },
        erasure_requested: false,
        identified_abroad: case.abroad.clone(),
    }
}
