//! casepath's identification projection folds the changes to a case into
//! its opening when both are in one batch ([`Write::then`]: one insert of
//! the case as they leave it). Checked against a real PostgreSQL, straight
//! through the projection, with commits made here:
//! - a case opened, flagged, screened, decided and reviewed in one batch is
//!   the row that applying them one commit at a time gives, field by field;
//! - an opening of a case that is already there (a second report of one
//!   case ID, from another stream) changes nothing by itself, and the
//!   changes after it in its batch still apply to the case as it was, as
//!   one by one: the folded insert must not swallow them;
//! - an erasure in a batch erases the cases opened before it, changed
//!   before and after it, and not a case of the same person opened after
//!   it (an erasure runs alone, between the writes before and after it).
//!
//! "One commit at a time" folds too (a commit's own events are a batch of
//! one): the values the changes must leave are spelt out as well.
//!
//! [`Write::then`]: nrm_casepath::projections

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use chrono::{DateTime, Utc};
use nrm_casepath::domain::changes::WatchKey;
use nrm_casepath::projections::IdentificationProjection;
use nrm_kernel::projection::{Delivery, Projection as _};
use nrm_kernel::store::EventStore;
use nrm_kernel::validate::timestamp;
use nrm_kernel::xborder::CountryCode;
use nrm_proto::common::v1 as common;
use nrm_proto::common::v1::{CommittedEvent, EventCommit};
use nrm_proto::identification::v1 as id;
use prost::Message as _;
use sqlx::PgPool;
use uuid::Uuid;

use id::identification_event::Event;

const PAYLOAD: &str = "nrm.identification.v1.IdentificationEvent";

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_790_000_000 + seconds, 0).unwrap()
}

/// A commit of `events` on stream `stream` (its versions from `first`).
fn commit(stream: &str, first: u64, events: Vec<Event>) -> EventCommit {
    EventCommit {
        commit_id: Uuid::now_v7().to_string(),
        stream_id: stream.to_owned(),
        payload_type: PAYLOAD.to_owned(),
        events: events
            .into_iter()
            .zip(first..)
            .map(|(event, version)| CommittedEvent {
                event_id: Uuid::now_v7().to_string(),
                version,
                event_type: String::new(),
                schema_version: 1,
                recorded_at: Some(timestamp(at(9000))),
                payload: id::IdentificationEvent { event: Some(event) }.encode_to_vec(),
            })
            .collect(),
    }
}

fn report(case: Uuid, person: Uuid, agency: &str, seconds: i64) -> Event {
    Event::PresumedVictimReported(id::PresumedVictimReported {
        case_id: case.to_string(),
        person_id: person.to_string(),
        reporting_agency: agency.into(),
        competent_authority: "kg-prosecutor".into(),
        reported_at: Some(timestamp(at(seconds))),
        found_at: Some(timestamp(at(seconds - 100))),
        found_country: "KG".into(),
        country_of_exploitation: "RU".into(),
        exploitation_forms: vec![id::ExploitationForm::Labour as i32],
        gender: common::Gender::Female as i32,
        age_band: 4,
        citizenship: "KG".into(),
        status: id::CaseStatus::Reported as i32,
        ..Default::default()
    })
}

fn flagged(case: Uuid) -> Event {
    Event::PossibleDuplicateFlagged(id::PossibleDuplicateFlagged {
        case_id: case.to_string(),
        matching_case_ids: vec![Uuid::now_v7().to_string()],
    })
}

fn screened(case: Uuid, seconds: i64) -> Event {
    Event::ScreeningCompleted(id::ScreeningCompleted {
        case_id: case.to_string(),
        indicators: vec![id::Indicator::DocumentsRetained as i32],
        screened_at: Some(timestamp(at(seconds))),
    })
}

fn decided(case: Uuid, decision: id::Decision, seconds: i64) -> Event {
    Event::IdentificationDecided(id::IdentificationDecided {
        case_id: case.to_string(),
        decision: decision as i32,
        decided_at: Some(timestamp(at(seconds))),
        ..Default::default()
    })
}

