//! Reading one return (from its events, so it is always current) and the
//! list (from the `return_list` read model, a few milliseconds behind).
//!
//! The identifiers go only to a caller whose role has the matrix's
//! `GetReturn (personal data)` row and stands in it to the return: an
//! agency holding an outgoing return, or in the home country IOM and MSD for
//! an incoming one (only what the person consented to share crossed). Every
//! such read is recorded in the audit trail before the data leave the
//! service, under the return and the pseudonymous person of its key.

use chrono::{DateTime, Utc};
use nrm_kernel::audit;
use nrm_kernel::command::CallContext;
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::ids::ReturnId;
use nrm_kernel::paging::{self, Cursor, Pager};
use nrm_kernel::permissions::{PERSONAL_DATA, Scope, Standing};
use nrm_kernel::validate;
use nrm_proto::common::v1 as common;
use nrm_proto::repatriation::v1 as pb;
use pb::SharedField;
use prost::Message as _;
use sqlx::{Postgres, QueryBuilder, Row as _};
use tracing::field::Empty;
use uuid::Uuid;

use super::{History, Returns, concern, not_found, standing};
use crate::domain::parse;

/// Audit purpose of a holder's read of an outgoing return's identifiers.
const HOLDER_READ: &str = "RETURN_HOLDER";
/// Audit purpose of a read of what crossed for an incoming return.
const INCOMING_READ: &str = "INCOMING_RETURN";

fn withheld(reason: &str) -> common::personal_data_view::View {
    common::personal_data_view::View::Withheld(common::Withheld { reason: reason.into() })
}

/// The return as its reader may see it: coded fields, steps, and
/// `personal` as decided for the caller.
#[must_use]
pub fn view(return_id: ReturnId, history: &History, personal: common::personal_data_view::View) -> pb::Return {
    let s = &history.state;
    let steps = history.steps().to_vec();
    let mut out = pb::Return {
        return_id: return_id.to_string(),
        direction: s.direction as i32,
        status: s.status as i32,
        from_country: s.from_country().to_owned(),
        to_country: s.to_country().to_owned(),
        version: s.version,
        personal_data: Some(common::PersonalDataView { view: Some(personal) }),
        ..Default::default()
    };
    out.opened_by = steps.first().map(|step| step.agency.clone()).unwrap_or_default();
    if let Some(c) = &s.announced {
        // Incoming: what crossed, already limited to the consented fields.
        out.shared_fields.clone_from(&c.shared_fields);
        out.consent_to_reintegration_referral = c.consent_to_reintegration_referral;
        out.gender = c.gender;
        out.age_band = c.age_band;
        out.form_of_exploitation.clone_from(&c.form_of_exploitation);
        out.country_of_exploitation.clone_from(&c.country_of_exploitation);
        out.safe_to_return = c.risk_shared && c.safe_to_return;
        out.family_involvement = c.family_involvement;
        out.needs.clone_from(&c.needs);
        out.interpretation_language.clone_from(&c.interpretation_language);
        out.departure_at = c.departure_at;
        out.arrival_at = c.arrival_at;
        out.carrier.clone_from(&c.carrier);
        out.arrival_point_kind = c.arrival_point_kind;
        out.arrival_point.clone_from(&c.arrival_point);
        out.escort_agency.clone_from(&c.escort_agency);
        out.halt_reason = c.halt_reason;
        out.foreign_reference.clone_from(&c.foreign_reference);
        out.identified_by.clone_from(&c.identified_by);
        out.received_by.clone_from(&c.received_by);
    }
    if let Some(o) = &s.opened {
        out.opened_by.clone_from(&o.opened_by);
        out.consulate_agency.clone_from(&o.consulate_agency);
        out.gender = o.gender;
        out.age_band = o.age_band;
        out.form_of_exploitation.clone_from(&o.form_of_exploitation);
        out.country_of_exploitation.clone_from(&o.country_of_exploitation);
        out.foreign_reference.clone_from(&o.foreign_reference);
        out.identified_by.clone_from(&o.identified_by);
    }
    if let Some(c) = &s.consent {
        out.shared_fields.clone_from(&c.shared_fields);
        out.consent_to_reintegration_referral = c.consent_to_reintegration_referral;
    }
    if let Some(r) = &s.risk {
        out.safe_to_return = r.safe_to_return;
        out.family_involvement = r.family_involvement;
        out.needs.clone_from(&r.needs);
        out.interpretation_language.clone_from(&r.interpretation_language);
    }
    if let Some(i) = &s.itinerary {
        out.departure_at = i.departure_at;
        out.arrival_at = i.arrival_at;
        out.carrier.clone_from(&i.carrier);
        out.arrival_point_kind = i.arrival_point_kind;
        out.arrival_point.clone_from(&i.arrival_point);
    }
    if let Some(e) = &s.escort {
        out.escort_agency.clone_from(&e.escort_agency);
    }
    if let Some(h) = &s.halted {
        out.halt_reason = h.reason;
    }
    if let Some(h) = &s.handed_over {
        out.received_by.clone_from(&h.received_by);
    }
    out.steps = steps;
    out
}

