-- Issue 10: a bed held at home for a person announced from abroad (a return
-- with a shelter need on arrival), by the arrivals reaction on the home
-- country's repatriation stream.

-- Such a hold names no referral: its events carry an empty referral_id, and
-- the return it is for is kept in placement_returns below.
ALTER TABLE open_holds ALTER COLUMN referral_id DROP NOT NULL;
ALTER TABLE free_capacity_holds ALTER COLUMN referral_id DROP NOT NULL;

-- The arrivals reaction's own record of each announced return: its guard
-- (the return's stream version acted on: an event at or below it changes
-- nothing), whether placement was tried (once per return: a bed held, or
-- NoBedAvailable), and the one hold it ever made for the return. Written in
-- the transaction of the reaction's checkpoint and of the hold's events. Not
-- a read model (never emptied): a replay of the repatriation stream holds no
-- second bed. Coded fields only: no reason for the return, no identifiers.
CREATE TABLE placement_returns (
    return_id  UUID        PRIMARY KEY,
    version    BIGINT      NOT NULL,
    -- The latest snapshot acted on said the return halted.
    halted     BOOLEAN     NOT NULL,
    placed     BOOLEAN     NOT NULL DEFAULT false,
    -- The hold made for the return (at most one, ever) and its shelter.
    hold_id    UUID        UNIQUE,
    shelter_id UUID,
    -- When the person is expected, as the latest snapshot says (ListArrivals).
    arrival_at TIMESTAMPTZ,
    CHECK ((hold_id IS NULL) = (shelter_id IS NULL)),
    CHECK (hold_id IS NULL OR placed)
);
