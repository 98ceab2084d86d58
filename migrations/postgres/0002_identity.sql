-- Identity: blocking keys for candidate lookup, and the review queue of uncertain pairs.

CREATE TABLE match_keys (
    key       TEXT NOT NULL,
    source    TEXT NOT NULL,
    source_id TEXT NOT NULL,
    PRIMARY KEY (key, source, source_id)
);
CREATE INDEX match_keys_record ON match_keys (source, source_id);

CREATE TABLE match_reviews (
    id         BIGSERIAL PRIMARY KEY,
    source     TEXT NOT NULL,
    source_id  TEXT NOT NULL,
    patient_id TEXT NOT NULL,
    score      DOUBLE PRECISION NOT NULL,
    state      TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    decided_at TIMESTAMPTZ,
    decided_by TEXT,
    UNIQUE (source, source_id, patient_id)
);
CREATE INDEX match_reviews_state ON match_reviews (state);
