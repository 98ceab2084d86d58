//! Core domain types shared by every module: source kinds, id newtypes and the normalized
//! source record that each upstream's wire shape is converted into.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

/// One of the three upstream systems. The string form is the one used everywhere: config
/// sections, the `source` log field and database values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Healthie,
    Intakeq,
    Hint,
}

impl SourceKind {
    pub const ALL: [SourceKind; 3] = [SourceKind::Healthie, SourceKind::Intakeq, SourceKind::Hint];

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Healthie => "healthie",
            SourceKind::Intakeq => "intakeq",
            SourceKind::Hint => "hint",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a string that names no source.
#[derive(Debug, thiserror::Error)]
#[error("unknown source {0:?} (expected healthie, intakeq or hint)")]
pub struct UnknownSource(pub String);

impl FromStr for SourceKind {
    type Err = UnknownSource;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "healthie" => Ok(SourceKind::Healthie),
            "intakeq" => Ok(SourceKind::Intakeq),
            "hint" => Ok(SourceKind::Hint),
            _ => Err(UnknownSource(s.to_string())),
        }
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}

string_id!(
    /// The id of a record inside its upstream system (Healthie user id, IntakeQ ClientId, Hint id).
    SourceId
);
string_id!(
    /// A canonical patient id: stable, never reused; a merged-away id keeps a `merged_into` pointer.
    PatientId
);

impl PatientId {
    /// A new time-ordered id (UUIDv7), so ids sort roughly by creation.
    pub fn generate() -> Self {
        Self::from_uuid(Self::new_uuid())
    }

    /// The UUID a new id is made of (version 7: ordered by creation time).
    pub fn new_uuid() -> uuid::Uuid {
        uuid::Uuid::now_v7()
    }

    /// The id of a UUID, written as [`PatientId::generate`] writes it.
    pub fn from_uuid(id: uuid::Uuid) -> Self {
        Self(id.to_string())
    }
}

/// Row id of an inbox item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InboxId(pub i64);

impl fmt::Display for InboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `(source, source id)`: the key of a source record, written `healthie:123` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SourceKey {
    pub source: SourceKind,
    pub id: SourceId,
}

impl SourceKey {
    pub fn new(source: SourceKind, id: impl Into<SourceId>) -> Self {
        Self {
            source,
            id: id.into(),
        }
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.id)
    }
}

/// Error for a malformed `SOURCE:ID` argument.
#[derive(Debug, thiserror::Error)]
pub enum SourceKeyError {
    #[error("expected SOURCE:ID, for example healthie:123")]
    Shape,
    #[error(transparent)]
    Source(#[from] UnknownSource),
}

impl FromStr for SourceKey {
    type Err = SourceKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (source, id) = s.split_once(':').ok_or(SourceKeyError::Shape)?;
        if id.trim().is_empty() {
            return Err(SourceKeyError::Shape);
        }
        Ok(SourceKey::new(source.parse()?, id.trim()))
    }
}

/// Lifecycle of a record in its source system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RecordStatus {
    #[default]
    Active,
    /// Archived or inactive upstream; still the same person, kept and linked.
    Archived,
    /// Deleted upstream (IntakeQ delete sweep, Hint `patient.destroyed`).
    Deleted,
    /// Merged into another record of the same source (`merged_into` says which).
    Merged,
    /// Not seen by a complete resync; becomes deleted after a grace period.
    Missing,
}

impl RecordStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordStatus::Active => "active",
            RecordStatus::Archived => "archived",
            RecordStatus::Deleted => "deleted",
            RecordStatus::Merged => "merged",
            RecordStatus::Missing => "missing",
        }
    }

    /// Whether the record still describes a live person in its source.
    pub fn is_live(self) -> bool {
        matches!(self, RecordStatus::Active | RecordStatus::Archived)
    }
}

impl FromStr for RecordStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(RecordStatus::Active),
            "archived" => Ok(RecordStatus::Archived),
            "deleted" => Ok(RecordStatus::Deleted),
            "merged" => Ok(RecordStatus::Merged),
            "missing" => Ok(RecordStatus::Missing),
            other => Err(format!("unknown record status {other:?}")),
        }
    }
}

/// A postal address as a source gave it (lightly trimmed, not yet normalized for matching).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Address {
    pub line1: Option<String>,
    pub line2: Option<String>,
    pub city: Option<String>,
    pub state: Option<String>,
    pub postal_code: Option<String>,
    pub country: Option<String>,
}

impl Address {
    pub fn is_empty(&self) -> bool {
        self.line1.is_none()
            && self.line2.is_none()
            && self.city.is_none()
            && self.state.is_none()
            && self.postal_code.is_none()
            && self.country.is_none()
    }
}

/// An identifier of this person in another system, as carried by a source record
/// (IntakeQ `ExternalClientId`, Hint `integration_record_id`, Healthie `record_identifier`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExternalId {
    /// Which system the id belongs to, e.g. `healthie`, `intakeq`, `hint` or a free label.
    pub system: String,
    pub value: String,
}

/// The fields every source is converted into. Values are trimmed, empty strings are `None`;
/// matching-grade normalisation (case, accents, nicknames, E.164) happens in `identity`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PersonFields {
    pub given_name: Option<String>,
    pub middle_name: Option<String>,
    pub family_name: Option<String>,
    /// Chosen or preferred first name, when the source separates it from the legal one.
    pub preferred_name: Option<String>,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<String>,
    pub gender_identity: Option<String>,
    pub email: Option<String>,
    /// Every phone number the source holds, primary first, as given.
    pub phones: Vec<String>,
    pub address: Address,
    pub external_ids: Vec<ExternalId>,
}

/// A snapshot of one upstream record, converted from its wire shape. Source records are the
/// truth from which links and canonical rows are rebuilt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    pub key: SourceKey,
    pub fields: PersonFields,
    pub status: RecordStatus,
    /// For `Merged`: the surviving record's id in the same source.
    pub merged_into: Option<SourceId>,
    /// The source's own last-modified time, when it has one.
    pub source_updated_at: Option<DateTime<Utc>>,
    pub fetched_at: DateTime<Utc>,
    /// The payload exactly as the source sent it (PHI: stored, never logged).
    pub raw: serde_json::Value,
}

impl SourceRecord {
    /// Ordering key for monotonic upserts: the source's `updated_at`, then fetch time.
    pub fn version_key(&self) -> (Option<DateTime<Utc>>, DateTime<Utc>) {
        (self.source_updated_at, self.fetched_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_key_parses_source_and_id() {
        let key: SourceKey = "healthie:123".parse().unwrap();
        assert_eq!(key, SourceKey::new(SourceKind::Healthie, "123"));
        assert_eq!(key.to_string(), "healthie:123");
        assert!("healthie".parse::<SourceKey>().is_err());
        assert!("nope:1".parse::<SourceKey>().is_err());
        assert!("hint:".parse::<SourceKey>().is_err());
    }

    #[test]
    fn source_kind_round_trips_through_strings() {
        for kind in SourceKind::ALL {
            assert_eq!(kind.as_str().parse::<SourceKind>().unwrap(), kind);
        }
    }
}
