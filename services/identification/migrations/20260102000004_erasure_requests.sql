-- Erasures asked of a case by an agency erasing a linked case of the same
-- person that it holds while another agency holds this one: the erasure
-- takes what the caller holds and records a request for the rest (never a
-- refusal, which would tell the caller that someone else reported the
-- person). Shown as `erasure_requested` to the case's holders and the
-- coordinator; the row goes when the case is erased. IDs and codes only.
CREATE TABLE erasure_requests (
    case_id      UUID        PRIMARY KEY,
    requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason       TEXT        NOT NULL
);
