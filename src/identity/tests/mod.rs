//! Table-driven tests of the public identity API: the evidence ladder and its guards, scores
//! and blocking keys (`matching`), and survivorship (`survivorship`). Normalisation and the
//! nickname table are tested in their own modules. This file holds the shared fixtures.

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};

use super::*;
use crate::model::{
    Address, ExternalId, PatientId, PersonFields, RecordStatus, SourceKey, SourceKind, SourceRecord,
};
use crate::store::LinkMethod;

use SourceKind::{Healthie, Hint, Intakeq};

mod matching;
mod survivorship;

// ---------------------------------------------------------------------------------------------
// Fixtures

pub(super) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
}

/// Builder for person fields.
#[derive(Clone, Default)]
pub(super) struct P(pub(super) PersonFields);

impl P {
    pub(super) fn new(given: &str, family: &str) -> P {
        P(PersonFields {
            given_name: Some(given.into()),
            family_name: Some(family.into()),
            ..PersonFields::default()
        })
    }
    pub(super) fn dob(mut self, ymd: &str) -> P {
        self.0.birth_date = Some(NaiveDate::parse_from_str(ymd, "%Y-%m-%d").unwrap());
        self
    }
    pub(super) fn sex(mut self, s: &str) -> P {
        self.0.sex = Some(s.into());
        self
    }
    pub(super) fn email(mut self, e: &str) -> P {
        self.0.email = Some(e.into());
        self
    }
    pub(super) fn phone(mut self, p: &str) -> P {
        self.0.phones.push(p.into());
        self
    }
    pub(super) fn preferred(mut self, n: &str) -> P {
        self.0.preferred_name = Some(n.into());
        self
    }
    pub(super) fn middle(mut self, n: &str) -> P {
        self.0.middle_name = Some(n.into());
        self
    }
    pub(super) fn address(mut self, line1: &str, zip: &str) -> P {
        self.0.address = Address {
            line1: Some(line1.into()),
            line2: None,
            city: Some("Springfield".into()),
            state: Some("IL".into()),
            postal_code: Some(zip.into()),
            country: Some("US".into()),
        };
        self
    }
    pub(super) fn ext(mut self, system: &str, value: &str) -> P {
        self.0.external_ids.push(ExternalId {
            system: system.into(),
            value: value.into(),
        });
        self
    }
    pub(super) fn rec(self, source: SourceKind, id: &str) -> SourceRecord {
        SourceRecord {
            key: SourceKey::new(source, id),
            fields: self.0,
            status: RecordStatus::Active,
            merged_into: None,
            source_updated_at: None,
            fetched_at: t0(),
            raw: serde_json::Value::Null,
        }
    }
}

pub(super) fn with_status(mut r: SourceRecord, status: RecordStatus) -> SourceRecord {
    r.status = status;
    r
}

pub(super) fn updated(mut r: SourceRecord, minutes: i64) -> SourceRecord {
    r.source_updated_at = Some(t0() + Duration::minutes(minutes));
    r
}

pub(super) fn cand(pid: &str, records: Vec<SourceRecord>) -> Candidate {
    Candidate {
        patient_id: PatientId::from(pid),
        records,
        rejected: false,
    }
}

pub(super) fn robert() -> P {
    P::new("Robert", "Smith")
        .dob("1980-03-05")
        .sex("M")
        .email("robert.smith@gmail.com")
        .phone("(415) 555-2671")
        .address("12 North Elm Street", "62704")
}

/// What a decision amounts to, for tables.
#[derive(Debug, PartialEq)]
pub(super) enum Outcome {
    Link(&'static str, LinkMethod, Option<&'static str>),
    Review(Vec<&'static str>),
    Nothing,
}

pub(super) fn outcome(d: &Decision) -> Outcome {
    match &d.target {
        LinkTarget::Existing {
            patient_id,
            method,
            rule,
            ..
        } => {
            let pid: &'static str = Box::leak(patient_id.0.clone().into_boxed_str());
            let rule = rule
                .as_ref()
                .map(|r| &*Box::leak(r.clone().into_boxed_str()));
            Outcome::Link(pid, *method, rule)
        }
        LinkTarget::NewPatient if d.reviews.is_empty() => Outcome::Nothing,
        LinkTarget::NewPatient => Outcome::Review(
            d.reviews
                .iter()
                .map(|r| &*Box::leak(r.patient_id.0.clone().into_boxed_str()))
                .collect(),
        ),
    }
}

pub(super) fn decide_one(incoming: P, candidate: P) -> Decision {
    let incoming = incoming.rec(Intakeq, "iq-1");
    let candidate = cand("p1", vec![candidate.rec(Healthie, "h-1")]);
    decide(&incoming, &[candidate], &MatchConfig::default())
}