fn reviewed(case: Uuid, seconds: i64) -> Event {
    Event::ReviewRequested(id::ReviewRequested {
        case_id: case.to_string(),
        requested_at: Some(timestamp(at(seconds))),
        ..Default::default()
    })
}

fn erased(case: Uuid, person: Uuid, seconds: i64) -> Event {
    Event::PersonalDataErased(id::PersonalDataErased {
        case_id: case.to_string(),
        person_id: person.to_string(),
        erased_at: Some(timestamp(at(seconds))),
        reason: 1,
    })
}

fn projection() -> IdentificationProjection {
    let country = CountryCode::parse("country", "KG").unwrap();
    IdentificationProjection::new(&country, &WatchKey::new(&[0; 32]))
}

/// A casepath database of its own, migrated.
struct Db {
    settings: nrm_kernel::settings::DatabaseSettings,
    pool: PgPool,
}

impl Db {
    async fn new() -> Self {
        let mut settings = nrm_e2e::settings().common.database;
        settings.name = format!("{}_fold", settings.name);
        let pool = nrm_kernel::db::connect_and_migrate(&settings, &nrm_casepath::startup::MIGRATIONS)
            .await
            .unwrap();
        Self { settings, pool }
    }

    /// Empties the model and applies `commits` in `batches` (their sizes,
    /// in order) in one transaction.
    async fn apply(&self, commits: &[EventCommit], batches: &[usize]) {
        assert_eq!(batches.iter().sum::<usize>(), commits.len());
        let projection = projection();
        let deliveries: Vec<Delivery> = commits
            .iter()
            .zip(1..)
            .map(|(commit, sequence)| Delivery {
                stream_sequence: sequence,
                subject: "t.identification.case".into(),
                commit: commit.clone(),
                metadata: None,
            })
            .collect();
        let all: Vec<&Delivery> = deliveries.iter().collect();
        let mut uow = EventStore::new(self.pool.clone()).begin().await.unwrap();
        projection.reset(uow.conn()).await.unwrap();
        let mut from = 0;
        for &size in batches {
            projection.apply_batch(&mut uow, &all[from..from + size]).await.unwrap();
            from += size;
        }
        uow.commit().await.unwrap();
    }

