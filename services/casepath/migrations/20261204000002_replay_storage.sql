-- A case row is written more than once: opened, then screened, decided,
-- reviewed. Filled pages leave no room for the new version of a row on its
-- own page, so every update was a non-HOT one: a new entry in each of the
-- table's indexes, and btree bottom-up deletion passes over them. With room
-- left on each page, an update that changes no indexed column (screening
-- sets the status only) stays on the row's page as a HOT update, without
-- index writes. Only pages written from now on keep the room.
ALTER TABLE cp_cases SET (fillfactor = 50);
