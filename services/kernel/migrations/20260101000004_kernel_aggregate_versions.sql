-- Per runner and source aggregate, the last version applied: a commit of an
-- aggregate at or below it (a hole refilled after later versions, a replay of
-- a recreated stream) changes nothing, so a read model or a reaction never
-- moves an aggregate back (a referral closed, then "accepted" again).
CREATE TABLE projection_versions (
    projection  TEXT   NOT NULL,
    stream_id   TEXT   NOT NULL,
    version     BIGINT NOT NULL,
    PRIMARY KEY (projection, stream_id)
);
