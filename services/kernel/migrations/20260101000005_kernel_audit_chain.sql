-- The audit trail made tamper-evident (issue 9): every entry is chained by
-- hash to the one before it, numbered without gaps, and the table refuses
-- UPDATE, DELETE and TRUNCATE. `nrmctl audit verify` walks the chain.
--
-- A BEFORE INSERT trigger numbers and hashes every entry, whoever writes it
-- (audit::append, or the audit CTE of the event store's single-statement
-- append), under the lock of the one-row chain head: appends are serialised
-- until their transaction ends, so the sequence has no gaps and no forks.

ALTER TABLE audit_log
    ADD COLUMN seq       BIGINT,
    ADD COLUMN prev_hash BYTEA,
    ADD COLUMN hash      BYTEA,
    -- The person whose records were read or changed, when known.
    ADD COLUMN person_id UUID,
    -- ok | denied | unauthenticated
    ADD COLUMN outcome   TEXT NOT NULL DEFAULT 'ok';

-- The hash of an entry: SHA-256 over a canonical encoding of its fields, in
-- this order: a version tag, seq (8 bytes, big-endian), prev_hash (32
-- bytes), the time in microseconds since the epoch (8 bytes, big-endian),
-- then agency, role, officer, action, subject_id as UTF-8 each preceded by
-- its length (4 bytes, big-endian), person_id (0x00 when absent, else 0x01
-- and its 16 bytes), purpose and outcome (length-prefixed). nrm_kernel::audit
-- computes the same bytes in Rust to verify the chain.
CREATE FUNCTION audit_field(value TEXT) RETURNS BYTEA LANGUAGE sql STABLE AS $$
    SELECT int4send(octet_length(convert_to(value, 'UTF8'))) || convert_to(value, 'UTF8')
$$;

CREATE FUNCTION audit_entry_hash(
    seq BIGINT, prev_hash BYTEA, recorded_at TIMESTAMPTZ, agency TEXT, role TEXT, officer TEXT, action TEXT,
    subject_id TEXT, person_id UUID, purpose TEXT, outcome TEXT
) RETURNS BYTEA LANGUAGE sql STABLE AS $$
    SELECT sha256(
        convert_to('kopur-audit-v1', 'UTF8')
        || int8send(seq)
        || prev_hash
        || int8send((extract(epoch FROM recorded_at) * 1000000)::BIGINT)
        || audit_field(agency) || audit_field(role) || audit_field(officer)
        || audit_field(action) || audit_field(subject_id)
        || CASE WHEN person_id IS NULL THEN '\x00'::BYTEA ELSE '\x01'::BYTEA || uuid_send(person_id) END
        || audit_field(purpose) || audit_field(outcome)
    )
$$;

-- The last entry of the chain: its seq and hash (32 zero bytes before the first).
CREATE TABLE audit_chain_head (
    only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row),
    seq      BIGINT NOT NULL,
    hash     BYTEA  NOT NULL
);

-- Existing entries are chained in the order they were written.
ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only;
UPDATE audit_log SET outcome = 'denied' WHERE action LIKE '%:denied';
DO $$
DECLARE
    entry RECORD;
    n     BIGINT := 0;
    last  BYTEA  := decode(repeat('00', 32), 'hex');
BEGIN
    FOR entry IN SELECT * FROM audit_log ORDER BY id LOOP
        n := n + 1;
        UPDATE audit_log
        SET seq = n,
            prev_hash = last,
            hash = audit_entry_hash(n, last, entry.at, entry.agency, entry.role, entry.officer, entry.action,
                                    entry.subject_id, entry.person_id, entry.purpose, entry.outcome)
        WHERE id = entry.id
        RETURNING hash INTO last;
    END LOOP;
    INSERT INTO audit_chain_head (seq, hash) VALUES (n, last);
END $$;
ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only;

ALTER TABLE audit_log
    ALTER COLUMN seq SET NOT NULL,
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN hash SET NOT NULL;
CREATE UNIQUE INDEX audit_log_seq ON audit_log (seq);
CREATE INDEX audit_log_person ON audit_log (person_id, at, seq) WHERE person_id IS NOT NULL;
CREATE INDEX audit_log_subject ON audit_log (subject_id, at, seq);

-- Numbers and hashes a new entry after the chain head, whatever the writer
-- put in seq, prev_hash and hash, and moves the head. The head's row lock
-- is held until the transaction ends.
CREATE FUNCTION audit_log_chain() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    head audit_chain_head%ROWTYPE;
BEGIN
    SELECT * INTO head FROM audit_chain_head FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'audit_chain_head is missing: the audit chain cannot be extended';
    END IF;
    NEW.seq := head.seq + 1;
    NEW.prev_hash := head.hash;
    NEW.hash := audit_entry_hash(NEW.seq, NEW.prev_hash, NEW.at, NEW.agency, NEW.role, NEW.officer, NEW.action,
                                 NEW.subject_id, NEW.person_id, NEW.purpose, NEW.outcome);
    UPDATE audit_chain_head SET seq = NEW.seq, hash = NEW.hash;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_chain();

CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();

-- The head moves only under audit_log_chain (a trigger within a trigger);
-- it is never deleted or truncated.
CREATE FUNCTION audit_chain_head_moves_with_the_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND pg_trigger_depth() > 1 THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_chain_head moves only when an audit entry is appended';
END $$;
CREATE TRIGGER audit_chain_head_guard BEFORE UPDATE OR DELETE ON audit_chain_head
    FOR EACH ROW EXECUTE FUNCTION audit_chain_head_moves_with_the_log();
CREATE TRIGGER audit_chain_head_no_truncate BEFORE TRUNCATE ON audit_chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_chain_head_moves_with_the_log();
