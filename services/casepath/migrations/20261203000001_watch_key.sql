-- The key of the tokens a change notification names instead of record IDs
-- (crate::domain::changes): anyone who may connect to this database may
-- LISTEN, but only who may read it learns the key. One row, made once,
-- from PostgreSQL's strong random source (gen_random_uuid: 122 random bits
-- each). Not a cp_* table: no reset or rebuild of the read models drops it.
CREATE TABLE casepath_watch_key (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    key bytea NOT NULL CHECK (length(key) = 32)
);
INSERT INTO casepath_watch_key (key)
VALUES (decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'));
