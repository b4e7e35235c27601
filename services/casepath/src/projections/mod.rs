//! casepath's read models: one projection per context stream, each writing
//! its own tables and its own rows of `cp_steps` (`source` = its name), and
//! announcing every change on the channel [`CHANGED`] in the same
//! transaction. What an event means is [`crate::domain::steps`]; here only
//! the SQL. Every write is idempotent (an upsert, or an update to a value
//! the event fixes) and no apply reads another table.
//!
//! A batch of commits (the runner hands over what has arrived, up to 500 in
//! a replay: [`Projection::apply_batch`]) is written with one statement per
//! kind of write and round, not one per write ([`write_batch`]): the
//! writes of every commit, in stream order, are dealt into rounds, the n-th
//! write to a row into the n-th round, so that a round changes each row at
//! most once and its statements may run in any order (a write that the
//! row's write before it absorbs, [`Write::then`], runs as part of that
//! one: a case opened and decided in one batch is inserted decided); a write that may
//! change several rows ([`Write::row`] `None`: an erasure, by person) runs
//! alone, between everything before it and everything after it. Then one
//! statement writes the batch's steps and notifies. A commit on its own is
//! a batch of one: there is one way to write. A commit the mapping refuses
//! ([`crate::domain::steps::StepError`], or a malformed commit ID) fails
//! the batch naming it ([`AtCommit`], [`Unprocessable`]), so the runner
//! parks it at its first failure instead of holding the stream behind it;
//! what the mapping skips is counted and logged with IDs only.
//!
//! - [`identification`]: `cp_cases`, `cp_notifications`.
//! - [`referral`]: `cp_consents`, `cp_referrals`, `cp_goals`.
//! - [`shelter`]: `cp_shelters`, `cp_holds`.
//! - [`repatriation`]: `cp_returns`, `cp_return_commits`.

pub mod identification;
pub mod referral;
pub mod repatriation;
pub mod shelter;

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use nrm_kernel::projection::{AtCommit, Delivery, Unprocessable};
use nrm_kernel::service::Kit;
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::telemetry;
use nrm_kernel::xborder::CountryCode;
use prost::Message as _;
use sqlx::PgConnection;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::domain::changes::{self, Touches, WatchKey};
use crate::domain::steps::{Effect, Origin, Skipped, StepError};

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

/// A write of one of the projections as a batch runs it ([`write_batch`]).
trait Write: Touches + Clone + Send + Sync + Sized {
    /// The one row the write changes, as its table and primary key: its
    /// statement must read and change that row only (so that writes to
    /// distinct rows commute). `None` when it may change or read several
    /// rows: then it runs alone, after every write before it and before
    /// every write after it.
    fn row(&self) -> Option<(&'static str, Uuid)>;

    /// Runs `round` (writes to distinct rows: their order does not matter)
    /// with one statement per kind of write in it.
    fn run<'a>(
        conn: &'a mut PgConnection,
        round: &'a [&'a Self],
    ) -> impl Future<Output = Result<(), anyhow::Error>> + Send + 'a;

    /// One write that does what `self` and then `later`, the next write to
    /// the same row, do (to a row that is there and to one that is not),
    /// when there is one: a batch then runs it in `self`'s round instead of
    /// both. `None` (the default): each runs in its own round.
    fn then(&self, later: &Self) -> Option<Self> {
        let _ = later;
        None
    }

    /// Derives again, from the projection's own records, what it keeps per
    /// person for the statistics (`cp_person_cases`, `cp_person_referrals`)
    /// for every person whose records `writes` (all of a batch's, after
    /// all its rounds) may have changed. Not during a rebuild, which derives
    /// them for everyone once at its end ([`Projection::after_replay`]).
    /// Nothing by default.
    ///
    /// The persons are found from the written rows as they are after the
    /// writes: no write deletes a record or moves it to another person. A
    /// write that ever does must name the person it took the record from
    /// (as an erasure names its person), or that person's facts would stay
    /// as they were.
    ///
    /// [`Projection::after_replay`]: nrm_kernel::projection::Projection::after_replay
    fn refresh<'a>(
        conn: &'a mut PgConnection,
        writes: &'a [&'a Self],
    ) -> impl Future<Output = Result<(), anyhow::Error>> + Send + 'a {
        let _ = (conn, writes);
        async { Ok(()) }
    }
}

