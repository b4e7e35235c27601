-- Issue 9: beds only for real referrals, placement on the shelter's own state.

-- What the shelter service knows of each referral, from the referral stream
-- (kept by the placement reaction, in the transaction of its checkpoint, so
-- that placement, auto-release and this table follow the stream in one
-- order). Coded fields only: never the referral's reason or case data.
CREATE TABLE shelter_referrals (
    referral_id      UUID    PRIMARY KEY,
    person_id        UUID,
    receiving_agency TEXT    NOT NULL,
    state            TEXT    NOT NULL
        CHECK (state IN ('pending', 'accepted', 'declined', 'redirected', 'closed', 'cancelled')),
    -- The shelter need's bed category (0: none) and region ('' : any).
    category         INTEGER NOT NULL DEFAULT 0,
    region           TEXT    NOT NULL DEFAULT '',
    -- The referral stream's version applied so far.
    version          BIGINT  NOT NULL
);

-- Beds per shelter and category as the shelter's events leave them: written
-- in the transaction that appends the events (never behind them), read by
-- placement to choose a shelter.
CREATE TABLE shelter_beds (
    shelter_id UUID    NOT NULL,
    category   INTEGER NOT NULL,
    region     TEXT    NOT NULL,
    capacity   INTEGER NOT NULL CHECK (capacity >= 0),
    free       INTEGER NOT NULL CHECK (free >= 0),
    -- The shelter's stream version the row reflects.
    version    BIGINT  NOT NULL,
    PRIMARY KEY (shelter_id, category)
);
CREATE INDEX shelter_beds_free ON shelter_beds (category, region, free DESC);

-- Every hold that takes a bed (held or admitted), written in the
-- transaction that appends the hold's events. One per referral across all
-- shelters: a second hold for the same referral anywhere fails here.
CREATE TABLE open_holds (
    hold_id       UUID        PRIMARY KEY,
    referral_id   UUID        NOT NULL UNIQUE,
    shelter_id    UUID        NOT NULL,
    category      INTEGER     NOT NULL,
    holder_agency TEXT        NOT NULL,
    status        TEXT        NOT NULL CHECK (status IN ('held', 'admitted')),
    held_at       TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL
);
CREATE INDEX open_holds_by_shelter ON open_holds (shelter_id, status, expires_at);