/// The line of the list of a return: coded fields only.
#[must_use]
pub fn summary(return_id: Uuid, history: &History) -> pb::ReturnSummary {
    let full = view(ReturnId::from_uuid(return_id), history, withheld("NOT_REQUESTED"));
    pb::ReturnSummary {
        return_id: full.return_id,
        direction: full.direction,
        status: full.status,
        from_country: full.from_country,
        to_country: full.to_country,
        arrival_at: full.arrival_at,
        arrival_point: full.arrival_point,
        needs: full.needs,
        version: full.version,
        updated_at: history.updated_at.map(validate::timestamp),
    }
}

impl Returns {
    /// One return as the caller may see it: coded, with its steps, for its
    /// holders, the coordinator and (an incoming one) the home country's IOM
    /// and MSD; with the identifiers for whom they are due (audited).
    ///
    /// # Errors
    /// `INVALID_ARGUMENT`, `NOT_FOUND`, `PERMISSION_DENIED`.
    #[tracing::instrument(skip_all, fields(return_id = Empty))]
    pub async fn get_return(&self, ctx: &CallContext, req: &pb::GetReturnRequest) -> Result<pb::Return, AppError> {
        let return_id = parse::return_id(&req.return_id)?;
        concern(ctx, return_id, None);
        let history = self.load(return_id).await?;
        if !history.state.exists() {
            return Err(not_found(return_id));
        }
        concern(ctx, return_id, Some(&history.state));
        let standing = standing(&history.state);
        ctx.check(&standing)?;
        let personal = self.personal(ctx, return_id, &history, &standing).await?;
        Ok(view(return_id, &history, personal))
    }

