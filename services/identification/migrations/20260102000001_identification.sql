-- Tables of the identification service (beside the kernel's).

-- Keyed hashes of normalised identifiers, to flag duplicate reports.
-- The hashes reveal nothing without the match key; rows go when the person is erased.
CREATE TABLE match_keys (
    match_key BYTEA NOT NULL,
    case_id   UUID  NOT NULL,
    PRIMARY KEY (match_key, case_id)
);
CREATE INDEX match_keys_by_case ON match_keys (case_id);

-- Read model of the case list (coded fields only), fed by the projection runner.
CREATE TABLE case_list (
    case_id            UUID        PRIMARY KEY,
    status             INTEGER     NOT NULL,
    reporting_agency   TEXT        NOT NULL,
    reported_at        TIMESTAMPTZ NOT NULL,
    exploitation_forms INTEGER[]   NOT NULL,
    child              BOOLEAN     NOT NULL,
    citizenship        TEXT        NOT NULL,
    version            BIGINT      NOT NULL
);
CREATE INDEX case_list_by_time ON case_list (reported_at DESC, case_id DESC);
CREATE INDEX case_list_by_agency ON case_list (reporting_agency, reported_at DESC);
