-- The case a return was opened for, as a UUID: its foreign reference when
-- that is a case ID's canonical text (the projection stores a reference
-- that parses as a UUID in that form; `20261202000001_links.sql`), NULL
-- otherwise. Paths and figures link a return to a person through it, by
-- the case's primary key, instead of matching every reference against a
-- pattern (a regular expression per return, about 12 of GetStatistics'
-- milliseconds per 3,500 returns here) or casting case IDs to text. The
-- pattern is checked once, when the row is written. Every lookup by
-- reference was of a case ID, so the index on the text goes.
ALTER TABLE cp_returns ADD COLUMN foreign_case uuid GENERATED ALWAYS AS (
    CASE WHEN foreign_reference ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
         THEN foreign_reference::uuid END
) STORED;
CREATE INDEX cp_returns_case ON cp_returns (foreign_case) WHERE foreign_case IS NOT NULL;
DROP INDEX cp_returns_reference;
-- The new column's statistics, for the planner, now rather than at the next
-- autoanalyze. The ALTER rewrites cp_returns (one row per return: small)
-- under an exclusive lock; a casepath replica of an older version, still
-- running, finds its lookups by reference without their index.
ANALYZE cp_returns;
