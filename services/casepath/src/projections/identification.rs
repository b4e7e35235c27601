//! `casepath_identification`: the identification stream into `cp_cases`,
//! `cp_notifications`, the identification steps, and each person's
//! statistical facts derived from their cases (`cp_person_cases`).

use std::collections::HashSet;

use nrm_kernel::projection::{Delivery, Projection, rows_digest};
use nrm_kernel::store::UnitOfWork;
use nrm_kernel::xborder::CountryCode;
use sqlx::PgConnection;
use uuid::Uuid;

use super::{column, int_array};
use crate::domain::changes::WatchKey;
use crate::domain::steps::{self, CaseRow, Changed, IdentificationWrite};

/// The stream it reads.
pub const CONTEXT: &str = "identification";

/// The projection's name (checkpoint key, `cp_steps.source`).
pub const NAME: &str = "casepath_identification";

/// Every row the projection owns, one text line each.
const DIGEST: &str = "SELECT 'cp_cases|' || t::text FROM cp_cases t
    UNION ALL SELECT 'cp_notifications|' || t::text FROM cp_notifications t
    UNION ALL SELECT 'cp_person_cases|' || t::text FROM cp_person_cases t
    UNION ALL SELECT 'cp_steps|' || t::text FROM cp_steps t WHERE t.source = 'casepath_identification'";

/// `cp_person_cases` from `cp_cases` (one row per person with a case, for
/// the statistics: [`crate::app`]'s `GetStatistics` reads these rows, not
/// every case): the first case by (`reported_at`, `case_id`) gives the time
/// and the coded person, the distinct forms are of all the person's cases,
/// `case_flags` has 1 for a case presumed (screened, a child reported, under
/// review), 2 identified, 4 not identified; `identified_at` is the first
/// decision that identified. `$prefix` names the persons to derive (`t`),
/// `$cases` and `$facts` restrict the cases read and the facts deleted to
/// them. Rows are written in person order. `upsert`: over the facts there
/// are, and a row that would not change is not written; `insert`: into an
/// empty table.
macro_rules! person_cases {
    (@conflict upsert) => {
        "ON CONFLICT (person_id) DO UPDATE SET cases = excluded.cases, first_reported_at = excluded.first_reported_at,
    gender = excluded.gender, age_band = excluded.age_band, citizenship = excluded.citizenship,
    country_of_exploitation = excluded.country_of_exploitation, exploitation_forms = excluded.exploitation_forms,
    case_flags = excluded.case_flags, identified_at = excluded.identified_at
WHERE (s.cases, s.first_reported_at, s.gender, s.age_band, s.citizenship, s.country_of_exploitation,
       s.exploitation_forms, s.case_flags, s.identified_at)
    IS DISTINCT FROM (excluded.cases, excluded.first_reported_at, excluded.gender, excluded.age_band,
       excluded.citizenship, excluded.country_of_exploitation, excluded.exploitation_forms, excluded.case_flags,
       excluded.identified_at)"
    };
    (@conflict insert) => {
        ""
    };
    ($prefix:literal, $cases:literal, $facts:literal, $how:ident) => {
        concat!(
            "WITH ",
            $prefix,
            r"c AS (
    SELECT person_id, case_id, reported_at, status, child, decision, decided_at, gender, age_band,
        citizenship, country_of_exploitation, exploitation_forms
    FROM cp_cases WHERE ",
            $cases,
            r"
),
a AS (
    SELECT person_id, count(*)::integer AS cases,
        bit_or(CASE WHEN status = 2 OR (child AND status = 1) THEN 1 ELSE 0 END
            | CASE WHEN status = 3 THEN 2 ELSE 0 END | CASE WHEN status = 4 THEN 4 ELSE 0 END) AS case_flags,
        min(decided_at) FILTER (WHERE decision = 1) AS identified_at
    FROM c GROUP BY person_id
),
f AS (
    SELECT DISTINCT ON (person_id) person_id, reported_at, gender, age_band, citizenship, country_of_exploitation
    FROM c ORDER BY person_id, reported_at, case_id
),
e AS (
    SELECT c.person_id, array_agg(DISTINCT x ORDER BY x) AS forms
    FROM c CROSS JOIN unnest(c.exploitation_forms) AS x GROUP BY c.person_id
),
gone AS (
    DELETE FROM cp_person_cases s
    WHERE ",
            $facts,
            r" AND NOT EXISTS (SELECT FROM c WHERE c.person_id = s.person_id)
)
INSERT INTO cp_person_cases AS s (person_id, cases, first_reported_at, gender, age_band, citizenship,
    country_of_exploitation, exploitation_forms, case_flags, identified_at)
SELECT f.person_id, a.cases, f.reported_at, f.gender, f.age_band, f.citizenship, f.country_of_exploitation,
    coalesce(e.forms, '{}'), a.case_flags, a.identified_at
FROM f JOIN a USING (person_id) LEFT JOIN e USING (person_id)
ORDER BY f.person_id
",
            person_cases!(@conflict $how)
        )
    };
}

