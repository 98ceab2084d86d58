-- patient_history: every version of a canonical row, valid from `valid_from` (inclusive) to
-- `valid_to` (exclusive; NULL for the current version). Written in the same transaction as the
-- `patients` row; consecutive versions of a patient chain without gaps or overlaps.
-- Column types mean the same as in `patients` on both backends.

CREATE TABLE patient_history (
    patient_id      TEXT NOT NULL,
    version         BIGINT NOT NULL,
    given_name      TEXT,
    middle_name     TEXT,
    family_name     TEXT,
    preferred_name  TEXT,
    birth_date      TEXT,
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
    status          TEXT NOT NULL,
    merged_into     TEXT,
    first_seen_at   TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    valid_from      TEXT NOT NULL,
    valid_to        TEXT,
    PRIMARY KEY (patient_id, version)
);
CREATE INDEX patient_history_valid_from ON patient_history (valid_from);
CREATE INDEX patient_history_valid_to ON patient_history (valid_to);

-- Existing rows: their current version, valid since their last change.
INSERT INTO patient_history (patient_id, version, given_name, middle_name, family_name, preferred_name,
    birth_date, sex, gender_identity, email, phone, address_line1, address_line2, city, state,
    postal_code, country, healthie_id, intakeq_id, hint_id, status, merged_into, first_seen_at,
    updated_at, valid_from, valid_to)
SELECT patient_id, version, given_name, middle_name, family_name, preferred_name,
    birth_date, sex, gender_identity, email, phone, address_line1, address_line2, city, state,
    postal_code, country, healthie_id, intakeq_id, hint_id, status, merged_into, first_seen_at,
    updated_at, updated_at, NULL
FROM patients;