    /// Every case, one text line each, by case ID.
    async fn cases(&self) -> Vec<String> {
        sqlx::query_scalar("SELECT t::text FROM cp_cases t ORDER BY case_id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// The fields of `case` that its changes set.
    async fn case(&self, case: Uuid) -> (String, i32, i32, Option<DateTime<Utc>>, Option<DateTime<Utc>>, bool) {
        sqlx::query_as(
            "SELECT reporting_agency, status, decision, decided_at, decision_waiting_since, possible_duplicate
             FROM cp_cases WHERE case_id = $1",
        )
        .bind(case)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// The digest of every table of the projection (cases, notifications,
    /// facts, steps).
    async fn digest(&self) -> Option<String> {
        let mut conn = self.pool.acquire().await.unwrap();
        projection().digest(&mut conn).await.unwrap()
    }

    /// The same commits one at a time, then in `batches`: the same cases,
    /// and the same rows in every table of the projection.
    async fn same_both_ways(&self, commits: &[EventCommit], batches: &[usize]) -> Vec<String> {
        self.apply(commits, &vec![1; commits.len()]).await;
        let (one_by_one, digest) = (self.cases().await, self.digest().await);
        self.apply(commits, batches).await;
        assert_eq!(
            self.cases().await,
            one_by_one,
            "batches {batches:?} differ from one by one"
        );
        assert_eq!(
            self.digest().await,
            digest,
            "batches {batches:?}: the projection's tables differ"
        );
        one_by_one
    }

    async fn drop(self) {
        self.pool.close().await;
        nrm_kernel::db::drop_database(&self.settings).await.unwrap();
    }
}

#[tokio::test]
async fn changes_folded_into_an_opening_leave_the_case_as_one_by_one_would() {
    let db = Db::new().await;
    let (case, person) = (Uuid::now_v7(), Uuid::now_v7());
    let stream = format!("case-{case}");
    let commits = [
        commit(&stream, 1, vec![report(case, person, "kg-mvd", 100), flagged(case)]),
        commit(&stream, 3, vec![screened(case, 200)]),
        commit(&stream, 4, vec![decided(case, id::Decision::NotIdentified, 300)]),
        commit(&stream, 5, vec![reviewed(case, 400)]),
    ];
    db.same_both_ways(&commits, &[4]).await;
    assert_eq!(
        db.case(case).await,
        (
            "kg-mvd".into(),
            id::CaseStatus::Presumed as i32,
            id::Decision::NotIdentified as i32,
            Some(at(300)),
            Some(at(400)),
            true
        ),
        "reviewed: presumed again, the decision kept, a decision due since the request"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_second_opening_of_a_case_changes_nothing_and_the_changes_after_it_still_apply() {
    let db = Db::new().await;
    let (case, person, other) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let commits = [
        // The case, reported and left undecided.
        commit(&format!("case-{case}"), 1, vec![report(case, person, "kg-mvd", 100)]),
        // The same case ID reported again from another stream, by another
        // agency, then screened and decided; and a new case beside it.
        commit(
            "case-elsewhere",
            1,
            vec![
                report(case, Uuid::now_v7(), "kg-ngo-sezim", 150),
                screened(case, 200),
                flagged(case),
                decided(case, id::Decision::Identified, 300),
            ],
        ),
        commit(
            &format!("case-{other}"),
            1,
            vec![report(other, Uuid::now_v7(), "kg-mvd", 160), screened(other, 210)],
        ),
    ];
    // The first commit alone, then the other two in one batch: the second
    // opening is folded with the case's changes and conflicts.
    let rows = db.same_both_ways(&commits, &[1, 2]).await;
    assert_eq!(rows.len(), 2);
    // All three in one batch: a second opening is never absorbed; it runs
    // in the case's next round, absorbs the changes after it and conflicts.
    db.same_both_ways(&commits, &[3]).await;
    assert_eq!(
        db.case(case).await,
        (
            "kg-mvd".into(),
            id::CaseStatus::Identified as i32,
            id::Decision::Identified as i32,
            Some(at(300)),
            None,
            true
        ),
        "the first report's agency; the later changes applied to it"
    );
    assert_eq!(db.case(other).await.1, id::CaseStatus::Presumed as i32);
    db.drop().await;
}

#[tokio::test]
async fn an_erasure_in_a_batch_erases_the_cases_opened_before_it_and_none_opened_after_it() {
    let db = Db::new().await;
    let (case, later, person) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let stream = format!("case-{case}");
    let commits = [
        commit(
            &stream,
            1,
            vec![report(case, person, "kg-mvd", 100), screened(case, 200)],
        ),
        commit(&stream, 3, vec![erased(case, person, 250)]),
        commit(&stream, 4, vec![decided(case, id::Decision::Identified, 300)]),
        // The same person reported again after the erasure: a new case,
        // not erased (the erasure ran before it was opened).
        commit(
            &format!("case-{later}"),
            1,
            vec![report(later, person, "kg-mvd", 400), screened(later, 410)],
        ),
    ];
    db.same_both_ways(&commits, &[4]).await;
    let erased_at = |case: Uuid| {
        sqlx::query_scalar::<_, Option<DateTime<Utc>>>("SELECT erased_at FROM cp_cases WHERE case_id = $1")
            .bind(case)
            .fetch_one(&db.pool)
    };
    assert_eq!(erased_at(case).await.unwrap(), Some(at(250)));
    assert_eq!(erased_at(later).await.unwrap(), None, "opened after the erasure");
    assert_eq!(db.case(case).await.1, id::CaseStatus::Identified as i32);
    assert_eq!(db.case(later).await.1, id::CaseStatus::Presumed as i32);
    db.drop().await;
}
