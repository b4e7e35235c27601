//! The `return_list` read model: every return of this deployment as the
//! list shows it (coded fields, the agencies holding it, where it stands),
//! from the service's own stream; dropped and rebuilt by replaying it.
//! Crossing commits (`xborder-*`) on the same stream change nothing here.

use anyhow::Context as _;
use nrm_kernel::projection::{Delivery, Projection};
use nrm_kernel::store::UnitOfWork;
use prost::Message as _;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::app::{fold, queries};
use crate::domain;

/// The list projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReturnList;

impl Projection for ReturnList {
    fn name(&self) -> &'static str {
        "repatriation_return_list"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["return_list"]
    }

    /// Folds the return from the store up to the commit's last version (the
    /// same fold commands use) and keeps the newest.
    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        let stream_id = &delivery.commit.stream_id;
        let Some(id) = stream_id.strip_prefix(&format!("{}-", domain::NAME)) else {
            return Ok(());
        };
        let return_id: Uuid = id.parse().context("return stream with a malformed ID")?;
        let Some(last) = delivery.commit.events.iter().map(|e| e.version).max() else {
            return Ok(());
        };
        let recorded: Vec<_> = uow
            .read_stream(stream_id)
            .await?
            .into_iter()
            .filter(|e| e.version <= last)
            .collect();
        let history = fold(&recorded).map_err(|e| anyhow::anyhow!("return {return_id}: {e}"))?;
        let opened_at = history.opened_at.context("return without events")?;
        let summary = queries::summary(return_id, &history);
        let holders: Vec<String> = history.state.holders().into_iter().map(str::to_owned).collect();
        sqlx::query(
            "INSERT INTO return_list (return_id, direction, status, holders, opened_at, version, summary)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (return_id) DO UPDATE SET direction = EXCLUDED.direction, status = EXCLUDED.status,
                 holders = EXCLUDED.holders, version = EXCLUDED.version, summary = EXCLUDED.summary
             WHERE return_list.version < EXCLUDED.version",
        )
        .bind(return_id)
        .bind(summary.direction)
        .bind(summary.status)
        .bind(&holders)
        .bind(opened_at)
        .bind(i64::try_from(last)?)
        .bind(summary.encode_to_vec())
        .execute(uow.conn())
        .await?;
        Ok(())
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("TRUNCATE return_list").execute(conn).await?;
        Ok(())
    }

    /// Every row of `return_list`, whole (`opened_at` is the event's time).
    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(
            nrm_kernel::projection::rows_digest(conn, "SELECT t::text FROM return_list t").await?,
        ))
    }
}
