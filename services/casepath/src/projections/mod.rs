//! casepath's read models: one projection per context stream, each writing
//! its own tables and its own rows of `cp_steps` (`source` = its name), and
//! announcing every change on the channel [`CHANGED`] in the same
//! transaction. What an event means is [`crate::domain::steps`]; here only
//! the SQL. Every write is idempotent (an upsert, or an update to a value
//! the event fixes), no apply reads another table, and a commit costs one
//! statement per row write plus one for all its steps and the notification.
//!
//! - [`identification`]: `cp_cases`, `cp_notifications`.
//! - [`referral`]: `cp_consents`, `cp_referrals`, `cp_goals`.
//! - [`shelter`]: `cp_shelters`, `cp_holds`.
//! - [`repatriation`]: `cp_returns`, `cp_return_commits`.

pub mod identification;
pub mod referral;
pub mod repatriation;
pub mod shelter;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use nrm_kernel::projection::Delivery;
use nrm_kernel::service::Kit;
use nrm_kernel::xborder::CountryCode;
use prost::Message as _;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::steps::{Origin, StepRow};

pub use identification::IdentificationProjection;
pub use referral::ReferralProjection;
pub use repatriation::RepatriationProjection;
pub use shelter::ShelterProjection;

/// The PostgreSQL channel every apply notifies (payload: the projection's name).
pub const CHANGED: &str = "casepath_changed";

/// Runs the projections of every context's stream while the service runs.
pub fn register(kit: &mut Kit, country: &CountryCode) {
    kit.project(identification::CONTEXT, IdentificationProjection::new(country));
    kit.project(referral::CONTEXT, ReferralProjection::new(country));
    kit.project(shelter::CONTEXT, ShelterProjection::new(country));
    kit.project(repatriation::CONTEXT, RepatriationProjection::new(country));
}

/// Who acted, as the steps record it: the agency of the commit's actor, or
/// nothing when the service acted by itself.
fn origin<'a>(country: &'a CountryCode, delivery: &'a Delivery) -> Origin<'a> {
    let agency = delivery
        .metadata
        .as_ref()
        .map(|m| &m.actor)
        .filter(|a| a.role != "system" && a.agency != "system")
        .map_or("", |a| a.agency.as_str());
    Origin {
        country: country.as_str(),
        agency,
    }
}

/// Writes the commit's steps (in one statement, each at most once) and
/// notifies [`CHANGED`] with `source`, in the apply's transaction.
///
/// # Errors
/// When the commit ID is malformed or the database fails.
async fn finish(
    conn: &mut PgConnection,
    source: &'static str,
    delivery: &Delivery,
    steps: &[StepRow],
) -> Result<(), anyhow::Error> {
    if steps.is_empty() {
        sqlx::query("SELECT pg_notify('casepath_changed', $1)")
            .bind(source)
            .execute(conn)
            .await?;
        return Ok(());
    }
    let commit_id: Uuid = delivery
        .commit
        .commit_id
        .parse()
        .with_context(|| format!("commit {} has a malformed ID", delivery.commit.commit_id))?;
    let causation_id = delivery.metadata.as_ref().map(|m| m.causation_id);
    let mut step_ids = Vec::with_capacity(steps.len());
    let mut subjects = Vec::with_capacity(steps.len());
    let mut parts = Vec::with_capacity(steps.len());
    let mut kinds = Vec::with_capacity(steps.len());
    let mut ats: Vec<DateTime<Utc>> = Vec::with_capacity(steps.len());
    let mut positions = Vec::with_capacity(steps.len());
    let mut encoded = Vec::with_capacity(steps.len());
    for (position, row) in steps.iter().enumerate() {
        step_ids.push(row.step_id);
        subjects.push(row.subject_id);
        parts.push(row.part());
        kinds.push(row.kind());
        ats.push(row.at);
        positions.push(i32::try_from(position)?);
        encoded.push(row.step.encode_to_vec());
    }
    sqlx::query(
        "WITH written AS (
           INSERT INTO cp_steps (source, step_id, subject_id, part, kind, at, commit_id, causation_id, stream_sequence, position, step)
           SELECT $1, s.step_id, s.subject_id, s.part, s.kind, s.at, $2, $3, $4, s.position, s.step
           FROM unnest($5::uuid[], $6::uuid[], $7::int4[], $8::int4[], $9::timestamptz[], $10::int4[], $11::bytea[])
             AS s(step_id, subject_id, part, kind, at, position, step)
           ON CONFLICT (source, step_id) DO NOTHING
         )
         SELECT pg_notify('casepath_changed', $1)",
    )
    .bind(source)
    .bind(commit_id)
    .bind(causation_id)
    .bind(i64::try_from(delivery.stream_sequence)?)
    .bind(&step_ids)
    .bind(&subjects)
    .bind(&parts)
    .bind(&kinds)
    .bind(&ats)
    .bind(&positions)
    .bind(&encoded)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes `source`'s own rows of `cp_steps` (each projection's reset).
async fn reset_steps(conn: &mut PgConnection, source: &'static str) -> Result<(), anyhow::Error> {
    sqlx::query("DELETE FROM cp_steps WHERE source = $1")
        .bind(source)
        .execute(conn)
        .await?;
    Ok(())
}
