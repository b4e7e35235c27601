//! What each context's events mean for casepath's read models: a commit in,
//! the rows to write and the steps of the paths out. Pure: no SQL, no clock;
//! the projections (`crate::projections`) only write what this returns.
//!
//! - [`identification`], [`referral`], [`shelter`], [`repatriation`]: one
//!   mapping per context stream. A commit of another payload type on the
//!   same stream (a crossing commit) maps to nothing.
//! - [`StepRow`]: one `cp_steps` row; its `step` is an encoded
//!   `nrm.casepath.v1.Step` with `spent` unset.
//! - Step IDs: the event's ID; a second step of one event (FOUND beside
//!   REPORTED) and a step that crossed the border (one per return and
//!   origin version, however often a snapshot repeats it) get a name-based
//!   UUID (version 5) instead, so that applying them again adds nothing.
//!
//! Nothing here reads an identifier: events carry them only sealed, and the
//! shelter's sealed address is not even decoded (a view of the message
//! without that field is decoded instead).
//!
//! # What one bad event does
//! One event must never stall a stream, nor be silently half-applied:
//! - An event of a variant this version does not know (a newer service's:
//!   its payload is not empty but decodes to no variant) fails the whole
//!   commit ([`StepError::UnknownEvent`]): the projection parks it at once,
//!   durably and listed by `nrmctl ops parked`, rather than apply the rest
//!   of the commit without it (half a command) or pass it over unseen.
//!   Upgrade casepath before the services whose events it reads; after an
//!   upgrade, `nrmctl ops retry` applies a parked commit in its place (a
//!   rebuild). Variants this version knows but has no use for map to
//!   nothing.
//! - Required, because a row or a step cannot exist without them: the
//!   commit's and each event's ID, the ID of the record the event is about
//!   (the case, consent, referral, goal, hold, shelter, notification; a
//!   return's from its stream ID), the person of a new case, consent,
//!   referral or goal, and the event's time (its own, else when it was
//!   recorded). Any of them missing or malformed, an empty event, or a
//!   payload that does not decode is a [`StepError`]: the projection parks
//!   the message at once (it can only fail again).
//! - Optional, because the path only uses them to link records of
//!   different streams: a case's, consent's or referral's `case_id`, a
//!   referral's `consent_id`, a hold's `referral_id`, a case from abroad's
//!   `return_id`. Empty is absent; malformed is stored as absent too (NULL,
//!   and empty in the step's detail) and reported in [`Effect::skipped`]
//!   (`nrm_casepath_malformed_links_total{projection, field}`), so the
//!   record stays on its path, only unlinked.
//! - A return's `foreign_reference` is free text; one that is a UUID in
//!   any accepted form (upper case, braces, no hyphens, `urn:uuid:`) is
//!   stored in the canonical lower-case form, so that it matches a case ID
//!   ([`normalise_reference`]); anything else is kept as typed.

use std::cell::RefCell;

use chrono::{DateTime, Utc};
use nrm_kernel::ids::{CaseId, CommitId, ConsentId, GoalId, HoldId, PersonId, ReferralId, ReturnId, ShelterId};
use nrm_kernel::validate::to_datetime;
use nrm_proto::casepath::v1 as cp;
use nrm_proto::common::v1::{CommittedEvent, EventCommit};
use nrm_proto::identification::v1 as id;
use nrm_proto::referral::v1 as rf;
use nrm_proto::repatriation::v1 as rp;
use nrm_proto::shelter::v1 as sh;
use prost_types::Timestamp;
use uuid::Uuid;

use crate::domain::changes::{Touched, Touches};

use cp::step::Detail;
use cp::{PathPart as Part, StepKind as Kind};

/// Payload type of identification's commits.
pub const IDENTIFICATION_PAYLOAD: &str = "nrm.identification.v1.IdentificationEvent";
/// Payload type of referral's commits.
pub const REFERRAL_PAYLOAD: &str = "nrm.referral.v1.ReferralEvent";
/// Payload type of shelter's commits.
pub const SHELTER_PAYLOAD: &str = "nrm.shelter.v1.ShelterEvent";
/// Payload type of repatriation's commits (its crossing commits have another).
pub const REPATRIATION_PAYLOAD: &str = "nrm.repatriation.v1.RepatriationEvent";

/// Namespace of casepath's name-based step IDs.
const STEP_NAMESPACE: Uuid = Uuid::from_u128(0x0193_5c1e_7a2b_7c4d_9e8f_a1b2_c3d4_e5f6);

/// Why a commit cannot be mapped (IDs and codes only, never a payload).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StepError {
    /// An event's payload is not a message of the commit's payload type.
    #[error("event {0} does not decode")]
    Undecodable(String),
    /// An event has no variant set.
    #[error("event {0} is empty")]
    Empty(String),
    /// An event of a variant this version does not know (a newer service's).
    #[error("event {0} is of a kind this version of casepath does not know: upgrade casepath, then retry")]
    UnknownEvent(String),
    /// An ID field is not a UUID.
    #[error("event {event}: {field} is not a UUID")]
    MalformedId {
        /// The event's ID.
        event: String,
        /// The field.
        field: &'static str,
    },
    /// Neither the event nor its commit gives a time.
    #[error("event {0} has no time")]
    NoTime(String),
    /// The stream ID does not name the aggregate the event needs.
    #[error("stream {0} is not one this projection knows")]
    UnknownStream(String),
}

/// Where a commit happened and who did it: what its steps record beside
/// the event's own fields.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// This deployment's country (lower-case ISO code).
    pub country: &'a str,
    /// The acting agency from the commit's metadata; empty when the service
    /// acted by itself (a timer, a reaction) or the metadata is missing.
    pub agency: &'a str,
}

/// One row of `cp_steps` (the projection adds source, commit, causation,
/// stream sequence and position).
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    /// The event's ID, or one derived from it.
    pub step_id: Uuid,
    /// The record it concerns: a case, consent, referral, hold, return or goal ID.
    pub subject_id: Uuid,
    /// `step.at` as a time.
    pub at: DateTime<Utc>,
    /// The step, `spent` unset.
    pub step: cp::Step,
}

impl StepRow {
    /// The step's part (enum number).
    #[must_use]
    pub fn part(&self) -> i32 {
        self.step.part
    }

    /// The step's kind (enum number).
    #[must_use]
    pub fn kind(&self) -> i32 {
        self.step.kind
    }
}

/// What one commit does to one projection's tables.
#[derive(Debug, Clone, PartialEq)]
pub struct Effect<W> {
    /// Row writes, in event order.
    pub writes: Vec<W>,
    /// Steps, in event order (their position in the commit is their index).
    pub steps: Vec<StepRow>,
    /// What was left out of the commit (see the module's rules).
    pub skipped: Vec<Skipped>,
}

impl<W> Default for Effect<W> {
    fn default() -> Self {
        Self {
            writes: Vec::new(),
            steps: Vec::new(),
            skipped: Vec::new(),
        }
    }
}

/// Something of a commit left out rather than failing it (IDs only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// An optional link that is not a UUID: stored as absent.
    MalformedLink {
        /// The event's ID.
        event_id: Uuid,
        /// The field.
        field: &'static str,
    },
}

impl<W> Effect<W> {
    /// Whether the commit changes nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.steps.is_empty()
    }
}

impl<W: Touches> Effect<W> {
    /// The keys the commit touches: its writes' and its steps' subjects
    /// (see [`crate::domain::changes`]).
    #[must_use]
    pub fn touched(&self) -> Touched {
        let mut t = Touched::default();
        for w in &self.writes {
            w.touch(&mut t);
        }
        for s in &self.steps {
            t.key(s.subject_id);
        }
        t
    }
}

/// A name-based UUID (RFC 9562 version 5: SHA-1 of namespace and name).
#[must_use]
pub fn uuid_v5(namespace: Uuid, name: &[u8]) -> Uuid {
    Uuid::new_v5(&namespace, name)
}

/// The ID of the FOUND step of the report `event_id` (REPORTED has the event's own).
#[must_use]
pub fn found_step_id(event_id: Uuid) -> Uuid {
    let mut name = b"found:".to_vec();
    name.extend_from_slice(event_id.as_bytes());
    uuid_v5(STEP_NAMESPACE, &name)
}

/// The ID of the crossed step of return `return_id` at `origin_version`.
#[must_use]
pub fn crossed_step_id(return_id: ReturnId, origin_version: u64) -> Uuid {
    let mut name = b"crossed:".to_vec();
    name.extend_from_slice(return_id.as_uuid().as_bytes());
    name.extend_from_slice(&origin_version.to_be_bytes());
    uuid_v5(STEP_NAMESPACE, &name)
}

/// One event of a commit, with what every mapping needs of it.
struct Ev<'a> {
    committed: &'a CommittedEvent,
    id: Uuid,
    recorded_at: Option<Timestamp>,
    /// The commit's [`Effect::skipped`], gathered while mapping.
    skipped: &'a RefCell<Vec<Skipped>>,
}

impl Ev<'_> {
    fn parse<T, F: FnOnce(Uuid) -> T>(&self, field: &'static str, text: &str, wrap: F) -> Result<T, StepError> {
        text.trim()
            .parse::<Uuid>()
            .map(wrap)
            .map_err(|_| StepError::MalformedId {
                event: self.id.to_string(),
                field,
            })
    }

    /// An optional link: empty is none; malformed is none too, reported
    /// in [`Effect::skipped`].
    fn link<T, F: FnOnce(Uuid) -> T>(&self, field: &'static str, text: &str, wrap: F) -> Option<T> {
        if text.trim().is_empty() {
            return None;
        }
        let parsed = self.parse(field, text, wrap).ok();
        if parsed.is_none() {
            self.skipped.borrow_mut().push(Skipped::MalformedLink {
                event_id: self.id,
                field,
            });
        }
        parsed
    }

    /// The event's variant.
    ///
    /// # Errors
    /// An empty event (no payload at all), or one of a variant this
    /// version does not know.
    fn known<T>(&self, variant: Option<T>) -> Result<Option<T>, StepError> {
        match variant {
            Some(v) => Ok(Some(v)),
            None if self.committed.payload.is_empty() => Err(StepError::Empty(self.id.to_string())),
            None => Err(StepError::UnknownEvent(self.id.to_string())),
        }
    }

    /// The event's own time, else the time it was recorded.
    fn time(&self, own: Option<&Timestamp>) -> Result<(Timestamp, DateTime<Utc>), StepError> {
        let candidates = [own.copied(), self.recorded_at];
        candidates
            .into_iter()
            .flatten()
            .find_map(|t| to_datetime(&t).map(|d| (t, d)))
            .ok_or_else(|| StepError::NoTime(self.id.to_string()))
    }

    fn recorded(&self) -> Result<(Timestamp, DateTime<Utc>), StepError> {
        self.time(None)
    }
}

/// The events of `commit`, each with its ID parsed, gathering what they
/// skip into `skipped`.
fn events<'a>(commit: &'a EventCommit, skipped: &'a RefCell<Vec<Skipped>>) -> Result<Vec<Ev<'a>>, StepError> {
    commit
        .events
        .iter()
        .enumerate()
        .map(|(index, committed)| {
            // Not the malformed text itself: only where it is.
            let id = committed.event_id.parse::<Uuid>().map_err(|_| StepError::MalformedId {
                event: format!("#{index} of its commit"),
                field: "event_id",
            })?;
            Ok(Ev {
                committed,
                id,
                recorded_at: committed.recorded_at,
                skipped,
            })
        })
        .collect()
}

fn decode<M: prost::Message + Default>(ev: &Ev<'_>) -> Result<M, StepError> {
    M::decode(ev.committed.payload.as_slice()).map_err(|_| StepError::Undecodable(ev.id.to_string()))
}

/// A step with its common fields.
#[allow(clippy::too_many_arguments)]
fn step(
    step_id: Uuid,
    subject_id: Uuid,
    part: Part,
    kind: Kind,
    at: (Timestamp, DateTime<Utc>),
    agency: &str,
    country: &str,
    detail: Detail,
) -> StepRow {
    StepRow {
        step_id,
        subject_id,
        at: at.1,
        step: cp::Step {
            part: part as i32,
            kind: kind as i32,
            at: Some(at.0),
            agency: agency.to_owned(),
            country: country.to_owned(),
            spent: None,
            subject_id: subject_id.to_string(),
            detail: Some(detail),
        },
    }
}

fn datetime(t: Option<&Timestamp>) -> Option<DateTime<Utc>> {
    t.and_then(to_datetime)
}

// ---------------------------------------------------------------- identification

/// A new row of `cp_cases`.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseRow {
    /// The case.
    pub case_id: CaseId,
    /// Its person (a pseudonym).
    pub person_id: PersonId,
    /// Who reported it (for a case from abroad: who received the person).
    pub reporting_agency: String,
    /// The competent authority handling it.
    pub competent_authority: String,
    /// `nrm.identification.v1.CaseStatus`.
    pub status: i32,
    /// When it was reported (opened).
    pub reported_at: DateTime<Utc>,
    /// When the person was found.
    pub found_at: Option<DateTime<Utc>>,
    /// `nrm.common.v1.Gender`.
    pub gender: i32,
    /// `nrm.common.v1.AgeBand`.
    pub age_band: i32,
    /// A child.
    pub child: bool,
    /// ISO code, as reported.
    pub citizenship: String,
    /// ISO code.
    pub country_of_exploitation: String,
    /// `nrm.identification.v1.ExploitationForm`s.
    pub exploitation_forms: Vec<i32>,
    /// `nrm.identification.v1.Decision` (0 while undecided).
    pub decision: i32,
    /// When decided (here, or abroad: the handover).
    pub decided_at: Option<DateTime<Utc>>,
    /// Since when a decision is due; `None` once decided.
    pub decision_waiting_since: Option<DateTime<Utc>>,
    /// A case opened on a return home: the country it came from.
    pub from_country: Option<String>,
    /// … and the return.
    pub return_id: Option<ReturnId>,
    /// Earlier cases may be the same person.
    pub possible_duplicate: bool,
}

