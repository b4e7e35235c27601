//! casepath with its read models seeded by SQL (as the projections would
//! fill them), for the tests of its queries and of its rows of the
//! permission matrix.

#![allow(clippy::unwrap_used, missing_docs)] // Test code: a failed unwrap is a failed test.

use chrono::{DateTime, TimeDelta, Utc};
use nrm_kernel::validate::timestamp;
use nrm_proto::casepath::v1 as pb;
use nrm_proto::casepath::v1::casepath_service_client::CasepathServiceClient;
use pb::{PathPart as P, StepKind as K};
use prost::Message as _;
use sqlx::PgPool;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::{ServiceProcess, process_env, settings};

pub type Client = CasepathServiceClient<Channel>;

/// The per-person facts of the seeded records (what `GetStatistics`
/// reads), derived for every person as the projections derive them at the
/// end of a rebuild: after seeding or changing records, before asking for
/// statistics.
pub async fn derive_facts(pool: &PgPool) {
    use nrm_casepath::projections::{IdentificationProjection, ReferralProjection};
    use nrm_kernel::projection::Projection as _;
    let country = nrm_kernel::xborder::CountryCode::parse("country", "KG").unwrap();
    let key = nrm_casepath::domain::changes::WatchKey::new(&[0; 32]);
    let mut conn = pool.acquire().await.unwrap();
    IdentificationProjection::new(&country, &key)
        .after_replay(&mut conn)
        .await
        .unwrap();
    ReferralProjection::new(&country, &key)
        .after_replay(&mut conn)
        .await
        .unwrap();
}

/// A casepath process with its own database, and a pool on it for seeding.
pub struct Casepath {
    pub process: ServiceProcess,
    pub base: nrm_identification::config::Settings,
    pub pool: PgPool,
    pub client: Client,
}

impl Casepath {
    pub async fn start(extra: &[(&str, &str)]) -> Self {
        let base = settings();
        let env = process_env(&base, "casepath", extra);
        let process = ServiceProcess::start("casepath", env);
        let client = CasepathServiceClient::new(process.channel().await);
        let mut database = base.database.clone();
        database.name = format!("{}_casepath", base.database.name);
        let pool = PgPool::connect_with(nrm_kernel::db::connect_options(&database).unwrap())
            .await
            .unwrap();
        Self {
            process,
            base,
            pool,
            client,
        }
    }

    pub async fn stop(mut self) {
        self.process.kill();
        self.pool.close().await;
        crate::drop_processes_data(&self.base, &["casepath"]).await;
    }
}

// --- seeding -------------------------------------------------------------

pub struct CaseSeed {
    pub case_id: Uuid,
    pub person_id: Uuid,
    pub reporting: &'static str,
    pub authority: &'static str,
    pub status: i32,
    pub reported_at: DateTime<Utc>,
    pub gender: i32,
    pub waiting_since: Option<DateTime<Utc>>,
    pub return_id: Option<Uuid>,
    pub decided_at: Option<DateTime<Utc>>,
}

impl CaseSeed {
    pub fn new(person_id: Uuid, reporting: &'static str, authority: &'static str, reported_at: DateTime<Utc>) -> Self {
        Self {
            case_id: Uuid::now_v7(),
            person_id,
            reporting,
            authority,
            status: 1,
            reported_at,
            gender: 1,
            waiting_since: None,
            return_id: None,
            decided_at: None,
        }
    }

    pub async fn insert(&self, pool: &PgPool) {
        sqlx::query(
            "INSERT INTO cp_cases (case_id, person_id, reporting_agency, competent_authority, status, reported_at, \
             gender, age_band, child, citizenship, country_of_exploitation, exploitation_forms, decision, \
             decided_at, decision_waiting_since, return_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 4, false, 'kg', 'ru', '{2}', $8, $9, $10, $11)",
        )
        .bind(self.case_id)
        .bind(self.person_id)
        .bind(self.reporting)
        .bind(self.authority)
        .bind(self.status)
        .bind(self.reported_at)
        .bind(self.gender)
        .bind(if self.decided_at.is_some() { 1 } else { 0 })
        .bind(self.decided_at)
        .bind(self.waiting_since)
        .bind(self.return_id)
        .execute(pool)
        .await
        .unwrap();
    }
}

