-- casepath's read models. Each table is written by exactly one projection
-- (named in its comment) and reset by it alone on a rebuild; `cp_steps` is
-- shared and each projection owns the rows of its `source`. Links between
-- records of different streams (a hold to its referral, a return to its
-- case) are kept as the IDs the events carry and resolved when read, so
-- the order in which the streams are applied never matters.
-- No identifier ever reaches casepath: persons are pseudonyms, the rest coded.
-- Enum columns hold the protobuf enum number.

-- casepath_identification
CREATE TABLE cp_cases (
    case_id uuid PRIMARY KEY,
    person_id uuid NOT NULL,
    reporting_agency text NOT NULL,
    competent_authority text NOT NULL,
    -- nrm.identification.v1.CaseStatus
    status integer NOT NULL,
    reported_at timestamptz NOT NULL,
    found_at timestamptz,
    gender integer NOT NULL,
    age_band integer NOT NULL,
    child boolean NOT NULL,
    citizenship text NOT NULL,
    country_of_exploitation text NOT NULL,
    -- nrm.identification.v1.ExploitationForm
    exploitation_forms integer[] NOT NULL,
    -- nrm.identification.v1.Decision (0 while undecided)
    decision integer NOT NULL DEFAULT 0,
    decided_at timestamptz,
    -- The report's or the review request's time while a decision is due;
    -- NULL once decided (and for a case opened from abroad, decided there).
    decision_waiting_since timestamptz,
    -- A case opened on a return home: the country and the return.
    from_country text,
    return_id uuid,
    possible_duplicate boolean NOT NULL DEFAULT false,
    erased_at timestamptz
);
CREATE INDEX cp_cases_person ON cp_cases (person_id);
CREATE INDEX cp_cases_return ON cp_cases (return_id) WHERE return_id IS NOT NULL;
CREATE INDEX cp_cases_reported ON cp_cases (reported_at);
CREATE INDEX cp_cases_waiting ON cp_cases (competent_authority, decision_waiting_since)
    WHERE decision_waiting_since IS NOT NULL;

-- casepath_identification: anonymous notifications (statistics only).
CREATE TABLE cp_notifications (
    notification_id uuid PRIMARY KEY,
    filed_on timestamptz NOT NULL,
    found_country text NOT NULL,
    country_of_exploitation text NOT NULL,
    exploitation_forms integer[] NOT NULL,
    gender integer NOT NULL,
    age_band integer NOT NULL,
    citizenship text NOT NULL
);
CREATE INDEX cp_notifications_filed ON cp_notifications (filed_on);

-- casepath_referral
CREATE TABLE cp_consents (
    consent_id uuid PRIMARY KEY,
    person_id uuid NOT NULL,
    case_id uuid,
    recipient_agency text NOT NULL,
    recorded_by_agency text NOT NULL,
    purposes integer[] NOT NULL,
    data_categories integer[] NOT NULL,
    recorded_at timestamptz NOT NULL,
    expires_at timestamptz,
    ended_at timestamptz,
    -- nrm.referral.v1.ConsentEndReason
    end_reason integer NOT NULL DEFAULT 0
);
CREATE INDEX cp_consents_person ON cp_consents (person_id);

-- casepath_referral
CREATE TABLE cp_referrals (
    referral_id uuid PRIMARY KEY,
    person_id uuid NOT NULL,
    case_id uuid,
    referring_agency text NOT NULL,
    receiving_agency text NOT NULL,
    consent_id uuid,
    services integer[] NOT NULL,
    urgency integer NOT NULL,
    -- pending | accepted | declined | closed | cancelled
    status text NOT NULL,
    created_at timestamptz NOT NULL,
    -- Since when an answer of receiving_agency is awaited (created or
    -- redirected); NULL once answered, closed or cancelled.
    waiting_since timestamptz,
    answer_due_at timestamptz,
    -- The first accept or decline.
    answered_at timestamptz,
    accepted_at timestamptz,
    closed_at timestamptz,
    -- nrm.referral.v1.ReferralOutcome
    outcome integer NOT NULL DEFAULT 0
);
CREATE INDEX cp_referrals_person ON cp_referrals (person_id);
CREATE INDEX cp_referrals_waiting ON cp_referrals (receiving_agency, answer_due_at) WHERE waiting_since IS NOT NULL;

