//! The append-only audit trail: who did what to which aggregate, when and why.
//! The table refuses updates and deletes (a trigger), so entries cannot be
//! rewritten by the service.

use sqlx::PgConnection;

use crate::store::Actor;

/// Records one access or command in the caller's transaction.
///
/// # Errors
/// When the database fails; the surrounding transaction then fails too.
pub async fn record(
    conn: &mut PgConnection,
    actor: &Actor,
    action: &str,
    subject_id: &str,
    purpose: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO audit_log (agency, role, officer, action, subject_id, purpose) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&actor.agency)
    .bind(&actor.role)
    .bind(&actor.officer)
    .bind(action)
    .bind(subject_id)
    .bind(purpose)
    .execute(conn)
    .await?;
    Ok(())
}
