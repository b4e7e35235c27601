-- Issue 10: cases opened on a person's return home, identified abroad
-- (CaseOpenedFromAbroad). Cases reported here before are not.
ALTER TABLE case_list ADD COLUMN identified_abroad BOOLEAN NOT NULL DEFAULT false;
