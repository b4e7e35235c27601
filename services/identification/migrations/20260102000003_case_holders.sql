-- The agencies holding a case: the reporting agency and the competent
-- authority handling it. ListCases shows a caller without a permit for any
-- case only the cases its agency holds, and possible duplicates (the
-- matching cases) only to the competent authority and the coordinator.
-- Cases reported before this column have no competent authority ('').
ALTER TABLE case_list
    ADD COLUMN competent_authority TEXT   NOT NULL DEFAULT '',
    ADD COLUMN matching_case_ids   UUID[] NOT NULL DEFAULT '{}';
CREATE INDEX case_list_by_authority ON case_list (competent_authority, reported_at DESC);
CREATE INDEX case_list_by_match ON case_list USING GIN (matching_case_ids);
