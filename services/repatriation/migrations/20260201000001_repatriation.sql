-- Tables of the repatriation service (beside the kernel's).

-- Read model of the list of returns (coded fields only), fed by the
-- return_list projection from the service's own stream: outgoing returns
-- and, in the home country, the incoming ones.
CREATE TABLE return_list (
    return_id  UUID        PRIMARY KEY,
    -- nrm.repatriation.v1.Direction
    direction  INTEGER     NOT NULL,
    -- nrm.repatriation.v1.ReturnStatus
    status     INTEGER     NOT NULL,
    -- The agencies holding an outgoing return (empty for an incoming one).
    holders    TEXT[]      NOT NULL,
    -- When the return was opened (or announced) here: the list's order.
    opened_at  TIMESTAMPTZ NOT NULL,
    -- Version of the return's stream last applied.
    version    BIGINT      NOT NULL,
    -- The encoded nrm.repatriation.v1.ReturnSummary.
    summary    BYTEA       NOT NULL
);
CREATE INDEX return_list_newest ON return_list (opened_at DESC, return_id DESC);
CREATE INDEX return_list_holders ON return_list USING GIN (holders);
CREATE INDEX return_list_incoming ON return_list (opened_at DESC, return_id DESC) WHERE direction = 2;