/// The writes of `effects` (in stream order) in the rounds they run in:
/// the n-th write to a row since the last write that runs alone in the
/// n-th round after it; such a write in a round of its own. A write that
/// the row's write before it absorbs ([`Write::then`]) runs as part of it.
fn rounds<W: Write>(effects: &[Effect<W>]) -> Vec<Vec<Cow<'_, W>>> {
    let mut rounds: Vec<Vec<Cow<'_, W>>> = Vec::new();
    // Rounds since the last write that ran alone.
    let mut open: Vec<Vec<Cow<'_, W>>> = Vec::new();
    // Per row: its writes in `open` so far, and where the last one is.
    let mut writes_of: HashMap<(&'static str, Uuid), (usize, usize)> = HashMap::new();
    for write in effects.iter().flat_map(|e| &e.writes) {
        match write.row() {
            Some(row) => {
                let seen = writes_of.get(&row).copied();
                if let Some((n, at)) = seen
                    && let Some(both) = open[n - 1][at].then(write)
                {
                    open[n - 1][at] = Cow::Owned(both);
                    continue;
                }
                let n = seen.map_or(0, |(n, _)| n);
                if open.len() == n {
                    open.push(Vec::new());
                }
                open[n].push(Cow::Borrowed(write));
                writes_of.insert(row, (n + 1, open[n].len() - 1));
            }
            None => {
                rounds.append(&mut open);
                rounds.push(vec![Cow::Borrowed(write)]);
                writes_of.clear();
            }
        }
    }
    rounds.append(&mut open);
    rounds
}

/// Applies `deliveries` (in stream order) to `source`'s read model, as
/// `map` reads each commit (see the module's rules).
///
/// # Errors
/// A commit the mapping refuses or whose ID is malformed: [`AtCommit`]
/// of [`Unprocessable`]; the database's errors as they are.
async fn apply_commits<W: Write>(
    uow: &mut UnitOfWork,
    source: &'static str,
    country: &CountryCode,
    watch_key: &WatchKey,
    deliveries: &[&Delivery],
    map: impl Fn(&Delivery, &Origin<'_>) -> Result<Effect<W>, StepError>,
) -> Result<(), anyhow::Error> {
    let span = tracing::info_span!(
        "projection.apply_batch",
        projection = source,
        commits = deliveries.len(),
        first_sequence = deliveries.first().map(|d| d.stream_sequence),
        last_sequence = deliveries.last().map(|d| d.stream_sequence),
    );
    // A commit on its own stays in the trace of the command that caused it;
    // a batch of several (a backlog, a replay) is a span of its own.
    if let [delivery] = deliveries
        && let Some(metadata) = &delivery.metadata
    {
        telemetry::continue_trace(&span, metadata);
    }
    async {
        let mut effects = Vec::with_capacity(deliveries.len());
        for (index, delivery) in deliveries.iter().enumerate() {
            let effect = map(delivery, &origin(country, delivery)).map_err(|err| AtCommit {
                index,
                source: Unprocessable::new(err).into(),
            })?;
            report_skipped(source, delivery, &effect.skipped);
            effects.push(effect);
        }
        let replaying = uow.replaying();
        write_batch(uow.conn(), replaying, source, watch_key, deliveries, &effects).await
    }
    .instrument(span)
    .await
}

/// Writes what `effects` (of `deliveries`, one each) do: their rounds of
/// writes, the facts of the persons they touched ([`Write::refresh`],
/// unless `replaying`), then their steps and the notification on
/// [`CHANGED`] of what each commit touched. Commits that change nothing
/// write and notify nothing.
async fn write_batch<W: Write>(
    conn: &mut PgConnection,
    replaying: bool,
    source: &'static str,
    watch_key: &WatchKey,
    deliveries: &[&Delivery],
    effects: &[Effect<W>],
) -> Result<(), anyhow::Error> {
    let steps = Steps::of(source, watch_key, deliveries, effects, replaying)?;
    for round in rounds(effects) {
        let round: Vec<&W> = round.iter().map(|write| &**write).collect();
        W::run(&mut *conn, &round).await?;
    }
    let writes: Vec<&W> = effects.iter().flat_map(|e| &e.writes).collect();
    if !replaying && !writes.is_empty() {
        W::refresh(&mut *conn, &writes).await?;
    }
    steps.write(conn).await
}

/// Inserts a batch's steps and notifies what each of its commits touched
/// (none when the kernel replays into a shadow to compare, `nrm.shadow` =
/// on: nothing live changed, and no watcher should look again; none in a
/// reset's transaction, which notified all: [`reset_steps`]).
const STEPS: &str = "WITH stepped AS (
   INSERT INTO cp_steps (source, step_id, subject_id, part, kind, at, commit_id, causation_id, stream_sequence, position, step)
   SELECT $1, s.step_id, s.subject_id, s.part, s.kind, s.at, s.commit_id, s.causation_id, s.stream_sequence, s.position, s.step
   FROM unnest($2::uuid[], $3::uuid[], $4::int4[], $5::int4[], $6::timestamptz[], $7::uuid[], $8::uuid[], $9::int8[],
               $10::int4[], $11::bytea[]) WITH ORDINALITY
     AS s(step_id, subject_id, part, kind, at, commit_id, causation_id, stream_sequence, position, step, n)
   ORDER BY s.n
   ON CONFLICT (source, step_id) DO NOTHING
 )
 SELECT pg_notify('casepath_changed', n.payload) FROM unnest($12::text[]) AS n(payload)
 WHERE current_setting('nrm.shadow', true) IS DISTINCT FROM 'on'
   AND current_setting('nrm.casepath_reset', true) IS DISTINCT FROM 'on'";

