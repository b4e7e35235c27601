-- Durable deadlines: scheduled in the transaction of the command that sets
-- them, fired once (the firing and its effects commit together).
CREATE TABLE timers (
    id            UUID        PRIMARY KEY,
    kind          TEXT        NOT NULL,
    aggregate_id  TEXT        NOT NULL,
    due_at        TIMESTAMPTZ NOT NULL,
    payload       BYTEA       NOT NULL DEFAULT '',
    fired_at      TIMESTAMPTZ,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (kind, aggregate_id)
);
CREATE INDEX timers_due ON timers (due_at) WHERE fired_at IS NULL;
