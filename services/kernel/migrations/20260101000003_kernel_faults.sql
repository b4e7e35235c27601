-- What the kernel needs to keep its promises under faults (issue 8).

-- Every commit ever appended, kept after publishing: the event store can
-- refill the bus when JetStream lost messages (a wiped data folder, a deleted
-- stream, a power loss before fsync), republishing each commit under its
-- original ID and subject.
CREATE TABLE commits (
    commit_id      UUID        PRIMARY KEY,
    stream_id      TEXT        NOT NULL,
    first_version  BIGINT      NOT NULL,
    last_version   BIGINT      NOT NULL,
    subject        TEXT        NOT NULL,
    committed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (stream_id, last_version)
);

-- The relay publishes, per aggregate, the outbox row of the lowest version first.
CREATE INDEX outbox_stream_version ON outbox (stream_id, first_version);

-- The identity of the stream a checkpoint counts in, and of the message at
-- the checkpoint: a stream deleted and recreated, or one that lost its tail
-- and was refilled, is recognised and the read model rebuilt.
ALTER TABLE projection_checkpoints
    ADD COLUMN stream_name    TEXT,
    ADD COLUMN stream_created BIGINT,
    ADD COLUMN commit_id      UUID;

-- Messages whose handler kept failing: set aside so that the messages after
-- them go on; listed and retried by an operator.
CREATE TABLE parked_messages (
    projection       TEXT        NOT NULL,
    stream_sequence  BIGINT      NOT NULL,
    stream_name      TEXT        NOT NULL,
    subject          TEXT        NOT NULL,
    commit_id        UUID,
    attempts         INTEGER     NOT NULL,
    last_error       TEXT        NOT NULL,
    parked_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    retry_requested  BOOLEAN     NOT NULL DEFAULT false,
    PRIMARY KEY (projection, stream_sequence)
);

-- Timers whose handler fails are tried again with growing back-off, then parked.
ALTER TABLE timers
    ADD COLUMN attempts        INTEGER     NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at TIMESTAMPTZ,
    ADD COLUMN parked_at       TIMESTAMPTZ,
    ADD COLUMN last_error      TEXT;
DROP INDEX timers_due;
CREATE INDEX timers_due ON timers (due_at) WHERE fired_at IS NULL AND parked_at IS NULL;
