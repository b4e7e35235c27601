-- Per-person facts for GetStatistics: a design to integrate, NOT a migration
-- (nothing runs this file). GetStatistics over 100,000 persons cannot answer
-- in 200 ms from the records themselves on a 2-core machine: the STATS query
-- of services/casepath/src/app/lists.rs costs about 450 ms of backend CPU
-- (2026-12-04; EXPLAIN ANALYZE, 840 ms with its own overhead: grouping every
-- linked record by person ~185 ms, grouping the period's cases by person and
-- the anti-join with earlier cases ~230 ms, joining the two ~50 ms, the two
-- materialized 100,000-row CTEs with the first-case lookups ~240 ms, the
-- cells ~70 ms; no spill, all buffers hit). Grouping 280,000
-- records by person alone, in the cheapest form found (index-only scans
-- merged in person order, a sorted aggregate, planner settings forced), still
-- took ~70 ms, before any coded field or count.
--
-- So: two tables of one row per person, each a function of ONE projection's
-- own tables (as the read models' rule asks: each table written by exactly
-- one projection, links between streams resolved when read). Returns and
-- admitted holds (repatriation, shelter) link to a person only through
-- another stream's records; they stay resolved at read time (`lk` below,
-- ~4,000 returns and ~6,000 holds in the benchmark: ~25 ms).
--
-- Checked on the benchmark's data (100,000 persons in the period, 150,000 in
-- all) and on the same data after mixed changes (cases added before and after
-- a person's first, decisions, referrals, goals, returns, holds, a person's
-- only case deleted, a referral before its person's case): the read query
-- below gives row for row the output of STATS for seven periods (a year, a
-- month, everything, periods across the data's edge, odd instants, an empty
-- one); the refresh of the touched persons only gives the same rows as a
-- refresh of all; and the e2e tests casepath_stats, casepath_query,
-- casepath_input, casepath_matrix, casepath_rebuild, casepath_ingest pass
-- with the read query below (facts refreshed for everyone before each read,
-- branch stats-facts-bench). Measured on the benchmark (publishable, a year,
-- 30 calls, other work on the CPUs both times): STATS p50 508 ms, p99 805 ms;
-- the read query below p50 228 ms, p99 314 ms (backend CPU ~130 ms a call).
-- What more would help, measured: one table with both projections' columns
-- (no join: -25 to -35 ms, but two projections write one row: column
-- ownership, upserts in person order against deadlocks, a reset that clears
-- columns), the forms as text '1,3' instead of integer[] (-15 ms: arrays hash
-- slowly), a check of the canonical UUID form by translate() instead of the
-- regular expression in returns_of_persons! (-6 ms).

-- ---------------------------------------------------------------------------
-- 1. Tables (a migration; it can fill them at once with the refresh
--    statements below over every person, ~3 s for 150,000 persons here).

-- casepath_identification: one row per person with a case, from cp_cases only.
CREATE TABLE cp_person_cases (
    person_id uuid PRIMARY KEY,
    cases integer NOT NULL,
    -- The first case by (reported_at, case_id): its time and coded person.
    first_reported_at timestamptz NOT NULL,
    gender integer NOT NULL,
    age_band integer NOT NULL,
    citizenship text NOT NULL,
    country_of_exploitation text NOT NULL,
    -- The distinct forms of all the person's cases, ascending ('{}': none).
    exploitation_forms integer[] NOT NULL,
    -- 1 a case presumed (screened, a child reported, under review),
    -- 2 a case identified, 4 a case not identified.
    case_flags integer NOT NULL,
    -- The first decided_at of a case decided identified (decision = 1).
    identified_at timestamptz
);
CREATE INDEX cp_person_cases_first ON cp_person_cases (first_reported_at);

-- casepath_referral: one row per person with a referral or a plan goal, from
-- cp_referrals and cp_goals only.
CREATE TABLE cp_person_referrals (
    person_id uuid PRIMARY KEY,
    -- 8 a referral pending, 16 accepted, 32 closed with an outcome;
    -- 512 a plan goal, 1024 a goal not met (the bits of STATS).
    flags integer NOT NULL,
    -- The last met_at of the person's goals.
    last_met_at timestamptz
);

-- ---------------------------------------------------------------------------
-- 2. After each batch, in its transaction, after its writes and before its
--    checkpoint: $1 = every person_id a row written by the batch had, before
--    or after the write (INSERT/UPDATE ... RETURNING person_id; a case or a
--    referral that changes person touches both). Rows are written in person
--    order. Each statement reads only its projection's tables, so the order
--    in which the streams are applied does not matter, and a shadow rebuild
--    (temporary tables shadowing these names) refreshes the shadow's copy.
--    Cost here: 500 touched persons ~12 ms (cases), ~6-8 ms (referrals).

-- casepath_identification (reads cp_cases):
WITH c AS (
    SELECT person_id, case_id, reported_at, status, child, decision, decided_at, gender, age_band,
        citizenship, country_of_exploitation, exploitation_forms
    FROM cp_cases WHERE person_id = ANY($1::uuid[])
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
    WHERE s.person_id = ANY($1::uuid[]) AND NOT EXISTS (SELECT FROM c WHERE c.person_id = s.person_id)
)
INSERT INTO cp_person_cases AS s (person_id, cases, first_reported_at, gender, age_band, citizenship,
    country_of_exploitation, exploitation_forms, case_flags, identified_at)
SELECT f.person_id, a.cases, f.reported_at, f.gender, f.age_band, f.citizenship, f.country_of_exploitation,
    coalesce(e.forms, '{}'), a.case_flags, a.identified_at
FROM f JOIN a USING (person_id) LEFT JOIN e USING (person_id)
ORDER BY f.person_id
ON CONFLICT (person_id) DO UPDATE SET cases = excluded.cases, first_reported_at = excluded.first_reported_at,
    gender = excluded.gender, age_band = excluded.age_band, citizenship = excluded.citizenship,
    country_of_exploitation = excluded.country_of_exploitation, exploitation_forms = excluded.exploitation_forms,
    case_flags = excluded.case_flags, identified_at = excluded.identified_at
WHERE (s.cases, s.first_reported_at, s.gender, s.age_band, s.citizenship, s.country_of_exploitation,
       s.exploitation_forms, s.case_flags, s.identified_at)
    IS DISTINCT FROM (excluded.cases, excluded.first_reported_at, excluded.gender, excluded.age_band,
       excluded.citizenship, excluded.country_of_exploitation, excluded.exploitation_forms, excluded.case_flags,
       excluded.identified_at);

-- casepath_referral (reads cp_referrals, cp_goals):
WITH x AS (
    SELECT person_id,
        CASE status WHEN 'pending' THEN 8 WHEN 'accepted' THEN 16
            WHEN 'closed' THEN CASE WHEN outcome <> 0 THEN 32 ELSE 0 END ELSE 0 END AS f,
        NULL::timestamptz AS met_at
    FROM cp_referrals WHERE person_id = ANY($1::uuid[])
    UNION ALL
    SELECT person_id, CASE WHEN met_at IS NULL THEN 1536 ELSE 512 END, met_at
    FROM cp_goals WHERE person_id = ANY($1::uuid[])
),
gone AS (
    DELETE FROM cp_person_referrals s
    WHERE s.person_id = ANY($1::uuid[]) AND NOT EXISTS (SELECT FROM x WHERE x.person_id = s.person_id)
)
INSERT INTO cp_person_referrals AS s (person_id, flags, last_met_at)
SELECT person_id, bit_or(f), max(met_at) FROM x GROUP BY person_id
ORDER BY person_id
ON CONFLICT (person_id) DO UPDATE SET flags = excluded.flags, last_met_at = excluded.last_met_at
WHERE (s.flags, s.last_met_at) IS DISTINCT FROM (excluded.flags, excluded.last_met_at);

-- ---------------------------------------------------------------------------
-- 3. Rebuild. Each table belongs to the projection named above: its reset
--    adds `DELETE FROM cp_person_cases` (identification) or
--    `DELETE FROM cp_person_referrals` (referral), its tables() lists it (so
--    that a shadow rebuild works on a copy) and its digest includes it
--    (rows_digest over the table ordered by person_id). A replay writes every
--    case (referral, goal) again, touching every person, so the rebuilt table
--    is the refresh of all persons over the rebuilt records: equal to the live
--    one whenever the records are. (A catch-up from an empty model may instead
--    skip the per-batch refresh and run the statement once at its end over
--    every person of the table's records.)

-- ---------------------------------------------------------------------------
-- 4. The read query that replaces STATS (same output rows; `{case}` is
--    stage::sql_case(); lower() is applied per cell and the cells grouped
--    again by GROUPING SETS, as before; the reintegration times are kept as
--    (value, count) cells and expanded; `pr` is returns_of_persons!).
--
-- WITH pr AS (...returns_of_persons!...),
-- lk AS (
--     SELECT person_id, bit_or(f) AS flags FROM (
--         SELECT person_id, CASE WHEN handed_over_at IS NULL AND status NOT IN (10, 11) THEN 64 ELSE 0 END
--             | CASE WHEN handed_over_at IS NOT NULL OR status = 10 THEN 128 ELSE 0 END AS f
--         FROM pr
--         UNION ALL
--         SELECT r.person_id, 256
--         FROM cp_holds h JOIN cp_referrals r ON r.referral_id = h.referral_id
--         WHERE h.status = 'admitted'
--         UNION ALL
--         SELECT pr.person_id, 256
--         FROM cp_holds h JOIN cp_return_commits rc ON rc.commit_id = h.cause_commit_id JOIN pr ON pr.return_id = rc.return_id
--         WHERE h.status = 'admitted'
--     ) AS l GROUP BY person_id
-- ),
-- cells AS (
--     SELECT pc.case_flags | coalesce(pf.flags, 0) | coalesce(lk.flags, 0) AS flags,
--         pc.gender, pc.age_band, pc.citizenship, pc.country_of_exploitation, pc.exploitation_forms AS forms,
--         CASE WHEN coalesce(pf.flags, 0) & 1536 = 512 THEN extract(epoch FROM pf.last_met_at - pc.identified_at) END AS secs,
--         count(*) AS n
--     FROM cp_person_cases pc
--     LEFT JOIN cp_person_referrals pf USING (person_id)
--     LEFT JOIN lk USING (person_id)
--     WHERE pc.first_reported_at >= $1 AND pc.first_reported_at < $2
--     GROUP BY 1, 2, 3, 4, 5, 6, 7
-- ),
-- s AS (
--     SELECT {case} AS stage, p.gender, p.age_band, lower(p.citizenship) AS citizenship,
--         lower(p.country_of_exploitation) AS country_of_exploitation, p.forms, p.secs, p.n
--     FROM cells CROSS JOIN LATERAL (
--         SELECT cells.flags & 1 <> 0 AS presumed, cells.flags & 2 <> 0 AS identified, cells.flags & 4 <> 0 AS not_identified,
--             (cells.flags & 8 <> 0)::int AS pending, (cells.flags & 16 <> 0)::int AS accepted, (cells.flags & 32 <> 0)::int AS closed,
--             (cells.flags & 64 <> 0)::int AS returns_open, (cells.flags & 128 <> 0)::int AS handed_over,
--             (cells.flags & 256 <> 0)::int AS admitted,
--             (cells.flags & 512 <> 0)::int AS goals, (cells.flags & 1536 = 512)::int AS met,
--             cells.gender, cells.age_band, cells.citizenship, cells.country_of_exploitation, cells.forms, cells.secs, cells.n
--     ) AS p
-- ),
-- done AS (SELECT secs FROM s CROSS JOIN generate_series(1, s.n) WHERE secs IS NOT NULL),
-- forms AS (
--     SELECT e.f, sum(a.n) AS n FROM (SELECT forms, sum(n) AS n FROM s GROUP BY forms) AS a
--     CROSS JOIN LATERAL (SELECT DISTINCT unnest(a.forms)) AS e(f)
--     GROUP BY e.f
-- )
-- SELECT ... FROM s GROUP BY GROUPING SETS ((stage), (gender), (age_band), (citizenship), (country_of_exploitation), ())
-- UNION ALL ... (the final SELECT of STATS unchanged, over s instead of cells)
--
-- The exact Rust of this query, the migration and the benchmark's seeding of
-- the two tables are the commit on branch stats-facts-bench (measured there;
-- not for merging as is: it refreshes every person before each read).
