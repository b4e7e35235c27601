-- Per-person facts for GetStatistics: the national figures over 100,000s of
-- persons cannot be counted from every case, referral and goal in 200 ms on
-- a small machine, so each projection keeps one row per person derived from
-- its own records (and from nothing else: links between streams, returns
-- and admitted holds, are still resolved when read). Each table is written
-- by exactly one projection, after every batch it applies, for the persons
-- the batch touched; a rebuild derives it once for everyone at its end.

-- casepath_identification, from cp_cases alone: one row per person with a case.
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

-- casepath_referral, from cp_referrals and cp_goals alone: one row per
-- person with a referral or a plan goal.
CREATE TABLE cp_person_referrals (
    person_id uuid PRIMARY KEY,
    -- 8 a referral pending, 16 accepted, 32 closed with an outcome;
    -- 512 a plan goal, 1024 a goal not met.
    flags integer NOT NULL,
    -- The last met_at of the person's goals.
    last_met_at timestamptz
);

-- The times from report to decision and from referral to answer read only
-- the decided cases and the answered referrals of the period, from these
-- two indexes (an index-only scan; without them, every case and referral
-- row: about 60 of GetStatistics' 250 ms over 100,000 persons here).
CREATE INDEX cp_cases_decided ON cp_cases (reported_at) INCLUDE (decided_at) WHERE decided_at IS NOT NULL;
CREATE INDEX cp_referrals_answered ON cp_referrals (created_at) INCLUDE (answered_at)
    WHERE answered_at IS NOT NULL;

-- A deployment that already has read models: every person's facts, from the
-- records as they stand (the statements of PERSON_CASES_ALL and
-- PERSON_REFERRALS_ALL in the projections, as of this version). Every
-- casepath replica of an older version must be stopped first: it would
-- apply batches without deriving the facts.
WITH c AS (
    SELECT person_id, case_id, reported_at, status, child, decision, decided_at, gender, age_band,
        citizenship, country_of_exploitation, exploitation_forms
    FROM cp_cases WHERE true
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
    WHERE true AND NOT EXISTS (SELECT FROM c WHERE c.person_id = s.person_id)
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
WITH x AS (
    SELECT person_id,
        CASE status WHEN 'pending' THEN 8 WHEN 'accepted' THEN 16
            WHEN 'closed' THEN CASE WHEN outcome <> 0 THEN 32 ELSE 0 END ELSE 0 END AS f,
        NULL::timestamptz AS met_at
    FROM cp_referrals WHERE true
    UNION ALL
    SELECT person_id, CASE WHEN met_at IS NULL THEN 1536 ELSE 512 END, met_at
    FROM cp_goals WHERE true
),
gone AS (
    DELETE FROM cp_person_referrals s
    WHERE true AND NOT EXISTS (SELECT FROM x WHERE x.person_id = s.person_id)
)
INSERT INTO cp_person_referrals AS s (person_id, flags, last_met_at)
SELECT person_id, bit_or(f), max(met_at) FROM x GROUP BY person_id
ORDER BY person_id
ON CONFLICT (person_id) DO UPDATE SET flags = excluded.flags, last_met_at = excluded.last_met_at
WHERE (s.flags, s.last_met_at) IS DISTINCT FROM (excluded.flags, excluded.last_met_at);