    /// The identifiers as the caller may see them, the read audited first.
    async fn personal(
        &self,
        ctx: &CallContext,
        return_id: ReturnId,
        history: &History,
        standing: &Standing<'_>,
    ) -> Result<common::personal_data_view::View, AppError> {
        let state = &history.state;
        let entitled = ctx
            .part(PERSONAL_DATA)
            .is_ok_and(|permit| permit.admits(ctx.agency(), standing));
        if !entitled {
            return Ok(withheld("NO_ACCESS"));
        }
        let (sealed, purpose) = if state.is_incoming() {
            (state.announced_identifiers.as_ref(), INCOMING_READ)
        } else {
            (state.opened.as_ref().and_then(|o| o.identifiers.as_ref()), HOLDER_READ)
        };
        let Some(sealed) = sealed else {
            // Nothing crossed (not consented, or withdrawn).
            return Ok(withheld("NOT_SHARED"));
        };
        let mut conn = self.store.pool().acquire().await?;
        audit::append(
            &mut conn,
            &ctx.audit_entry("ReadPersonalData", &return_id.to_string(), purpose),
        )
        .await?;
        drop(conn);
        let identifiers = if state.is_incoming() {
            match self.key_of(self.store.pool(), sealed).await? {
                Some(key) => Some(
                    key.open(sealed)
                        .map_err(|_| AppError::Internal("the return's sealed data do not open".into()))?,
                ),
                None => None,
            }
        } else {
            self.identifiers_of(self.store.pool(), state)
                .await?
                .map(|mut identifiers| {
                    // The consulate issues the travel document: it needs who the
                    // person is, not where the family lives, unless the person
                    // let the home country know that too.
                    let consulate_only = state
                        .opened
                        .as_ref()
                        .is_some_and(|o| o.consulate_agency == ctx.agency() && o.opened_by != ctx.agency());
                    if consulate_only && !state.shares(SharedField::Contact) {
                        identifiers.phone.clear();
                        identifiers.address.clear();
                    }
                    identifiers
                })
        };
        Ok(match identifiers {
            Some(identifiers) => common::personal_data_view::View::Identifiers(identifiers),
            None => common::personal_data_view::View::Erased(common::Erased {}),
        })
    }

    /// Returns, newest first, a page at a time: for the coordinator all;
    /// otherwise those the caller's agency holds and, where the matrix
    /// grants it, the incoming ones.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` for a bad page size, filter or token.
    #[tracing::instrument(skip_all)]
    pub async fn list_returns(
        &self,
        ctx: &CallContext,
        req: &pb::ListReturnsRequest,
    ) -> Result<pb::ListReturnsResponse, AppError> {
        let mut v = Violations::new();
        let page_size = paging::page_size(req.page_size, &mut v);
        let (status, direction) = parse::list_filters(req, &mut v);
        let permit = ctx.permit();
        let all = permit.any();
        let holder = (!all && permit.has(Scope::CaseHolders)).then(|| ctx.agency().to_owned());
        let incoming = !all && permit.has(Scope::Consented);
        let pager = Pager::new(&format!("{all}|{holder:?}|{incoming}|{status}|{direction}"));
        let cursor = pager.cursor(&req.page_token, &mut v);
        v.finish(|| ())?;

        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new("SELECT return_id, opened_at, summary FROM return_list WHERE true");
        if !all {
            q.push(" AND (false");
            if let Some(agency) = &holder {
                q.push(" OR ").push_bind(agency.clone()).push(" = ANY (holders)");
            }
            if incoming {
                q.push(" OR direction = ").push_bind(pb::Direction::Incoming as i32);
            }
            q.push(")");
        }
        if status != 0 {
            q.push(" AND status = ").push_bind(status);
        }
        if direction != 0 {
            q.push(" AND direction = ").push_bind(direction);
        }
        if let Some(c) = &cursor {
            q.push(" AND (opened_at, return_id) < (")
                .push_bind(c.time)
                .push(", ")
                .push_bind(c.id)
                .push(")");
        }
        q.push(" ORDER BY opened_at DESC, return_id DESC LIMIT ")
            .push_bind(i64::from(page_size) + 1);
        let rows = q.build().fetch_all(self.store.pool()).await?;
        let limit = usize::try_from(page_size).unwrap_or(0);
        let more = rows.len() > limit;
        let mut returns = Vec::with_capacity(rows.len().min(limit));
        let mut last: Option<(DateTime<Utc>, Uuid)> = None;
        for row in rows.iter().take(limit) {
            let bytes: Vec<u8> = row.get("summary");
            let summary = pb::ReturnSummary::decode(bytes.as_slice())
                .map_err(|e| AppError::Internal(format!("return_list row does not decode: {e}")))?;
            last = Some((row.get("opened_at"), row.get("return_id")));
            returns.push(summary);
        }
        let next_page_token = pager.next_token(more, last.map(|(time, id)| Cursor { time, id }));
        Ok(pb::ListReturnsResponse {
            returns,
            next_page_token,
        })
    }
}