/// A batch's steps (a commit's position in it their index in the commit)
/// and the notifications of its commits, as the parameters of [`STEPS`].
#[derive(Default)]
struct Steps {
    source: &'static str,
    step_ids: Vec<Uuid>,
    subjects: Vec<Uuid>,
    parts: Vec<i32>,
    kinds: Vec<i32>,
    ats: Vec<DateTime<Utc>>,
    commit_ids: Vec<Uuid>,
    causations: Vec<Option<Uuid>>,
    sequences: Vec<i64>,
    positions: Vec<i32>,
    encoded: Vec<Vec<u8>>,
    /// Commits that change something.
    changed: usize,
    /// One payload per commit that changes something; none in a rebuild,
    /// whose reset told every watcher to look again ([`reset_steps`]).
    notices: Vec<String>,
}

impl Steps {
    /// The steps and notifications of `effects`, the effects of `deliveries`
    /// (no notifications when `replaying`).
    fn of<W: Touches>(
        source: &'static str,
        watch_key: &WatchKey,
        deliveries: &[&Delivery],
        effects: &[Effect<W>],
        replaying: bool,
    ) -> Result<Self, anyhow::Error> {
        let mut out = Self {
            source,
            ..Self::default()
        };
        for (index, (delivery, effect)) in deliveries.iter().zip(effects).enumerate() {
            if effect.is_empty() {
                continue;
            }
            // Errors of the message itself: parked at once.
            let unprocessable = |err: anyhow::Error| AtCommit {
                index,
                source: Unprocessable::new(err).into(),
            };
            let commit_id: Uuid = delivery
                .commit
                .commit_id
                .parse()
                .context("the commit's ID is not a UUID")
                .map_err(unprocessable)?;
            let sequence = i64::try_from(delivery.stream_sequence).map_err(|e| unprocessable(e.into()))?;
            let causation = delivery.metadata.as_ref().map(|m| m.causation_id);
            for (position, row) in effect.steps.iter().enumerate() {
                out.step_ids.push(row.step_id);
                out.subjects.push(row.subject_id);
                out.parts.push(row.part());
                out.kinds.push(row.kind());
                out.ats.push(row.at);
                out.commit_ids.push(commit_id);
                out.causations.push(causation);
                out.sequences.push(sequence);
                out.positions.push(i32::try_from(position)?);
                out.encoded.push(row.step.encode_to_vec());
            }
            out.changed += 1;
            if !replaying {
                out.notices.push(effect.touched().payload(source, watch_key));
            }
        }
        Ok(out)
    }

