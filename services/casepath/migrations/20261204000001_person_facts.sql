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

-- A deployment that already has read models gets the facts of every person
-- the one way they are derived: the two projections, having no checkpoint,
-- rebuild their read models from their streams at the next start (the
-- streams keep every message), and derive the facts at the end of it.
DELETE FROM projection_checkpoints
WHERE projection IN ('casepath_identification', 'casepath_referral');
