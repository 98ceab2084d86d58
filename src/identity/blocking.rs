//! Blocking keys: a handful of strings per record such that two records of one person share at
//! least one key in realistic cases (a typo in one field, a nickname, day and month swapped, a
//! missing email), while each key stays selective. The store indexes `(key, record)` and looks
//! candidates up by the incoming record's keys, so matching costs a few indexed lookups.
//!
//! Key families (values are matching-grade normalized; placeholders and shared clinic contacts
//! produce no key):
//! - `em:<email>`
//! - `ph:<e164>`, one per phone
//! - `df:<dob>|<soundex of family name>`: whole family name and each word of a multi-part one,
//!   and the legal given name too (a record with the two names swapped)
//! - `dg:<dob>|<initial>`: initials of the given and preferred names and of their formal names
//!   (Bob -> b and r)
//! - `dz:<dob>|<zip>`: a record whose given and family names both changed or were mistyped
//! - `nm:<family word>|<formal given name>`: so a record without a birth date, or with a
//!   mistyped one (on either side), still meets its match. Exact names, not phonetic codes:
//!   at 1,000,000 records a key of two soundex codes reaches thousands of records, and a
//!   rebuild's clustering slowed from seconds to minutes
//! - `xid:<system>:<value>` for a trusted external id of a non-source system, and
//!   `src:<source>:<id>` both for a trusted id naming a source record and for the record itself
//!   (see [`record_blocking_keys`])
//!
//! In the date keys the day and month are written smaller first (`1980-03-05` and
//! `1980-05-03` both give `1980-03-05`), so a swap keeps the key. Keys contain PHI: store them
//! like the source records and never log them.

use std::collections::BTreeSet;

use super::decide::MatchConfig;
use super::nicknames;
use super::normalize;
use super::score::{Context, Profile};
use crate::model::{PersonFields, SourceKind, SourceRecord};

/// At most this many words of a multi-part family name produce keys.
const MAX_FAMILY_WORDS: usize = 3;

/// The blocking keys of a record's fields, sorted and deduplicated. Stable across runs and
/// versions of the process (no hashing, no iteration-order dependence).
pub fn blocking_keys(fields: &PersonFields, cfg: &MatchConfig) -> Vec<String> {
    let ctx = Context::new(cfg);
    let profile = Profile::new(fields, &ctx);
    profile_keys(&profile, &trusted_ids(fields, cfg))
        .into_iter()
        .collect()
}

/// The keys of a normalized profile and its trusted ids.
pub(crate) fn profile_keys(profile: &Profile, ids: &[(String, String)]) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let profile = profile.view();

    if let Some(email) = profile.email {
        keys.insert(format!("em:{email}"));
    }
    for phone in profile.phones() {
        keys.insert(format!("ph:{phone}"));
    }

    let family_words: Vec<&str> = profile
        .family
        .as_ref()
        .map(|f| {
            let mut words = vec![f.joined];
            words.extend(f.tokens().take(MAX_FAMILY_WORDS));
            words.dedup();
            words
        })
        .unwrap_or_default();
    // Formal given names (via the nickname table) and initials, over legal and preferred names.
    let mut formal: BTreeSet<String> = BTreeSet::new();
    let mut initials: BTreeSet<char> = BTreeSet::new();
    for given in profile.given() {
        for name in [given.first, given.joined] {
            if name.len() > 1 {
                for head in nicknames::heads(name) {
                    initials.extend(head.chars().next());
                    formal.insert(head);
                }
            }
            initials.extend(name.chars().next());
        }
    }

    if let Some(dob) = profile.birth_date {
        let date = swap_invariant_date(dob);
        for word in &family_words {
            if let Some(code) = normalize::soundex(word) {
                keys.insert(format!("df:{date}|{code}"));
            }
        }
        // The legal given name in the same family of keys, so a record with given and family
        // name swapped meets its match.
        if let Some(code) = profile
            .given()
            .first()
            .and_then(|g| normalize::soundex(g.joined))
        {
            keys.insert(format!("df:{date}|{code}"));
        }
        for initial in &initials {
            keys.insert(format!("dg:{date}|{initial}"));
        }
        // Birth date and ZIP: records whose given and family names both changed or were
        // mistyped.
        if let Some(zip) = profile.address.and_then(|a| a.zip) {
            keys.insert(format!("dz:{date}|{zip}"));
        }
    }
    // Without this family, a record whose birth date is missing or mistyped (on either side)
    // would be found only by email or phone. Emitted for every record, since the other side
    // may be the one missing the date.
    for word in &family_words {
        for given in &formal {
            keys.insert(format!("nm:{word}|{given}"));
        }
    }

    for (system, value) in ids {
        keys.insert(id_key(system, value));
    }
    keys
}

/// [`blocking_keys`] plus the key naming the record itself (`src:<source>:<id>`), which is how
/// a record that carries this one's id as a trusted external id finds it. This is the set to
/// index for a stored record and to look up for an incoming one.
pub fn record_blocking_keys(record: &SourceRecord, cfg: &MatchConfig) -> Vec<String> {
    let mut keys = blocking_keys(&record.fields, cfg);
    keys.push(format!("src:{}:{}", record.key.source, record.key.id));
    keys.sort();
    keys.dedup();
    keys
}

/// `yyyy-aa-bb` with `aa <= bb` the month and day in either order.
fn swap_invariant_date(d: chrono::NaiveDate) -> String {
    use chrono::Datelike;
    let (lo, hi) = if d.month() <= d.day() {
        (d.month(), d.day())
    } else {
        (d.day(), d.month())
    };
    format!("{:04}-{lo:02}-{hi:02}", d.year())
}

/// The trusted external ids a record carries, as `(system, value)` with the system lowercased
/// and both trimmed. Sorted, deduplicated.
pub(crate) fn trusted_ids(fields: &PersonFields, cfg: &MatchConfig) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = fields
        .external_ids
        .iter()
        .filter_map(|x| {
            let system = x.system.trim().to_ascii_lowercase();
            let value = x.value.trim();
            let trusted = cfg
                .trusted_id_systems
                .iter()
                .any(|t| t.trim().eq_ignore_ascii_case(&system));
            (trusted && !value.is_empty()).then(|| (system, value.to_string()))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `src:` when the system is one of ours (the id names a source record), else `xid:`.
fn id_key(system: &str, value: &str) -> String {
    match system.parse::<SourceKind>() {
        Ok(kind) => format!("src:{kind}:{value}"),
        Err(_) => format!("xid:{system}:{value}"),
    }
}
