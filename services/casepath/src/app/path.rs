//! `GetPath`: a person's path as far as the caller may see it.
//!
//! The person's records are gathered by the contract's link rules (cases,
//! consents, referrals and goals by person; returns by the cases' return IDs
//! and by `foreign_case`, the case a return's reference names; holds by the person's referrals
//! or by a commit of the person's returns), in one read-only snapshot. Each
//! part is shown when the role has its row `GetPath (<part>)` and the
//! caller's agency stands in it to at least one of the part's records (the
//! person part: to the person); within a part only the steps of admitted
//! records are shown. A bed held for a referral is recorded twice (by the
//! shelter on the hold, by the referral service on the referral): a caller
//! who sees the shelter's step is not shown the referral's as well. The
//! answered path is audited before it leaves.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use nrm_kernel::auth::Role;
use nrm_kernel::command::CallContext;
use nrm_kernel::error::{AppError, FieldViolation};
use nrm_kernel::ids::PersonId;
use nrm_kernel::permissions::{
    self, CASEPATH, PATH_CONSENTS, PATH_IDENTIFICATION, PATH_PERSON, PATH_PLAN, PATH_REFERRALS, PATH_RETURN,
    PATH_SHELTER, Permit, Standing,
};
use nrm_proto::casepath::v1 as pb;
use prost::Message as _;
use sqlx::Row as _;
use uuid::Uuid;

use super::{Casepath, duration, inbox, ts};
use crate::domain::{order, stage};

/// Audit purpose of a read of a path.
pub const PURPOSE: &str = "PATH";

/// A case of the person, as the path needs it.
#[derive(Debug, Clone)]
pub(crate) struct CaseRow {
    pub case_id: Uuid,
    pub person_id: Uuid,
    pub reporting_agency: String,
    pub competent_authority: String,
    pub gender: i32,
    pub age_band: i32,
    pub child: bool,
    pub citizenship: String,
    pub decision_waiting_since: Option<DateTime<Utc>>,
    pub return_id: Option<Uuid>,
    pub erased: bool,
}

/// A consent of the person.
#[derive(Debug, Clone)]
pub(crate) struct ConsentRow {
    pub consent_id: Uuid,
    pub case_id: Option<Uuid>,
    /// The agency the consent lets in.
    pub recipient_agency: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
}

