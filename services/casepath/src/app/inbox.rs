//! `ListInbox`: what waits for an agency's answer. Referrals waiting for
//! their receiving agency (`cp_referrals.waiting_since` set: created or
//! redirected, not yet answered, closed or cancelled; a referral whose
//! consent ended was cancelled by the referral service), and identification
//! decisions waiting for the competent authority (`decision_waiting_since`
//! set), due N working days (`NRM_CASEPATH__DECISION_WORKING_DAYS`) after
//! the waiting day on the country's calendar.
//!
//! Order: by due time, which puts what is overdue first (the most overdue
//! first) and then what is due soonest; ties by subject ID. Pages are
//! keyset pages on (due time, subject ID).

use chrono::{DateTime, TimeDelta, Utc};
use nrm_kernel::command::CallContext;
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::paging::{self, Cursor, Pager};
use nrm_kernel::permissions::Standing;
use nrm_kernel::validate;
use nrm_proto::casepath::v1 as pb;
use uuid::Uuid;

use super::path::{CASE_COLUMNS, CaseRow, REFERRAL_COLUMNS, ReferralRow, case_row, referral_row};
use super::{Casepath, duration, ts};

/// The inbox item of a waiting referral.
#[must_use]
pub(crate) fn referral_item(r: &ReferralRow, now: DateTime<Utc>) -> pb::InboxItem {
    let since = r.waiting_since.unwrap_or(now);
    let due = r.answer_due_at.unwrap_or(since);
    pb::InboxItem {
        kind: pb::InboxKind::ReferralAnswer as i32,
        subject_id: r.referral_id.to_string(),
        person_id: r.person_id.to_string(),
        agency: r.receiving_agency.clone(),
        waiting_since: Some(ts(since)),
        due_at: Some(ts(due)),
        time_left: Some(duration(due - now)),
        overdue: due < now,
        urgency: r.urgency,
        services: r.services.clone(),
    }
}

/// The inbox item of a decision waiting since `since`, due at `due`.
#[must_use]
pub(crate) fn decision_item(
    c: &CaseRow,
    since: DateTime<Utc>,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
) -> pb::InboxItem {
    pb::InboxItem {
        kind: pb::InboxKind::IdentificationDecision as i32,
        subject_id: c.case_id.to_string(),
        person_id: c.person_id.to_string(),
        agency: c.competent_authority.clone(),
        waiting_since: Some(ts(since)),
        due_at: Some(ts(due)),
        time_left: Some(duration(due - now)),
        overdue: due < now,
        ..pb::InboxItem::default()
    }
}

fn key(item: &pb::InboxItem) -> (i64, i32, String) {
    let due = item.due_at.unwrap_or_default();
    (due.seconds, due.nanos, item.subject_id.clone())
}

/// Sorts items by due time (overdue first, most overdue first), then ID.
pub fn sort(items: &mut [pb::InboxItem]) {
    items.sort_by_key(key);
}

/// A parsed inbox request.
#[derive(Debug, Clone)]
pub struct InboxQuery {
    /// The agency whose inbox; none: the coordinator's view of everything overdue.
    pub agency: Option<String>,
    /// Referrals wanted.
    pub referrals: bool,
    /// Decisions wanted.
    pub decisions: bool,
    /// Only what is overdue.
    pub overdue_only: bool,
    page_size: i32,
    pager: Pager,
    cursor: Option<Cursor>,
}

