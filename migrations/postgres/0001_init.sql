-- Core tables: inbox, source records, canonical patients, provenance, links, sync state.
-- Queue times are epoch milliseconds (BIGINT) so comparisons are exact on both backends;
-- analyst-facing times are timestamptz/date here and ISO-8601 text on SQLite.

CREATE TABLE inbox (
    id               BIGSERIAL PRIMARY KEY,
    source           TEXT    NOT NULL,
    origin           TEXT    NOT NULL,
    event_type       TEXT    NOT NULL,
    resource_type    TEXT,
    resource_id      TEXT,
    body             TEXT    NOT NULL,
    dedupe_key       TEXT,
    received_at_ms   BIGINT  NOT NULL,
    state            TEXT    NOT NULL,
    reason           TEXT,
    attempts         BIGINT  NOT NULL DEFAULT 0,
    available_at_ms  BIGINT  NOT NULL,
    lease_owner      TEXT,
    leased_until_ms  BIGINT,
    last_error_kind  TEXT,
    last_http_status BIGINT,
    finished_at_ms   BIGINT
);
CREATE INDEX inbox_claimable ON inbox (state, available_at_ms);
CREATE INDEX inbox_resource ON inbox (source, resource_id, state);
CREATE UNIQUE INDEX inbox_dedupe ON inbox (source, dedupe_key) WHERE dedupe_key IS NOT NULL;

CREATE TABLE source_records (
    source            TEXT NOT NULL,
    source_id         TEXT NOT NULL,
    status            TEXT NOT NULL,
    merged_into       TEXT,
    fields            TEXT NOT NULL,
    raw               TEXT NOT NULL,
    source_updated_at TIMESTAMPTZ,
    fetched_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (source, source_id)
);

CREATE TABLE patients (
    patient_id      TEXT PRIMARY KEY,
    given_name      TEXT,
    middle_name     TEXT,
    family_name     TEXT,
    preferred_name  TEXT,
    birth_date      DATE,
    sex             TEXT,
    gender_identity TEXT,
    email           TEXT,
    phone           TEXT,
    address_line1   TEXT,
    address_line2   TEXT,
    city            TEXT,
    state           TEXT,
    postal_code     TEXT,
    country         TEXT,
    healthie_id     TEXT,
    intakeq_id      TEXT,
    hint_id         TEXT,
    status          TEXT   NOT NULL,
    merged_into     TEXT,
    first_seen_at   TIMESTAMPTZ   NOT NULL,
    updated_at      TIMESTAMPTZ   NOT NULL,
    version         BIGINT NOT NULL
);
CREATE INDEX patients_healthie_id ON patients (healthie_id);
CREATE INDEX patients_intakeq_id ON patients (intakeq_id);
CREATE INDEX patients_hint_id ON patients (hint_id);

CREATE TABLE patient_field_sources (
    patient_id        TEXT NOT NULL,
    field             TEXT NOT NULL,
    source            TEXT NOT NULL,
    source_id         TEXT NOT NULL,
    source_updated_at TIMESTAMPTZ,
    decided_at        TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (patient_id, field)
);

CREATE TABLE links (
    source      TEXT NOT NULL,
    source_id   TEXT NOT NULL,
    patient_id  TEXT NOT NULL,
    method      TEXT NOT NULL,
    rule        TEXT,
    score       DOUBLE PRECISION,
    decided_by  TEXT NOT NULL,
    decided_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (source, source_id)
);
CREATE INDEX links_patient ON links (patient_id);

CREATE TABLE link_events (
    id                  BIGSERIAL PRIMARY KEY,
    source              TEXT NOT NULL,
    source_id           TEXT NOT NULL,
    action              TEXT NOT NULL,
    patient_id          TEXT,
    previous_patient_id TEXT,
    method              TEXT NOT NULL,
    rule                TEXT,
    score               DOUBLE PRECISION,
    decided_by          TEXT NOT NULL,
    at                  TIMESTAMPTZ NOT NULL
);
CREATE INDEX link_events_record ON link_events (source, source_id);

CREATE TABLE sync_state (
    source          TEXT NOT NULL,
    stream          TEXT NOT NULL,
    cursor          TEXT,
    checkpoint      TEXT,
    last_success_at TIMESTAMPTZ,
    updated_at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (source, stream)
);