impl ConsentRow {
    /// Not ended and not expired at `now`.
    #[must_use]
    pub(crate) fn active(&self, now: DateTime<Utc>) -> bool {
        self.ended_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// A referral of the person.
#[derive(Debug, Clone)]
pub(crate) struct ReferralRow {
    pub referral_id: Uuid,
    pub person_id: Uuid,
    pub referring_agency: String,
    pub receiving_agency: String,
    pub consent_id: Option<Uuid>,
    pub services: Vec<i32>,
    pub urgency: i32,
    pub status: String,
    pub waiting_since: Option<DateTime<Utc>>,
    pub answer_due_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
struct ReturnRow {
    return_id: Uuid,
    direction: i32,
    opened_by: String,
    consulate_agency: String,
}

#[derive(Debug, Clone)]
struct HoldRow {
    hold_id: Uuid,
    shelter_id: Uuid,
    holder_agency: String,
    operator_agency: Option<String>,
}

#[derive(Debug, Clone)]
struct StepRow {
    subject_id: Uuid,
    part: i32,
    ordering: order::Ordering,
    step: pb::Step,
}

/// Everything casepath knows of one person.
#[derive(Debug, Default)]
struct Records {
    cases: Vec<CaseRow>,
    consents: Vec<ConsentRow>,
    referrals: Vec<ReferralRow>,
    goals: Vec<Uuid>,
    returns: Vec<ReturnRow>,
    holds: Vec<HoldRow>,
    steps: Vec<StepRow>,
}

impl Records {
    fn known(&self) -> bool {
        !(self.cases.is_empty() && self.referrals.is_empty() && self.consents.is_empty() && self.goals.is_empty())
    }

    /// What a watch of `person`'s path must look again for: the person and
    /// every ID this read filtered or joined on — each record's own and
    /// the shelters of its holds (the rule of [`crate::domain::changes`]).
    /// The steps' subjects are among the records.
    fn interest(&self, person: Uuid) -> HashSet<Uuid> {
        let mut out = HashSet::from([person]);
        out.extend(self.cases.iter().map(|c| c.case_id));
        out.extend(self.cases.iter().filter_map(|c| c.return_id));
        out.extend(self.consents.iter().map(|c| c.consent_id));
        out.extend(self.referrals.iter().map(|r| r.referral_id));
        out.extend(&self.goals);
        out.extend(self.returns.iter().map(|r| r.return_id));
        out.extend(self.holds.iter().flat_map(|h| [h.hold_id, h.shelter_id]));
        out
    }

    /// The earliest time after `now` a consent of the person lapses: what
    /// the path shows may change then by the clock alone.
    fn next_expiry(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.consents
            .iter()
            .filter(|c| c.ended_at.is_none())
            .filter_map(|c| c.expires_at)
            .filter(|at| *at > now)
            .min()
    }
}

/// Columns of [`CaseRow`].
pub(crate) const CASE_COLUMNS: &str = "case_id, person_id, reporting_agency, competent_authority, gender, \
     age_band, child, citizenship, decision_waiting_since, return_id, erased_at IS NOT NULL AS erased";

/// A case from a row of [`CASE_COLUMNS`].
///
/// # Errors
/// When a column is missing.
pub(crate) fn case_row(r: &sqlx::postgres::PgRow) -> Result<CaseRow, sqlx::Error> {
    Ok(CaseRow {
        case_id: r.try_get("case_id")?,
        person_id: r.try_get("person_id")?,
        reporting_agency: r.try_get("reporting_agency")?,
        competent_authority: r.try_get("competent_authority")?,
        gender: r.try_get("gender")?,
        age_band: r.try_get("age_band")?,
        child: r.try_get("child")?,
        citizenship: r.try_get("citizenship")?,
        decision_waiting_since: r.try_get("decision_waiting_since")?,
        return_id: r.try_get("return_id")?,
        erased: r.try_get("erased")?,
    })
}

/// Columns of [`ReferralRow`].
pub(crate) const REFERRAL_COLUMNS: &str = "referral_id, person_id, referring_agency, receiving_agency, consent_id, \
     services, urgency, status, waiting_since, answer_due_at";

/// A referral from a row of [`REFERRAL_COLUMNS`].
///
/// # Errors
/// When a column is missing.
pub(crate) fn referral_row(r: &sqlx::postgres::PgRow) -> Result<ReferralRow, sqlx::Error> {
    Ok(ReferralRow {
        referral_id: r.try_get("referral_id")?,
        person_id: r.try_get("person_id")?,
        referring_agency: r.try_get("referring_agency")?,
        receiving_agency: r.try_get("receiving_agency")?,
        consent_id: r.try_get("consent_id")?,
        services: r.try_get("services")?,
        urgency: r.try_get("urgency")?,
        status: r.try_get("status")?,
        waiting_since: r.try_get("waiting_since")?,
        answer_due_at: r.try_get("answer_due_at")?,
    })
}

/// The permit of a path part for `role`: the matrix's row
/// `CasepathService/GetPath (<part>)`, for `GetPath` and `WatchPath` alike.
fn part_permit(role: Role, part: &str) -> Option<Permit> {
    permissions::permit(CASEPATH, "GetPath", Some(part), role).ok()
}

/// The matrix's name of a part.
fn part_name(part: pb::PathPart) -> &'static str {
    match part {
        pb::PathPart::Person | pb::PathPart::Unspecified => PATH_PERSON,
        pb::PathPart::Identification => PATH_IDENTIFICATION,
        pb::PathPart::Consents => PATH_CONSENTS,
        pb::PathPart::Referrals => PATH_REFERRALS,
        pb::PathPart::Shelter => PATH_SHELTER,
        pb::PathPart::Return => PATH_RETURN,
        pb::PathPart::Plan => PATH_PLAN,
    }
}

const PARTS: [pb::PathPart; 7] = [
    pb::PathPart::Person,
    pb::PathPart::Identification,
    pb::PathPart::Consents,
    pb::PathPart::Referrals,
    pb::PathPart::Shelter,
    pb::PathPart::Return,
    pb::PathPart::Plan,
];

/// Parses `person_id` (never echoing it).
///
/// # Errors
/// `INVALID_ARGUMENT` naming `person_id`.
pub fn parse_person(text: &str) -> Result<Uuid, AppError> {
    PersonId::parse("person_id", text)
        .map(|p| p.as_uuid())
        .map_err(|v: FieldViolation| AppError::InvalidArgument(vec![v]))
}

/// How the caller stands to each record of the person.
struct Standings<'a> {
    records: &'a Records,
    holders: Vec<&'a str>,
    consents: HashMap<Uuid, &'a ConsentRow>,
    cases: HashMap<Uuid, &'a CaseRow>,
    now: DateTime<Utc>,
}

impl<'a> Standings<'a> {
    fn new(records: &'a Records, now: DateTime<Utc>) -> Self {
        let mut holders: Vec<&str> = Vec::new();
        for c in &records.cases {
            for a in [c.reporting_agency.as_str(), c.competent_authority.as_str()] {
                if !holders.contains(&a) {
                    holders.push(a);
                }
            }
        }
        Self {
            records,
            holders,
            consents: records.consents.iter().map(|c| (c.consent_id, c)).collect(),
            cases: records.cases.iter().map(|c| (c.case_id, c)).collect(),
            now,
        }
    }

