//! Reading one referral (from its events, so it is always current) and the
//! inbox (from the `inbox` read model, a few milliseconds behind).

use chrono::{DateTime, Utc};
use nrm_kernel::command::CallContext;
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::ids::ReferralId;
use nrm_kernel::paging::{self, Cursor, Pager};
use nrm_proto::referral::v1 as pb;
use prost::Message as _;
use sqlx::{Postgres, QueryBuilder, Row};
use uuid::Uuid;

use super::Referrals;
use crate::domain::referral::Referral;

/// The referral as its readers see it (coded fields only).
#[must_use]
pub fn view(state: &Referral) -> pb::Referral {
    let created = state.created.clone().unwrap_or_default();
    pb::Referral {
        referral_id: created.referral_id,
        person_id: created.person_id,
        case_id: created.case_id,
        referring_agency: created.referring_agency,
        receiving_agency: state.receiving_agency.clone(),
        services: created.services,
        urgency: created.urgency,
        status: state.status.to_proto() as i32,
        consent_id: state.consent_id.clone(),
        shelter_need: created.shelter_need,
        created_at: created.created_at,
        answer_due_at: state.answer_due_at,
        overdue: state.overdue,
        decline_reason: state.decline_reason,
        services_delivered: state.services_delivered.clone(),
        outcome: state.outcome,
        shelter_id: state.shelter_id.clone(),
        hold_id: state.hold_id.clone(),
        nearest_regions_with_beds: state.nearest_regions_with_beds.clone(),
        version: state.version,
    }
}

impl Referrals {
    /// One referral, for its referring agency, its receiving agency and the national coordinator.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`.
    #[tracing::instrument(skip_all, fields(referral_id = tracing::field::Empty))]
    pub async fn get_referral(
        &self,
        ctx: &CallContext,
        req: &pb::GetReferralRequest,
    ) -> Result<pb::Referral, AppError> {
        let referral_id =
            ReferralId::parse("referral_id", &req.referral_id).map_err(|v| AppError::InvalidArgument(vec![v]))?;
        tracing::Span::current().record("referral_id", tracing::field::display(referral_id));
        ctx.concerns(referral_id);
        let state = self.load_referral(referral_id).await?;
        if state.created.is_none() {
            return Err(AppError::NotFound {
                kind: "referral",
                id: referral_id.to_string(),
            });
        }
        super::referrals::concerns_person(ctx, &state);
        ctx.check(&super::referrals::standing(&state))?;
        Ok(view(&state))
    }

    /// The caller's inbox: the referrals its agency receives (the national
    /// coordinator: every referral), newest first, a page at a time.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a bad page size, filter or token.
    #[tracing::instrument(skip_all)]
    pub async fn list_inbox(
        &self,
        ctx: &CallContext,
        req: &pb::ListInboxRequest,
    ) -> Result<pb::ListInboxResponse, AppError> {
        let mut v = Violations::new();
        let page_size = paging::page_size(req.page_size, &mut v);
        if req.status != 0 && pb::ReferralStatus::try_from(req.status).is_err() {
            v.add("status", "is not a known value");
        }
        if req.urgency != 0 && pb::Urgency::try_from(req.urgency).is_err() {
            v.add("urgency", "is not a known value");
        }
        // Who may see every inbox (the coordinator) sees all; everyone else their agency's.
        let agency = (!ctx.permit().any()).then(|| ctx.agency().to_owned());
        let overdue_only = req.overdue_only;
        let pager = Pager::new(&format!("{:?}|{}|{}|{}", agency, req.status, req.urgency, overdue_only));
        let cursor = pager.cursor(&req.page_token, &mut v);
        v.finish(|| ())?;

        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT referral_id, created_at, view FROM inbox WHERE true");
        if let Some(agency) = &agency {
            q.push(" AND receiving_agency = ").push_bind(agency.clone());
        }
        if req.status != 0 {
            q.push(" AND status = ").push_bind(req.status);
        }
        if req.urgency != 0 {
            q.push(" AND urgency = ").push_bind(req.urgency);
        }
        if overdue_only {
            q.push(" AND overdue");
        }
        if let Some(c) = &cursor {
            let t = c.time;
            q.push(" AND (created_at, referral_id) < (")
                .push_bind(t)
                .push(", ")
                .push_bind(c.id)
                .push(")");
        }
        q.push(" ORDER BY created_at DESC, referral_id DESC LIMIT ")
            .push_bind(i64::from(page_size) + 1);
        let rows = q.build().fetch_all(self.store().pool()).await?;
        let limit = usize::try_from(page_size).unwrap_or(0);
        let more = rows.len() > limit;
        let mut referrals = Vec::with_capacity(rows.len().min(limit));
        let mut last: Option<(DateTime<Utc>, Uuid)> = None;
        for row in rows.iter().take(limit) {
            let bytes: Vec<u8> = row.get("view");
            let referral = pb::Referral::decode(bytes.as_slice())
                .map_err(|e| AppError::Internal(format!("inbox row does not decode: {e}")))?;
            last = Some((row.get("created_at"), row.get("referral_id")));
            referrals.push(referral);
        }
        let next_page_token = pager.next_token(more, last.map(|(time, id)| Cursor { time, id }));
        Ok(pb::ListInboxResponse {
            referrals,
            next_page_token,
        })
    }
}
