//! `ListPaths` and `GetStatistics` (the coordinator's). For `ListPaths` one
//! set-based query ([`FACTS`]) gives every person's facts (first report,
//! coded person, counts of open and closed records, what waits) and the
//! stage is decided on them in Rust by [`crate::domain::stage::stage`].
//! `GetStatistics` counts in the database ([`STATS`]: the same persons and
//! links, the stage by the same precedence in SQL, over the facts the
//! projections keep per person, and the dimensions counted over cells of
//! persons); the times are PostgreSQL's `percentile_cont` over the measured
//! intervals.
//! The persons' counts, the anonymous notifications and the times are
//! three queries run side by side. Both queries share how a return links
//! to a person (`returns_of_persons!`) and which case codes a person
//! (the first: `first_case!`, and `cp_person_cases` for [`STATS`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use nrm_kernel::command::CallContext;
use nrm_kernel::error::{AppError, Violations};
use nrm_kernel::paging::{self, Cursor, Pager};
use nrm_kernel::validate;
use nrm_proto::casepath::v1 as pb;
use nrm_proto::common::v1 as common;
use nrm_proto::identification::v1 as id;
use sqlx::Row as _;
use uuid::Uuid;

use super::{Casepath, duration, ts};
use crate::domain::stage::{self, Facts};
use crate::domain::suppress;

/// One person's facts, from [`FACTS`].
#[derive(Debug, Clone)]
struct PersonFacts {
    person_id: Uuid,
    first_reported_at: DateTime<Utc>,
    gender: i32,
    age_band: i32,
    child: bool,
    citizenship: String,
    erased: bool,
    facts: Facts,
    waiting_decisions: Vec<DateTime<Utc>>,
    overdue_referrals: i64,
}

/// The coded person of a person with several cases: the first case's
/// (after a `cs` of persons with their number of `cases`).
macro_rules! first_case {
    () => {
        r"fc AS (
    SELECT DISTINCT ON (c.person_id) c.person_id, c.gender, c.age_band, c.citizenship, c.country_of_exploitation
    FROM cp_cases c JOIN cs ON cs.person_id = c.person_id AND cs.cases > 1
    ORDER BY c.person_id, c.reported_at, c.case_id
)"
    };
}

/// The returns of a person (`pr`): by its cases' return IDs and by
/// `foreign_case`, the case a return's foreign reference names (a column
/// PostgreSQL derives from the reference when the row is written). The
/// second link looks the case up by its primary key, one return at a time
/// (the planner would rather read every case to hash them).
macro_rules! returns_of_persons {
    () => {
        r"pr AS (
    SELECT c.person_id, r.return_id, r.status, r.handed_over_at
    FROM cp_cases c JOIN cp_returns r ON r.return_id = c.return_id
    UNION
    SELECT x.person_id, x.return_id, x.status, x.handed_over_at FROM (
        SELECT (SELECT c.person_id FROM cp_cases c WHERE c.case_id = r.foreign_case) AS person_id,
            r.return_id, r.status, r.handed_over_at
        FROM cp_returns r WHERE r.foreign_case IS NOT NULL
        OFFSET 0
    ) AS x WHERE x.person_id IS NOT NULL
)"
    };
}

/// What links to a person beyond its cases (after a `cs` of persons):
/// returns by the cases' return IDs and by the case a return's reference names
/// (`pr`, counted in `rt`), holds admitted by the person's referrals and by
/// a commit of the person's returns (`sh`), plan goals (`gl`). [`STATS`]
/// links the same records, in one grouping (`lk`).
macro_rules! linked {
    () => {
        concat!(
            returns_of_persons!(),
            r",
rt AS (
    SELECT person_id,
        count(*) FILTER (WHERE handed_over_at IS NULL AND status NOT IN (10, 11)) AS open,
        count(*) FILTER (WHERE handed_over_at IS NOT NULL OR status = 10) AS handed_over
    FROM pr GROUP BY person_id
),
sh AS (
    SELECT person_id, count(DISTINCT hold_id) AS admitted FROM (
        SELECT r.person_id, h.hold_id FROM cp_holds h JOIN cp_referrals r ON r.referral_id = h.referral_id
        WHERE h.status = 'admitted'
        UNION ALL
        SELECT pr.person_id, h.hold_id FROM cp_holds h
            JOIN cp_return_commits rc ON rc.commit_id = h.cause_commit_id
            JOIN pr ON pr.return_id = rc.return_id
        WHERE h.status = 'admitted'
    ) x GROUP BY person_id
),
gl AS (
    SELECT person_id, count(*) AS goals, count(met_at) AS met, max(met_at) AS last_met_at
    FROM cp_goals GROUP BY person_id
)"
        )
    };
}