    /// The agency has an accepted referral for the person under an active
    /// consent that lets that agency in (a consent for another agency, say
    /// one a redirected referral carried along, lets nobody else in).
    fn consented(&self, agency: &str) -> bool {
        self.records.referrals.iter().any(|r| {
            r.receiving_agency == agency
                && r.status == "accepted"
                && r.consent_id
                    .and_then(|c| self.consents.get(&c))
                    .is_some_and(|c| c.recipient_agency == agency && c.active(self.now))
        })
    }

    fn person(&self, agency: &str) -> Standing<'_> {
        Standing {
            case_holders: self.holders.clone(),
            consented: self.consented(agency),
            ..Standing::default()
        }
    }

    fn case(&self, case_id: Option<Uuid>) -> Standing<'_> {
        Standing {
            case_holders: self.holders.clone(),
            competent_authority: case_id
                .and_then(|c| self.cases.get(&c))
                .map(|c| c.competent_authority.as_str()),
            ..Standing::default()
        }
    }

    fn referral(r: &ReferralRow) -> Standing<'_> {
        Standing {
            owner: Some(&r.referring_agency),
            addressees: vec![&r.receiving_agency],
            ..Standing::default()
        }
    }

    fn hold(h: &HoldRow) -> Standing<'_> {
        Standing {
            shelter_operator: h.operator_agency.as_deref(),
            addressees: vec![&h.holder_agency],
            ..Standing::default()
        }
    }

    fn ret(r: &ReturnRow) -> Standing<'_> {
        Standing {
            case_holders: vec![&r.opened_by, &r.consulate_agency],
            consented: r.direction == nrm_proto::repatriation::v1::Direction::Incoming as i32,
            ..Standing::default()
        }
    }
}

/// What the caller may see: per part, the admitted records.
struct Sight {
    parts: Vec<pb::PathPart>,
    admitted: HashSet<(i32, Uuid)>,
    person: bool,
    /// Cases whose `possible_duplicate` the caller may see.
    duplicates: HashSet<Uuid>,
}

