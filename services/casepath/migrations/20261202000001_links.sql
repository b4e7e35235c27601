-- A bed held for an arrival finds its return through cp_return_commits:
-- the path and the figures look commits up by their return.
CREATE INDEX cp_return_commits_return ON cp_return_commits (return_id);

-- A return's foreign reference that is a UUID is stored in the canonical
-- lower-case form (the projection now normalises it as the `uuid` crate
-- reads it: plain, hyphenated, braced or `urn:uuid:`, blanks around), so
-- that it matches cp_cases.case_id::text. Rows written before are
-- normalised the same way here, so that a rebuild gives the same rows.
UPDATE cp_returns
SET foreign_reference = regexp_replace(btrim(foreign_reference, E' \t\r\n'), '^(urn:uuid:|\{)|\}$', '', 'g')::uuid::text
WHERE btrim(foreign_reference, E' \t\r\n') ~ ('^([0-9a-fA-F]{32}'
    || '|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}'
    || '|\{[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\}'
    || '|urn:uuid:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$');
