//! The `free_capacity` read model: beds, holds and admissions per shelter and
//! category, and whether the coordinator approved the shelter (only approved
//! ones are listed), so that "where is a free bed for a woman in the Osh region"
//! answers from an index. Fed by the kernel's projection runner from the
//! service's own shelter subjects; can be dropped and rebuilt by replaying.
//!
//! Beside the counters it keeps each hold's category and status (a release
//! names only the hold) and each shelter's applied version (an event at or
//! below it changes nothing, whatever delivered it twice).

use anyhow::Context as _;
use nrm_kernel::projection::{Delivery, Projection};
use nrm_kernel::store::UnitOfWork;
use nrm_proto::shelter::v1 as pb;
use pb::shelter_event::Event;
use prost::Message as _;
use sqlx::PgConnection;
use uuid::Uuid;

/// The free-capacity projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct FreeCapacity;

/// Moves one hold from `from` to `to` and its bed counters by `held`/`admitted`.
async fn transition(
    conn: &mut PgConnection,
    hold_id: &str,
    from: &str,
    to: &str,
    held: i32,
    admitted: i32,
) -> Result<(), anyhow::Error> {
    let hold_id: Uuid = hold_id.parse().context("hold ID")?;
    sqlx::query(
        "WITH h AS (
             UPDATE free_capacity_holds SET status = $3 WHERE hold_id = $1 AND status = $2
             RETURNING shelter_id, category
         )
         UPDATE free_capacity f SET held = f.held + $4, admitted = f.admitted + $5
         FROM h WHERE f.shelter_id = h.shelter_id AND f.category = h.category",
    )
    .bind(hold_id)
    .bind(from)
    .bind(to)
    .bind(held)
    .bind(admitted)
    .execute(conn)
    .await?;
    Ok(())
}

impl Projection for FreeCapacity {
    fn name(&self) -> &'static str {
        "shelter_free_capacity"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["free_capacity", "free_capacity_shelters", "free_capacity_holds"]
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let Some(id) = delivery.commit.stream_id.strip_prefix("shelter-") else {
            return Ok(());
        };
        let shelter_id: Uuid = id.parse().context("shelter stream ID")?;
        let conn = uow.conn();
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT version FROM free_capacity_shelters WHERE shelter_id = $1 FOR UPDATE")
                .bind(shelter_id)
                .fetch_optional(&mut *conn)
                .await?;
        let mut last = applied;
        for committed in &delivery.commit.events {
            let version = i64::try_from(committed.version)?;
            if last.is_some_and(|v| version <= v) {
                continue;
            }
            let event = pb::ShelterEvent::decode(committed.payload.as_slice())
                .with_context(|| format!("event {} does not decode", committed.event_id))?
                .event
                .with_context(|| format!("event {} is empty", committed.event_id))?;
            match event {
                Event::ShelterRegistered(r) => {
                    sqlx::query(
                        "INSERT INTO free_capacity_shelters (shelter_id, region, version, approved)
                         VALUES ($1, $2, $3,
                                 EXISTS (SELECT 1 FROM shelters_approved_by_migration m WHERE m.shelter_id = $1))
                         ON CONFLICT (shelter_id) DO NOTHING",
                    )
                    .bind(shelter_id)
                    .bind(&r.region)
                    .bind(version)
                    .execute(&mut *conn)
                    .await?;
                    for c in &r.capacity {
                        sqlx::query(
                            "INSERT INTO free_capacity (shelter_id, category, region, capacity, approved)
                             SELECT $1, $2, $3, $4, approved FROM free_capacity_shelters WHERE shelter_id = $1
                             ON CONFLICT (shelter_id, category) DO NOTHING",
                        )
                        .bind(shelter_id)
                        .bind(c.category)
                        .bind(&r.region)
                        .bind(i32::try_from(c.beds)?)
                        .execute(&mut *conn)
                        .await?;
                    }
                }
                Event::ShelterApproved(_) => {
                    sqlx::query("UPDATE free_capacity_shelters SET approved = true WHERE shelter_id = $1")
                        .bind(shelter_id)
                        .execute(&mut *conn)
                        .await?;
                    sqlx::query("UPDATE free_capacity SET approved = true WHERE shelter_id = $1")
                        .bind(shelter_id)
                        .execute(&mut *conn)
                        .await?;
                }
                Event::CapacityChanged(c) => {
                    sqlx::query(
                        "INSERT INTO free_capacity (shelter_id, category, region, capacity, approved)
                         SELECT $1, $2, region, $3, approved FROM free_capacity_shelters WHERE shelter_id = $1
                         ON CONFLICT (shelter_id, category) DO UPDATE SET capacity = EXCLUDED.capacity",
                    )
                    .bind(shelter_id)
                    .bind(c.category)
                    .bind(i32::try_from(c.beds)?)
                    .execute(&mut *conn)
                    .await?;
                }
                Event::BedHeld(h) => {
                    let hold_id: Uuid = h.hold_id.parse().context("hold ID")?;
                    // A bed held for a person arriving from abroad names no referral.
                    let referral_id: Option<Uuid> = if h.referral_id.is_empty() {
                        None
                    } else {
                        Some(h.referral_id.parse().context("referral ID")?)
                    };
                    let inserted = sqlx::query(
                        "INSERT INTO free_capacity_holds (hold_id, shelter_id, category, referral_id, status)
                         VALUES ($1, $2, $3, $4, 'held') ON CONFLICT (hold_id) DO NOTHING",
                    )
                    .bind(hold_id)
                    .bind(shelter_id)
                    .bind(h.category)
                    .bind(referral_id)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    if inserted > 0 {
                        sqlx::query("UPDATE free_capacity SET held = held + 1 WHERE shelter_id = $1 AND category = $2")
                            .bind(shelter_id)
                            .bind(h.category)
                            .execute(&mut *conn)
                            .await?;
                    }
                }
                Event::HoldReleased(e) => transition(conn, &e.hold_id, "held", "released", -1, 0).await?,
                Event::HoldExpired(e) => transition(conn, &e.hold_id, "held", "expired", -1, 0).await?,
                Event::PersonAdmitted(e) => transition(conn, &e.hold_id, "held", "admitted", -1, 1).await?,
                Event::PersonDischarged(e) => transition(conn, &e.hold_id, "admitted", "discharged", 0, -1).await?,
                Event::NoBedAvailable(_) => {}
            }
            last = Some(version);
        }
        if last != applied
            && let Some(version) = last
        {
            sqlx::query("UPDATE free_capacity_shelters SET version = $2 WHERE shelter_id = $1")
                .bind(shelter_id)
                .bind(version)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("TRUNCATE free_capacity, free_capacity_shelters, free_capacity_holds")
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Every row of `free_capacity`, `free_capacity_shelters` and
    /// `free_capacity_holds`, whole, each tagged with its table (nothing in
    /// them is wall-clock).
    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        let query = "SELECT 'free_capacity ' || t::text FROM free_capacity t
             UNION ALL SELECT 'free_capacity_shelters ' || t::text FROM free_capacity_shelters t
             UNION ALL SELECT 'free_capacity_holds ' || t::text FROM free_capacity_holds t";
        Ok(Some(nrm_kernel::projection::rows_digest(conn, query).await?))
    }
}