/// [`person_cases!`] of the persons of the cases `$1` and the persons `$2`.
const PERSON_CASES_OF: &str = person_cases!(
    "t AS (SELECT person_id FROM cp_cases WHERE case_id = ANY($1::uuid[]) UNION SELECT unnest($2::uuid[])),\n",
    "person_id IN (SELECT person_id FROM t)",
    "s.person_id IN (SELECT person_id FROM t)",
    upsert
);

/// [`person_cases!`] of every person, into an emptied table
/// ([`super::derive_all`]).
const PERSON_CASES_ALL: &str = person_cases!("", "true", "true", insert);

/// The identification projection.
#[derive(Debug, Clone)]
pub struct IdentificationProjection {
    country: CountryCode,
    watch_key: WatchKey,
}

impl IdentificationProjection {
    /// The projection of a deployment in `country`, notifying its changes
    /// under `watch_key`.
    #[must_use]
    pub fn new(country: &CountryCode, watch_key: &WatchKey) -> Self {
        Self {
            country: country.clone(),
            watch_key: watch_key.clone(),
        }
    }
}

impl Projection for IdentificationProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn apply(&self, uow: &mut UnitOfWork, delivery: &Delivery) -> Result<(), anyhow::Error> {
        self.apply_batch(uow, &[delivery]).await
    }

    async fn apply_batch(&self, uow: &mut UnitOfWork, deliveries: &[&Delivery]) -> Result<(), anyhow::Error> {
        super::apply_commits(
            uow,
            NAME,
            &self.country,
            &self.watch_key,
            deliveries,
            |delivery, origin| steps::identification(&delivery.commit, origin),
        )
        .await
    }

    async fn reset(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        sqlx::query("DELETE FROM cp_cases").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_notifications").execute(&mut *conn).await?;
        sqlx::query("DELETE FROM cp_person_cases").execute(&mut *conn).await?;
        super::reset_steps(conn, NAME).await
    }

    /// Every person's `cp_person_cases`, once, from the replayed cases.
    async fn after_replay(&self, conn: &mut PgConnection) -> Result<(), anyhow::Error> {
        super::derive_all(conn, "cp_person_cases", PERSON_CASES_ALL).await
    }

    async fn digest(&self, conn: &mut PgConnection) -> Result<Option<String>, anyhow::Error> {
        Ok(Some(rows_digest(conn, DIGEST).await?))
    }

    /// Its own tables and `cp_steps`, of which its digest counts its own
    /// rows (a rebuild compares in a shadow of them).
    fn tables(&self) -> &'static [&'static str] {
        &["cp_cases", "cp_notifications", "cp_person_cases", "cp_steps"]
    }
}

/// What the writes folded into the openings `open` set ([`Changed`]), to
/// the cases that were there before them (the ones `inserted`, the case IDs
/// the insert returned, leaves out): as each of those writes would have in
/// turn. Nothing when every case was new.
async fn changed_before(
    conn: &mut PgConnection,
    open: &[(&CaseRow, Changed)],
    inserted: &[Uuid],
) -> Result<(), anyhow::Error> {
    if inserted.len() == open.len() {
        return Ok(());
    }
    let inserted: HashSet<&Uuid> = inserted.iter().collect();
    let before: Vec<&(&CaseRow, Changed)> = open
        .iter()
        .filter(|(row, changed)| !changed.is_empty() && !inserted.contains(&row.case_id.as_uuid()))
        .collect();
    if before.is_empty() {
        return Ok(());
    }
    let bit = |of: Changed| before.iter().map(|(_, c)| c.contains(of)).collect::<Vec<bool>>();
    sqlx::query(
        "UPDATE cp_cases c SET
           status = CASE WHEN v.set_status THEN v.status ELSE c.status END,
           decision = CASE WHEN v.set_decision THEN v.decision ELSE c.decision END,
           decided_at = CASE WHEN v.set_decision THEN v.decided_at ELSE c.decided_at END,
           decision_waiting_since = CASE WHEN v.set_waiting THEN v.waiting_since ELSE c.decision_waiting_since END,
           possible_duplicate = c.possible_duplicate OR v.set_duplicate
         FROM unnest($1::uuid[], $2::bool[], $3::int4[], $4::bool[], $5::int4[], $6::timestamptz[], $7::bool[],
           $8::timestamptz[], $9::bool[])
           AS v(case_id, set_status, status, set_decision, decision, decided_at, set_waiting, waiting_since, set_duplicate)
         WHERE c.case_id = v.case_id",
    )
    .bind(column(&before, |(r, _)| r.case_id.as_uuid()))
    .bind(bit(Changed::STATUS))
    .bind(column(&before, |(r, _)| r.status))
    .bind(bit(Changed::DECISION))
    .bind(column(&before, |(r, _)| r.decision))
    .bind(column(&before, |(r, _)| r.decided_at))
    .bind(bit(Changed::WAITING))
    .bind(column(&before, |(r, _)| r.decision_waiting_since))
    .bind(bit(Changed::DUPLICATE))
    .execute(conn)
    .await?;
    Ok(())
}

