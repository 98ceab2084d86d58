//! Identity resolution and the golden record: pure functions from stored source records to
//! match decisions and canonical rows. No IO, no async, no clock, no logging; the same input
//! gives the same output (ordered maps only, candidates and records sorted before use).
//!
//! - [`normalize`]: matching-grade forms of names, emails, phones, addresses, sex, and the
//!   placeholder values that carry no weight.
//! - [`blocking_keys`]: the index keys that find candidates without comparing every pair.
//! - [`explain`]: the Fellegi-Sunter pair score, field by field.
//! - [`decide`]: the evidence ladder (explicit ids, rules, score) with its guards.
//! - [`golden_record`]: survivorship, the canonical row and its provenance.
//!
//! Nothing here puts a field value in an error or a `Debug` of a decision: decisions carry ids,
//! methods, rule names, field names and scores.

mod blocking;
mod decide;
mod nicknames;
pub mod normalize;
mod score;
mod survivorship;

#[cfg(test)]
mod tests;

pub use blocking::{blocking_keys, record_blocking_keys};
pub use decide::{
    decide, decide_prepared, Candidate, Decision, LinkTarget, MatchConfig, Prepared,
    PreparedCandidate, ReviewProposal,
};
pub use normalize::{
    normalize_email, phone_e164, PhoneDatabase, PhoneDatabaseGuard, PhoneMemo, PhoneMemoGuard,
};
pub use score::{explain, Contribution, MatchScore};
pub use survivorship::{
    golden_record, golden_record_with_phones, record_phone, Golden, RecordPhone, SurvivorshipConfig,
};
