-- Tables of the shelter service (beside the kernel's).

-- Read model: beds per shelter and category, fed by the free-capacity
-- projection from the service's own stream. Coded fields only (never the address).
CREATE TABLE free_capacity (
    shelter_id UUID    NOT NULL,
    category   INTEGER NOT NULL,
    region     TEXT    NOT NULL,
    capacity   INTEGER NOT NULL CHECK (capacity >= 0),
    held       INTEGER NOT NULL DEFAULT 0,
    admitted   INTEGER NOT NULL DEFAULT 0,
    free       INTEGER GENERATED ALWAYS AS (greatest(capacity - held - admitted, 0)) STORED,
    PRIMARY KEY (shelter_id, category)
);
CREATE INDEX free_capacity_by_region ON free_capacity (region, category, free DESC);
CREATE INDEX free_capacity_by_category ON free_capacity (category, free DESC);

-- The same projection: where each shelter's stream was applied up to.
CREATE TABLE free_capacity_shelters (
    shelter_id UUID   PRIMARY KEY,
    region     TEXT   NOT NULL,
    version    BIGINT NOT NULL
);

-- The same projection: every hold with its category and status, so that a
-- release, expiry, admission or discharge moves the right counter.
CREATE TABLE free_capacity_holds (
    hold_id     UUID    PRIMARY KEY,
    shelter_id  UUID    NOT NULL,
    category    INTEGER NOT NULL,
    referral_id UUID    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('held', 'admitted', 'discharged', 'released', 'expired'))
);
CREATE INDEX free_capacity_holds_active ON free_capacity_holds (referral_id) WHERE status IN ('held', 'admitted');

-- The placement reaction: referral commits already acted on. Written in the
-- reaction's transaction, so a commit published twice (whatever its stream
-- sequence) holds no second bed.
CREATE TABLE placement_handled (
    commit_id  UUID        PRIMARY KEY,
    handled_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