impl super::Write for IdentificationWrite {
    fn row(&self) -> Option<(&'static str, Uuid)> {
        match self {
            Self::Open(row, _) => Some(("cp_cases", row.case_id.as_uuid())),
            Self::FlagDuplicate { case_id }
            | Self::Screened { case_id }
            | Self::Decided { case_id, .. }
            | Self::ReviewRequested { case_id, .. } => Some(("cp_cases", case_id.as_uuid())),
            // Every case of the person.
            Self::Erased { .. } => None,
            Self::Notification(n) => Some(("cp_notifications", n.notification_id)),
        }
    }

    fn then(&self, later: &Self) -> Option<Self> {
        IdentificationWrite::then(self, later)
    }

    async fn run(conn: &mut PgConnection, round: &[&Self]) -> Result<(), anyhow::Error> {
        let mut open = Vec::new();
        let mut duplicates = Vec::new();
        let mut screened = Vec::new();
        let mut decided = Vec::new();
        let mut reviews = Vec::new();
        let mut erased = Vec::new();
        let mut notifications = Vec::new();
        for write in round {
            match write {
                Self::Open(row, changed) => open.push((&**row, *changed)),
                Self::FlagDuplicate { case_id } => duplicates.push(case_id.as_uuid()),
                Self::Screened { case_id } => screened.push(case_id.as_uuid()),
                Self::Decided {
                    case_id,
                    status,
                    decision,
                    decided_at,
                } => decided.push((case_id.as_uuid(), *status, *decision, *decided_at)),
                Self::ReviewRequested { case_id, requested_at } => reviews.push((case_id.as_uuid(), *requested_at)),
                Self::Erased { person_id, erased_at } => erased.push((person_id.as_uuid(), *erased_at)),
                Self::Notification(n) => notifications.push(n),
            }
        }
        if !open.is_empty() {
            let inserted: Vec<Uuid> = sqlx::query_scalar(
                "INSERT INTO cp_cases (case_id, person_id, reporting_agency, competent_authority, status, reported_at,
                   found_at, gender, age_band, child, citizenship, country_of_exploitation, exploitation_forms,
                   decision, decided_at, decision_waiting_since, from_country, return_id, possible_duplicate)
                 SELECT v.case_id, v.person_id, v.reporting_agency, v.competent_authority, v.status, v.reported_at,
                   v.found_at, v.gender, v.age_band, v.child, v.citizenship, v.country_of_exploitation, v.forms::int4[],
                   v.decision, v.decided_at, v.waiting_since, v.from_country, v.return_id, v.possible_duplicate
                 FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int4[], $6::timestamptz[],
                   $7::timestamptz[], $8::int4[], $9::int4[], $10::bool[], $11::text[], $12::text[], $13::text[],
                   $14::int4[], $15::timestamptz[], $16::timestamptz[], $17::text[], $18::uuid[], $19::bool[])
                   AS v(case_id, person_id, reporting_agency, competent_authority, status, reported_at, found_at, gender,
                     age_band, child, citizenship, country_of_exploitation, forms, decision, decided_at, waiting_since,
                     from_country, return_id, possible_duplicate)
                 ON CONFLICT (case_id) DO NOTHING
                 RETURNING case_id",
            )
            .bind(column(&open, |(r, _)| r.case_id.as_uuid()))
            .bind(column(&open, |(r, _)| r.person_id.as_uuid()))
            .bind(column(&open, |(r, _)| r.reporting_agency.as_str()))
            .bind(column(&open, |(r, _)| r.competent_authority.as_str()))
            .bind(column(&open, |(r, _)| r.status))
            .bind(column(&open, |(r, _)| r.reported_at))
            .bind(column(&open, |(r, _)| r.found_at))
            .bind(column(&open, |(r, _)| r.gender))
            .bind(column(&open, |(r, _)| r.age_band))
            .bind(column(&open, |(r, _)| r.child))
            .bind(column(&open, |(r, _)| r.citizenship.as_str()))
            .bind(column(&open, |(r, _)| r.country_of_exploitation.as_str()))
            .bind(column(&open, |(r, _)| int_array(&r.exploitation_forms)))
            .bind(column(&open, |(r, _)| r.decision))
            .bind(column(&open, |(r, _)| r.decided_at))
            .bind(column(&open, |(r, _)| r.decision_waiting_since))
            .bind(column(&open, |(r, _)| r.from_country.as_deref()))
            .bind(column(&open, |(r, _)| r.return_id.map(|i| i.as_uuid())))
            .bind(column(&open, |(r, _)| r.possible_duplicate))
            .fetch_all(&mut *conn)
            .await?;
            changed_before(conn, &open, &inserted).await?;
        }
        if !duplicates.is_empty() {
            sqlx::query(
                "UPDATE cp_cases c SET possible_duplicate = true FROM unnest($1::uuid[]) AS v(case_id)
                 WHERE c.case_id = v.case_id",
            )
            .bind(duplicates)
            .execute(&mut *conn)
            .await?;
        }
        if !screened.is_empty() {
            sqlx::query(
                "UPDATE cp_cases c SET status = $2 FROM unnest($1::uuid[]) AS v(case_id) WHERE c.case_id = v.case_id",
            )
            .bind(screened)
            .bind(nrm_proto::identification::v1::CaseStatus::Presumed as i32)
            .execute(&mut *conn)
            .await?;
        }
        if !decided.is_empty() {
            sqlx::query(
                "UPDATE cp_cases c SET status = v.status, decision = v.decision, decided_at = v.decided_at,
                   decision_waiting_since = NULL
                 FROM unnest($1::uuid[], $2::int4[], $3::int4[], $4::timestamptz[]) AS v(case_id, status, decision, decided_at)
                 WHERE c.case_id = v.case_id",
            )
            .bind(column(&decided, |d| d.0))
            .bind(column(&decided, |d| d.1))
            .bind(column(&decided, |d| d.2))
            .bind(column(&decided, |d| d.3))
            .execute(&mut *conn)
            .await?;
        }
        if !reviews.is_empty() {
            sqlx::query(
                "UPDATE cp_cases c SET status = $3, decision_waiting_since = v.requested_at
                 FROM unnest($1::uuid[], $2::timestamptz[]) AS v(case_id, requested_at) WHERE c.case_id = v.case_id",
            )
            .bind(column(&reviews, |r| r.0))
            .bind(column(&reviews, |r| r.1))
            .bind(nrm_proto::identification::v1::CaseStatus::Presumed as i32)
            .execute(&mut *conn)
            .await?;
        }
        // Alone in its round (several rows): one person.
        for (person_id, erased_at) in erased {
            sqlx::query("UPDATE cp_cases SET erased_at = coalesce(erased_at, $2) WHERE person_id = $1")
                .bind(person_id)
                .bind(erased_at)
                .execute(&mut *conn)
                .await?;
        }
        if !notifications.is_empty() {
            sqlx::query(
                "INSERT INTO cp_notifications (notification_id, filed_on, found_country, country_of_exploitation,
                   exploitation_forms, gender, age_band, citizenship)
                 SELECT v.notification_id, v.filed_on, v.found_country, v.country_of_exploitation, v.forms::int4[],
                   v.gender, v.age_band, v.citizenship
                 FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::int4[], $7::int4[],
                   $8::text[])
                   AS v(notification_id, filed_on, found_country, country_of_exploitation, forms, gender, age_band,
                     citizenship)
                 ON CONFLICT (notification_id) DO NOTHING",
            )
            .bind(column(&notifications, |n| n.notification_id))
            .bind(column(&notifications, |n| n.filed_on))
            .bind(column(&notifications, |n| n.found_country.as_str()))
            .bind(column(&notifications, |n| n.country_of_exploitation.as_str()))
            .bind(column(&notifications, |n| int_array(&n.exploitation_forms)))
            .bind(column(&notifications, |n| n.gender))
            .bind(column(&notifications, |n| n.age_band))
            .bind(column(&notifications, |n| n.citizenship.as_str()))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    async fn refresh(conn: &mut PgConnection, writes: &[&Self]) -> Result<(), anyhow::Error> {
        let mut cases = Vec::new();
        let mut persons = Vec::new();
        for write in writes {
            match (write, write.row()) {
                (Self::Erased { person_id, .. }, _) => persons.push(person_id.as_uuid()),
                (_, Some(("cp_cases", case_id))) => cases.push(case_id),
                _ => {}
            }
        }
        if cases.is_empty() && persons.is_empty() {
            return Ok(());
        }
        sqlx::query(PERSON_CASES_OF)
            .bind(cases)
            .bind(persons)
            .execute(conn)
            .await?;
        Ok(())
    }
}