/// A new row of `cp_notifications`.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationRow {
    /// The notification (its own stream's aggregate).
    pub notification_id: Uuid,
    /// Midnight UTC of the day it was filed.
    pub filed_on: DateTime<Utc>,
    /// ISO codes.
    pub found_country: String,
    /// ISO code.
    pub country_of_exploitation: String,
    /// `nrm.identification.v1.ExploitationForm`s.
    pub exploitation_forms: Vec<i32>,
    /// `nrm.common.v1.Gender`.
    pub gender: i32,
    /// `nrm.common.v1.AgeBand`.
    pub age_band: i32,
    /// ISO code.
    pub citizenship: String,
}

/// A write of the identification projection.
#[derive(Debug, Clone, PartialEq)]
pub enum IdentificationWrite {
    /// A case reported, or opened from abroad; with what the writes folded
    /// into it set ([`IdentificationWrite::then`]; none as mapped).
    Open(Box<CaseRow>, Changed),
    /// Earlier cases match (an event of earlier versions).
    FlagDuplicate {
        /// The case.
        case_id: CaseId,
    },
    /// Screened: presumed a victim.
    Screened {
        /// The case.
        case_id: CaseId,
    },
    /// Decided.
    Decided {
        /// The case.
        case_id: CaseId,
        /// `nrm.identification.v1.CaseStatus` after it.
        status: i32,
        /// `nrm.identification.v1.Decision`.
        decision: i32,
        /// When.
        decided_at: DateTime<Utc>,
    },
    /// A review of the decision was asked for: a decision is due again.
    ReviewRequested {
        /// The case.
        case_id: CaseId,
        /// When.
        requested_at: DateTime<Utc>,
    },
    /// The person's identifiers were erased: every case of the person.
    Erased {
        /// The person.
        person_id: PersonId,
        /// When.
        erased_at: DateTime<Utc>,
    },
    /// An anonymous notification (statistics only).
    Notification(NotificationRow),
}

/// The columns of a case that the writes folded into its opening set
/// ([`IdentificationWrite::then`]): what they do to a case that was there
/// before the opening (whose insert then changes nothing), one bit each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changed(u8);

impl Changed {
    /// `status`.
    pub const STATUS: Self = Self(1);
    /// `decision` and `decided_at`.
    pub const DECISION: Self = Self(2);
    /// `decision_waiting_since`.
    pub const WAITING: Self = Self(4);
    /// `possible_duplicate`.
    pub const DUPLICATE: Self = Self(8);

