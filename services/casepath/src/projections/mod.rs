//! casepath's read models: one projection per context stream, each writing
//! its own tables and its own rows of `cp_steps` (`source` = its name), and
//! announcing every change on the channel [`CHANGED`] in the same
//! transaction. What an event means is [`crate::domain::steps`]; here only
//! the SQL. Every write is idempotent (an upsert, or an update to a value
//! the event fixes), no apply reads another table, and a commit costs one
//! statement per row write, the last of them also writing all the commit's
//! steps and notifying ([`with_steps!`]); a commit without row writes, one
//! statement for its steps and the notification. A commit the mapping
//! refuses ([`crate::domain::steps::StepError`], or a malformed commit ID)
//! is returned as [`Unprocessable`], so the runner parks it at its first
//! failure instead of holding the stream behind it; what the mapping
//! skips is counted and logged with IDs only.
//!
//! - [`identification`]: `cp_cases`, `cp_notifications`.
//! - [`referral`]: `cp_consents`, `cp_referrals`, `cp_goals`.
//! - [`shelter`]: `cp_shelters`, `cp_holds`.
//! - [`repatriation`]: `cp_returns`, `cp_return_commits`.

/// `$write` (its parameters from `$13`) fused with the insert of a
/// commit's steps (`$1`–`$11`, bound by [`Steps::bind`]) and the
/// notification on [`CHANGED`] of what the commit touched (`$12`, see
/// [`crate::domain::changes`]; none when the kernel replays into a shadow
/// to compare, `nrm.shadow` = on: nothing live changed, and no watcher
/// should look again; none in a reset's transaction, which notified all:
/// [`reset_steps`]): one round trip for a commit's last write.
macro_rules! with_steps {
    ($write:literal) => {
        concat!(
            "WITH written AS (",
            $write,
            "), stepped AS (
               INSERT INTO cp_steps (source, step_id, subject_id, part, kind, at, commit_id, causation_id, stream_sequence, position, step)
               SELECT $1, s.step_id, s.subject_id, s.part, s.kind, s.at, $2, $3, $4, s.position, s.step
               FROM unnest($5::uuid[], $6::uuid[], $7::int4[], $8::int4[], $9::timestamptz[], $10::int4[], $11::bytea[])
                 AS s(step_id, subject_id, part, kind, at, position, step)
               ON CONFLICT (source, step_id) DO NOTHING
             )
             SELECT pg_notify('casepath_changed', $12) WHERE current_setting('nrm.shadow', true) IS DISTINCT FROM 'on'
               AND current_setting('nrm.casepath_reset', true) IS DISTINCT FROM 'on'"
        )
    };
}

pub mod identification;
pub mod referral;
pub mod repatriation;
pub mod shelter;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use nrm_kernel::projection::{Delivery, Unprocessable};
use nrm_kernel::service::Kit;
use nrm_kernel::xborder::CountryCode;
use prost::Message as _;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::changes::{self, Touches, WatchKey};
use crate::domain::steps::{Effect, Origin, Skipped, StepRow};

pub use identification::IdentificationProjection;
pub use referral::ReferralProjection;
pub use repatriation::RepatriationProjection;
pub use shelter::ShelterProjection;

/// The PostgreSQL channel every apply notifies (payload: the projection's
/// name and the tokens of what the commit touched,
/// [`Touched::payload`](changes::Touched::payload)).
pub const CHANGED: &str = "casepath_changed";

/// Runs the projections of every context's stream while the service
/// runs, notifying under `watch_key`.
pub fn register(kit: &mut Kit, country: &CountryCode, watch_key: &WatchKey) {
    kit.project(
        identification::CONTEXT,
        IdentificationProjection::new(country, watch_key),
    );
    kit.project(referral::CONTEXT, ReferralProjection::new(country, watch_key));
    kit.project(shelter::CONTEXT, ShelterProjection::new(country, watch_key));
    kit.project(repatriation::CONTEXT, RepatriationProjection::new(country, watch_key));
}