-- casepath_referral
CREATE TABLE cp_goals (
    goal_id uuid PRIMARY KEY,
    person_id uuid NOT NULL,
    -- nrm.referral.v1.GoalKind
    kind integer NOT NULL,
    added_at timestamptz NOT NULL,
    due_at timestamptz,
    met_at timestamptz
);
CREATE INDEX cp_goals_person ON cp_goals (person_id);

-- casepath_shelter
CREATE TABLE cp_shelters (
    shelter_id uuid PRIMARY KEY,
    code text NOT NULL,
    region text NOT NULL,
    operator_agency text NOT NULL
);

-- casepath_shelter
CREATE TABLE cp_holds (
    hold_id uuid PRIMARY KEY,
    shelter_id uuid NOT NULL,
    -- The referral the bed is for; NULL for a bed held for a person
    -- arriving from abroad, which is linked by the commit that caused it
    -- (a return's commit: cp_return_commits).
    referral_id uuid,
    cause_commit_id uuid,
    holder_agency text NOT NULL,
    -- nrm.shelter.v1.BedCategory
    category integer NOT NULL,
    held_at timestamptz NOT NULL,
    expires_at timestamptz,
    -- held | released | expired | admitted | discharged
    status text NOT NULL,
    admitted_at timestamptz,
    discharged_at timestamptz
);
CREATE INDEX cp_holds_referral ON cp_holds (referral_id) WHERE referral_id IS NOT NULL;
CREATE INDEX cp_holds_cause ON cp_holds (cause_commit_id) WHERE cause_commit_id IS NOT NULL;

-- casepath_repatriation
CREATE TABLE cp_returns (
    return_id uuid PRIMARY KEY,
    -- nrm.repatriation.v1.Direction
    direction integer NOT NULL,
    from_country text NOT NULL,
    to_country text NOT NULL,
    opened_by text NOT NULL,
    consulate_agency text NOT NULL,
    received_by text NOT NULL DEFAULT '',
    -- The destination country's reference of the identification: a case
    -- ID of this deployment when the return was opened for one.
    foreign_reference text NOT NULL,
    -- nrm.repatriation.v1.ReturnStatus
    status integer NOT NULL,
    opened_at timestamptz NOT NULL,
    handed_over_at timestamptz
);
CREATE INDEX cp_returns_reference ON cp_returns (foreign_reference);

-- casepath_repatriation: every commit of a return, so that what another
-- stream did because of it (a bed held for an arrival) finds the return.
CREATE TABLE cp_return_commits (
    commit_id uuid PRIMARY KEY,
    return_id uuid NOT NULL
);

-- Every projection: the steps of the paths. `step` is an encoded
-- nrm.casepath.v1.Step (without `spent`, computed when read).
CREATE TABLE cp_steps (
    -- The projection that wrote it.
    source text NOT NULL,
    -- The event's ID, or one derived from it (uuid v5) for a second step of
    -- one event (FOUND beside REPORTED) or a step that crossed the border.
    step_id uuid NOT NULL,
    -- The record it concerns: a case, consent, referral, hold, return or
    -- goal ID (unique across kinds: UUIDv7).
    subject_id uuid NOT NULL,
    -- nrm.casepath.v1.PathPart and StepKind
    part integer NOT NULL,
    kind integer NOT NULL,
    at timestamptz NOT NULL,
    -- The commit it came in and the commit that caused that one (ordering).
    commit_id uuid NOT NULL,
    causation_id uuid,
    -- Its place in its stream and commit (ties of equal times).
    stream_sequence bigint NOT NULL,
    position integer NOT NULL,
    step bytea NOT NULL,
    PRIMARY KEY (source, step_id)
);
CREATE INDEX cp_steps_subject ON cp_steps (subject_id);
