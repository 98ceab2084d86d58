-- SQLite's `match_keys` traded its primary key for a unique index that a bulk load can drop
-- and build again. Postgres loads keys with its primary key in place: nothing changes here.
SELECT 1;