    /// Nothing set.
    #[must_use]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every column of `other` is set here.
    #[must_use]
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Changed {
    type Output = Self;

    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

impl IdentificationWrite {
    /// One write that does what `self` and then `later` (the next write to
    /// the same row) do, when there is one: a case's opening absorbs the
    /// changes to the case that follow it, so that a batch inserts the case
    /// as they leave it instead of inserting it and updating it once per
    /// change. The columns they set are kept ([`Changed`]): on a case that
    /// was already there they are what changes, as if each had been applied
    /// to it in turn (each sets its columns to values of its own, reading
    /// none). Nothing else is absorbed (`None`).
    #[must_use]
    pub fn then(&self, later: &Self) -> Option<Self> {
        let Self::Open(opened, changed) = self else {
            return None;
        };
        let presumed = id::CaseStatus::Presumed as i32;
        let mut row = opened.clone();
        let set = match *later {
            Self::FlagDuplicate { case_id } if case_id == row.case_id => {
                row.possible_duplicate = true;
                Changed::DUPLICATE
            }
            Self::Screened { case_id } if case_id == row.case_id => {
                row.status = presumed;
                Changed::STATUS
            }
            Self::Decided {
                case_id,
                status,
                decision,
                decided_at,
            } if case_id == row.case_id => {
                row.status = status;
                row.decision = decision;
                row.decided_at = Some(decided_at);
                row.decision_waiting_since = None;
                Changed::STATUS | Changed::DECISION | Changed::WAITING
            }
            Self::ReviewRequested { case_id, requested_at } if case_id == row.case_id => {
                row.status = presumed;
                row.decision_waiting_since = Some(requested_at);
                Changed::STATUS | Changed::WAITING
            }
            _ => return None,
        };
        Some(Self::Open(row, *changed | set))
    }
}

impl Touches for IdentificationWrite {
    fn touch(&self, t: &mut Touched) {
        match self {
            Self::Open(row, _) => {
                t.key(row.case_id.as_uuid());
                t.key(row.person_id.as_uuid());
                t.maybe(row.return_id.map(|r| r.as_uuid()));
            }
            Self::FlagDuplicate { case_id }
            | Self::Screened { case_id }
            | Self::Decided { case_id, .. }
            | Self::ReviewRequested { case_id, .. } => t.key(case_id.as_uuid()),
            Self::Erased { person_id, .. } => t.key(person_id.as_uuid()),
            // On no path.
            Self::Notification(_) => {}
        }
    }
}

/// The identification stream's commit `commit`.
///
/// # Errors
/// When an event does not decode or lacks an ID or a time it needs.
pub fn identification(commit: &EventCommit, origin: &Origin<'_>) -> Result<Effect<IdentificationWrite>, StepError> {
    use id::identification_event::Event;
    let mut effect = Effect::default();
    if commit.payload_type != IDENTIFICATION_PAYLOAD {
        return Ok(effect);
    }
    let skipped = RefCell::new(Vec::new());
    for ev in events(commit, &skipped)? {
        let Some(event) = ev.known(decode::<id::IdentificationEvent>(&ev)?.event)? else {
            continue;
        };
        let case = |text: &str| ev.parse("case_id", text, CaseId::from_uuid);
        let ident = |case_id: CaseId| cp::IdentificationDetail {
            case_id: case_id.to_string(),
            ..Default::default()
        };
        let country = origin.country;
        match event {
            Event::PresumedVictimReported(r) => {
                let row = case_row(&ev, &r)?;
                let detail = report_detail(&r);
                let subject = row.case_id.as_uuid();
                let reported = ev.time(r.reported_at.as_ref())?;
                let found = ev.time(r.found_at.as_ref().or(r.reported_at.as_ref()))?;
                let agency = r.reporting_agency.as_str();
                effect.steps.push(step(
                    found_step_id(ev.id),
                    subject,
                    Part::Identification,
                    Kind::Found,
                    found,
                    agency,
                    country,
                    Detail::Identification(detail.clone()),
                ));
                effect.steps.push(step(
                    ev.id,
                    subject,
                    Part::Identification,
                    Kind::Reported,
                    reported,
                    agency,
                    country,
                    Detail::Identification(detail),
                ));
                effect
                    .writes
                    .push(IdentificationWrite::Open(Box::new(row), Changed::default()));
            }
            Event::PossibleDuplicateFlagged(f) => {
                if !f.matching_case_ids.is_empty() {
                    effect.writes.push(IdentificationWrite::FlagDuplicate {
                        case_id: case(&f.case_id)?,
                    });
                }
            }
            Event::ScreeningCompleted(s) => {
                let case_id = case(&s.case_id)?;
                let mut detail = ident(case_id);
                detail.indicators.clone_from(&s.indicators);
                effect.steps.push(step(
                    ev.id,
                    case_id.as_uuid(),
                    Part::Identification,
                    Kind::Screened,
                    ev.time(s.screened_at.as_ref())?,
                    origin.agency,
                    country,
                    Detail::Identification(detail),
                ));
                effect.writes.push(IdentificationWrite::Screened { case_id });
            }
            Event::IdentificationDecided(d) => {
                let case_id = case(&d.case_id)?;
                let at = ev.time(d.decided_at.as_ref())?;
                let identified = d.decision == id::Decision::Identified as i32;
                let mut detail = ident(case_id);
                detail.decision = d.decision;
                detail.not_identified_reason = d.reason;
                detail.non_punishment = d.non_punishment;
                detail.reflection_period_ends_at = d.reflection_period_ends_at;
                let (kind, status) = if identified {
                    (Kind::Identified, id::CaseStatus::Identified)
                } else {
                    (Kind::NotIdentified, id::CaseStatus::NotIdentified)
                };
                effect.steps.push(step(
                    ev.id,
                    case_id.as_uuid(),
                    Part::Identification,
                    kind,
                    at,
                    origin.agency,
                    country,
                    Detail::Identification(detail),
                ));
                effect.writes.push(IdentificationWrite::Decided {
                    case_id,
                    status: status as i32,
                    decision: d.decision,
                    decided_at: at.1,
                });
            }
            Event::ReviewRequested(r) => {
                let case_id = case(&r.case_id)?;
                let at = ev.time(r.requested_at.as_ref())?;
                let mut detail = ident(case_id);
                detail.review_reason = r.reason;
                effect.steps.push(step(
                    ev.id,
                    case_id.as_uuid(),
                    Part::Identification,
                    Kind::ReviewRequested,
                    at,
                    origin.agency,
                    country,
                    Detail::Identification(detail),
                ));
                effect.writes.push(IdentificationWrite::ReviewRequested {
                    case_id,
                    requested_at: at.1,
                });
            }
            Event::PersonalDataErased(e) => {
                let case_id = case(&e.case_id)?;
                let person_id = ev.parse("person_id", &e.person_id, PersonId::from_uuid)?;
                let at = ev.time(e.erased_at.as_ref())?;
                effect.steps.push(step(
                    ev.id,
                    case_id.as_uuid(),
                    Part::Identification,
                    Kind::PersonalDataErased,
                    at,
                    origin.agency,
                    country,
                    Detail::Identification(ident(case_id)),
                ));
                effect.writes.push(IdentificationWrite::Erased {
                    person_id,
                    erased_at: at.1,
                });
            }
            Event::CaseOpenedFromAbroad(opened) => {
                let r = opened.report.unwrap_or_default();
                let abroad = opened.identified_abroad.unwrap_or_default();
                let mut row = case_row(&ev, &r)?;
                let at = ev.time(abroad.handed_over_at.as_ref().or(r.reported_at.as_ref()))?;
                let return_id = ev.link("return_id", &abroad.return_id, ReturnId::from_uuid);
                row.status = id::CaseStatus::Identified as i32;
                row.decision = id::Decision::Identified as i32;
                row.decided_at = Some(at.1);
                row.decision_waiting_since = None;
                row.from_country = Some(abroad.from_country.clone()).filter(|c| !c.is_empty());
                row.return_id = return_id;
                let mut detail = report_detail(&r);
                detail.decision = id::Decision::Identified as i32;
                detail.from_country.clone_from(&abroad.from_country);
                detail.return_id = return_id.map(|r| r.to_string()).unwrap_or_default();
                effect.steps.push(step(
                    ev.id,
                    row.case_id.as_uuid(),
                    Part::Identification,
                    Kind::CaseOpenedFromAbroad,
                    at,
                    &r.reporting_agency,
                    country,
                    Detail::Identification(detail),
                ));
                effect
                    .writes
                    .push(IdentificationWrite::Open(Box::new(row), Changed::default()));
            }
            Event::AnonymousNotificationFiled(n) => {
                let notification_id = ev.parse("notification_id", &n.notification_id, |u| u)?;
                let filed_on = ev.time(n.filed_on.as_ref())?.1;
                effect.writes.push(IdentificationWrite::Notification(NotificationRow {
                    notification_id,
                    filed_on,
                    found_country: n.found_country,
                    country_of_exploitation: n.country_of_exploitation,
                    exploitation_forms: n.exploitation_forms,
                    gender: n.gender,
                    age_band: n.age_band,
                    citizenship: n.citizenship,
                }));
            }
        }
    }
    effect.skipped = skipped.into_inner();
    Ok(effect)
}

/// The row of a report (or of the report a case from abroad carries).
fn case_row(ev: &Ev<'_>, r: &id::PresumedVictimReported) -> Result<CaseRow, StepError> {
    let reported_at = ev.time(r.reported_at.as_ref())?.1;
    Ok(CaseRow {
        case_id: ev.parse("case_id", &r.case_id, CaseId::from_uuid)?,
        person_id: ev.parse("person_id", &r.person_id, PersonId::from_uuid)?,
        reporting_agency: r.reporting_agency.clone(),
        competent_authority: r.competent_authority.clone(),
        status: r.status,
        reported_at,
        found_at: datetime(r.found_at.as_ref()),
        gender: r.gender,
        age_band: r.age_band,
        child: r.child,
        citizenship: r.citizenship.clone(),
        country_of_exploitation: r.country_of_exploitation.clone(),
        exploitation_forms: r.exploitation_forms.clone(),
        decision: id::Decision::Unspecified as i32,
        decided_at: None,
        decision_waiting_since: Some(reported_at),
        from_country: None,
        return_id: None,
        possible_duplicate: !r.matching_case_ids.is_empty(),
    })
}

/// The criminal-case detail of a report: coded fields only.
fn report_detail(r: &id::PresumedVictimReported) -> cp::IdentificationDetail {
    cp::IdentificationDetail {
        case_id: r.case_id.clone(),
        reporting_agency: r.reporting_agency.clone(),
        competent_authority: r.competent_authority.clone(),
        found_country: r.found_country.clone(),
        found_region: r.found_region.clone(),
        country_of_exploitation: r.country_of_exploitation.clone(),
        exploitation_forms: r.exploitation_forms.clone(),
        means_of_control: r.means_of_control.clone(),
        recruitment_method: r.recruitment_method,
        recruiter_relationship: r.recruiter_relationship,
        possible_duplicate: !r.matching_case_ids.is_empty(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------- referral

/// A new row of `cp_consents`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsentRow {
    /// The consent.
    pub consent_id: ConsentId,
    /// Whose.
    pub person_id: PersonId,
    /// The case it was recorded under.
    pub case_id: Option<CaseId>,
    /// The agency it allows to receive.
    pub recipient_agency: String,
    /// The agency that recorded it.
    pub recorded_by_agency: String,
    /// `nrm.referral.v1.ServiceKind`s.
    pub purposes: Vec<i32>,
    /// `nrm.referral.v1.DataCategory`s.
    pub data_categories: Vec<i32>,
    /// When.
    pub recorded_at: DateTime<Utc>,
    /// When it lapses.
    pub expires_at: Option<DateTime<Utc>>,
}

/// A new row of `cp_referrals` (status pending).
#[derive(Debug, Clone, PartialEq)]
pub struct ReferralRow {
    /// The referral.
    pub referral_id: ReferralId,
    /// Whose.
    pub person_id: PersonId,
    /// The case it was sent under.
    pub case_id: Option<CaseId>,
    /// Who sent it.
    pub referring_agency: String,
    /// To whom.
    pub receiving_agency: String,
    /// The consent it relies on.
    pub consent_id: Option<ConsentId>,
    /// `nrm.referral.v1.ServiceKind`s.
    pub services: Vec<i32>,
    /// `nrm.referral.v1.Urgency`.
    pub urgency: i32,
    /// When it was sent (and since when an answer is awaited).
    pub created_at: DateTime<Utc>,
    /// When the answer is due.
    pub answer_due_at: Option<DateTime<Utc>>,
}

/// A new row of `cp_goals`.
#[derive(Debug, Clone, PartialEq)]
pub struct GoalRow {
    /// The goal.
    pub goal_id: GoalId,
    /// Whose plan.
    pub person_id: PersonId,
    /// `nrm.referral.v1.GoalKind`.
    pub kind: i32,
    /// When it was added.
    pub added_at: DateTime<Utc>,
    /// When it is due.
    pub due_at: Option<DateTime<Utc>>,
}

/// A write of the referral projection.
#[derive(Debug, Clone, PartialEq)]
pub enum ReferralWrite {
    /// A consent recorded.
    Consent(ConsentRow),
    /// A consent ended (withdrawn or expired).
    ConsentEnded {
        /// The consent.
        consent_id: ConsentId,
        /// When.
        ended_at: DateTime<Utc>,
        /// `nrm.referral.v1.ConsentEndReason`.
        end_reason: i32,
    },
    /// A referral sent.
    Referral(ReferralRow),
    /// Accepted.
    Accepted {
        /// The referral.
        referral_id: ReferralId,
        /// When.
        at: DateTime<Utc>,
    },
    /// Declined.
    Declined {
        /// The referral.
        referral_id: ReferralId,
        /// When.
        at: DateTime<Utc>,
    },
    /// Taken from one agency and sent to another: pending again.
    Redirected {
        /// The referral.
        referral_id: ReferralId,
        /// The new receiving agency.
        receiving_agency: String,
        /// When (the answer is awaited since then).
        at: DateTime<Utc>,
        /// The new due time.
        answer_due_at: Option<DateTime<Utc>>,
        /// The consent to the new agency.
        consent_id: Option<ConsentId>,
    },
    /// Closed with an outcome.
    Closed {
        /// The referral.
        referral_id: ReferralId,
        /// `nrm.referral.v1.ReferralOutcome`.
        outcome: i32,
        /// When.
        at: DateTime<Utc>,
    },
    /// Cancelled.
    Cancelled {
        /// The referral.
        referral_id: ReferralId,
    },
    /// A plan goal added.
    Goal(GoalRow),
    /// A plan goal met.
    GoalMet {
        /// The goal.
        goal_id: GoalId,
        /// When.
        met_at: DateTime<Utc>,
    },
}

impl Touches for ReferralWrite {
    fn touch(&self, t: &mut Touched) {
        match self {
            Self::Consent(c) => {
                t.key(c.consent_id.as_uuid());
                t.key(c.person_id.as_uuid());
                t.maybe(c.case_id.map(|i| i.as_uuid()));
            }
            Self::ConsentEnded { consent_id, .. } => t.key(consent_id.as_uuid()),
            Self::Referral(r) => {
                t.key(r.referral_id.as_uuid());
                t.key(r.person_id.as_uuid());
                t.maybe(r.case_id.map(|i| i.as_uuid()));
                t.maybe(r.consent_id.map(|i| i.as_uuid()));
            }
            Self::Redirected {
                referral_id,
                consent_id,
                ..
            } => {
                t.key(referral_id.as_uuid());
                t.maybe(consent_id.map(|i| i.as_uuid()));
            }
            Self::Accepted { referral_id, .. }
            | Self::Declined { referral_id, .. }
            | Self::Closed { referral_id, .. }
            | Self::Cancelled { referral_id } => t.key(referral_id.as_uuid()),
            Self::Goal(g) => {
                t.key(g.goal_id.as_uuid());
                t.key(g.person_id.as_uuid());
            }
            Self::GoalMet { goal_id, .. } => t.key(goal_id.as_uuid()),
        }
    }
}

/// The referral stream's commit `commit`.
///
/// # Errors
/// When an event does not decode or lacks an ID or a time it needs.
#[allow(clippy::too_many_lines)]
pub fn referral(commit: &EventCommit, origin: &Origin<'_>) -> Result<Effect<ReferralWrite>, StepError> {
    use rf::referral_event::Event;
    let mut effect = Effect::default();
    if commit.payload_type != REFERRAL_PAYLOAD {
        return Ok(effect);
    }
    let skipped = RefCell::new(Vec::new());
    for ev in events(commit, &skipped)? {
        let Some(event) = ev.known(decode::<rf::ReferralEvent>(&ev)?.event)? else {
            continue;
        };
        let country = origin.country;
        let referral_id = |text: &str| ev.parse("referral_id", text, ReferralId::from_uuid);
        let refd = |referral_id: ReferralId| cp::ReferralDetail {
            referral_id: referral_id.to_string(),
            ..Default::default()
        };
        let on_referral = |referral_id: ReferralId, kind: Kind, at, agency: &str, detail: cp::ReferralDetail| {
            step(
                ev.id,
                referral_id.as_uuid(),
                Part::Referrals,
                kind,
                at,
                agency,
                country,
                Detail::Referral(detail),
            )
        };
        match event {
            Event::ConsentRecorded(c) => {
                let consent_id = ev.parse("consent_id", &c.consent_id, ConsentId::from_uuid)?;
                let at = ev.time(c.recorded_at.as_ref())?;
                effect.steps.push(step(
                    ev.id,
                    consent_id.as_uuid(),
                    Part::Consents,
                    Kind::ConsentRecorded,
                    at,
                    &c.recorded_by_agency,
                    country,
                    Detail::Consent(cp::ConsentDetail {
                        consent_id: c.consent_id.clone(),
                        recipient_agency: c.recipient_agency.clone(),
                        recorded_by_agency: c.recorded_by_agency.clone(),
                        given_by: c.given_by,
                        purposes: c.purposes.clone(),
                        data_categories: c.data_categories.clone(),
                        expires_at: c.expires_at,
                        end_reason: 0,
                    }),
                ));
                effect.writes.push(ReferralWrite::Consent(ConsentRow {
                    consent_id,
                    person_id: ev.parse("person_id", &c.person_id, PersonId::from_uuid)?,
                    case_id: ev.link("case_id", &c.case_id, CaseId::from_uuid),
                    recipient_agency: c.recipient_agency,
                    recorded_by_agency: c.recorded_by_agency,
                    purposes: c.purposes,
                    data_categories: c.data_categories,
                    recorded_at: at.1,
                    expires_at: datetime(c.expires_at.as_ref()),
                }));
            }
            Event::ConsentWithdrawn(c) => {
                let consent_id = ev.parse("consent_id", &c.consent_id, ConsentId::from_uuid)?;
                let at = ev.time(c.withdrawn_at.as_ref())?;
                effect.steps.push(step(
                    ev.id,
                    consent_id.as_uuid(),
                    Part::Consents,
                    Kind::ConsentEnded,
                    at,
                    origin.agency,
                    country,
                    Detail::Consent(cp::ConsentDetail {
                        consent_id: c.consent_id.clone(),
                        recipient_agency: c.recipient_agency.clone(),
                        end_reason: c.reason,
                        ..Default::default()
                    }),
                ));
                effect.writes.push(ReferralWrite::ConsentEnded {
                    consent_id,
                    ended_at: at.1,
                    end_reason: c.reason,
                });
            }
            Event::ReferralCreated(r) => {
                let id = referral_id(&r.referral_id)?;
                let at = ev.time(r.created_at.as_ref())?;
                let detail = cp::ReferralDetail {
                    referral_id: r.referral_id.clone(),
                    referring_agency: r.referring_agency.clone(),
                    receiving_agency: r.receiving_agency.clone(),
                    services: r.services.clone(),
                    urgency: r.urgency,
                    answer_due_at: r.answer_due_at,
                    ..Default::default()
                };
                effect
                    .steps
                    .push(on_referral(id, Kind::ReferralSent, at, &r.referring_agency, detail));
                effect.writes.push(ReferralWrite::Referral(ReferralRow {
                    referral_id: id,
                    person_id: ev.parse("person_id", &r.person_id, PersonId::from_uuid)?,
                    case_id: ev.link("case_id", &r.case_id, CaseId::from_uuid),
                    referring_agency: r.referring_agency,
                    receiving_agency: r.receiving_agency,
                    consent_id: ev.link("consent_id", &r.consent_id, ConsentId::from_uuid),
                    services: r.services,
                    urgency: r.urgency,
                    created_at: at.1,
                    answer_due_at: datetime(r.answer_due_at.as_ref()),
                }));
            }
            Event::ReferralAccepted(a) => {
                let id = referral_id(&a.referral_id)?;
                let at = ev.time(a.accepted_at.as_ref())?;
                let mut detail = refd(id);
                detail.receiving_agency.clone_from(&a.receiving_agency);
                effect
                    .steps
                    .push(on_referral(id, Kind::ReferralAccepted, at, &a.receiving_agency, detail));
                effect.writes.push(ReferralWrite::Accepted {
                    referral_id: id,
                    at: at.1,
                });
            }
            Event::ReferralDeclined(d) => {
                let id = referral_id(&d.referral_id)?;
                let at = ev.time(d.declined_at.as_ref())?;
                let mut detail = refd(id);
                detail.receiving_agency.clone_from(&d.receiving_agency);
                detail.decline_reason = d.reason;
                effect
                    .steps
                    .push(on_referral(id, Kind::ReferralDeclined, at, &d.receiving_agency, detail));
                effect.writes.push(ReferralWrite::Declined {
                    referral_id: id,
                    at: at.1,
                });
            }
            Event::ReferralRedirected(r) => {
                let id = referral_id(&r.referral_id)?;
                let at = ev.recorded()?;
                let mut detail = refd(id);
                detail.receiving_agency.clone_from(&r.receiving_agency);
                detail.previous_agency.clone_from(&r.previous_agency);
                detail.answer_due_at = r.answer_due_at;
                effect
                    .steps
                    .push(on_referral(id, Kind::ReferralRedirected, at, origin.agency, detail));
                effect.writes.push(ReferralWrite::Redirected {
                    referral_id: id,
                    receiving_agency: r.receiving_agency,
                    at: at.1,
                    answer_due_at: datetime(r.answer_due_at.as_ref()),
                    consent_id: ev.link("consent_id", &r.consent_id, ConsentId::from_uuid),
                });
            }
            Event::ReferralOverdue(o) => {
                let id = referral_id(&o.referral_id)?;
                let mut detail = refd(id);
                detail.receiving_agency.clone_from(&o.receiving_agency);
                detail.answer_due_at = o.answer_due_at;
                let at = ev.time(o.escalated_at.as_ref())?;
                effect
                    .steps
                    .push(on_referral(id, Kind::ReferralOverdue, at, origin.agency, detail));
            }
            Event::ServiceDelivered(s) => {
                let id = referral_id(&s.referral_id)?;
                let mut detail = refd(id);
                detail.delivered = s.kind;
                let at = ev.time(s.delivered_at.as_ref())?;
                effect
                    .steps
                    .push(on_referral(id, Kind::ServiceDelivered, at, origin.agency, detail));
            }
            Event::ReferralClosed(c) => {
                let id = referral_id(&c.referral_id)?;
                let mut detail = refd(id);
                detail.outcome = c.outcome;
                let at = ev.time(c.closed_at.as_ref())?;
                effect
                    .steps
                    .push(on_referral(id, Kind::ReferralClosed, at, origin.agency, detail));
                effect.writes.push(ReferralWrite::Closed {
                    referral_id: id,
                    outcome: c.outcome,
                    at: at.1,
                });
            }
            Event::ReferralCancelled(c) => {
                let id = referral_id(&c.referral_id)?;
                let mut detail = refd(id);
                detail.receiving_agency.clone_from(&c.receiving_agency);
                detail.cancel_reason.clone_from(&c.reason);
                let at = ev.recorded()?;
                effect
                    .steps
                    .push(on_referral(id, Kind::ReferralCancelled, at, origin.agency, detail));
                effect.writes.push(ReferralWrite::Cancelled { referral_id: id });
            }
            Event::BedHoldRecorded(b) => {
                let id = referral_id(&b.referral_id)?;
                let mut detail = refd(id);
                // Only to match the shelter's step of the same hold: a link.
                detail.hold_id = ev
                    .link("hold_id", &b.hold_id, HoldId::from_uuid)
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                let at = ev.recorded()?;
                effect
                    .steps
                    .push(on_referral(id, Kind::BedHeld, at, origin.agency, detail));
            }
            Event::NoBedRecorded(n) => {
                let id = referral_id(&n.referral_id)?;
                let mut detail = refd(id);
                detail.nearest_regions_with_beds = n.nearest_regions_with_beds;
                let at = ev.recorded()?;
                effect
                    .steps
                    .push(on_referral(id, Kind::NoBed, at, origin.agency, detail));
            }
            Event::PlanGoalAdded(g) => {
                let goal_id = ev.parse("goal_id", &g.goal_id, GoalId::from_uuid)?;
                let at = ev.recorded()?;
                effect.steps.push(plan_step(
                    ev.id,
                    goal_id,
                    Kind::PlanGoalAdded,
                    at,
                    origin,
                    cp::PlanDetail {
                        goal_id: g.goal_id.clone(),
                        kind: g.kind,
                        due_at: g.due_at,
                        status_code: String::new(),
                    },
                ));
                effect.writes.push(ReferralWrite::Goal(GoalRow {
                    goal_id,
                    person_id: ev.parse("person_id", &g.person_id, PersonId::from_uuid)?,
                    kind: g.kind,
                    added_at: at.1,
                    due_at: datetime(g.due_at.as_ref()),
                }));
            }
            Event::FollowUpRecorded(f) => {
                let goal_id = ev.parse("goal_id", &f.goal_id, GoalId::from_uuid)?;
                let at = ev.time(f.followed_up_at.as_ref())?;
                effect.steps.push(plan_step(
                    ev.id,
                    goal_id,
                    Kind::FollowUp,
                    at,
                    origin,
                    cp::PlanDetail {
                        goal_id: f.goal_id.clone(),
                        status_code: f.status_code,
                        ..Default::default()
                    },
                ));
            }
            Event::GoalMet(g) => {
                let goal_id = ev.parse("goal_id", &g.goal_id, GoalId::from_uuid)?;
                let at = ev.time(g.met_at.as_ref())?;
                effect.steps.push(plan_step(
                    ev.id,
                    goal_id,
                    Kind::GoalMet,
                    at,
                    origin,
                    cp::PlanDetail {
                        goal_id: g.goal_id.clone(),
                        ..Default::default()
                    },
                ));
                effect.writes.push(ReferralWrite::GoalMet { goal_id, met_at: at.1 });
            }
        }
    }
    effect.skipped = skipped.into_inner();
    Ok(effect)
}

fn plan_step(
    step_id: Uuid,
    goal_id: GoalId,
    kind: Kind,
    at: (Timestamp, DateTime<Utc>),
    origin: &Origin<'_>,
    detail: cp::PlanDetail,
) -> StepRow {
    step(
        step_id,
        goal_id.as_uuid(),
        Part::Plan,
        kind,
        at,
        origin.agency,
        origin.country,
        Detail::Plan(detail),
    )
}

// ---------------------------------------------------------------- shelter

/// `nrm.shelter.v1.ShelterEvent` as casepath reads it: the variants it
/// uses, the shelter's registration without its sealed address (field
/// 4 is skipped on the wire, never decoded), and the variants it has no
/// use for kept undecoded (so that only a variant this version does not
/// know decodes to none).
#[derive(Clone, PartialEq, prost::Message)]
struct ShelterEventView {
    #[prost(oneof = "ShelterVariant", tags = "1, 2, 3, 4, 5, 6, 7, 8, 9")]
    event: Option<ShelterVariant>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum ShelterVariant {
    #[prost(message, tag = "1")]
    ShelterRegistered(ShelterRegisteredCoded),
    #[prost(message, tag = "3")]
    BedHeld(sh::BedHeld),
    #[prost(message, tag = "4")]
    HoldReleased(sh::HoldReleased),
    #[prost(message, tag = "5")]
    HoldExpired(sh::HoldExpired),
    #[prost(message, tag = "6")]
    PersonAdmitted(sh::PersonAdmitted),
    #[prost(message, tag = "7")]
    PersonDischarged(sh::PersonDischarged),
    /// `capacity_changed`, undecoded.
    #[prost(bytes, tag = "2")]
    CapacityChanged(Vec<u8>),
    /// `no_bed_available`, undecoded.
    #[prost(bytes, tag = "8")]
    NoBedAvailable(Vec<u8>),
    /// `shelter_approved`, undecoded.
    #[prost(bytes, tag = "9")]
    ShelterApproved(Vec<u8>),
}

/// `nrm.shelter.v1.ShelterRegistered`, coded fields only.
#[derive(Clone, PartialEq, prost::Message)]
struct ShelterRegisteredCoded {
    #[prost(string, tag = "1")]
    shelter_id: String,
    #[prost(string, tag = "2")]
    code: String,
    #[prost(string, tag = "3")]
    region: String,
    #[prost(string, tag = "8")]
    operator_agency: String,
}

/// A row of `cp_shelters`: never the address.
#[derive(Debug, Clone, PartialEq)]
pub struct ShelterRow {
    /// The shelter.
    pub shelter_id: ShelterId,
    /// Its public code.
    pub code: String,
    /// Its region.
    pub region: String,
    /// The agency operating it.
    pub operator_agency: String,
}

/// A new row of `cp_holds` (status held).
#[derive(Debug, Clone, PartialEq)]
pub struct HoldRow {
    /// The hold.
    pub hold_id: HoldId,
    /// Where.
    pub shelter_id: ShelterId,
    /// The referral it is for; `None` for a bed held for an arrival.
    pub referral_id: Option<ReferralId>,
    /// For a bed held for an arrival: the commit that caused it (a return's).
    pub cause_commit_id: Option<CommitId>,
    /// The agency it is held for.
    pub holder_agency: String,
    /// `nrm.shelter.v1.BedCategory`.
    pub category: i32,
    /// When.
    pub held_at: DateTime<Utc>,
    /// When it lapses.
    pub expires_at: Option<DateTime<Utc>>,
}

/// Where a hold stands after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldStatus {
    /// Released by its holder or the operator.
    Released,
    /// Lapsed.
    Expired,
    /// The person came.
    Admitted,
    /// The person left.
    Discharged,
}

impl HoldStatus {
    /// As stored in `cp_holds.status`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Admitted => "admitted",
            Self::Discharged => "discharged",
        }
    }
}

/// A write of the shelter projection.
#[derive(Debug, Clone, PartialEq)]
pub enum ShelterWrite {
    /// A shelter registered.
    Shelter(ShelterRow),
    /// A bed held.
    Hold(HoldRow),
    /// A hold moved on.
    HoldStatus {
        /// The hold.
        hold_id: HoldId,
        /// Its new status.
        status: HoldStatus,
        /// When the event happened (admitted, discharged, or recorded).
        at: DateTime<Utc>,
    },
}

impl Touches for ShelterWrite {
    fn touch(&self, t: &mut Touched) {
        match self {
            Self::Shelter(s) => t.key(s.shelter_id.as_uuid()),
            Self::Hold(h) => {
                t.key(h.hold_id.as_uuid());
                t.key(h.shelter_id.as_uuid());
                t.maybe(h.referral_id.map(|i| i.as_uuid()));
                // Found through the commits of a return, which no read
                // lists before the bed is held: every watcher looks.
                if h.cause_commit_id.is_some() {
                    t.all();
                }
            }
            Self::HoldStatus { hold_id, .. } => t.key(hold_id.as_uuid()),
        }
    }
}

/// The shelter stream's commit `commit`; `cause` is the commit that caused
/// it (the delivery metadata's causation ID).
///
/// # Errors
/// When an event does not decode or lacks an ID or a time it needs.
pub fn shelter(
    commit: &EventCommit,
    cause: Option<CommitId>,
    origin: &Origin<'_>,
) -> Result<Effect<ShelterWrite>, StepError> {
    let mut effect = Effect::default();
    if commit.payload_type != SHELTER_PAYLOAD {
        return Ok(effect);
    }
    let skipped = RefCell::new(Vec::new());
    for ev in events(commit, &skipped)? {
        let Some(event) = ev.known(decode::<ShelterEventView>(&ev)?.event)? else {
            continue;
        };
        let hold = |text: &str| ev.parse("hold_id", text, HoldId::from_uuid);
        let detail = |hold_id: &str, shelter_id: &str| cp::ShelterDetail {
            hold_id: hold_id.to_owned(),
            shelter_id: shelter_id.to_owned(),
            ..Default::default()
        };
        let moved = |hold_id: HoldId, kind: Kind, status: HoldStatus, at: (Timestamp, DateTime<Utc>), d| {
            (
                step(
                    ev.id,
                    hold_id.as_uuid(),
                    Part::Shelter,
                    kind,
                    at,
                    origin.agency,
                    origin.country,
                    Detail::Shelter(d),
                ),
                ShelterWrite::HoldStatus {
                    hold_id,
                    status,
                    at: at.1,
                },
            )
        };
        let (step_row, write) = match event {
            ShelterVariant::CapacityChanged(_)
            | ShelterVariant::NoBedAvailable(_)
            | ShelterVariant::ShelterApproved(_) => {
                continue;
            }
            ShelterVariant::ShelterRegistered(s) => {
                effect.writes.push(ShelterWrite::Shelter(ShelterRow {
                    shelter_id: ev.parse("shelter_id", &s.shelter_id, ShelterId::from_uuid)?,
                    code: s.code,
                    region: s.region,
                    operator_agency: s.operator_agency,
                }));
                continue;
            }
            ShelterVariant::BedHeld(b) => {
                let hold_id = hold(&b.hold_id)?;
                let referral_id = ev.link("referral_id", &b.referral_id, ReferralId::from_uuid);
                let at = ev.recorded()?;
                let row = HoldRow {
                    hold_id,
                    shelter_id: ev.parse("shelter_id", &b.shelter_id, ShelterId::from_uuid)?,
                    referral_id,
                    // A bed for an arrival names no referral; one whose
                    // referral is malformed is linked to neither.
                    cause_commit_id: if b.referral_id.trim().is_empty() { cause } else { None },
                    holder_agency: b.holder_agency.clone(),
                    category: b.category,
                    held_at: at.1,
                    expires_at: datetime(b.expires_at.as_ref()),
                };
                let d = cp::ShelterDetail {
                    region: b.region,
                    category: b.category,
                    expires_at: b.expires_at,
                    holder_agency: b.holder_agency,
                    ..detail(&b.hold_id, &b.shelter_id)
                };
                (
                    step(
                        ev.id,
                        hold_id.as_uuid(),
                        Part::Shelter,
                        Kind::BedHeld,
                        at,
                        origin.agency,
                        origin.country,
                        Detail::Shelter(d),
                    ),
                    ShelterWrite::Hold(row),
                )
            }
            ShelterVariant::HoldReleased(h) => moved(
                hold(&h.hold_id)?,
                Kind::HoldReleased,
                HoldStatus::Released,
                ev.recorded()?,
                detail(&h.hold_id, &h.shelter_id),
            ),
            ShelterVariant::HoldExpired(h) => moved(
                hold(&h.hold_id)?,
                Kind::HoldExpired,
                HoldStatus::Expired,
                ev.recorded()?,
                detail(&h.hold_id, &h.shelter_id),
            ),
            ShelterVariant::PersonAdmitted(h) => moved(
                hold(&h.hold_id)?,
                Kind::Admitted,
                HoldStatus::Admitted,
                ev.time(h.admitted_at.as_ref())?,
                detail(&h.hold_id, &h.shelter_id),
            ),
            ShelterVariant::PersonDischarged(h) => moved(
                hold(&h.hold_id)?,
                Kind::Discharged,
                HoldStatus::Discharged,
                ev.time(h.discharged_at.as_ref())?,
                detail(&h.hold_id, &h.shelter_id),
            ),
        };
        effect.steps.push(step_row);
        effect.writes.push(write);
    }
    effect.skipped = skipped.into_inner();
    Ok(effect)
}

// ---------------------------------------------------------------- repatriation

/// A row of `cp_returns`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReturnRow {
    /// The return (its ID in both countries).
    pub return_id: ReturnId,
    /// `nrm.repatriation.v1.Direction`.
    pub direction: i32,
    /// ISO codes, lower case.
    pub from_country: String,
    /// ISO code, lower case.
    pub to_country: String,
    /// The agency that opened it (destination country).
    pub opened_by: String,
    /// The home country's consulate (from the opening, or from the snapshot for an incoming return).
    pub consulate_agency: String,
    /// The agency that received the person at home.
    pub received_by: String,
    /// The destination country's reference of the identification.
    pub foreign_reference: String,
    /// `nrm.repatriation.v1.ReturnStatus`.
    pub status: i32,
    /// When it was opened.
    pub opened_at: DateTime<Utc>,
    /// When the person was handed over.
    pub handed_over_at: Option<DateTime<Utc>>,
}

/// A write of the repatriation projection.
#[derive(Debug, Clone, PartialEq)]
pub enum ReturnWrite {
    /// A commit of the return's stream (links what it caused elsewhere).
    Commit {
        /// The commit.
        commit_id: CommitId,
        /// Its return.
        return_id: ReturnId,
    },
    /// Opened here (outgoing).
    Opened(ReturnRow),
    /// Announced at home, or a later step as announced (incoming): the
    /// return as the newest snapshot has it.
    Announced(ReturnRow),
    /// An outgoing return moved on.
    Status {
        /// The return.
        return_id: ReturnId,
        /// `nrm.repatriation.v1.ReturnStatus` after it.
        status: i32,
        /// Handed over: to whom and when.
        handover: Option<(String, DateTime<Utc>)>,
    },
}

impl Touches for ReturnWrite {
    fn touch(&self, t: &mut Touched) {
        match self {
            Self::Commit { commit_id, return_id } => {
                t.key(commit_id.as_uuid());
                t.key(return_id.as_uuid());
            }
            Self::Opened(row) | Self::Announced(row) => {
                t.key(row.return_id.as_uuid());
                t.text(&row.foreign_reference);
            }
            Self::Status { return_id, .. } => t.key(return_id.as_uuid()),
        }
    }
}

/// A return's foreign reference as stored: a UUID in any form the `uuid`
/// crate reads (upper case, braces, no hyphens, `urn:uuid:`, surrounding
/// blanks) in its canonical lower-case hyphenated form, so that it matches
/// `cp_cases.case_id::text`; anything else as typed.
#[must_use]
pub fn normalise_reference(text: &str) -> String {
    text.trim()
        .parse::<Uuid>()
        .map_or_else(|_| text.to_owned(), |u| u.to_string())
}

/// The step kind of a return step by its event's name (as steps cross).
#[must_use]
pub fn return_step_kind(name: &str) -> Option<Kind> {
    let kind = match name {
        "ReturnOpened" => Kind::ReturnOpened,
        "ReturnConsentRecorded" => Kind::ReturnConsent,
        "RiskAssessed" => Kind::RiskAssessed,
        "TravelDocumentRequested" => Kind::DocumentRequested,
        "TravelDocumentIssued" => Kind::DocumentIssued,
        "ItineraryBooked" => Kind::ItineraryBooked,
        "EscortAssigned" => Kind::EscortAssigned,
        "ReturnDeparted" => Kind::Departed,
        "ReturnArrived" => Kind::Arrived,
        "ReturnHandedOver" => Kind::HandedOver,
        "ReturnHalted" => Kind::ReturnHalted,
        _ => return None,
    };
    Some(kind)
}

/// The repatriation stream's commit `commit`. Every commit of a return's
/// stream is kept (its ID links what it caused); crossing commits
/// (`xborder-*`, another payload type) map to nothing.
///
/// # Errors
/// When an event does not decode or lacks an ID or a time it needs.
#[allow(clippy::too_many_lines)]
pub fn repatriation(commit: &EventCommit, origin: &Origin<'_>) -> Result<Effect<ReturnWrite>, StepError> {
    use rp::repatriation_event::Event;
    let mut effect = Effect::default();
    if commit.payload_type != REPATRIATION_PAYLOAD {
        return Ok(effect);
    }
    // Only a return's own stream holds its events.
    let Some(stream_return) = commit.stream_id.strip_prefix("return-") else {
        return Ok(effect);
    };
    let return_id = stream_return
        .parse::<Uuid>()
        .map(ReturnId::from_uuid)
        .map_err(|_| StepError::UnknownStream(commit.stream_id.clone()))?;
    let commit_id = commit
        .commit_id
        .parse::<Uuid>()
        .map(CommitId::from_uuid)
        .map_err(|_| StepError::MalformedId {
            event: "(the commit)".to_owned(),
            field: "commit_id",
        })?;
    effect.writes.push(ReturnWrite::Commit { commit_id, return_id });
    let outgoing = rp::Direction::Outgoing as i32;
    let skipped = RefCell::new(Vec::new());
    for ev in events(commit, &skipped)? {
        let Some(event) = ev.known(decode::<rp::RepatriationEvent>(&ev)?.event)? else {
            continue;
        };
        let rd = |status: rp::ReturnStatus| rp_detail(return_id, outgoing, status as i32);
        let here = |kind: Kind, at, agency: &str, detail: cp::ReturnDetail| {
            step(
                ev.id,
                return_id.as_uuid(),
                Part::Return,
                kind,
                at,
                agency,
                origin.country,
                Detail::Return(detail),
            )
        };
        let status_step = |kind: Kind, status: rp::ReturnStatus, at| {
            (
                here(kind, at, origin.agency, rd(status)),
                ReturnWrite::Status {
                    return_id,
                    status: status as i32,
                    handover: None,
                },
            )
        };
        let (step_row, write) = match event {
            Event::ReturnOpened(o) => {
                let at = ev.recorded()?;
                let to_country = o.citizenship.to_lowercase();
                let mut detail = rd(rp::ReturnStatus::Opened);
                detail.from_country = origin.country.to_owned();
                detail.to_country.clone_from(&to_country);
                (
                    here(Kind::ReturnOpened, at, &o.opened_by, detail),
                    ReturnWrite::Opened(ReturnRow {
                        return_id,
                        direction: outgoing,
                        from_country: origin.country.to_owned(),
                        to_country,
                        opened_by: o.opened_by,
                        consulate_agency: o.consulate_agency,
                        received_by: String::new(),
                        foreign_reference: normalise_reference(&o.foreign_reference),
                        status: rp::ReturnStatus::Opened as i32,
                        opened_at: at.1,
                        handed_over_at: None,
                    }),
                )
            }
            Event::ConsentRecorded(_) => status_step(Kind::ReturnConsent, rp::ReturnStatus::Consented, ev.recorded()?),
            Event::RiskAssessed(_) => status_step(Kind::RiskAssessed, rp::ReturnStatus::Assessed, ev.recorded()?),
            Event::TravelDocumentRequested(_) => status_step(
                Kind::DocumentRequested,
                rp::ReturnStatus::DocumentRequested,
                ev.recorded()?,
            ),
            // Never the document's (sealed) number: the step alone.
            Event::TravelDocumentIssued(_) => {
                status_step(Kind::DocumentIssued, rp::ReturnStatus::DocumentIssued, ev.recorded()?)
            }
            Event::ItineraryBooked(i) => {
                let (mut s, w) = status_step(Kind::ItineraryBooked, rp::ReturnStatus::ItineraryBooked, ev.recorded()?);
                if let Some(Detail::Return(d)) = s.step.detail.as_mut() {
                    d.arrival_point = i.arrival_point;
                }
                (s, w)
            }
            Event::EscortAssigned(_) => {
                status_step(Kind::EscortAssigned, rp::ReturnStatus::EscortAssigned, ev.recorded()?)
            }
            Event::Departed(d) => status_step(
                Kind::Departed,
                rp::ReturnStatus::Departed,
                ev.time(d.departed_at.as_ref())?,
            ),
            Event::Arrived(a) => status_step(
                Kind::Arrived,
                rp::ReturnStatus::Arrived,
                ev.time(a.arrived_at.as_ref())?,
            ),
            Event::HandedOver(h) => {
                let at = ev.time(h.handed_over_at.as_ref())?;
                let mut detail = rd(rp::ReturnStatus::HandedOver);
                detail.received_by.clone_from(&h.received_by);
                (
                    here(Kind::HandedOver, at, origin.agency, detail),
                    ReturnWrite::Status {
                        return_id,
                        status: rp::ReturnStatus::HandedOver as i32,
                        handover: Some((h.received_by, at.1)),
                    },
                )
            }
            Event::Halted(h) => {
                let at = ev.recorded()?;
                let mut detail = rd(rp::ReturnStatus::Halted);
                detail.halt_reason = h.reason;
                (
                    here(Kind::ReturnHalted, at, origin.agency, detail),
                    ReturnWrite::Status {
                        return_id,
                        status: rp::ReturnStatus::Halted as i32,
                        handover: None,
                    },
                )
            }
            Event::Announced(a) => {
                let snapshot = a.snapshot.unwrap_or_default();
                let at = ev.recorded()?;
                announced(&mut effect, return_id, &snapshot, &ev)?;
                let mut detail = rp_detail(return_id, rp::Direction::Incoming as i32, snapshot.status);
                detail.from_country.clone_from(&snapshot.from_country);
                detail.to_country.clone_from(&snapshot.to_country);
                (
                    here(Kind::ReturnAnnounced, at, origin.agency, detail),
                    ReturnWrite::Announced(incoming_row(return_id, &snapshot, at.1)),
                )
            }
            Event::AnnouncedStep(a) => {
                let snapshot = a.snapshot.unwrap_or_default();
                announced(&mut effect, return_id, &snapshot, &ev)?;
                effect.writes.push(ReturnWrite::Announced(incoming_row(
                    return_id,
                    &snapshot,
                    ev.recorded()?.1,
                )));
                continue;
            }
        };
        effect.steps.push(step_row);
        effect.writes.push(write);
    }
    effect.skipped = skipped.into_inner();
    Ok(effect)
}

fn rp_detail(return_id: ReturnId, direction: i32, status_after: i32) -> cp::ReturnDetail {
    cp::ReturnDetail {
        return_id: return_id.to_string(),
        direction,
        status_after,
        ..Default::default()
    }
}

/// One step per entry of the snapshot's history, each ID'd by its origin
/// version so that a later snapshot repeating it adds nothing.
fn announced(
    effect: &mut Effect<ReturnWrite>,
    return_id: ReturnId,
    snapshot: &rp::CrossBorderReturn,
    ev: &Ev<'_>,
) -> Result<(), StepError> {
    for crossed in &snapshot.steps {
        let Some(kind) = return_step_kind(&crossed.step) else {
            continue;
        };
        // A handover at the time it was stated to happen, as the
        // destination's own path shows it (and as the case it opens here is
        // dated), not when it was recorded.
        let stated = match kind {
            Kind::HandedOver => snapshot.handed_over_at.as_ref(),
            _ => None,
        };
        let at = ev.time(stated.or(crossed.at.as_ref()))?;
        let mut detail = rp_detail(return_id, rp::Direction::Incoming as i32, crossed.status_after);
        detail.from_country.clone_from(&snapshot.from_country);
        detail.to_country.clone_from(&snapshot.to_country);
        match kind {
            Kind::ReturnHalted => detail.halt_reason = snapshot.halt_reason,
            Kind::ItineraryBooked => detail.arrival_point.clone_from(&snapshot.arrival_point),
            Kind::HandedOver => detail.received_by.clone_from(&snapshot.received_by),
            _ => {}
        }
        effect.steps.push(step(
            crossed_step_id(return_id, crossed.origin_version),
            return_id.as_uuid(),
            Part::Return,
            kind,
            at,
            &crossed.agency,
            &snapshot.from_country,
            Detail::Return(detail),
        ));
    }
    Ok(())
}

/// An incoming return as the snapshot has it.
fn incoming_row(return_id: ReturnId, snapshot: &rp::CrossBorderReturn, recorded: DateTime<Utc>) -> ReturnRow {
    let opened = snapshot.steps.iter().find(|s| s.step == "ReturnOpened");
    ReturnRow {
        return_id,
        direction: rp::Direction::Incoming as i32,
        from_country: snapshot.from_country.clone(),
        to_country: snapshot.to_country.clone(),
        opened_by: opened.map(|s| s.agency.clone()).unwrap_or_default(),
        consulate_agency: snapshot.consulate_agency.clone(),
        received_by: snapshot.received_by.clone(),
        foreign_reference: normalise_reference(&snapshot.foreign_reference),
        status: snapshot.status,
        opened_at: opened.and_then(|s| datetime(s.at.as_ref())).unwrap_or(recorded),
        handed_over_at: datetime(snapshot.handed_over_at.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    const KG: Origin<'static> = Origin {
        country: "kg",
        agency: "kg-mvd",
    };

    fn ts(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    fn touched<W: Touches>(writes: Vec<W>, steps: Vec<StepRow>) -> Touched {
        Effect {
            writes,
            steps,
            skipped: Vec::new(),
        }
        .touched()
    }

    fn keys(ids: &[Uuid]) -> Touched {
        Touched::Keys(ids.iter().copied().collect())
    }

    #[test]
    fn a_commit_touches_its_rows_keys_the_links_a_path_follows_and_its_steps_subjects() {
        let (person, referral, consent, hold, shelter) = (
            PersonId::new(),
            ReferralId::new(),
            ConsentId::new(),
            HoldId::new(),
            ShelterId::new(),
        );
        let at = Utc::now();
        // A new referral names its person (the path finds it by the person).
        let sent = ReferralWrite::Referral(ReferralRow {
            referral_id: referral,
            person_id: person,
            case_id: None,
            referring_agency: "kg-mvd".into(),
            receiving_agency: "kg-msd".into(),
            consent_id: Some(consent),
            services: vec![],
            urgency: 0,
            created_at: at,
            answer_due_at: None,
        });
        assert_eq!(
            touched(vec![sent], vec![]),
            keys(&[referral.as_uuid(), person.as_uuid(), consent.as_uuid()])
        );
        // An answer touches the referral; its step, its subject.
        let step = StepRow {
            step_id: Uuid::now_v7(),
            subject_id: referral.as_uuid(),
            at,
            step: cp::Step::default(),
        };
        assert_eq!(
            touched(
                vec![ReferralWrite::Accepted {
                    referral_id: referral,
                    at
                }],
                vec![step]
            ),
            keys(&[referral.as_uuid()])
        );
        // A bed held for a referral: the hold, its shelter, the referral.
        let held = |cause: Option<CommitId>| {
            ShelterWrite::Hold(HoldRow {
                hold_id: hold,
                shelter_id: shelter,
                referral_id: cause.is_none().then_some(referral),
                cause_commit_id: cause,
                holder_agency: "kg-msd".into(),
                category: 0,
                held_at: at,
                expires_at: None,
            })
        };
        assert_eq!(
            touched(vec![held(None)], vec![]),
            keys(&[hold.as_uuid(), shelter.as_uuid(), referral.as_uuid()])
        );
        // … for an arrival, found through a return's commits: everyone looks.
        assert_eq!(touched(vec![held(Some(CommitId::new()))], vec![]), Touched::All);
        // An anonymous notification is on no path.
        let notification = IdentificationWrite::Notification(NotificationRow {
            notification_id: Uuid::now_v7(),
            filed_on: at,
            found_country: "kg".into(),
            country_of_exploitation: "ru".into(),
            exploitation_forms: vec![],
            gender: 0,
            age_band: 0,
            citizenship: "kg".into(),
        });
        assert_eq!(touched(vec![notification], vec![]), Touched::default());
        // A return touches itself and the case it refers to.
        let case = CaseId::new();
        let ret = ReturnId::new();
        let announced = ReturnWrite::Announced(ReturnRow {
            return_id: ret,
            direction: 0,
            from_country: "ru".into(),
            to_country: "kg".into(),
            opened_by: "ru-iom".into(),
            consulate_agency: "kg-consulate-moscow".into(),
            received_by: String::new(),
            foreign_reference: case.as_uuid().to_string(),
            status: 0,
            opened_at: at,
            handed_over_at: None,
        });
        assert_eq!(touched(vec![announced], vec![]), keys(&[ret.as_uuid(), case.as_uuid()]));
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    fn uuid() -> String {
        Uuid::now_v7().to_string()
    }

    /// A commit of one event per payload, recorded at 9000, 9001, …
    fn commit(payload_type: &str, stream_id: &str, payloads: Vec<Vec<u8>>) -> EventCommit {
        EventCommit {
            commit_id: uuid(),
            stream_id: stream_id.to_owned(),
            payload_type: payload_type.to_owned(),
            events: payloads
                .into_iter()
                .enumerate()
                .map(|(i, payload)| CommittedEvent {
                    event_id: uuid(),
                    version: i as u64 + 1,
                    event_type: String::new(),
                    schema_version: 1,
                    recorded_at: Some(ts(9000 + i as i64)),
                    payload,
                })
                .collect(),
        }
    }

    fn ident(events: Vec<id::identification_event::Event>) -> EventCommit {
        let payloads = events
            .into_iter()
            .map(|e| id::IdentificationEvent { event: Some(e) }.encode_to_vec())
            .collect();
        commit(IDENTIFICATION_PAYLOAD, &format!("case-{}", uuid()), payloads)
    }

    fn refer(events: Vec<rf::referral_event::Event>) -> EventCommit {
        let payloads = events
            .into_iter()
            .map(|e| rf::ReferralEvent { event: Some(e) }.encode_to_vec())
            .collect();
        commit(REFERRAL_PAYLOAD, &format!("referral-{}", uuid()), payloads)
    }

    fn shelter_commit(events: Vec<sh::shelter_event::Event>) -> EventCommit {
        let payloads = events
            .into_iter()
            .map(|e| sh::ShelterEvent { event: Some(e) }.encode_to_vec())
            .collect();
        commit(SHELTER_PAYLOAD, &format!("shelter-{}", uuid()), payloads)
    }

    fn ret(return_id: &str, events: Vec<rp::repatriation_event::Event>) -> EventCommit {
        let payloads = events
            .into_iter()
            .map(|e| rp::RepatriationEvent { event: Some(e) }.encode_to_vec())
            .collect();
        commit(REPATRIATION_PAYLOAD, &format!("return-{return_id}"), payloads)
    }

    fn kinds(steps: &[StepRow]) -> Vec<Kind> {
        steps.iter().map(|s| Kind::try_from(s.kind()).unwrap()).collect()
    }

    fn report(case_id: &str, person_id: &str) -> id::PresumedVictimReported {
        id::PresumedVictimReported {
            case_id: case_id.to_owned(),
            person_id: person_id.to_owned(),
            reporting_agency: "kg-mvd".into(),
            competent_authority: "kg-prosecutor".into(),
            reported_at: Some(ts(200)),
            found_at: Some(ts(100)),
            found_country: "kg".into(),
            citizenship: "kg".into(),
            country_of_exploitation: "ru".into(),
            exploitation_forms: vec![id::ExploitationForm::Labour as i32],
            status: id::CaseStatus::Reported as i32,
            personal: Some(nrm_proto::common::v1::SealedData {
                ciphertext: b"sealed-canary".to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn uuid_v5_matches_the_rfc_vector() {
        // Python: uuid.uuid5(uuid.NAMESPACE_DNS, "python.org")
        let id = uuid_v5(Uuid::NAMESPACE_DNS, b"python.org");
        assert_eq!(id.to_string(), "886313e1-3b8a-5372-9b90-0c9aee199e5d");
        assert_eq!(id.get_version_num(), 5);
        // More than one SHA-1 block.
        let long = uuid_v5(Uuid::NAMESPACE_URL, &[b'x'; 200]);
        assert_ne!(long, uuid_v5(Uuid::NAMESPACE_URL, &[b'x'; 201]));
    }

    #[test]
    fn a_report_gives_found_then_reported_and_opens_the_case() {
        use id::identification_event::Event;
        let (case_id, person_id) = (uuid(), uuid());
        let c = ident(vec![Event::PresumedVictimReported(report(&case_id, &person_id))]);
        let effect = identification(&c, &KG).unwrap();
        assert_eq!(kinds(&effect.steps), [Kind::Found, Kind::Reported]);
        let event_id: Uuid = c.events[0].event_id.parse().unwrap();
        assert_eq!(effect.steps[1].step_id, event_id);
        assert_eq!(effect.steps[0].step_id, found_step_id(event_id));
        assert_ne!(effect.steps[0].step_id, effect.steps[1].step_id);
        assert_eq!(effect.steps[0].at, at(100));
        assert_eq!(effect.steps[1].at, at(200));
        for s in &effect.steps {
            assert_eq!(s.subject_id.to_string(), case_id);
            assert_eq!(s.step.subject_id, case_id);
            assert_eq!(s.step.country, "kg");
            assert_eq!(s.step.agency, "kg-mvd");
            assert!(s.step.spent.is_none());
            assert_eq!(s.part(), Part::Identification as i32);
            let Some(Detail::Identification(d)) = &s.step.detail else {
                panic!("identification detail")
            };
            assert_eq!(d.competent_authority, "kg-prosecutor");
            assert!(!d.possible_duplicate);
        }
        let [IdentificationWrite::Open(row, _)] = effect.writes.as_slice() else {
            panic!("one case opened")
        };
        assert_eq!(row.person_id.to_string(), person_id);
        assert_eq!(row.decision_waiting_since, Some(at(200)));
        assert_eq!(row.found_at, Some(at(100)));
        assert!(!row.possible_duplicate);
        // Nothing sealed reaches a row or a step.
        assert!(!format!("{effect:?}").contains("canary"));
        // Mapping again gives the same.
        assert_eq!(identification(&c, &KG).unwrap(), effect);
    }

    #[test]
    fn an_opening_absorbs_the_changes_to_its_case_and_keeps_which_columns_they_set() {
        use id::identification_event::Event;
        let (case_id, person_id) = (uuid(), uuid());
        let effect = identification(
            &ident(vec![Event::PresumedVictimReported(report(&case_id, &person_id))]),
            &KG,
        )
        .unwrap();
        let [opened @ IdentificationWrite::Open(row, changed)] = effect.writes.as_slice() else {
            panic!("one case opened")
        };
        assert!(changed.is_empty(), "as mapped, an opening sets nothing else");
        let case = row.case_id;
        let presumed = id::CaseStatus::Presumed as i32;

        let screened = opened.then(&IdentificationWrite::Screened { case_id: case }).unwrap();
        let IdentificationWrite::Open(r, c) = &screened else {
            panic!("still an opening")
        };
        assert_eq!((r.status, r.decision, r.decided_at), (presumed, 0, None));
        assert_eq!(
            r.decision_waiting_since, row.decision_waiting_since,
            "screening leaves the deadline"
        );
        assert_eq!(*c, Changed::STATUS);

        let decided = screened
            .then(&IdentificationWrite::Decided {
                case_id: case,
                status: id::CaseStatus::NotIdentified as i32,
                decision: id::Decision::NotIdentified as i32,
                decided_at: at(400),
            })
            .unwrap();
        let reviewed = decided
            .then(&IdentificationWrite::ReviewRequested {
                case_id: case,
                requested_at: at(500),
            })
            .unwrap();
        let IdentificationWrite::Open(r, c) = &reviewed else {
            panic!("still an opening")
        };
        assert_eq!(r.status, presumed);
        assert_eq!(
            r.decision,
            id::Decision::NotIdentified as i32,
            "a review keeps the decision"
        );
        assert_eq!(r.decided_at, Some(at(400)));
        assert_eq!(r.decision_waiting_since, Some(at(500)));
        assert!(!r.possible_duplicate);
        assert_eq!(*c, Changed::STATUS | Changed::DECISION | Changed::WAITING);

        let flagged = reviewed
            .then(&IdentificationWrite::FlagDuplicate { case_id: case })
            .unwrap();
        let IdentificationWrite::Open(r, c) = &flagged else {
            panic!("still an opening")
        };
        assert!(r.possible_duplicate);
        assert!(c.contains(Changed::DUPLICATE) && c.contains(Changed::WAITING));
        // What the row was opened with stays.
        assert_eq!(
            (&r.person_id, r.reported_at, &r.reporting_agency),
            (&row.person_id, row.reported_at, &row.reporting_agency)
        );

        // Nothing else is absorbed: another case, an erasure, a change that
        // is not an opening's.
        let other = CaseId::parse("c", &uuid()).unwrap();
        assert_eq!(opened.then(&IdentificationWrite::Screened { case_id: other }), None);
        let erased = IdentificationWrite::Erased {
            person_id: row.person_id,
            erased_at: at(600),
        };
        assert_eq!(opened.then(&erased), None);
        assert_eq!(opened.then(opened), None, "a second opening is its own write");
        let screening = IdentificationWrite::Screened { case_id: case };
        assert_eq!(
            screening.then(&IdentificationWrite::FlagDuplicate { case_id: case }),
            None
        );
    }

    #[test]
    fn a_report_with_matches_is_a_possible_duplicate() {
        use id::identification_event::Event;
        let mut r = report(&uuid(), &uuid());
        r.matching_case_ids = vec![uuid()];
        let effect = identification(&ident(vec![Event::PresumedVictimReported(r)]), &KG).unwrap();
        let IdentificationWrite::Open(row, _) = &effect.writes[0] else {
            panic!("opened")
        };
        assert!(row.possible_duplicate);
        let case_id = uuid();
        let flagged = identification(
            &ident(vec![Event::PossibleDuplicateFlagged(id::PossibleDuplicateFlagged {
                case_id: case_id.clone(),
                matching_case_ids: vec![uuid()],
            })]),
            &KG,
        )
        .unwrap();
        assert!(flagged.steps.is_empty());
        assert_eq!(
            flagged.writes,
            [IdentificationWrite::FlagDuplicate {
                case_id: CaseId::parse("c", &case_id).unwrap()
            }]
        );
    }

    #[test]
    fn every_identification_event_maps_to_its_step() {
        use id::identification_event::Event;
        let (case_id, person_id) = (uuid(), uuid());
        let c = ident(vec![
            Event::ScreeningCompleted(id::ScreeningCompleted {
                case_id: case_id.clone(),
                indicators: vec![1, 2],
                screened_at: Some(ts(300)),
            }),
            Event::IdentificationDecided(id::IdentificationDecided {
                case_id: case_id.clone(),
                decision: id::Decision::NotIdentified as i32,
                decided_at: None,
                ..Default::default()
            }),
            Event::ReviewRequested(id::ReviewRequested {
                case_id: case_id.clone(),
                reason: 1,
                requested_at: Some(ts(500)),
            }),
            Event::IdentificationDecided(id::IdentificationDecided {
                case_id: case_id.clone(),
                decision: id::Decision::Identified as i32,
                non_punishment: true,
                decided_at: Some(ts(600)),
                reflection_period_ends_at: Some(ts(9999)),
                ..Default::default()
            }),
            Event::PersonalDataErased(id::PersonalDataErased {
                case_id: case_id.clone(),
                person_id: person_id.clone(),
                erased_at: Some(ts(700)),
                reason: 1,
            }),
        ]);
        let effect = identification(&c, &KG).unwrap();
        assert_eq!(
            kinds(&effect.steps),
            [
                Kind::Screened,
                Kind::NotIdentified,
                Kind::ReviewRequested,
                Kind::Identified,
                Kind::PersonalDataErased
            ]
        );
        // The decision without a time of its own: the time it was recorded.
        let times: Vec<_> = effect.steps.iter().map(|s| s.at).collect();
        assert_eq!(times, [at(300), at(9001), at(500), at(600), at(700)]);
        let case = CaseId::parse("c", &case_id).unwrap();
        assert_eq!(
            effect.writes,
            [
                IdentificationWrite::Screened { case_id: case },
                IdentificationWrite::Decided {
                    case_id: case,
                    status: id::CaseStatus::NotIdentified as i32,
                    decision: id::Decision::NotIdentified as i32,
                    decided_at: at(9001),
                },
                IdentificationWrite::ReviewRequested {
                    case_id: case,
                    requested_at: at(500)
                },
                IdentificationWrite::Decided {
                    case_id: case,
                    status: id::CaseStatus::Identified as i32,
                    decision: id::Decision::Identified as i32,
                    decided_at: at(600),
                },
                IdentificationWrite::Erased {
                    person_id: PersonId::parse("p", &person_id).unwrap(),
                    erased_at: at(700)
                },
            ]
        );
        let Some(Detail::Identification(d)) = &effect.steps[3].step.detail else {
            panic!("detail")
        };
        assert!(d.non_punishment);
        assert_eq!(d.reflection_period_ends_at, Some(ts(9999)));
        let Some(Detail::Identification(d)) = &effect.steps[0].step.detail else {
            panic!("detail")
        };
        assert_eq!(d.indicators, [1, 2]);
        // Steps of later events name the acting agency.
        assert_eq!(effect.steps[0].step.agency, "kg-mvd");
    }

    #[test]
    fn a_case_opened_from_abroad_is_identified_with_no_decision_due() {
        use id::identification_event::Event;
        let (case_id, return_id) = (uuid(), uuid());
        let mut r = report(&case_id, &uuid());
        r.reporting_agency = "kg-iom".into();
        r.status = id::CaseStatus::Identified as i32;
        let c = ident(vec![Event::CaseOpenedFromAbroad(id::CaseOpenedFromAbroad {
            report: Some(r),
            identified_abroad: Some(id::IdentifiedAbroad {
                from_country: "ru".into(),
                return_id: return_id.clone(),
                handed_over_at: Some(ts(800)),
                ..Default::default()
            }),
        })]);
        let effect = identification(&c, &KG).unwrap();
        assert_eq!(kinds(&effect.steps), [Kind::CaseOpenedFromAbroad]);
        assert_eq!(effect.steps[0].at, at(800));
        assert_eq!(effect.steps[0].step.agency, "kg-iom");
        let IdentificationWrite::Open(row, _) = &effect.writes[0] else {
            panic!("opened")
        };
        assert_eq!(row.status, id::CaseStatus::Identified as i32);
        assert_eq!(row.decided_at, Some(at(800)));
        assert_eq!(row.decision_waiting_since, None);
        assert_eq!(row.from_country.as_deref(), Some("ru"));
        assert_eq!(row.return_id.map(|r| r.to_string()), Some(return_id));
    }

    #[test]
    fn an_anonymous_notification_is_counted_without_a_step() {
        use id::identification_event::Event;
        let notification_id = uuid();
        let mut c = ident(vec![Event::AnonymousNotificationFiled(
            id::AnonymousNotificationFiled {
                notification_id: notification_id.clone(),
                filed_on: Some(ts(86_400)),
                citizenship: "uz".into(),
                ..Default::default()
            },
        )]);
        c.stream_id = format!("notification-{notification_id}");
        let effect = identification(&c, &KG).unwrap();
        assert!(effect.steps.is_empty());
        let [IdentificationWrite::Notification(n)] = effect.writes.as_slice() else {
            panic!("one notification")
        };
        assert_eq!(n.filed_on, at(86_400));
        assert_eq!(n.citizenship, "uz");
    }

    #[test]
    fn a_commit_of_another_payload_type_maps_to_nothing() {
        let mut c = ident(vec![]);
        c.payload_type = "nrm.repatriation.v1.CrossBorderMessage".into();
        c.events = vec![CommittedEvent {
            event_id: uuid(),
            payload: vec![0xff, 0xff, 0xff],
            ..Default::default()
        }];
        assert!(identification(&c, &KG).unwrap().is_empty());
        assert!(referral(&c, &KG).unwrap().is_empty());
        assert!(shelter(&c, None, &KG).unwrap().is_empty());
        assert!(repatriation(&c, &KG).unwrap().is_empty());
    }

    #[test]
    fn an_undecodable_event_is_an_error_naming_only_its_id() {
        let mut c = ident(vec![]);
        c.events = vec![CommittedEvent {
            event_id: uuid(),
            payload: vec![0xff, 0xff, 0xff],
            ..Default::default()
        }];
        let err = identification(&c, &KG).unwrap_err();
        assert_eq!(err, StepError::Undecodable(c.events[0].event_id.clone()));
    }

    #[test]
    #[allow(clippy::too_many_lines)]
    fn every_referral_event_maps_to_its_step_and_rows() {
        use rf::referral_event::Event;
        let (person_id, consent_id, referral_id, goal_id) = (uuid(), uuid(), uuid(), uuid());
        let c = refer(vec![
            Event::ConsentRecorded(rf::ConsentRecorded {
                consent_id: consent_id.clone(),
                person_id: person_id.clone(),
                recipient_agency: "kg-iom".into(),
                recorded_by_agency: "kg-mvd".into(),
                purposes: vec![1],
                recorded_at: Some(ts(100)),
                expires_at: Some(ts(10_000)),
                ..Default::default()
            }),
            Event::ReferralCreated(rf::ReferralCreated {
                referral_id: referral_id.clone(),
                person_id: person_id.clone(),
                referring_agency: "kg-mvd".into(),
                receiving_agency: "kg-iom".into(),
                consent_id: consent_id.clone(),
                services: vec![1, 2],
                urgency: 1,
                created_at: Some(ts(200)),
                answer_due_at: Some(ts(5000)),
                ..Default::default()
            }),
            Event::ReferralRedirected(rf::ReferralRedirected {
                referral_id: referral_id.clone(),
                previous_agency: "kg-iom".into(),
                receiving_agency: "kg-msd".into(),
                consent_id: String::new(),
                answer_due_at: Some(ts(6000)),
            }),
            Event::ReferralOverdue(rf::ReferralOverdue {
                referral_id: referral_id.clone(),
                escalated_at: Some(ts(6001)),
                ..Default::default()
            }),
            Event::ReferralDeclined(rf::ReferralDeclined {
                referral_id: referral_id.clone(),
                receiving_agency: "kg-msd".into(),
                reason: 1,
                declined_at: Some(ts(6100)),
            }),
            Event::ReferralAccepted(rf::ReferralAccepted {
                referral_id: referral_id.clone(),
                receiving_agency: "kg-msd".into(),
                accepted_at: Some(ts(6200)),
                ..Default::default()
            }),
            Event::BedHoldRecorded(rf::BedHoldRecorded {
                referral_id: referral_id.clone(),
                ..Default::default()
            }),
            Event::NoBedRecorded(rf::NoBedRecorded {
                referral_id: referral_id.clone(),
                nearest_regions_with_beds: vec!["kg-c".into()],
            }),
            Event::ServiceDelivered(rf::ServiceDelivered {
                referral_id: referral_id.clone(),
                kind: 2,
                delivered_at: Some(ts(6300)),
                ..Default::default()
            }),
            Event::ReferralClosed(rf::ReferralClosed {
                referral_id: referral_id.clone(),
                outcome: 1,
                closed_at: Some(ts(6400)),
            }),
            Event::ReferralCancelled(rf::ReferralCancelled {
                referral_id: referral_id.clone(),
                reason: "CONSENT_WITHDRAWN".into(),
                ..Default::default()
            }),
            Event::ConsentWithdrawn(rf::ConsentWithdrawn {
                consent_id: consent_id.clone(),
                person_id: person_id.clone(),
                withdrawn_at: Some(ts(6500)),
                reason: rf::ConsentEndReason::Withdrawn as i32,
                ..Default::default()
            }),
            Event::PlanGoalAdded(rf::PlanGoalAdded {
                person_id: person_id.clone(),
                goal_id: goal_id.clone(),
                kind: 1,
                due_at: Some(ts(20_000)),
            }),
            Event::FollowUpRecorded(rf::FollowUpRecorded {
                person_id: person_id.clone(),
                goal_id: goal_id.clone(),
                followed_up_at: Some(ts(7000)),
                status_code: "ON_TRACK".into(),
            }),
            Event::GoalMet(rf::GoalMet {
                person_id: person_id.clone(),
                goal_id: goal_id.clone(),
                met_at: Some(ts(8000)),
            }),
        ]);
        let effect = referral(&c, &KG).unwrap();
        assert_eq!(
            kinds(&effect.steps),
            [
                Kind::ConsentRecorded,
                Kind::ReferralSent,
                Kind::ReferralRedirected,
                Kind::ReferralOverdue,
                Kind::ReferralDeclined,
                Kind::ReferralAccepted,
                Kind::BedHeld,
                Kind::NoBed,
                Kind::ServiceDelivered,
                Kind::ReferralClosed,
                Kind::ReferralCancelled,
                Kind::ConsentEnded,
                Kind::PlanGoalAdded,
                Kind::FollowUp,
                Kind::GoalMet,
            ]
        );
        let subjects: Vec<String> = effect.steps.iter().map(|s| s.subject_id.to_string()).collect();
        assert_eq!(subjects[0], consent_id);
        assert!(subjects[1..11].iter().all(|s| *s == referral_id));
        assert_eq!(subjects[11], consent_id);
        assert!(subjects[12..].iter().all(|s| *s == goal_id));
        let parts: Vec<i32> = effect.steps.iter().map(StepRow::part).collect();
        assert_eq!(parts[0], Part::Consents as i32);
        assert_eq!(parts[1], Part::Referrals as i32);
        assert_eq!(parts[14], Part::Plan as i32);
        // Own times where the event has one; the recorded time otherwise.
        assert_eq!(effect.steps[2].at, at(9002));
        assert_eq!(effect.steps[3].at, at(6001));
        assert_eq!(effect.steps[12].at, at(9012));
        let Some(Detail::Referral(d)) = &effect.steps[7].step.detail else {
            panic!("referral detail")
        };
        assert_eq!(d.nearest_regions_with_beds, ["kg-c"]);
        let Some(Detail::Referral(d)) = &effect.steps[2].step.detail else {
            panic!("referral detail")
        };
        assert_eq!(
            (d.previous_agency.as_str(), d.receiving_agency.as_str()),
            ("kg-iom", "kg-msd")
        );
        let Some(Detail::Plan(d)) = &effect.steps[13].step.detail else {
            panic!("plan detail")
        };
        assert_eq!(d.status_code, "ON_TRACK");
        let referral = ReferralId::parse("r", &referral_id).unwrap();
        assert!(matches!(&effect.writes[0], ReferralWrite::Consent(c) if c.expires_at == Some(at(10_000))));
        assert!(
            matches!(&effect.writes[1], ReferralWrite::Referral(r) if r.created_at == at(200) && r.consent_id.is_some())
        );
        assert_eq!(
            effect.writes[2],
            ReferralWrite::Redirected {
                referral_id: referral,
                receiving_agency: "kg-msd".into(),
                at: at(9002),
                answer_due_at: Some(at(6000)),
                consent_id: None,
            }
        );
        assert_eq!(
            effect.writes[3..6],
            [
                ReferralWrite::Declined {
                    referral_id: referral,
                    at: at(6100)
                },
                ReferralWrite::Accepted {
                    referral_id: referral,
                    at: at(6200)
                },
                ReferralWrite::Closed {
                    referral_id: referral,
                    outcome: 1,
                    at: at(6400)
                },
            ]
        );
        assert_eq!(effect.writes[6], ReferralWrite::Cancelled { referral_id: referral });
        assert!(matches!(
            &effect.writes[7],
            ReferralWrite::ConsentEnded { ended_at, end_reason: 1, .. } if *ended_at == at(6500)
        ));
        assert!(matches!(&effect.writes[8], ReferralWrite::Goal(g) if g.added_at == at(9012)));
        assert!(matches!(&effect.writes[9], ReferralWrite::GoalMet { met_at, .. } if *met_at == at(8000)));
        assert_eq!(effect.writes.len(), 10);
        // Every step ID is its event's.
        for (s, e) in effect.steps.iter().zip(&c.events) {
            assert_eq!(s.step_id.to_string(), e.event_id);
        }
    }

    #[test]
    fn a_shelters_address_is_never_decoded() {
        use sh::shelter_event::Event;
        let shelter_id = uuid();
        let registered = sh::ShelterRegistered {
            shelter_id: shelter_id.clone(),
            code: "BSK-1".into(),
            region: "kg-c".into(),
            operator_agency: "kg-shelter-bishkek".into(),
            address: None,
            ..Default::default()
        };
        // Field 4 (the sealed address) as bytes that are no SealedData at
        // all: a decoder that looked inside would fail.
        let mut inner = registered.encode_to_vec();
        inner.extend_from_slice(&[0x22, 0x04, 0xff, 0xff, 0xff, 0xff]);
        assert!(sh::ShelterRegistered::decode(inner.as_slice()).is_err());
        let mut payload = vec![0x0a];
        prost::encoding::encode_varint(inner.len() as u64, &mut payload);
        payload.extend_from_slice(&inner);
        let c = commit(SHELTER_PAYLOAD, &format!("shelter-{shelter_id}"), vec![payload]);
        let effect = shelter(&c, None, &KG).unwrap();
        assert!(effect.steps.is_empty());
        assert_eq!(
            effect.writes,
            [ShelterWrite::Shelter(ShelterRow {
                shelter_id: ShelterId::parse("s", &shelter_id).unwrap(),
                code: "BSK-1".into(),
                region: "kg-c".into(),
                operator_agency: "kg-shelter-bishkek".into(),
            })]
        );
        // A well-formed sealed address with a canary: nowhere in the effect.
        let sealed = sh::ShelterEvent {
            event: Some(Event::ShelterRegistered(sh::ShelterRegistered {
                address: Some(nrm_proto::common::v1::SealedData {
                    ciphertext: b"address-canary".to_vec(),
                    ..Default::default()
                }),
                ..registered
            })),
        };
        let c = commit(SHELTER_PAYLOAD, "shelter-x", vec![sealed.encode_to_vec()]);
        assert!(!format!("{:?}", shelter(&c, None, &KG).unwrap()).contains("canary"));
    }

    #[test]
    fn every_hold_event_maps_to_its_step_and_a_bed_for_an_arrival_keeps_its_cause() {
        use sh::shelter_event::Event;
        let (shelter_id, hold_id, referral_id) = (uuid(), uuid(), uuid());
        let held = |referral_id: &str| {
            Event::BedHeld(sh::BedHeld {
                shelter_id: shelter_id.clone(),
                hold_id: hold_id.clone(),
                category: 1,
                referral_id: referral_id.to_owned(),
                expires_at: Some(ts(5000)),
                region: "kg-c".into(),
                holder_agency: "kg-iom".into(),
            })
        };
        let cause = CommitId::new();
        let c = shelter_commit(vec![
            held(""),
            Event::PersonAdmitted(sh::PersonAdmitted {
                shelter_id: shelter_id.clone(),
                hold_id: hold_id.clone(),
                admitted_at: Some(ts(300)),
                ..Default::default()
            }),
            Event::PersonDischarged(sh::PersonDischarged {
                shelter_id: shelter_id.clone(),
                hold_id: hold_id.clone(),
                discharged_at: Some(ts(400)),
                ..Default::default()
            }),
            Event::HoldReleased(sh::HoldReleased {
                shelter_id: shelter_id.clone(),
                hold_id: hold_id.clone(),
                ..Default::default()
            }),
            Event::HoldExpired(sh::HoldExpired {
                shelter_id: shelter_id.clone(),
                hold_id: hold_id.clone(),
                ..Default::default()
            }),
            Event::CapacityChanged(sh::CapacityChanged::default()),
            Event::NoBedAvailable(sh::NoBedAvailable::default()),
            Event::ShelterApproved(sh::ShelterApproved::default()),
        ]);
        let effect = shelter(&c, Some(cause), &KG).unwrap();
        // Variants known but of no use are not unknown ones.
        assert!(effect.skipped.is_empty(), "{:?}", effect.skipped);
        assert_eq!(
            kinds(&effect.steps),
            [
                Kind::BedHeld,
                Kind::Admitted,
                Kind::Discharged,
                Kind::HoldReleased,
                Kind::HoldExpired
            ]
        );
        assert!(effect.steps.iter().all(|s| s.subject_id.to_string() == hold_id));
        assert_eq!(effect.steps[0].at, at(9000));
        assert_eq!(effect.steps[1].at, at(300));
        let ShelterWrite::Hold(row) = &effect.writes[0] else {
            panic!("a hold")
        };
        assert_eq!(row.referral_id, None);
        assert_eq!(row.cause_commit_id, Some(cause));
        let Some(Detail::Shelter(d)) = &effect.steps[0].step.detail else {
            panic!("shelter detail")
        };
        assert_eq!((d.region.as_str(), d.holder_agency.as_str()), ("kg-c", "kg-iom"));
        let statuses: Vec<_> = effect.writes[1..]
            .iter()
            .map(|w| match w {
                ShelterWrite::HoldStatus { status, at, .. } => (status.as_str(), *at),
                _ => panic!("a status"),
            })
            .collect();
        assert_eq!(
            statuses,
            [
                ("admitted", at(300)),
                ("discharged", at(400)),
                ("released", at(9003)),
                ("expired", at(9004))
            ]
        );
        // A bed for a referral is linked by it, not by its cause.
        let effect = shelter(&shelter_commit(vec![held(&referral_id)]), Some(cause), &KG).unwrap();
        let ShelterWrite::Hold(row) = &effect.writes[0] else {
            panic!("a hold")
        };
        assert_eq!(row.referral_id.map(|r| r.to_string()), Some(referral_id));
        assert_eq!(row.cause_commit_id, None);
    }

    #[test]
    fn every_return_step_here_maps_to_its_kind() {
        use rp::repatriation_event::Event;
        let return_id = uuid();
        let c = ret(
            &return_id,
            vec![
                Event::ReturnOpened(rp::ReturnOpened {
                    return_id: return_id.clone(),
                    citizenship: "KG".into(),
                    opened_by: "ru-mvd".into(),
                    consulate_agency: "kg-consulate-moscow".into(),
                    foreign_reference: "case-ref".into(),
                    identifiers: Some(nrm_proto::common::v1::SealedData {
                        ciphertext: b"id-canary".to_vec(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                Event::ConsentRecorded(rp::ReturnConsentRecorded::default()),
                Event::RiskAssessed(rp::RiskAssessed::default()),
                Event::TravelDocumentRequested(rp::TravelDocumentRequested {}),
                Event::TravelDocumentIssued(rp::TravelDocumentIssued {
                    document: Some(nrm_proto::common::v1::SealedData {
                        ciphertext: b"doc-canary".to_vec(),
                        ..Default::default()
                    }),
                    valid_until: None,
                }),
                Event::ItineraryBooked(rp::ItineraryBooked {
                    arrival_point: "FRU".into(),
                    ..Default::default()
                }),
                Event::EscortAssigned(rp::EscortAssigned::default()),
                Event::Departed(rp::ReturnDeparted {
                    departed_at: Some(ts(500)),
                }),
                Event::Arrived(rp::ReturnArrived {
                    arrived_at: Some(ts(600)),
                }),
                Event::HandedOver(rp::ReturnHandedOver {
                    handed_over_at: Some(ts(700)),
                    received_by: "kg-iom".into(),
                }),
                Event::Halted(rp::ReturnHalted {
                    reason: 1,
                    halted_at: 0,
                }),
            ],
        );
        let ru = Origin {
            country: "ru",
            agency: "ru-iom",
        };
        let effect = repatriation(&c, &ru).unwrap();
        assert_eq!(
            kinds(&effect.steps),
            [
                Kind::ReturnOpened,
                Kind::ReturnConsent,
                Kind::RiskAssessed,
                Kind::DocumentRequested,
                Kind::DocumentIssued,
                Kind::ItineraryBooked,
                Kind::EscortAssigned,
                Kind::Departed,
                Kind::Arrived,
                Kind::HandedOver,
                Kind::ReturnHalted
            ]
        );
        assert!(!format!("{effect:?}").contains("canary"));
        assert!(effect.steps.iter().all(|s| s.step.country == "ru"));
        assert_eq!(effect.steps[0].step.agency, "ru-mvd");
        assert_eq!(effect.steps[1].step.agency, "ru-iom");
        assert_eq!(effect.steps[7].at, at(500));
        assert_eq!(effect.steps[9].at, at(700));
        let rid = ReturnId::parse("r", &return_id).unwrap();
        assert_eq!(
            effect.writes[0],
            ReturnWrite::Commit {
                commit_id: CommitId::parse("c", &c.commit_id).unwrap(),
                return_id: rid
            }
        );
        let ReturnWrite::Opened(row) = &effect.writes[1] else {
            panic!("opened")
        };
        assert_eq!((row.from_country.as_str(), row.to_country.as_str()), ("ru", "kg"));
        assert_eq!(row.direction, rp::Direction::Outgoing as i32);
        assert_eq!(row.consulate_agency, "kg-consulate-moscow");
        assert_eq!(row.foreign_reference, "case-ref");
        assert_eq!(
            effect.writes[10],
            ReturnWrite::Status {
                return_id: rid,
                status: rp::ReturnStatus::HandedOver as i32,
                handover: Some(("kg-iom".into(), at(700))),
            }
        );
        let Some(Detail::Return(d)) = &effect.steps[5].step.detail else {
            panic!("return detail")
        };
        assert_eq!(d.arrival_point, "FRU");
        // Another stream of the context (a crossing commit's) adds nothing.
        let mut other = c.clone();
        other.stream_id = format!("xborder-{return_id}");
        assert!(repatriation(&other, &ru).unwrap().is_empty());
    }

    fn snapshot(return_id: &str, upto: usize) -> rp::CrossBorderReturn {
        let names = [
            ("ReturnOpened", rp::ReturnStatus::Opened, "ru-mvd"),
            ("ReturnConsentRecorded", rp::ReturnStatus::Consented, "ru-iom"),
            ("RiskAssessed", rp::ReturnStatus::Assessed, "ru-iom"),
            ("ReturnHandedOver", rp::ReturnStatus::HandedOver, "ru-iom"),
        ];
        rp::CrossBorderReturn {
            return_id: return_id.to_owned(),
            from_country: "ru".into(),
            to_country: "kg".into(),
            status: names[upto - 1].1 as i32,
            origin_version: upto as u64,
            foreign_reference: "ref-1".into(),
            received_by: if upto == 4 { "kg-iom".into() } else { String::new() },
            steps: names[..upto]
                .iter()
                .enumerate()
                .map(|(i, (step, status, agency))| rp::Step {
                    step: (*step).to_owned(),
                    status_after: *status as i32,
                    at: Some(ts(1000 + i as i64)),
                    agency: (*agency).to_owned(),
                    origin_version: i as u64 + 1,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_crossed_snapshot_repeated_gives_the_same_step_ids() {
        use rp::repatriation_event::Event;
        let return_id = uuid();
        let first = ret(
            &return_id,
            vec![Event::Announced(rp::ReturnAnnounced {
                return_id: return_id.clone(),
                from_country: "ru".into(),
                snapshot: Some(snapshot(&return_id, 2)),
                identifiers: None,
            })],
        );
        let later = ret(
            &return_id,
            vec![Event::AnnouncedStep(rp::AnnouncedStepRecorded {
                snapshot: Some(snapshot(&return_id, 4)),
                identifiers: None,
            })],
        );
        let a = repatriation(&first, &KG).unwrap();
        let b = repatriation(&later, &KG).unwrap();
        assert_eq!(
            kinds(&a.steps),
            [Kind::ReturnOpened, Kind::ReturnConsent, Kind::ReturnAnnounced]
        );
        assert_eq!(
            kinds(&b.steps),
            [
                Kind::ReturnOpened,
                Kind::ReturnConsent,
                Kind::RiskAssessed,
                Kind::HandedOver
            ]
        );
        // The crossed steps: the same IDs in both snapshots, times and
        // agencies as they happened abroad, in the country they happened in.
        assert_eq!(a.steps[0].step_id, b.steps[0].step_id);
        assert_eq!(a.steps[1].step_id, b.steps[1].step_id);
        let rid = ReturnId::parse("r", &return_id).unwrap();
        assert_eq!(a.steps[1].step_id, crossed_step_id(rid, 2));
        assert_eq!(b.steps[1].at, at(1001));
        assert_eq!(b.steps[1].step.agency, "ru-iom");
        assert!(b.steps.iter().all(|s| s.step.country == "ru"));
        // RETURN_ANNOUNCED happened here, once, with the event's own ID.
        assert_eq!(a.steps[2].step.country, "kg");
        assert_eq!(a.steps[2].step_id.to_string(), first.events[0].event_id);
        let Some(Detail::Return(d)) = &b.steps[3].step.detail else {
            panic!("return detail")
        };
        assert_eq!(d.received_by, "kg-iom");
        assert_eq!(d.direction, rp::Direction::Incoming as i32);
        let ReturnWrite::Announced(row) = &b.writes[1] else {
            panic!("announced")
        };
        assert_eq!(row.direction, rp::Direction::Incoming as i32);
        assert_eq!(row.status, rp::ReturnStatus::HandedOver as i32);
        assert_eq!((row.from_country.as_str(), row.to_country.as_str()), ("ru", "kg"));
        assert_eq!(row.opened_at, at(1000));
        assert_eq!(row.opened_by, "ru-mvd");
        assert_eq!(row.received_by, "kg-iom");
        assert_eq!(row.foreign_reference, "ref-1");
    }

    /// A payload of a variant no version here knows: oneof field 999 (as a
    /// newer service would write it), hand-encoded.
    fn unknown_variant() -> Vec<u8> {
        let mut payload = Vec::new();
        prost::encoding::encode_key(999, prost::encoding::WireType::LengthDelimited, &mut payload);
        prost::encoding::encode_varint(2, &mut payload);
        payload.extend_from_slice(&[0x08, 0x01]);
        payload
    }

    fn event_id(c: &EventCommit, index: usize) -> Uuid {
        c.events[index].event_id.parse().unwrap()
    }

    #[test]
    fn an_unknown_variant_fails_the_whole_commit_on_every_stream() {
        use id::identification_event::Event;
        let (case_id, person_id) = (uuid(), uuid());
        let payload = |e| id::IdentificationEvent { event: Some(e) }.encode_to_vec();
        let c = commit(
            IDENTIFICATION_PAYLOAD,
            &format!("case-{case_id}"),
            vec![
                payload(Event::PresumedVictimReported(report(&case_id, &person_id))),
                unknown_variant(),
            ],
        );
        let unknown = event_id(&c, 1).to_string();
        assert!(matches!(identification(&c, &KG), Err(StepError::UnknownEvent(e)) if e == unknown));
        for (payload_type, stream) in [
            (REFERRAL_PAYLOAD, format!("referral-{}", uuid())),
            (SHELTER_PAYLOAD, format!("shelter-{}", uuid())),
            (REPATRIATION_PAYLOAD, format!("return-{}", uuid())),
        ] {
            let c = commit(payload_type, &stream, vec![unknown_variant()]);
            let failed = match payload_type {
                REFERRAL_PAYLOAD => referral(&c, &KG).err(),
                SHELTER_PAYLOAD => shelter(&c, None, &KG).err(),
                _ => repatriation(&c, &KG).err(),
            };
            assert!(
                matches!(failed, Some(StepError::UnknownEvent(_))),
                "{payload_type}: {failed:?}"
            );
        }
    }

    #[test]
    fn an_empty_event_or_a_malformed_required_id_is_an_error_naming_only_ids() {
        use id::identification_event::Event;
        let mut c = ident(vec![]);
        c.events = vec![CommittedEvent {
            event_id: uuid(),
            recorded_at: Some(ts(9000)),
            ..Default::default()
        }];
        assert_eq!(
            identification(&c, &KG).unwrap_err(),
            StepError::Empty(c.events[0].event_id.clone())
        );
        let c = ident(vec![Event::ScreeningCompleted(id::ScreeningCompleted {
            case_id: "Canarybek".into(),
            ..Default::default()
        })]);
        let err = identification(&c, &KG).unwrap_err();
        assert_eq!(
            err,
            StepError::MalformedId {
                event: c.events[0].event_id.clone(),
                field: "case_id"
            }
        );
        assert!(!err.to_string().contains("Canarybek"), "{err}");
        let mut c = ident(vec![Event::ScreeningCompleted(id::ScreeningCompleted::default())]);
        c.events[0].event_id = "Canarybek".into();
        let err = identification(&c, &KG).unwrap_err();
        assert!(
            matches!(err, StepError::MalformedId { field: "event_id", .. }),
            "{err:?}"
        );
        assert!(!err.to_string().contains("Canarybek"), "{err}");
        let mut r = report(&uuid(), &uuid());
        r.person_id = "not-a-person".into();
        let err = identification(&ident(vec![Event::PresumedVictimReported(r)]), &KG).unwrap_err();
        assert!(
            matches!(err, StepError::MalformedId { field: "person_id", .. }),
            "{err:?}"
        );
    }

    #[test]
    fn a_malformed_optional_link_is_absent_and_reported_and_the_record_kept() {
        use rf::referral_event::Event;
        let referral_id = uuid();
        let c = refer(vec![Event::ReferralCreated(rf::ReferralCreated {
            referral_id: referral_id.clone(),
            person_id: uuid(),
            case_id: "{not-a-case}".into(),
            consent_id: "  ".into(),
            referring_agency: "kg-mvd".into(),
            receiving_agency: "kg-msd".into(),
            created_at: Some(ts(100)),
            ..Default::default()
        })]);
        let effect = referral(&c, &KG).unwrap();
        assert_eq!(kinds(&effect.steps), [Kind::ReferralSent]);
        let [ReferralWrite::Referral(row)] = effect.writes.as_slice() else {
            panic!("a referral")
        };
        assert_eq!(row.referral_id.to_string(), referral_id);
        assert_eq!((row.case_id, row.consent_id), (None, None));
        // Blank is simply absent; only the malformed one is reported.
        assert_eq!(
            effect.skipped,
            [Skipped::MalformedLink {
                event_id: event_id(&c, 0),
                field: "case_id"
            }]
        );

        // A hold whose referral is malformed: linked to neither a referral
        // nor, as a bed for an arrival would be, to the commit that caused it.
        let c = shelter_commit(vec![sh::shelter_event::Event::BedHeld(sh::BedHeld {
            shelter_id: uuid(),
            hold_id: uuid(),
            referral_id: "R-17".into(),
            ..Default::default()
        })]);
        let effect = shelter(&c, Some(CommitId::new()), &KG).unwrap();
        let [ShelterWrite::Hold(row)] = effect.writes.as_slice() else {
            panic!("a hold")
        };
        assert_eq!((row.referral_id, row.cause_commit_id), (None, None));
        assert_eq!(
            effect.skipped,
            [Skipped::MalformedLink {
                event_id: event_id(&c, 0),
                field: "referral_id"
            }]
        );

        // A case from abroad with a malformed return: opened, unlinked.
        let c = ident(vec![id::identification_event::Event::CaseOpenedFromAbroad(
            id::CaseOpenedFromAbroad {
                report: Some(report(&uuid(), &uuid())),
                identified_abroad: Some(id::IdentifiedAbroad {
                    return_id: "ret-1".into(),
                    from_country: "ru".into(),
                    ..Default::default()
                }),
            },
        )]);
        let effect = identification(&c, &KG).unwrap();
        let [IdentificationWrite::Open(row, _)] = effect.writes.as_slice() else {
            panic!("a case")
        };
        assert_eq!(row.return_id, None);
        let Some(Detail::Identification(d)) = &effect.steps[0].step.detail else {
            panic!("identification detail")
        };
        assert_eq!(d.return_id, "");
        assert_eq!(effect.skipped.len(), 1);
    }

    #[test]
    fn a_foreign_reference_that_is_a_uuid_is_stored_canonical() {
        let id = Uuid::now_v7();
        let canonical = id.to_string();
        let upper = canonical.to_uppercase();
        for typed in [
            canonical.clone(),
            upper.clone(),
            format!("{{{upper}}}"),
            format!(" {canonical}\n"),
            id.simple().to_string().to_uppercase(),
            format!("urn:uuid:{canonical}"),
        ] {
            assert_eq!(normalise_reference(&typed), canonical, "{typed}");
        }
        for typed in ["", "KG-2026-0017", "{not a uuid}", " 12 "] {
            assert_eq!(normalise_reference(typed), typed, "kept as typed");
        }
    }
}