fn decide(ctx: &CallContext, records: &Records, now: DateTime<Utc>) -> Sight {
    let agency = ctx.agency();
    let role = ctx.caller.role;
    let s = Standings::new(records, now);
    let mut admitted: HashSet<(i32, Uuid)> = HashSet::new();
    let mut parts = Vec::new();
    let mut person = false;
    for part in PARTS {
        let Some(permit) = part_permit(role, part_name(part)) else {
            continue;
        };
        let items: Vec<(Uuid, bool)> = match part {
            pb::PathPart::Person | pb::PathPart::Unspecified => {
                person = records.known() && permit.admits(agency, &s.person(agency));
                if person {
                    parts.push(part);
                }
                continue;
            }
            pb::PathPart::Identification => records
                .cases
                .iter()
                .map(|c| (c.case_id, permit.admits(agency, &s.case(Some(c.case_id)))))
                .collect(),
            pb::PathPart::Consents => records
                .consents
                .iter()
                .map(|c| (c.consent_id, permit.admits(agency, &s.case(c.case_id))))
                .collect(),
            pb::PathPart::Referrals => records
                .referrals
                .iter()
                .map(|r| (r.referral_id, permit.admits(agency, &Standings::referral(r))))
                .collect(),
            pb::PathPart::Shelter => records
                .holds
                .iter()
                .map(|h| (h.hold_id, permit.admits(agency, &Standings::hold(h))))
                .collect(),
            pb::PathPart::Return => records
                .returns
                .iter()
                .map(|r| (r.return_id, permit.admits(agency, &Standings::ret(r))))
                .collect(),
            pb::PathPart::Plan => {
                let consented = permit.admits(agency, &s.person(agency));
                records.goals.iter().map(|g| (*g, consented)).collect()
            }
        };
        let mut any = false;
        for (id, ok) in items {
            if ok {
                admitted.insert((part as i32, id));
                any = true;
            }
        }
        if any {
            parts.push(part);
        }
    }
    let duplicates = records
        .cases
        .iter()
        .filter(|c| ctx.sees_possible_duplicates(&c.reporting_agency, &c.competent_authority))
        .map(|c| c.case_id)
        .collect();
    Sight {
        parts,
        admitted,
        person,
        duplicates,
    }
}