/// A person's coded fields (of the first case) and counts of linked
/// records, from `cs` and the CTEs of [`first_case!`] and [`linked!`] and
/// an `rf` of referral counts; the end of a select list and its `FROM`.
macro_rules! person_columns {
    () => {
        r"    coalesce(fc.gender, cs.gender) AS gender, coalesce(fc.age_band, cs.age_band) AS age_band,
    coalesce(fc.citizenship, cs.citizenship) AS citizenship,
    coalesce(fc.country_of_exploitation, cs.country_of_exploitation) AS country_of_exploitation,
    coalesce(rf.pending, 0) AS pending, coalesce(rf.accepted, 0) AS accepted, coalesce(rf.closed, 0) AS closed,
    coalesce(rt.open, 0) AS returns_open, coalesce(rt.handed_over, 0) AS handed_over,
    coalesce(sh.admitted, 0) AS admitted,
    coalesce(gl.goals, 0) AS goals, coalesce(gl.met, 0) AS met, gl.last_met_at
FROM cs
LEFT JOIN fc USING (person_id)
LEFT JOIN rf USING (person_id)
LEFT JOIN rt USING (person_id)
LEFT JOIN sh USING (person_id)
LEFT JOIN gl USING (person_id)"
    };
}

/// Every person first reported in [$1, $2) (NULL: unbounded) with the facts
/// the stage is decided on; `$3` is now. Returns of a person are linked by
/// the cases' return IDs and by the case a return's reference names, holds by
/// the person's referrals and by a commit of the person's returns. Each
/// table is aggregated once per person (no per-person round trips); the
/// coded person is the one of the first case.
const FACTS: &str = concat!(
    r"
WITH cs AS (
    SELECT * FROM (
        SELECT c.person_id,
            count(*) AS cases,
            min(c.reported_at) AS first_reported_at,
            min(c.gender) AS gender,
            min(c.age_band) AS age_band,
            min(c.citizenship) AS citizenship,
            min(c.country_of_exploitation) AS country_of_exploitation,
            bool_or(c.child) AS child,
            bool_or(c.erased_at IS NOT NULL) AS erased,
            bool_or(c.status = 2 OR (c.child AND c.status = 1)) AS presumed,
            bool_or(c.status = 3) AS identified,
            bool_or(c.status = 4) AS not_identified,
            coalesce(array_agg(c.decision_waiting_since) FILTER (WHERE c.decision_waiting_since IS NOT NULL), '{}') AS waiting,
            min(c.decided_at) FILTER (WHERE c.decision = 1) AS identified_at
        FROM cp_cases c
        GROUP BY c.person_id
    ) AS g
    WHERE ($1::timestamptz IS NULL OR g.first_reported_at >= $1)
      AND ($2::timestamptz IS NULL OR g.first_reported_at < $2)
),
",
    first_case!(),
    r",
rf AS (
    SELECT person_id,
        count(*) FILTER (WHERE status = 'pending') AS pending,
        count(*) FILTER (WHERE status = 'accepted') AS accepted,
        count(*) FILTER (WHERE status = 'closed' AND outcome <> 0) AS closed,
        count(*) FILTER (WHERE status = 'pending' AND waiting_since IS NOT NULL
                           AND coalesce(answer_due_at, waiting_since) < $3) AS overdue
    FROM cp_referrals GROUP BY person_id
),
",
    linked!(),
    r"
SELECT cs.person_id, cs.first_reported_at, cs.child, cs.erased, cs.presumed, cs.identified, cs.not_identified,
    cs.waiting, cs.identified_at,
    coalesce(rf.overdue, 0) AS overdue,
",
    person_columns!(),
    r"
"
);

