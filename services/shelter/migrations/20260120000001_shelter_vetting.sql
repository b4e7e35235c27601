-- Issue 9 review: holds only for referrals that asked for shelter, a bounded
-- number of holds per referral, approved shelters only, and shelter_referrals
-- kept by a read model of its own (backfilled from the referral stream).

-- The placement reaction's own view of each referral: the referral stream
-- version it acted on, and whether the referral's last event it saw ended
-- it (cancelled, closed, declined, redirected). Not a read model (never
-- emptied): it is the reaction's guard. HoldBed reads `ended` too, so that a
-- lagging `shelter_referrals` never lets a bed be held for a referral whose
-- end the placement reaction has already acted on. Seeded from what the
-- reaction wrote into shelter_referrals until now.
CREATE TABLE placement_referrals (
    referral_id UUID    PRIMARY KEY,
    version     BIGINT  NOT NULL,
    ended       BOOLEAN NOT NULL
);
INSERT INTO placement_referrals (referral_id, version, ended)
SELECT referral_id, version, state IN ('declined', 'redirected', 'closed', 'cancelled') FROM shelter_referrals;

-- Whether the referral asked for shelter (services include SHELTER or it
-- carries a shelter need). Kept by the `shelter_referrals` read model, which
-- is rebuilt from the referral stream: emptied here, so that the new runner
-- (no checkpoint yet) replays the stream from its first message and fills it
-- with the referrals accepted before this deploy too.
TRUNCATE shelter_referrals;
ALTER TABLE shelter_referrals ADD COLUMN wants_shelter BOOLEAN NOT NULL DEFAULT false;

-- Holds made for each referral over its lifetime (by HoldBed and by
-- placement), counted in the hold's transaction under the referral's lock.
-- Not part of any read model: a rebuild never resets it.
CREATE TABLE referral_hold_counts (
    referral_id UUID    PRIMARY KEY,
    holds       INTEGER NOT NULL CHECK (holds >= 0)
);
-- Every hold made so far counts (the free-capacity projection keeps them all).
INSERT INTO referral_hold_counts (referral_id, holds)
SELECT referral_id, count(*) FROM free_capacity_holds GROUP BY referral_id;

-- Shelters approved by the coordinator (ShelterApproved). Placement and the
-- capacity lists consider approved shelters only.
ALTER TABLE shelter_beds ADD COLUMN approved BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE free_capacity ADD COLUMN approved BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE free_capacity_shelters ADD COLUMN approved BOOLEAN NOT NULL DEFAULT false;
DROP INDEX shelter_beds_free;
CREATE INDEX shelter_beds_free ON shelter_beds (category, region, free DESC) WHERE approved;

-- Approve-by-migration: the shelters registered before this rule were
-- registered under the old rules (any shelter-running role, no vetting) and
-- have been taking referrals; to keep them serving, they count as approved.
-- Their streams carry no ShelterApproved event, so the service reads this
-- list when it folds a shelter. A shelter registered from now on starts
-- unapproved until the coordinator approves it.
CREATE TABLE shelters_approved_by_migration (
    shelter_id UUID PRIMARY KEY
);
INSERT INTO shelters_approved_by_migration (shelter_id)
SELECT DISTINCT substring(stream_id FROM 9)::uuid FROM events
WHERE stream_id LIKE 'shelter-%' AND event_type = 'ShelterRegistered';
UPDATE shelter_beds SET approved = true
WHERE shelter_id IN (SELECT shelter_id FROM shelters_approved_by_migration);
UPDATE free_capacity SET approved = true
WHERE shelter_id IN (SELECT shelter_id FROM shelters_approved_by_migration);
UPDATE free_capacity_shelters SET approved = true
WHERE shelter_id IN (SELECT shelter_id FROM shelters_approved_by_migration);