impl InboxQuery {
    /// Parses `req` for the caller of `ctx`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming `kind`, `page_size`, `page_token` or
    /// `agency`; `PERMISSION_DENIED` when a caller other than the
    /// coordinator names another agency.
    pub fn parse(ctx: &CallContext, req: &pb::ListInboxRequest) -> Result<Self, AppError> {
        let mut v = Violations::new();
        let kind = v
            .check(validate::enum_value::<pb::InboxKind>("kind", req.kind, true))
            .unwrap_or(0);
        if req.page_size > paging::MAX_PAGE_SIZE.unsigned_abs() {
            v.add("page_size", "must be 1..500 (0: 50)");
        }
        let page_size = paging::page_size(i32::try_from(req.page_size).unwrap_or(paging::MAX_PAGE_SIZE), &mut v);
        let named = if req.agency.is_empty() {
            None
        } else {
            v.check(validate::agency("agency", &req.agency))
        };
        let everything = ctx.permit().any();
        let agency = if req.agency.is_empty() {
            (!everything).then(|| ctx.agency().to_owned())
        } else if everything || req.agency == ctx.agency() {
            Some(req.agency.clone())
        } else {
            if named.is_some() {
                // The refusal's audit entry says another agency's inbox was
                // asked for; not which: a code-shaped text can still be a
                // name or a number typed in, and the trail keeps it for ever.
                ctx.concerns("inbox:another-agency");
            }
            if v.is_empty() {
                return Err(AppError::PermissionDenied(
                    "only the coordinator reads another agency's inbox".into(),
                ));
            }
            None
        };
        let pager = Pager::new(&format!(
            "inbox|{}|{kind}|{}",
            agency.as_deref().unwrap_or("*"),
            req.overdue_only
        ));
        let cursor = pager.cursor(&req.page_token, &mut v);
        let overdue_only = req.overdue_only || agency.is_none();
        v.finish(|| Self {
            agency,
            referrals: kind == 0 || kind == pb::InboxKind::ReferralAnswer as i32,
            decisions: kind == 0 || kind == pb::InboxKind::IdentificationDecision as i32,
            overdue_only,
            page_size,
            pager,
            cursor,
        })
    }
}

/// The earliest of `next` and `due`, when `due` is still ahead of `now`.
fn earliest(next: &mut Option<DateTime<Utc>>, due: DateTime<Utc>, now: DateTime<Utc>) {
    if due >= now && next.is_none_or(|n| due < n) {
        *next = Some(due);
    }
}

impl Casepath {
    /// The inbox `query` asks for, as the caller of `ctx` may see it.
    ///
    /// # Errors
    /// The database's.
    pub async fn inbox(&self, ctx: &CallContext, query: &InboxQuery) -> Result<pb::Inbox, AppError> {
        Ok(self.inbox_until(ctx, query).await?.0)
    }