    /// Runs [`STEPS`]; nothing when no commit changed anything.
    async fn write(self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        if self.changed == 0 {
            return Ok(());
        }
        sqlx::query(STEPS)
            .bind(self.source)
            .bind(self.step_ids)
            .bind(self.subjects)
            .bind(self.parts)
            .bind(self.kinds)
            .bind(self.ats)
            .bind(self.commit_ids)
            .bind(self.causations)
            .bind(self.sequences)
            .bind(self.positions)
            .bind(self.encoded)
            .bind(self.notices)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// One column of a round's rows of one kind.
fn column<R, T>(rows: &[R], value: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(value).collect()
}

/// An integer array as PostgreSQL's literal (`{1,2}`), for a column of
/// arrays (an `int4[]` per row cannot be a parameter of `unnest`): digits
/// and commas only, whatever the values.
fn int_array(values: &[i32]) -> String {
    let mut out = String::with_capacity(2 + values.len() * 3);
    out.push('{');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&v.to_string());
    }
    out.push('}');
    out
}

/// Derives a table of per-person facts for everyone
/// ([`Projection::after_replay`]): empties `table` (every row of it is
/// derived) and runs `insert`, a plain insert of every person's row (no
/// conflict to check for), with the memory for its groupings that it needs
/// to stay off the disk (at least 64 MB); the setting is put back after.
/// All of it in a transaction of its own (a savepoint inside a rebuild's),
/// so that nobody sees the table emptied, whoever calls it.
///
/// [`Projection::after_replay`]: nrm_kernel::projection::Projection::after_replay
async fn derive_all(conn: &mut PgConnection, table: &'static str, insert: &'static str) -> Result<(), anyhow::Error> {
    use sqlx::Connection as _;
    let mut tx = conn.begin().await?;
    // The table is one of the projections' own names, never a caller's.
    sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}")))
        .execute(&mut *tx)
        .await?;
    let before: String = sqlx::query_scalar("SELECT current_setting('work_mem')")
        .fetch_one(&mut *tx)
        .await?;
    // Raised to 64 MB, never lowered (`setting` is in kB).
    sqlx::query(
        "SELECT set_config('work_mem', greatest(setting::bigint, 65536)::text || 'kB', true)
         FROM pg_settings WHERE name = 'work_mem'",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query(insert).execute(&mut *tx).await?;
    sqlx::query("SELECT set_config('work_mem', $1, true)")
        .bind(before)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::changes::Touched;

    /// A write of row `.0` (`None`: of several rows), named `.1`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct W(Option<u128>, &'static str);

    impl Touches for W {
        fn touch(&self, _: &mut Touched) {}
    }

    impl Write for W {
        fn row(&self) -> Option<(&'static str, Uuid)> {
            self.0.map(|n| ("t", Uuid::from_u128(n)))
        }

        /// An "open…" write absorbs the "fold…" writes to its row after it.
        fn then(&self, later: &Self) -> Option<Self> {
            (self.0.is_some() && self.0 == later.0 && self.1.starts_with("open") && later.1.starts_with("fold"))
                .then_some(W(self.0, "open+"))
        }

        async fn run(_: &mut PgConnection, _: &[&Self]) -> Result<(), anyhow::Error> {
            Ok(())
        }
    }

    fn effects(commits: &[&[W]]) -> Vec<Effect<W>> {
        commits
            .iter()
            .map(|writes| Effect {
                writes: writes.to_vec(),
                ..Effect::default()
            })
            .collect()
    }

    fn names(rounds: &[Vec<Cow<'_, W>>]) -> Vec<Vec<&'static str>> {
        rounds.iter().map(|r| r.iter().map(|w| w.1).collect()).collect()
    }

    #[test]
    fn each_write_to_a_row_runs_in_a_round_after_the_one_before_it() {
        let e = effects(&[
            &[W(Some(1), "open 1"), W(Some(1), "screen 1")],
            &[W(Some(2), "open 2")],
            &[W(Some(1), "decide 1"), W(Some(2), "screen 2")],
            &[W(Some(3), "open 3")],
        ]);
        assert_eq!(
            names(&rounds(&e)),
            [
                vec!["open 1", "open 2", "open 3"],
                vec!["screen 1", "screen 2"],
                vec!["decide 1"],
            ]
        );
    }

    #[test]
    fn a_write_of_several_rows_runs_alone_between_what_came_before_and_after_it() {
        let e = effects(&[
            &[W(Some(1), "open 1"), W(Some(2), "open 2")],
            &[W(Some(1), "screen 1")],
            &[W(None, "erase")],
            &[W(Some(1), "decide 1"), W(Some(3), "open 3")],
            &[W(Some(1), "review 1")],
        ]);
        assert_eq!(
            names(&rounds(&e)),
            [
                vec!["open 1", "open 2"],
                vec!["screen 1"],
                vec!["erase"],
                vec!["decide 1", "open 3"],
                vec!["review 1"],
            ]
        );
    }

    #[test]
    fn a_write_its_rows_write_before_absorbs_runs_as_part_of_that_one_and_never_across_a_write_of_several_rows() {
        let e = effects(&[
            &[W(Some(1), "open 1"), W(Some(1), "fold 1"), W(Some(2), "open 2")],
            &[W(Some(2), "fold 2"), W(Some(3), "open 3"), W(Some(3), "decide 3")],
            &[W(Some(3), "fold 3"), W(Some(1), "fold 1 again")],
            &[W(None, "erase")],
            &[W(Some(1), "fold 1 after")],
        ]);
        assert_eq!(
            names(&rounds(&e)),
            [
                // Row 3's decision absorbs nothing: its fold runs after it.
                vec!["open+", "open+", "open 3"],
                vec!["decide 3"],
                vec!["fold 3"],
                vec!["erase"],
                // The erasure ran between: no opening before it absorbs this.
                vec!["fold 1 after"],
            ]
        );
    }

    #[test]
    fn no_round_writes_a_row_twice_and_each_row_keeps_its_order() {
        // Rows 0..5, written in a shuffled but fixed order, several times each.
        let order = [3u128, 1, 3, 0, 4, 1, 1, 2, 0, 3, 4, 4, 2, 1];
        let labels = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n"];
        let writes: Vec<W> = order.iter().zip(labels).map(|(&row, l)| W(Some(row), l)).collect();
        let e = vec![Effect {
            writes: writes.clone(),
            ..Effect::default()
        }];
        let rounds = rounds(&e);
        assert_eq!(
            rounds.iter().map(Vec::len).sum::<usize>(),
            writes.len(),
            "every write runs once"
        );
        for round in &rounds {
            let mut rows: Vec<_> = round.iter().map(|w| w.0).collect();
            rows.sort_unstable();
            rows.dedup();
            assert_eq!(rows.len(), round.len(), "a round writes a row twice: {round:?}");
        }
        for row in 0..5 {
            let in_rounds: Vec<&str> = rounds
                .iter()
                .flatten()
                .filter(|w| w.0 == Some(row))
                .map(|w| w.1)
                .collect();
            let in_stream: Vec<&str> = writes.iter().filter(|w| w.0 == Some(row)).map(|w| w.1).collect();
            assert_eq!(in_rounds, in_stream, "row {row} out of order");
        }
    }

    #[test]
    fn an_array_literal_is_digits_and_commas() {
        assert_eq!(int_array(&[]), "{}");
        assert_eq!(int_array(&[3]), "{3}");
        assert_eq!(int_array(&[1, -2, 30]), "{1,-2,30}");
    }
}