/// The counts of the persons first reported in [$1, $2), one row per
/// (dimension, value), and the time from identification to reintegration;
/// `{case}` is replaced by [`stage::sql_case`]. The same persons and facts
/// as [`FACTS`], with what the stage needs only, read from the facts the
/// projections keep per person (`cp_person_cases` from a person's cases,
/// `cp_person_referrals` from their referrals and goals) rather than from
/// every record:
///
/// - `lk`: the records of other streams linked to a person (returns by
///   `returns_of_persons!`, admitted holds as in `linked!`) into bits, as
///   the stage asks only whether a person has one of a kind (an open, a
///   handed-over return; an admitted hold).
/// - `cells`: the persons whose first report is in the period (an index
///   range of `cp_person_cases`), their bits joined (the cases' and the
///   referrals' facts and `lk`), grouped by coded values, bits and the time
///   from identification to the last goal met (some thousand cells).
/// - the dimensions and the total are counted over the cells with their
///   stage; the reintegration times are each cell's, `n` times.
/// - `forms`: the persons of the period by each of their forms, from
///   `cp_person_cases` alone (no stage needs them). Grouping the cells by
///   the forms as well cost a fifth of the query: an array is slow to hash.
const STATS: &str = concat!(
    r"
WITH ",
    returns_of_persons!(),
    r#",
lk AS (
    SELECT person_id, bit_or(f) AS flags FROM (
        SELECT person_id, CASE WHEN handed_over_at IS NULL AND status NOT IN (10, 11) THEN 64 ELSE 0 END
            | CASE WHEN handed_over_at IS NOT NULL OR status = 10 THEN 128 ELSE 0 END AS f
        FROM pr
        UNION ALL
        SELECT r.person_id, 256
        FROM cp_holds h JOIN cp_referrals r ON r.referral_id = h.referral_id
        WHERE h.status = 'admitted'
        UNION ALL
        SELECT pr.person_id, 256
        FROM cp_holds h JOIN cp_return_commits rc ON rc.commit_id = h.cause_commit_id JOIN pr ON pr.return_id = rc.return_id
        WHERE h.status = 'admitted'
    ) AS l GROUP BY person_id
),
cells AS (
    SELECT pc.case_flags | coalesce(pf.flags, 0) | coalesce(lk.flags, 0) AS flags,
        pc.gender, pc.age_band, pc.citizenship, pc.country_of_exploitation,
        CASE WHEN coalesce(pf.flags, 0) & 1536 = 512 THEN date_part('epoch', pf.last_met_at - pc.identified_at) END AS secs,
        count(*) AS n
    FROM cp_person_cases pc
    LEFT JOIN cp_person_referrals pf USING (person_id)
    LEFT JOIN lk USING (person_id)
    WHERE pc.first_reported_at >= $1 AND pc.first_reported_at < $2
    GROUP BY 1, 2, 3, 4, 5, 6
),
s AS (
    SELECT {case} AS stage, p.gender, p.age_band, lower(p.citizenship) AS citizenship,
        lower(p.country_of_exploitation) AS country_of_exploitation, p.secs, p.n
    FROM cells CROSS JOIN LATERAL (
        SELECT cells.flags & 1 <> 0 AS presumed, cells.flags & 2 <> 0 AS identified, cells.flags & 4 <> 0 AS not_identified,
            (cells.flags & 8 <> 0)::int AS pending, (cells.flags & 16 <> 0)::int AS accepted, (cells.flags & 32 <> 0)::int AS closed,
            (cells.flags & 64 <> 0)::int AS returns_open, (cells.flags & 128 <> 0)::int AS handed_over,
            (cells.flags & 256 <> 0)::int AS admitted,
            (cells.flags & 512 <> 0)::int AS goals, (cells.flags & 1536 = 512)::int AS met,
            cells.gender, cells.age_band, cells.citizenship, cells.country_of_exploitation, cells.secs, cells.n
    ) AS p
),
done AS (
    SELECT secs FROM s CROSS JOIN generate_series(1, s.n) WHERE secs IS NOT NULL
),
forms AS (
    SELECT f, count(*) AS n FROM cp_person_cases pc CROSS JOIN LATERAL unnest(pc.exploitation_forms) AS f
    WHERE pc.first_reported_at >= $1 AND pc.first_reported_at < $2
    GROUP BY f
)
SELECT CASE WHEN GROUPING(stage) = 0 THEN 'stage' WHEN GROUPING(gender) = 0 THEN 'gender'
        WHEN GROUPING(age_band) = 0 THEN 'age_band' WHEN GROUPING(citizenship) = 0 THEN 'citizenship'
        WHEN GROUPING(country_of_exploitation) = 0 THEN 'country_of_exploitation' ELSE 'persons' END AS dimension,
    coalesce(stage::text, gender::text, age_band::text, citizenship, country_of_exploitation, '') AS value,
    sum(n)::float8 AS n
FROM s GROUP BY GROUPING SETS ((stage), (gender), (age_band), (citizenship), (country_of_exploitation), ())
UNION ALL SELECT 'exploitation_form', f::text, sum(n)::float8 FROM forms GROUP BY 2
UNION ALL SELECT 'reintegration', 'samples', count(*) FROM done
UNION ALL SELECT 'reintegration', 'median', percentile_cont(0.5) WITHIN GROUP (ORDER BY secs) FROM done
UNION ALL SELECT 'reintegration', 'p90', percentile_cont(0.9) WITHIN GROUP (ORDER BY secs) FROM done"#
);

