-- The kernel's tables, present in every service's own database.

-- Every event of every aggregate of this service, append-only.
CREATE TABLE events (
    global_position BIGSERIAL PRIMARY KEY,
    event_id        UUID        NOT NULL UNIQUE,
    stream_id       TEXT        NOT NULL,
    version         BIGINT      NOT NULL CHECK (version > 0),
    event_type      TEXT        NOT NULL,
    schema_version  INTEGER     NOT NULL,
    payload         BYTEA       NOT NULL,
    -- correlation and causation IDs, actor (agency, role, pseudonymous officer), W3C trace context
    metadata        JSONB       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (stream_id, version)
);

-- One row per commit still to be published. Written in the same transaction as
-- the events; deleted by the relay once JetStream acknowledged the message.
CREATE TABLE outbox (
    id             BIGSERIAL PRIMARY KEY,
    -- The writing transaction: the relay reads only rows of transactions older
    -- than every transaction still running, so an early row committing late is never skipped.
    tx_id          XID8        NOT NULL DEFAULT pg_current_xact_id(),
    commit_id      UUID        NOT NULL UNIQUE,
    stream_id      TEXT        NOT NULL,
    first_version  BIGINT      NOT NULL,
    last_version   BIGINT      NOT NULL,
    subject        TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX outbox_order ON outbox (tx_id, id);

-- Idempotent commands: the first answer to each client request ID.
CREATE TABLE commands (
    request_key  TEXT        PRIMARY KEY,
    fingerprint  BYTEA       NOT NULL,
    response     BYTEA       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Where each projection stands in its JetStream stream; written in the same
-- transaction as the projection's read model.
CREATE TABLE projection_checkpoints (
    projection      TEXT        PRIMARY KEY,
    stream_sequence BIGINT      NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Per-person data keys, wrapped by the master key. Deleting a row erases the
-- person's sealed data everywhere (crypto-shredding).
CREATE TABLE person_keys (
    person_id    UUID        PRIMARY KEY,
    key_version  INTEGER     NOT NULL,
    nonce        BYTEA       NOT NULL,
    wrapped_key  BYTEA       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Append-only audit trail of every command and every read of personal data.
CREATE TABLE audit_log (
    id          BIGSERIAL   PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    agency      TEXT        NOT NULL,
    role        TEXT        NOT NULL,
    officer     TEXT        NOT NULL,
    action      TEXT        NOT NULL,
    subject_id  TEXT        NOT NULL,
    purpose     TEXT        NOT NULL
);
CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();

CREATE FUNCTION events_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();
