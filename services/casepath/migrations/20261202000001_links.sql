-- A bed held for an arrival finds its return through cp_return_commits:
-- the path and the figures look commits up by their return.
CREATE INDEX cp_return_commits_return ON cp_return_commits (return_id);

-- A return's foreign reference that is a UUID is now stored in the
-- canonical lower-case form, as the projection (the one normaliser, in
-- Rust) reads it. Rows written before this version keep the form they were
-- typed in: `nrmctl ops rebuild --service casepath` after the upgrade finds
-- them DIFFERENT and rebuilds those views from the streams.