fn count(r: &sqlx::postgres::PgRow, column: &str) -> Result<u32, sqlx::Error> {
    let n: i64 = r.try_get(column)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

impl Casepath {
    async fn facts(
        &self,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<Vec<PersonFacts>, AppError> {
        // The plan's estimates are far off for these aggregates; JIT
        // compiling it costs more than running it.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
        let rows = sqlx::query(FACTS)
            .bind(from)
            .bind(to)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                Ok(PersonFacts {
                    person_id: r.try_get("person_id")?,
                    first_reported_at: r.try_get("first_reported_at")?,
                    gender: r.try_get("gender")?,
                    age_band: r.try_get("age_band")?,
                    child: r.try_get("child")?,
                    citizenship: r.try_get("citizenship")?,
                    erased: r.try_get("erased")?,
                    facts: Facts {
                        reported: true,
                        presumed: r.try_get("presumed")?,
                        identified: r.try_get("identified")?,
                        not_identified: r.try_get("not_identified")?,
                        referrals_pending: count(r, "pending")?,
                        referrals_accepted: count(r, "accepted")?,
                        referrals_closed: count(r, "closed")?,
                        sheltered: count(r, "admitted")?,
                        returns_open: count(r, "returns_open")?,
                        handed_over: count(r, "handed_over")?,
                        goals: count(r, "goals")?,
                        goals_met: count(r, "met")?,
                    },
                    waiting_decisions: r.try_get("waiting")?,
                    overdue_referrals: r.try_get("overdue")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(AppError::from)
    }

    fn overdue(&self, p: &PersonFacts, now: DateTime<Utc>) -> u32 {
        let decisions = p
            .waiting_decisions
            .iter()
            .filter(|since| self.decision_due(**since) < now)
            .count();
        u32::try_from(decisions)
            .unwrap_or(u32::MAX)
            .saturating_add(u32::try_from(p.overdue_referrals).unwrap_or(u32::MAX))
    }

    /// `ListPaths`: every person's path, coded, newest first.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming `stage`, `page_size`, `page_token`,
    /// `reported_from`/`reported_to`.
    #[tracing::instrument(skip_all)]
    pub async fn list_paths(
        &self,
        ctx: &CallContext,
        req: &pb::ListPathsRequest,
    ) -> Result<pb::ListPathsResponse, AppError> {
        let mut v = Violations::new();
        let stage_filter = v
            .check(validate::enum_value::<pb::Stage>("stage", req.stage, true))
            .unwrap_or(0);
        if req.page_size > paging::MAX_PAGE_SIZE.unsigned_abs() {
            v.add("page_size", "must be 1..500 (0: 50)");
        }
        let page_size = paging::page_size(i32::try_from(req.page_size).unwrap_or(paging::MAX_PAGE_SIZE), &mut v);
        let from = time_field(req.reported_from.as_ref(), "reported_from", &mut v);
        let to = time_field(req.reported_to.as_ref(), "reported_to", &mut v);
        if let (Some(f), Some(t)) = (from, to)
            && f >= t
        {
            v.add("reported_to", "must be after reported_from");
        }
        let pager = Pager::new(&format!(
            "paths|{stage_filter}|{}|{:?}|{:?}",
            req.overdue_only,
            from.map(|t| t.timestamp_micros()),
            to.map(|t| t.timestamp_micros())
        ));
        let cursor = pager.cursor(&req.page_token, &mut v);
        v.finish(|| ())?;
        let now = Utc::now();
        let mut rows: Vec<(PersonFacts, pb::Stage, u32)> = self
            .facts(from, to, now)
            .await?
            .into_iter()
            .map(|p| {
                let s = stage::stage(&p.facts);
                let overdue = self.overdue(&p, now);
                (p, s, overdue)
            })
            .filter(|(_, s, overdue)| {
                (stage_filter == 0 || *s as i32 == stage_filter) && (!req.overdue_only || *overdue > 0)
            })
            .filter(|(p, _, _)| {
                cursor.is_none_or(|c| {
                    (p.first_reported_at.timestamp_micros(), p.person_id) < (c.time.timestamp_micros(), c.id)
                })
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse((r.0.first_reported_at, r.0.person_id)));
        let size = usize::try_from(page_size).unwrap_or(50);
        let more = rows.len() > size;
        rows.truncate(size);
        let persons: Vec<Uuid> = rows.iter().map(|r| r.0.person_id).collect();
        let last_steps = self.last_steps(&persons).await?;
        let last = rows.last().map(|r| Cursor {
            time: r.0.first_reported_at,
            id: r.0.person_id,
        });
        // Coded persons with their first-report times: the read is on the trail.
        let purpose = format!(
            "PATHS:stage={stage_filter}:overdue={}:{} paths",
            req.overdue_only,
            rows.len()
        );
        self.audit_read(ctx, "ListPaths", "paths", &purpose).await?;
        Ok(pb::ListPathsResponse {
            paths: rows
                .into_iter()
                .map(|(p, s, overdue)| pb::PathSummary {
                    person_id: p.person_id.to_string(),
                    stage: s as i32,
                    first_reported_at: Some(ts(p.first_reported_at)),
                    last_step_at: last_steps.get(&p.person_id).copied().map(ts),
                    overdue,
                    person: Some(pb::Person {
                        gender: p.gender,
                        age_band: p.age_band,
                        child: p.child,
                        citizenship: p.citizenship,
                        erased: p.erased,
                    }),
                })
                .collect(),
            next_page_token: pager.next_token(more, last),
        })
    }

    /// The newest step time of each of `persons` (by the link rules).
    async fn last_steps(&self, persons: &[Uuid]) -> Result<BTreeMap<Uuid, DateTime<Utc>>, AppError> {
        if persons.is_empty() {
            return Ok(BTreeMap::new());
        }
        let rows = sqlx::query(
            r"
WITH pp AS (SELECT unnest($1::uuid[]) AS person_id),
cs AS (SELECT c.person_id, c.case_id, c.return_id FROM cp_cases c JOIN pp USING (person_id)),
rf AS (SELECT r.person_id, r.referral_id FROM cp_referrals r JOIN pp USING (person_id)),
rt AS (
    SELECT cs.person_id, r.return_id FROM cs JOIN cp_returns r ON r.return_id = cs.return_id
    UNION
    SELECT cs.person_id, r.return_id FROM cs JOIN cp_returns r ON r.foreign_case = cs.case_id
),
subj AS (
    SELECT person_id, case_id AS id FROM cs
    UNION ALL SELECT person_id, referral_id FROM rf
    UNION ALL SELECT c.person_id, c.consent_id FROM cp_consents c JOIN pp USING (person_id)
    UNION ALL SELECT g.person_id, g.goal_id FROM cp_goals g JOIN pp USING (person_id)
    UNION ALL SELECT person_id, return_id FROM rt
    UNION ALL SELECT rf.person_id, h.hold_id FROM rf JOIN cp_holds h ON h.referral_id = rf.referral_id
    UNION ALL SELECT rt.person_id, h.hold_id FROM rt
        JOIN cp_return_commits rc ON rc.return_id = rt.return_id JOIN cp_holds h ON h.cause_commit_id = rc.commit_id
)
SELECT subj.person_id, max(s.at) AS last_at FROM subj JOIN cp_steps s ON s.subject_id = subj.id
GROUP BY subj.person_id",
        )
        .bind(persons)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("person_id")?, r.try_get("last_at")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(AppError::from)
    }

    /// `GetStatistics`: counts and times for persons first reported (and
    /// anonymous notifications filed) in [from, to); exact, or publishable
    /// by the rules of [`suppress`].
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming `from` / `to` (missing, reversed; in a
    /// publishable request not the first of a month at 00:00:00Z) and
    /// `min_cell` (in a publishable request, below the configured one).
    #[tracing::instrument(skip_all, fields(publishable = req.publishable))]
    pub async fn get_statistics(
        &self,
        ctx: &CallContext,
        req: &pb::GetStatisticsRequest,
    ) -> Result<pb::Statistics, AppError> {
        let mut v = Violations::new();
        let k = if req.publishable {
            suppress::k(req.min_cell, self.settings.min_cell).unwrap_or_else(|least| {
                v.add(
                    "min_cell",
                    format!("must be 0 or at least {least} for publishable statistics"),
                );
                least
            })
        } else {
            0
        };
        let from = required_time(req.from.as_ref(), "from", &mut v);
        let to = required_time(req.to.as_ref(), "to", &mut v);
        let (Some(from), Some(to)) = (from, to) else {
            return Err(v.into_error());
        };
        if from >= to {
            v.add("to", "must be after from");
        }
        if req.publishable {
            publishable_period(from, to, &mut v);
        }
        v.finish(|| ())?;
        // The three queries in one snapshot (the figures agree with each
        // other, which suppression relies on). The plan of the persons'
        // query is made for the period asked (a generic plan would guess
        // the share of cases in it); its groupings hold a row per person,
        // which spill to disk with the default work_mem; JIT compiling
        // costs more here than running; with parallel plans made as cheap
        // as the others, the scans and joins of the persons run on two
        // workers beside the call's backend (about 7 % faster here).
        // Every table of the figures is locked (for reading) before the
        // snapshot is taken: a statement that rewrites one of them (an
        // ALTER TABLE of an upgrade) cannot run between the snapshot and
        // the reads, which would see it empty.
        let mut tx = self.pool.begin().await?;
        sqlx::raw_sql(
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; \
             SET LOCAL jit = off; SET LOCAL work_mem = '64MB'; SET LOCAL plan_cache_mode = force_custom_plan; \
             SET LOCAL parallel_setup_cost = 0; SET LOCAL parallel_tuple_cost = 0; \
             LOCK TABLE cp_person_cases, cp_person_referrals, cp_cases, cp_referrals, cp_returns, cp_holds, \
                 cp_return_commits, cp_notifications IN ACCESS SHARE MODE",
        )
        .execute(&mut *tx)
        .await?;
        // The notifications and the times are read beside the persons'
        // counts on a second connection in the same snapshot, when one is
        // idle and a turn of `side_reads` free (neither is waited for: a
        // call that waited for a second connection while holding one could
        // wait for ever); else after them on this one.
        let side = self
            .side_reads
            .clone()
            .try_acquire_owned()
            .ok()
            .and_then(|turn| Some((turn, self.pool.try_acquire()?)));
        let beside = match side {
            Some((_turn, mut conn)) => Self::read_beside(&mut tx, &mut conn, from, to).await?,
            None => None,
        };
        let (counted, (anonymous, notifications), mut times) = match beside {
            Some(read) => read,
            None => (
                Self::person_counts(&mut tx, from, to).await?,
                Self::notification_counts(&mut tx, from, to).await?,
                Self::times(&mut tx, from, to).await?,
            ),
        };
        tx.commit().await?;
        let (mut dims, persons, reintegration) = counted;
        dims.add_count("notification", suppress::IDENTIFIED.into(), persons);
        for (dimension, value, count) in anonymous {
            dims.add_coded(&dimension, &value, count);
        }
        dims.add_count("notification", "anonymous".into(), notifications);
        let units = persons + notifications;
        let table: Vec<suppress::Dimension> = [
            (suppress::STAGE, persons),
            ("exploitation_form", units),
            ("gender", units),
            ("age_band", units),
            ("citizenship", units),
            ("country_of_exploitation", units),
            (suppress::NOTIFICATION, units),
        ]
        .into_iter()
        .map(|(name, total)| suppress::Dimension {
            name: name.into(),
            cells: dims.cells(name),
            total,
            open: matches!(name, "citizenship" | "country_of_exploitation"),
        })
        .collect();
        let shown = if req.publishable {
            suppress::publish(table, units, u64::from(k))
        } else {
            table.into_iter().map(suppress::Shown::exact).collect()
        };
        let cell = |dimension: &str, value: String, count: Option<u64>| pb::Cell {
            dimension: dimension.into(),
            value,
            count: count.unwrap_or(0),
            suppressed: count.is_none(),
        };
        let mut counts = Vec::new();
        for d in shown {
            for (value, count) in d.cells {
                counts.push(cell(&d.name, value, count));
            }
            counts.push(cell(&d.name, "total".into(), d.total));
        }
        let suppressed_cells = u32::try_from(counts.iter().filter(|c| c.suppressed).count()).unwrap_or(u32::MAX);
        times.push(reintegration);
        if req.publishable {
            // The persons a time is measured on are a part of the stage
            // cells (those reintegrated, for the last measure): with a stage
            // cell suppressed, an exact number of samples would bound it, so
            // the numbers are withheld, and the reintegration time with them.
            let stage_hidden = counts.iter().any(|c| c.dimension == suppress::STAGE && c.suppressed);
            for t in &mut times {
                let of_a_stage = t.measure == "identification_to_reintegration";
                if suppress::time_suppressed(t.samples, units, u64::from(k)) || (stage_hidden && of_a_stage) {
                    t.suppressed = true;
                    t.samples = 0;
                    t.median = None;
                    t.p90 = None;
                } else {
                    t.median = t.median.as_ref().map(whole_days);
                    t.p90 = t.p90.as_ref().map(whole_days);
                    if stage_hidden {
                        t.samples = 0;
                    }
                }
            }
        }
        // Which figures left, for whom: the period, exact or publishable, k.
        let subject = format!("statistics:{}..{}", from.to_rfc3339(), to.to_rfc3339());
        let purpose = if req.publishable {
            format!("STATISTICS:publishable:k={k}")
        } else {
            "STATISTICS:exact".to_owned()
        };
        self.audit_read(ctx, "GetStatistics", &subject, &purpose).await?;
        Ok(pb::Statistics {
            from: Some(ts(from)),
            to: Some(ts(to)),
            publishable: req.publishable,
            min_cell: k,
            counts,
            times,
            suppressed_cells,
        })
    }

    /// The persons' counts on `tx`, and beside them on `conn`, in `tx`'s
    /// snapshot, the notifications and the times; `None` (nothing read)
    /// when the side cannot lock its tables at once.
    ///
    /// `tx` holds every table's lock already. The side locks its tables
    /// without waiting before either reads: a side read queued behind an
    /// ALTER TABLE that waits for `tx`, idle while it waits for the side,
    /// would be a wait PostgreSQL cannot see as a deadlock (two backends).
    /// An ALTER TABLE already queued makes the lock fail, and the caller
    /// reads all on `tx` (which waits for nothing: it holds its locks). The
    /// indexes are locked when a query is planned, so a REINDEX or DROP
    /// INDEX of one of them can still close such a loop: the side's
    /// `lock_timeout` ends it, and the call is answered UNAVAILABLE after 5 s.
    #[allow(clippy::type_complexity)]
    async fn read_beside(
        tx: &mut sqlx::PgConnection,
        conn: &mut sqlx::PgConnection,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<
        Option<(
            (Dimensions, u64, pb::TimeMeasure),
            (Vec<(String, String, u64)>, u64),
            Vec<pb::TimeMeasure>,
        )>,
        AppError,
    > {
        let mut side = nrm_kernel::db::begin_in_snapshot_of(&mut *tx, conn).await?;
        let locked = sqlx::raw_sql(
            "SET LOCAL lock_timeout = '5s'; SET LOCAL jit = off; SET LOCAL work_mem = '64MB'; \
             LOCK TABLE cp_notifications, cp_cases, cp_referrals, cp_returns IN ACCESS SHARE MODE NOWAIT",
        )
        .execute(&mut *side)
        .await;
        match locked {
            Ok(_) => {}
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("55P03") => {
                side.rollback().await?;
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        let (counted, beside) = tokio::join!(Self::person_counts(tx, from, to), async {
            let notified = Self::notification_counts(&mut side, from, to).await?;
            let times = Self::times(&mut side, from, to).await?;
            side.commit().await?;
            Ok::<_, AppError>((notified, times))
        });
        let (notified, times) = beside?;
        Ok(Some((counted?, notified, times)))
    }

    /// The counts of the persons first reported in [from, to), per
    /// dimension, aggregated in the database by [`STATS`] (the stage by
    /// [`stage::sql_case`], the same precedence as [`stage::stage`]); the
    /// number of persons; the time from identification to reintegration.
    async fn person_counts(
        conn: &mut sqlx::PgConnection,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(Dimensions, u64, pb::TimeMeasure), AppError> {
        let sql = STATS.replace("{case}", &stage::sql_case());
        // The stage's CASE is built from a fixed table, not from a caller.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(from)
            .bind(to)
            .fetch_all(conn)
            .await?;
        let mut dims = Dimensions::default();
        let mut persons = 0u64;
        let mut reintegration = pb::TimeMeasure {
            measure: "identification_to_reintegration".into(),
            ..pb::TimeMeasure::default()
        };
        for r in &rows {
            let dimension: String = r.try_get("dimension")?;
            let value: String = r.try_get("value")?;
            let n: Option<f64> = r.try_get("n")?;
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let count = n.unwrap_or(0.0).max(0.0) as u64;
            match (dimension.as_str(), value.as_str()) {
                ("persons", _) => persons = count,
                ("reintegration", "samples") => reintegration.samples = count,
                ("reintegration", "median") => reintegration.median = n.map(seconds),
                ("reintegration", "p90") => reintegration.p90 = n.map(seconds),
                (d, v) => dims.add_coded(d, v, count),
            }
        }
        Ok((dims, persons, reintegration))
    }

    /// The counts of the anonymous notifications filed in [from, to), as
    /// (dimension, value as the database gives it, count); how many.
    /// Read beside the persons' counts: `get_statistics` locks the tables
    /// of this and of [`Self::times`] first.
    async fn notification_counts(
        conn: &mut sqlx::PgConnection,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<(Vec<(String, String, u64)>, u64), AppError> {
        let rows = sqlx::query(
            r"
WITH n AS (SELECT * FROM cp_notifications WHERE filed_on >= $1 AND filed_on < $2)
SELECT 'gender' AS dimension, gender::text AS value, count(*) AS n FROM n GROUP BY 2
UNION ALL SELECT 'age_band', age_band::text, count(*) FROM n GROUP BY 2
UNION ALL SELECT 'citizenship', lower(citizenship), count(*) FROM n GROUP BY 2
UNION ALL SELECT 'country_of_exploitation', lower(country_of_exploitation), count(*) FROM n GROUP BY 2
UNION ALL SELECT 'exploitation_form', e.value::text, count(*) FROM n
    CROSS JOIN LATERAL (SELECT DISTINCT unnest(n.exploitation_forms)) AS e(value) GROUP BY 2
UNION ALL SELECT 'notifications', '', count(*) FROM n",
        )
        .bind(from)
        .bind(to)
        .fetch_all(conn)
        .await?;
        let mut total = 0;
        let mut counts = Vec::new();
        for r in &rows {
            let dimension: String = r.try_get("dimension")?;
            let value: String = r.try_get("value")?;
            let n: i64 = r.try_get("n")?;
            let count = u64::try_from(n).unwrap_or(0);
            if dimension == "notifications" {
                total = count;
            } else {
                counts.push((dimension, value, count));
            }
        }
        Ok((counts, total))
    }

    /// The measured times of cases, referrals and returns of the period,
    /// in seconds as `date_part` gives them (a float; `extract` gives a
    /// numeric, which sorts about twice as slowly, and the answers are
    /// floats anyway).
    async fn times(
        conn: &mut sqlx::PgConnection,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Vec<pb::TimeMeasure>, AppError> {
        let rows = sqlx::query(
            r"
SELECT 'report_to_decision' AS measure, count(*) AS samples,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY date_part('epoch', decided_at - reported_at)) AS median,
    percentile_cont(0.9) WITHIN GROUP (ORDER BY date_part('epoch', decided_at - reported_at)) AS p90
FROM cp_cases WHERE reported_at >= $1 AND reported_at < $2 AND decided_at IS NOT NULL
UNION ALL
SELECT 'referral_to_answer', count(*),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY date_part('epoch', answered_at - created_at)),
    percentile_cont(0.9) WITHIN GROUP (ORDER BY date_part('epoch', answered_at - created_at))
FROM cp_referrals WHERE created_at >= $1 AND created_at < $2 AND answered_at IS NOT NULL
UNION ALL
SELECT 'return_opened_to_handover', count(*),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY date_part('epoch', handed_over_at - opened_at)),
    percentile_cont(0.9) WITHIN GROUP (ORDER BY date_part('epoch', handed_over_at - opened_at))
FROM cp_returns WHERE opened_at >= $1 AND opened_at < $2 AND handed_over_at IS NOT NULL",
        )
        .bind(from)
        .bind(to)
        .fetch_all(conn)
        .await?;
        rows.iter()
            .map(|r| {
                let samples: i64 = r.try_get("samples")?;
                let median: Option<f64> = r.try_get("median")?;
                let p90: Option<f64> = r.try_get("p90")?;
                Ok(pb::TimeMeasure {
                    measure: r.try_get("measure")?,
                    samples: u64::try_from(samples).unwrap_or(0),
                    median: median.map(seconds),
                    p90: p90.map(seconds),
                    suppressed: false,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(AppError::from)
    }
}

/// A publishable period is whole calendar months in UTC
/// ([`suppress::is_month_start`]).
fn publishable_period(from: DateTime<Utc>, to: DateTime<Utc>, v: &mut Violations) {
    for (t, field) in [(from, "from"), (to, "to")] {
        if !suppress::is_month_start(t) {
            v.add(
                field,
                "must be the first of a month at 00:00:00Z for publishable statistics",
            );
        }
    }
}

/// A duration rounded to the nearest whole day ([`suppress::nearest_day_ms`]).
fn whole_days(d: &prost_types::Duration) -> prost_types::Duration {
    let ms = d
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(d.nanos / 1_000_000));
    duration(chrono::TimeDelta::milliseconds(suppress::nearest_day_ms(ms)))
}

/// A duration of `s` seconds (to the millisecond).
fn seconds(s: f64) -> prost_types::Duration {
    #[allow(clippy::cast_possible_truncation)]
    let ms = (s * 1000.0).round() as i64;
    duration(chrono::TimeDelta::milliseconds(ms))
}

fn form_name(f: i32) -> String {
    id::ExploitationForm::try_from(f).map_or_else(|_| format!("EXPLOITATION_FORM_{f}"), |e| e.as_str_name().to_owned())
}

/// The counts of each dimension, by value.
#[derive(Debug, Default)]
struct Dimensions(BTreeMap<String, BTreeMap<String, u64>>);

impl Dimensions {
    fn add_count(&mut self, dimension: &str, value: String, n: u64) {
        *self
            .0
            .entry(dimension.to_owned())
            .or_default()
            .entry(value)
            .or_default() += n;
    }

    /// Adds `n` for a value as the database gives it: an enum number for
    /// stage, gender, age band and form (named here), a code otherwise.
    fn add_coded(&mut self, dimension: &str, value: &str, n: u64) {
        let number = value.parse::<i32>().ok();
        let named = match (dimension, number) {
            ("stage", Some(s)) => pb::Stage::try_from(s).map_or_else(|_| value.to_owned(), |s| s.as_str_name().into()),
            ("gender", Some(g)) => {
                common::Gender::try_from(g).map_or_else(|_| format!("GENDER_{g}"), |g| g.as_str_name().into())
            }
            ("age_band", Some(a)) => {
                common::AgeBand::try_from(a).map_or_else(|_| format!("AGE_BAND_{a}"), |a| a.as_str_name().into())
            }
            ("exploitation_form", Some(f)) => form_name(f),
            _ => value.to_owned(),
        };
        self.add_count(dimension, named, n);
    }

    /// The cells of `dimension`, each known enum value listed (zeros too).
    fn cells(&self, dimension: &str) -> Vec<(String, u64)> {
        let mut cells = self.0.get(dimension).cloned().unwrap_or_default();
        let known: Vec<String> = match dimension {
            "stage" => (1..=11)
                .filter_map(|s| pb::Stage::try_from(s).ok())
                .map(|s| s.as_str_name().to_owned())
                .collect(),
            "exploitation_form" => (1..=8).map(form_name).collect(),
            "gender" => (1..=4)
                .filter_map(|g| common::Gender::try_from(g).ok())
                .map(|g| g.as_str_name().to_owned())
                .collect(),
            "age_band" => (1..=7)
                .filter_map(|a| common::AgeBand::try_from(a).ok())
                .map(|a| a.as_str_name().to_owned())
                .collect(),
            "notification" => vec!["identified".into(), "anonymous".into()],
            _ => Vec::new(),
        };
        for k in known {
            cells.entry(k).or_insert(0);
        }
        cells.into_iter().collect()
    }
}

fn time_field(t: Option<&prost_types::Timestamp>, field: &str, v: &mut Violations) -> Option<DateTime<Utc>> {
    let t = t?;
    let parsed = validate::to_datetime(t);
    if parsed.is_none() {
        v.add(field, "is not a valid time");
    }
    parsed
}

fn required_time(t: Option<&prost_types::Timestamp>, field: &str, v: &mut Violations) -> Option<DateTime<Utc>> {
    if t.is_none() {
        v.add(field, "is required");
        return None;
    }
    time_field(t, field, v)
}