/// Counts and logs (IDs only) what the mapping of `delivery`'s commit left
/// out: malformed optional links stored as absent
/// (`nrm_casepath_malformed_links_total{projection, field}`).
fn report_skipped(projection: &'static str, delivery: &Delivery, skipped: &[Skipped]) {
    for s in skipped {
        match *s {
            Skipped::MalformedLink { event_id, field } => {
                metrics::counter!("nrm_casepath_malformed_links_total", "projection" => projection, "field" => field)
                    .increment(1);
                tracing::warn!(
                    projection,
                    stream_sequence = delivery.stream_sequence,
                    event_id = %event_id,
                    field,
                    "an optional link is not a UUID; stored as absent"
                );
            }
        }
    }
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

/// A query of a projection, borrowing what it binds.
type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// A commit's steps and what it touched, as the parameters `$1`–`$12` of
/// [`with_steps!`].
struct Steps {
    source: &'static str,
    commit_id: Uuid,
    causation_id: Option<Uuid>,
    stream_sequence: i64,
    step_ids: Vec<Uuid>,
    subjects: Vec<Uuid>,
    parts: Vec<i32>,
    kinds: Vec<i32>,
    ats: Vec<DateTime<Utc>>,
    positions: Vec<i32>,
    encoded: Vec<Vec<u8>>,
    /// The notification's payload.
    notice: String,
}

impl Steps {
    /// The steps of `delivery`'s commit, their position in it their index.
    fn of(source: &'static str, delivery: &Delivery, steps: &[StepRow], notice: String) -> Result<Self, anyhow::Error> {
        // Errors of the message itself: parked at once.
        let commit_id: Uuid = delivery
            .commit
            .commit_id
            .parse()
            .context("the commit's ID is not a UUID")
            .map_err(Unprocessable::new)?;
        let mut out = Self {
            source,
            commit_id,
            causation_id: delivery.metadata.as_ref().map(|m| m.causation_id),
            stream_sequence: i64::try_from(delivery.stream_sequence).map_err(Unprocessable::new)?,
            step_ids: Vec::with_capacity(steps.len()),
            subjects: Vec::with_capacity(steps.len()),
            parts: Vec::with_capacity(steps.len()),
            kinds: Vec::with_capacity(steps.len()),
            ats: Vec::with_capacity(steps.len()),
            positions: Vec::with_capacity(steps.len()),
            encoded: Vec::with_capacity(steps.len()),
            notice,
        };
        for (position, row) in steps.iter().enumerate() {
            out.step_ids.push(row.step_id);
            out.subjects.push(row.subject_id);
            out.parts.push(row.part());
            out.kinds.push(row.kind());
            out.ats.push(row.at);
            out.positions.push(i32::try_from(position)?);
            out.encoded.push(row.step.encode_to_vec());
        }
        Ok(out)
    }

    /// No steps, for the writes before a commit's last (the same
    /// notification: PostgreSQL sends a transaction's equal ones once).
    fn none(&self) -> Self {
        Self {
            source: self.source,
            commit_id: self.commit_id,
            causation_id: self.causation_id,
            stream_sequence: self.stream_sequence,
            step_ids: Vec::new(),
            subjects: Vec::new(),
            parts: Vec::new(),
            kinds: Vec::new(),
            ats: Vec::new(),
            positions: Vec::new(),
            encoded: Vec::new(),
            notice: self.notice.clone(),
        }
    }

    /// Binds `$1`–`$12`.
    fn bind<'q>(&'q self, query: Query<'q>) -> Query<'q> {
        query
            .bind(self.source)
            .bind(self.commit_id)
            .bind(self.causation_id)
            .bind(self.stream_sequence)
            .bind(&self.step_ids)
            .bind(&self.subjects)
            .bind(&self.parts)
            .bind(&self.kinds)
            .bind(&self.ats)
            .bind(&self.positions)
            .bind(&self.encoded)
            .bind(&self.notice)
    }
}

/// Writes what one commit does: each row write (`write` builds its query
/// with [`with_steps!`], binding the given steps first), the last one with
/// the commit's steps; the steps alone when there is no row write. Each in
/// the apply's transaction, [`CHANGED`] notified with `source` and what
/// the commit touched.
///
/// # Errors
/// When the commit ID is malformed ([`Unprocessable`]) or the database fails.
async fn write_effect<W: Touches>(
    conn: &mut PgConnection,
    source: &'static str,
    watch_key: &WatchKey,
    delivery: &Delivery,
    effect: &Effect<W>,
    write: impl for<'q> Fn(&'q W, &'q Steps) -> Query<'q>,
) -> Result<(), anyhow::Error> {
    let steps = Steps::of(
        source,
        delivery,
        &effect.steps,
        effect.touched().payload(source, watch_key),
    )?;
    let Some((last, before)) = effect.writes.split_last() else {
        steps.bind(sqlx::query(with_steps!("SELECT 1"))).execute(conn).await?;
        return Ok(());
    };
    let none = steps.none();
    for row in before {
        write(row, &none).execute(&mut *conn).await?;
    }
    write(last, &steps).execute(conn).await?;
    Ok(())
}

/// Deletes `source`'s own rows of `cp_steps` (each projection's reset),
/// and tells every watcher to look again once the reset's transaction
/// commits (unless in a shadow); the commits replayed in that transaction
/// then notify nothing more (`nrm.casepath_reset`, local to it): every
/// watcher looks at them anyway, and one notification per replayed commit
/// would only fill PostgreSQL's queue.
async fn reset_steps(conn: &mut PgConnection, source: &'static str) -> Result<(), anyhow::Error> {
    sqlx::query("DELETE FROM cp_steps WHERE source = $1")
        .bind(source)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "SELECT pg_notify('casepath_changed', $1), set_config('nrm.casepath_reset', 'on', true) \
         WHERE current_setting('nrm.shadow', true) IS DISTINCT FROM 'on'",
    )
    .bind(changes::everything(source))
    .execute(conn)
    .await?;
    Ok(())
}
