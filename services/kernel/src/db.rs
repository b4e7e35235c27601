//! A service's own PostgreSQL database: created when missing, migrated with
//! the kernel's tables and the service's own, before anything else runs.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, PgPool, Postgres};

use crate::settings::DatabaseSettings;

/// The kernel's own migrations (event store, outbox, commands, checkpoints,
/// person keys, audit log), tracked apart from the service's migrations.
fn kernel_migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.dangerous_set_table_name("_nrm_kernel_migrations");
    migrator
}

/// Errors of connecting to or preparing the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The server URL or the database name is malformed.
    #[error("invalid database settings: {0}")]
    Settings(String),
    /// The server refused or failed.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Connection options of the service's database.
///
/// # Errors
/// [`DbError::Settings`] when the URL does not parse or the name is not a plain identifier.
pub fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, DbError> {
    if settings.name.is_empty()
        || !settings
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(DbError::Settings(
            "database name must be lowercase letters, digits and underscores".into(),
        ));
    }
    let options = PgConnectOptions::from_str(&settings.url).map_err(|e| DbError::Settings(e.to_string()))?;
    Ok(options.database(&settings.name).application_name("kopur"))
}

/// Creates the database when missing, connects a pool and runs the kernel's
/// migrations, then `service_migrations`.
///
/// # Errors
/// [`DbError`] when the server cannot be reached or a migration fails.
pub async fn connect_and_migrate(
    settings: &DatabaseSettings,
    service_migrations: &Migrator,
) -> Result<PgPool, DbError> {
    let options = connect_options(settings)?;
    let url = options.to_url_lossy().to_string();
    // A server still recovering (after a crash or an immediate restart) is
    // waited for, a minute at most, instead of failing the start.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let exists = loop {
        match Postgres::database_exists(&url).await {
            Ok(exists) => break exists,
            Err(e) if crate::retry::is_transient_sqlx(&e) && std::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "PostgreSQL not ready; waiting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if !exists {
        // Two processes may race to create it; the loser sees "already exists".
        if let Err(err) = Postgres::create_database(&url).await
            && !Postgres::database_exists(&url).await?
        {
            return Err(err.into());
        }
        tracing::info!(database = %settings.name, "created database");
    }
    // No ping before each use (a round trip per command); a broken connection
    // fails its statement, the command answers UNAVAILABLE and the client
    // retries with the same request ID.
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await?;
    kernel_migrator().run(&pool).await?;
    service_migrations.run(&pool).await?;
    Ok(pool)
}

/// Drops a database (used by tests and `make reset`-style tooling).
///
/// # Errors
/// [`DbError`] when the server refuses.
pub async fn drop_database(settings: &DatabaseSettings) -> Result<(), DbError> {
    let url = connect_options(settings)?.to_url_lossy().to_string();
    if Postgres::database_exists(&url).await? {
        Postgres::force_drop_database(&url).await?;
    }
    Ok(())
}

/// Begins on `side` a read-only transaction in the snapshot of `tx`, a
/// REPEATABLE READ (or SERIALIZABLE) transaction that is open on another
/// connection: what the two read agrees as if one transaction read it all,
/// so that a call can run its queries side by side. `tx` takes its snapshot
/// here if it has not yet, and must stay open until `side` has begun (it
/// does: the caller holds it).
///
/// The side connection is one the caller holds already, typically one
/// `pool.try_acquire()` found idle: a call that *waited* for a second
/// connection while holding one could wait for ever on a busy pool.
///
/// # Errors
/// A database error; `sqlx::Error::InvalidArgument` (not transient) when `tx` is neither
/// REPEATABLE READ nor SERIALIZABLE, or PostgreSQL's snapshot ID is not as
/// it writes them (it is put into the statement as text).
pub async fn begin_in_snapshot_of<'c>(
    tx: &mut sqlx::PgConnection,
    side: &'c mut sqlx::PgConnection,
) -> Result<sqlx::Transaction<'c, Postgres>, sqlx::Error> {
    use sqlx::Connection as _;
    let (isolation, snapshot): (String, String) =
        sqlx::query_as("SELECT current_setting('transaction_isolation'), pg_export_snapshot()")
            .fetch_one(&mut *tx)
            .await?;
    // A READ COMMITTED transaction exports a snapshot and takes a new one
    // for its next statement: the two would read different data.
    if !matches!(isolation.as_str(), "repeatable read" | "serializable") {
        return Err(sqlx::Error::InvalidArgument(format!(
            "a snapshot is read beside a {isolation} transaction, which does not keep it"
        )));
    }
    // SET TRANSACTION SNAPSHOT takes no parameter; the ID is hex digits and
    // hyphens (`00000003-0000001B-1`).
    if snapshot.is_empty() || !snapshot.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(sqlx::Error::InvalidArgument(
            "an exported snapshot's ID is not as PostgreSQL writes them".into(),
        ));
    }
    let mut beside = side.begin().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{snapshot}'"
    )))
    .execute(&mut *beside)
    .await?;
    Ok(beside)
}