pub async fn consent(pool: &PgPool, person: Uuid, case: Uuid, recipient: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO cp_consents (consent_id, person_id, case_id, recipient_agency, recorded_by_agency, purposes, \
         data_categories, recorded_at) VALUES ($1, $2, $3, $4, 'kg-mvd', '{1}', '{1}', now())",
    )
    .bind(id)
    .bind(person)
    .bind(case)
    .bind(recipient)
    .execute(pool)
    .await
    .unwrap();
    id
}

#[allow(clippy::too_many_arguments)]
pub async fn referral(
    pool: &PgPool,
    person: Uuid,
    from: &str,
    to: &str,
    consent: Option<Uuid>,
    status: &str,
    created_at: DateTime<Utc>,
    due: Option<DateTime<Utc>>,
) -> Uuid {
    let id = Uuid::now_v7();
    let waiting = (status == "pending").then_some(created_at);
    sqlx::query(
        "INSERT INTO cp_referrals (referral_id, person_id, referring_agency, receiving_agency, consent_id, \
         services, urgency, status, created_at, waiting_since, answer_due_at, answered_at, accepted_at) \
         VALUES ($1, $2, $3, $4, $5, '{1,2}', 2, $6, $7, $8, $9, $10, $10)",
    )
    .bind(id)
    .bind(person)
    .bind(from)
    .bind(to)
    .bind(consent)
    .bind(status)
    .bind(created_at)
    .bind(waiting)
    .bind(due)
    .bind((status != "pending").then(|| created_at + TimeDelta::hours(2)))
    .execute(pool)
    .await
    .unwrap();
    id
}

/// One step as a projection writes it.
pub struct StepSeed {
    pub subject: Uuid,
    pub part: P,
    pub kind: K,
    pub at: DateTime<Utc>,
    pub commit: Uuid,
    pub cause: Option<Uuid>,
    pub sequence: i64,
    pub position: i32,
    pub detail: Option<pb::step::Detail>,
}

pub fn step(subject: Uuid, part: P, kind: K, at: DateTime<Utc>, sequence: i64) -> StepSeed {
    StepSeed {
        subject,
        part,
        kind,
        at,
        commit: Uuid::now_v7(),
        cause: None,
        sequence,
        position: 0,
        detail: None,
    }
}

pub async fn insert_step(pool: &PgPool, s: StepSeed) {
    let encoded = pb::Step {
        part: s.part as i32,
        kind: s.kind as i32,
        at: Some(timestamp(s.at)),
        agency: "kg-mvd".into(),
        country: "kg".into(),
        spent: None,
        subject_id: s.subject.to_string(),
        detail: s.detail,
    }
    .encode_to_vec();
    sqlx::query(
        "INSERT INTO cp_steps (source, step_id, subject_id, part, kind, at, commit_id, causation_id, \
         stream_sequence, position, step) VALUES ('test', $1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(Uuid::now_v7())
    .bind(s.subject)
    .bind(s.part as i32)
    .bind(s.kind as i32)
    .bind(s.at)
    .bind(s.commit)
    .bind(s.cause)
    .bind(s.sequence)
    .bind(s.position)
    .bind(encoded)
    .execute(pool)
    .await
    .unwrap();
}

/// Notifies a change that touched `keys` only, as a projection's commit
/// that wrote those rows does.
pub async fn notify_touched(pool: &PgPool, keys: &[Uuid]) {
    let mut touched = nrm_casepath::domain::changes::Touched::default();
    for k in keys {
        touched.key(*k);
    }
    let key = nrm_casepath::app::watch::load_key(pool).await.unwrap();
    sqlx::query("SELECT pg_notify('casepath_changed', $1)")
        .bind(touched.payload("casepath_referral", &key))
        .execute(pool)
        .await
        .unwrap();
}

/// Notifies a change a watcher cannot narrow down (every watcher looks).
pub async fn notify(pool: &PgPool) {
    sqlx::query("SELECT pg_notify('casepath_changed', 'test')")
        .execute(pool)
        .await
        .unwrap();
}