    /// As [`Casepath::inbox`], with the earliest due time still ahead among
    /// the items the query looks at (shown or, asked for overdue only, not
    /// yet): when the answer changes by the clock alone (an item becomes
    /// overdue, or overdue enough to be listed). A watcher wakes then.
    ///
    /// # Errors
    /// The database's.
    pub async fn inbox_until(
        &self,
        ctx: &CallContext,
        query: &InboxQuery,
    ) -> Result<(pb::Inbox, Option<DateTime<Utc>>), AppError> {
        let now = Utc::now();
        let mut next: Option<DateTime<Utc>> = None;
        let agency = ctx.agency();
        let permit = ctx.permit();
        let mut items = Vec::new();
        if query.referrals {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {REFERRAL_COLUMNS} FROM cp_referrals \
                 WHERE waiting_since IS NOT NULL AND status = 'pending' \
                   AND ($1::text IS NULL OR receiving_agency = $1) \
                   AND ($2::timestamptz IS NULL OR coalesce(answer_due_at, waiting_since) < $2)"
            )))
            .bind(query.agency.as_deref())
            .bind(query.overdue_only.then_some(now))
            .fetch_all(&self.pool)
            .await?;
            for row in &rows {
                let r = referral_row(row)?;
                let standing = Standing {
                    addressees: vec![&r.receiving_agency],
                    ..Standing::default()
                };
                if permit.admits(agency, &standing) {
                    let item = referral_item(&r, now);
                    if let Some(due) = item.due_at.as_ref().and_then(validate::to_datetime) {
                        earliest(&mut next, due, now);
                    }
                    items.push(item);
                }
            }
            if query.overdue_only {
                // Not yet overdue, so not listed: the first of them to be.
                let due: Option<DateTime<Utc>> = sqlx::query_scalar(
                    "SELECT min(coalesce(answer_due_at, waiting_since)) FROM cp_referrals \
                     WHERE waiting_since IS NOT NULL AND status = 'pending' \
                       AND ($1::text IS NULL OR receiving_agency = $1) \
                       AND coalesce(answer_due_at, waiting_since) >= $2",
                )
                .bind(query.agency.as_deref())
                .bind(now)
                .fetch_one(&self.pool)
                .await?;
                if let Some(due) = due {
                    earliest(&mut next, due, now);
                }
            }
        }
        if query.decisions {
            // A decision due N working days later is at least N days old
            // when overdue: the database pre-selects on that.
            let days = i64::from(self.settings.decision_working_days);
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {CASE_COLUMNS} FROM cp_cases \
                 WHERE decision_waiting_since IS NOT NULL \
                   AND ($1::text IS NULL OR competent_authority = $1) \
                   AND ($2::timestamptz IS NULL OR decision_waiting_since < $2)"
            )))
            .bind(query.agency.as_deref())
            .bind(query.overdue_only.then(|| now - TimeDelta::days(days)))
            .fetch_all(&self.pool)
            .await?;
            for row in &rows {
                let c = case_row(row)?;
                let Some(since) = c.decision_waiting_since else {
                    continue;
                };
                let standing = Standing {
                    competent_authority: Some(&c.competent_authority),
                    ..Standing::default()
                };
                let due = self.decision_due(since);
                if !permit.admits(agency, &standing) {
                    continue;
                }
                earliest(&mut next, due, now);
                if !query.overdue_only || due < now {
                    items.push(decision_item(&c, since, due, now));
                }
            }
            if query.overdue_only {
                // Waiting for less than N days, so not fetched: the due time
                // of the oldest of them is the first (due grows with since).
                let since: Option<DateTime<Utc>> = sqlx::query_scalar(
                    "SELECT min(decision_waiting_since) FROM cp_cases \
                     WHERE decision_waiting_since >= $2 AND ($1::text IS NULL OR competent_authority = $1)",
                )
                .bind(query.agency.as_deref())
                .bind(now - TimeDelta::days(days))
                .fetch_one(&self.pool)
                .await?;
                if let Some(since) = since {
                    earliest(&mut next, self.decision_due(since), now);
                }
            }
        }
        sort(&mut items);
        let after = |item: &pb::InboxItem| match query.cursor {
            None => true,
            Some(c) => {
                let due = item.due_at.as_ref().and_then(validate::to_datetime).unwrap_or_default();
                let id = item.subject_id.parse::<Uuid>().unwrap_or_default();
                (due.timestamp_micros(), id) > (c.time.timestamp_micros(), c.id)
            }
        };
        let mut page: Vec<pb::InboxItem> = items.into_iter().filter(after).collect();
        let size = usize::try_from(query.page_size).unwrap_or(50);
        let more = page.len() > size;
        page.truncate(size);
        let last = page.last().map(|item| Cursor {
            time: item.due_at.as_ref().and_then(validate::to_datetime).unwrap_or_default(),
            id: item.subject_id.parse().unwrap_or_default(),
        });
        let inbox = pb::Inbox {
            next_page_token: query.pager.next_token(more, last),
            items: page,
            as_of: Some(ts(now)),
        };
        Ok((inbox, next))
    }

    /// `ListInbox`.
    ///
    /// # Errors
    /// As [`InboxQuery::parse`] and [`Casepath::inbox`].
    #[tracing::instrument(skip_all)]
    pub async fn list_inbox(&self, ctx: &CallContext, req: &pb::ListInboxRequest) -> Result<pb::Inbox, AppError> {
        let query = InboxQuery::parse(ctx, req)?;
        let inbox = self.inbox(ctx, &query).await?;
        self.audit_inbox(ctx, "ListInbox", &query, &inbox).await?;
        Ok(inbox)
    }

    /// Audits an answered inbox (`action`: the RPC) before it leaves: whose
    /// inbox (`*`: every agency's), and how many items.
    pub(crate) async fn audit_inbox(
        &self,
        ctx: &CallContext,
        action: &str,
        query: &InboxQuery,
        inbox: &pb::Inbox,
    ) -> Result<(), AppError> {
        // An agency named as casepath knows it (one a referral went to, or
        // a case's competent authority); any other text the coordinator
        // typed stays off the trail.
        let subject = match query.agency.as_deref() {
            None => "inbox:*".to_owned(),
            Some(agency) if agency == ctx.agency() => format!("inbox:{agency}"),
            Some(agency) => {
                let known: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM cp_referrals WHERE receiving_agency = $1)
                         OR EXISTS (SELECT 1 FROM cp_cases WHERE competent_authority = $1)",
                )
                .bind(agency)
                .fetch_one(&self.pool)
                .await?;
                if known {
                    format!("inbox:{agency}")
                } else {
                    "inbox:unknown-agency".to_owned()
                }
            }
        };
        let purpose = format!("INBOX:{} items", inbox.items.len());
        self.audit_read(ctx, action, &subject, &purpose).await
    }
}