impl Casepath {
    /// Gathers every record of `person` in one read-only snapshot.
    async fn records(&self, person: Uuid) -> Result<Records, AppError> {
        // One snapshot for all the reads, begun in one round trip (not a
        // BEGIN and a SET TRANSACTION apart): every watch runs this again on
        // each change of its person, and each round trip is lag.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .await?;
        let cases = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cp_cases WHERE person_id = $1 ORDER BY reported_at, case_id"
        )))
        .bind(person)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(case_row)
        .collect::<Result<Vec<_>, _>>()?;
        let consents = sqlx::query(
            "SELECT consent_id, case_id, recipient_agency, expires_at, ended_at FROM cp_consents WHERE person_id = $1 \
             ORDER BY recorded_at, consent_id",
        )
        .bind(person)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(ConsentRow {
                consent_id: r.try_get("consent_id")?,
                case_id: r.try_get("case_id")?,
                recipient_agency: r.try_get("recipient_agency")?,
                expires_at: r.try_get("expires_at")?,
                ended_at: r.try_get("ended_at")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let referrals = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {REFERRAL_COLUMNS} FROM cp_referrals WHERE person_id = $1 ORDER BY created_at, referral_id"
        )))
        .bind(person)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(referral_row)
        .collect::<Result<Vec<_>, _>>()?;
        let goals: Vec<Uuid> =
            sqlx::query_scalar("SELECT goal_id FROM cp_goals WHERE person_id = $1 ORDER BY added_at")
                .bind(person)
                .fetch_all(&mut *tx)
                .await?;
        let return_ids: Vec<Uuid> = cases.iter().filter_map(|c| c.return_id).collect();
        let case_ids: Vec<Uuid> = cases.iter().map(|c| c.case_id).collect();
        let returns = sqlx::query(
            "SELECT return_id, direction, opened_by, consulate_agency FROM cp_returns \
             WHERE return_id = ANY($1) OR foreign_case = ANY($2) ORDER BY opened_at, return_id",
        )
        .bind(&return_ids)
        .bind(&case_ids)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(ReturnRow {
                return_id: r.try_get("return_id")?,
                direction: r.try_get("direction")?,
                opened_by: r.try_get("opened_by")?,
                consulate_agency: r.try_get("consulate_agency")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let referral_ids: Vec<Uuid> = referrals.iter().map(|r| r.referral_id).collect();
        let all_returns: Vec<Uuid> = returns.iter().map(|r| r.return_id).collect();
        // Two index scans (by referral; by the return's commits) united,
        // not one OR that only a scan of every hold can answer.
        let holds = sqlx::query(
            "SELECT h.hold_id, h.shelter_id, h.holder_agency, s.operator_agency FROM ( \
                 SELECT hold_id FROM cp_holds WHERE referral_id = ANY($1) \
                 UNION \
                 SELECT h.hold_id FROM cp_return_commits rc JOIN cp_holds h ON h.cause_commit_id = rc.commit_id \
                 WHERE rc.return_id = ANY($2) \
             ) x JOIN cp_holds h USING (hold_id) \
             LEFT JOIN cp_shelters s ON s.shelter_id = h.shelter_id \
             ORDER BY h.held_at, h.hold_id",
        )
        .bind(&referral_ids)
        .bind(&all_returns)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(HoldRow {
                hold_id: r.try_get("hold_id")?,
                shelter_id: r.try_get("shelter_id")?,
                holder_agency: r.try_get("holder_agency")?,
                operator_agency: r.try_get("operator_agency")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let mut subjects: Vec<Uuid> = cases.iter().map(|c| c.case_id).collect();
        subjects.extend(consents.iter().map(|c| c.consent_id));
        subjects.extend(&referral_ids);
        subjects.extend(&goals);
        subjects.extend(&all_returns);
        subjects.extend(holds.iter().map(|h| h.hold_id));
        let rows = sqlx::query(
            "SELECT subject_id, part, at, commit_id, causation_id, stream_sequence, position, step \
             FROM cp_steps WHERE subject_id = ANY($1)",
        )
        .bind(&subjects)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut steps = Vec::with_capacity(rows.len());
        for r in &rows {
            let bytes: Vec<u8> = r.try_get("step")?;
            let step = pb::Step::decode(bytes.as_slice())
                .map_err(|e| AppError::Internal(format!("a stored step does not decode: {e}")))?;
            let after_peers = step.kind == pb::StepKind::CaseOpenedFromAbroad as i32;
            steps.push(StepRow {
                subject_id: r.try_get("subject_id")?,
                part: r.try_get("part")?,
                ordering: order::Ordering {
                    at: r.try_get("at")?,
                    commit_id: r.try_get("commit_id")?,
                    causation_id: r.try_get("causation_id")?,
                    stream_sequence: r.try_get("stream_sequence")?,
                    position: r.try_get("position")?,
                    after_peers,
                },
                step,
            });
        }
        Ok(Records {
            cases,
            consents,
            referrals,
            goals,
            returns,
            holds,
            steps,
        })
    }

    /// The path of `person` as the caller of `ctx` sees it now.
    ///
    /// # Errors
    /// `PERMISSION_DENIED` when the caller sees no part (also for an unknown
    /// person), `NOT_FOUND` for the coordinator and an unknown person.
    pub async fn path_of(&self, ctx: &CallContext, person: Uuid) -> Result<pb::Path, AppError> {
        Ok(self.path_watched(ctx, person).await?.0)
    }

    /// [`Casepath::path_of`], with what a watch of it must look again for
    /// ([`Records::interest`], of the same read) and when a consent of the
    /// person lapses next ([`Records::next_expiry`]).
    ///
    /// # Errors
    /// As [`Casepath::path_of`].
    pub(crate) async fn path_watched(
        &self,
        ctx: &CallContext,
        person: Uuid,
    ) -> Result<(pb::Path, HashSet<Uuid>, Option<DateTime<Utc>>), AppError> {
        let now = Utc::now();
        let records = self.records(person).await?;
        let sight = decide(ctx, &records, now);
        if sight.parts.is_empty() {
            let coordinator = part_permit(ctx.caller.role, PATH_PERSON).is_some_and(|p| p.any());
            if coordinator && !records.known() {
                return Err(AppError::NotFound {
                    kind: "person",
                    id: person.to_string(),
                });
            }
            return Err(AppError::PermissionDenied(
                "the caller's agency sees no part of this path".into(),
            ));
        }
        Ok((
            self.view(ctx, person, &records, &sight, now),
            records.interest(person),
            records.next_expiry(now),
        ))
    }

    fn view(&self, ctx: &CallContext, person: Uuid, records: &Records, sight: &Sight, now: DateTime<Utc>) -> pb::Path {
        let orderings: Vec<order::Ordering> = records.steps.iter().map(|s| s.ordering).collect();
        let ordered = order::order(&orderings);
        let child: HashMap<Uuid, bool> = records.cases.iter().map(|c| (c.case_id, c.child)).collect();
        let coordinator = part_permit(ctx.caller.role, PATH_PERSON).is_some_and(|p| p.any());
        // The stage, and the time the path stands at, come from the steps the
        // caller sees (the coordinator sees them all): a reporter does not
        // learn from the stage that the person was admitted to a shelter,
        // nor from `as_of` when a step it cannot see happened.
        let seen = |s: &&StepRow| coordinator || sight.admitted.contains(&(s.part, s.subject_id));
        let changes: Vec<stage::Change<'_>> = ordered
            .iter()
            .filter(|&&i| seen(&&records.steps[i]))
            .map(|&i| {
                let s = &records.steps[i];
                stage::Change {
                    at: s.ordering.at,
                    kind: pb::StepKind::try_from(s.step.kind).unwrap_or_default(),
                    subject: s.subject_id,
                    detail: s.step.detail.as_ref(),
                    child: child.get(&s.subject_id).copied().unwrap_or(false),
                }
            })
            .collect();
        let (current, spans) = stage::spans(&changes);
        // A bed is recorded twice: by the shelter (BED_HELD of the hold, with
        // its details) and by the referral it is for (BED_HELD of the
        // referral, naming the hold). A caller who sees the shelter's step of
        // a hold sees that one only; a hold it cannot see (another agency's,
        // after a redirect) still shows as the referral's step.
        let holds_shown: HashSet<String> = records
            .steps
            .iter()
            .filter(|s| {
                s.step.kind == pb::StepKind::BedHeld as i32
                    && s.part == pb::PathPart::Shelter as i32
                    && sight.admitted.contains(&(s.part, s.subject_id))
            })
            .map(|s| s.subject_id.to_string())
            .collect();
        let shown = |s: &&StepRow| {
            sight.admitted.contains(&(s.part, s.subject_id))
                && !(s.step.kind == pb::StepKind::BedHeld as i32
                    && s.part == pb::PathPart::Referrals as i32
                    && matches!(&s.step.detail, Some(pb::step::Detail::Referral(d)) if holds_shown.contains(&d.hold_id)))
        };
        let mut steps: Vec<pb::Step> = ordered
            .iter()
            .map(|&i| &records.steps[i])
            .filter(shown)
            .map(|s| {
                let mut step = s.step.clone();
                step.part = s.part;
                step.at = Some(ts(s.ordering.at));
                step.spent = None;
                if let Some(pb::step::Detail::Identification(d)) = step.detail.as_mut()
                    && !sight.duplicates.contains(&s.subject_id)
                {
                    d.possible_duplicate = false;
                }
                step
            })
            .collect();
        let times: Vec<DateTime<Utc>> = ordered
            .iter()
            .map(|&i| &records.steps[i])
            .filter(shown)
            .map(|s| s.ordering.at)
            .collect();
        for (i, step) in steps.iter_mut().enumerate() {
            let until = times.get(i + 1).copied().unwrap_or(now);
            step.spent = Some(duration((until - times[i]).max(chrono::TimeDelta::zero())));
        }
        let shows = |p: pb::PathPart| sight.parts.contains(&p);
        let mut waiting = Vec::new();
        if shows(pb::PathPart::Referrals) {
            for r in &records.referrals {
                if r.waiting_since.is_some()
                    && r.status == "pending"
                    && sight
                        .admitted
                        .contains(&(pb::PathPart::Referrals as i32, r.referral_id))
                {
                    waiting.push(inbox::referral_item(r, now));
                }
            }
        }
        if shows(pb::PathPart::Identification) {
            for c in &records.cases {
                if let Some(since) = c.decision_waiting_since
                    && sight
                        .admitted
                        .contains(&(pb::PathPart::Identification as i32, c.case_id))
                {
                    waiting.push(inbox::decision_item(c, since, self.decision_due(since), now));
                }
            }
        }
        inbox::sort(&mut waiting);
        let first = records.cases.first();
        pb::Path {
            person_id: person.to_string(),
            parts: sight.parts.iter().map(|p| *p as i32).collect(),
            person: (sight.person).then(|| pb::Person {
                gender: first.map_or(0, |c| c.gender),
                age_band: first.map_or(0, |c| c.age_band),
                child: records.cases.iter().any(|c| c.child),
                citizenship: first.map(|c| c.citizenship.clone()).unwrap_or_default(),
                erased: records.cases.iter().any(|c| c.erased),
            }),
            steps,
            stage: if coordinator || shows(pb::PathPart::Identification) {
                current as i32
            } else {
                0
            },
            stages: if coordinator {
                spans
                    .iter()
                    .map(|s| pb::StageSpan {
                        stage: s.stage as i32,
                        entered_at: Some(ts(s.entered_at)),
                        left_at: s.left_at.map(ts),
                        spent: Some(duration(
                            (s.left_at.unwrap_or(now) - s.entered_at).max(chrono::TimeDelta::zero()),
                        )),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            waiting,
            as_of: records.steps.iter().filter(seen).map(|s| s.ordering.at).max().map(ts),
        }
    }

    /// Audits an answered path (`action`: the RPC) before it leaves.
    pub(crate) async fn audit_path(&self, ctx: &CallContext, action: &str, path: &pb::Path) -> Result<(), AppError> {
        let parts: Vec<&str> = path
            .parts
            .iter()
            .filter_map(|p| pb::PathPart::try_from(*p).ok())
            .map(part_name)
            .collect();
        let purpose = format!("{PURPOSE}:{}", parts.join("+"));
        self.audit_read(ctx, action, &path.person_id, &purpose).await
    }

    /// `GetPath`: the path, audited.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming `person_id`; as [`Casepath::path_of`].
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty))]
    pub async fn get_path(&self, ctx: &CallContext, req: &pb::GetPathRequest) -> Result<pb::Path, AppError> {
        let person = parse_person(&req.person_id)?;
        tracing::Span::current().record("person_id", tracing::field::display(person));
        ctx.concerns(person);
        ctx.concerns_person(person);
        let path = self.path_of(ctx, person).await?;
        self.audit_path(ctx, "GetPath", &path).await?;
        Ok(path)
    }
}
