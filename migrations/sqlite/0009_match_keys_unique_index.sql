-- `match_keys` keeps its rows in a plain table with two indexes: `match_keys_key`, unique,
-- where candidates are found by key (what the primary key was), and `match_keys_record`, by
-- record. Unlike a primary key's, both indexes can be dropped and built again around a bulk
-- load (a rebuild writing most records' keys), so the rows go in in any order, beside other
-- work, and SQLite sorts once per index.
CREATE TABLE match_keys_new (
    key       TEXT NOT NULL,
    source    TEXT NOT NULL,
    source_id TEXT NOT NULL
);
INSERT INTO match_keys_new (key, source, source_id)
    SELECT key, source, source_id FROM match_keys ORDER BY key, source, source_id;
DROP TABLE match_keys;
ALTER TABLE match_keys_new RENAME TO match_keys;
CREATE UNIQUE INDEX match_keys_key ON match_keys (key, source, source_id);
CREATE INDEX match_keys_record ON match_keys (source, source_id);
