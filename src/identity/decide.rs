//! The evidence ladder: which canonical patient an incoming source record belongs to.
//!
//! 1. Explicit ids: a trusted external id that names a candidate's record (or that a
//!    candidate's record carries for this one, or that both carry) links with `ExplicitId`.
//! 2. Deterministic rules (`email_dob_name`, `phone_dob_name`, `name_dob_zip`,
//!    `given_dob_contact` for a changed surname, and, when
//!    `link_without_birth_date` is set, `name_email_contact` for a record without a birth
//!    date) link with `Rule`.
//! 3. The probabilistic score: at or above `match_threshold` links with `Score`; between the
//!    two thresholds proposes a review; below does nothing.
//!
//! Guards block automatic links (a review may still be proposed):
//! - a candidate that already has a live record from the incoming record's source;
//! - a rule or score link without a compatible given name, an agreeing birth date (equal, day
//!   and month swapped, or a day apart) and no sex disagreement: twins and relatives sharing a
//!   phone or email never qualify. The one exception is the opt-in `name_email_contact`, for a
//!   record without a birth date: the same full name, email and phone or address;
//! - an explicit id contradicted by the given name or the birth date (a mistyped id);
//! - two candidates qualifying on the same rung with close scores.
//!
//! Candidates an admin rejected are never linked or proposed.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::blocking::trusted_ids;
use super::score::{
    Comparison, Context, Profile, RULE_EMAIL_DOB_NAME, RULE_GIVEN_DOB_CONTACT, RULE_NAME_DOB_ZIP,
    RULE_NAME_EMAIL_CONTACT, RULE_PHONE_DOB_NAME,
};
use chrono::{DateTime, Utc};

use crate::model::{PatientId, RecordStatus, SourceKey, SourceKind, SourceRecord};
use crate::store::LinkMethod;

/// Two candidates on the same rung whose scores are closer than this (in bits, a factor of
/// 16 in likelihood) are too close to choose between automatically.
pub const AMBIGUITY_MARGIN_BITS: f64 = 4.0;

/// Deterministic rules, strongest first.
const RULES: [&str; 5] = [
    RULE_EMAIL_DOB_NAME,
    RULE_PHONE_DOB_NAME,
    RULE_NAME_DOB_ZIP,
    RULE_GIVEN_DOB_CONTACT,
    RULE_NAME_EMAIL_CONTACT,
];

/// Matching settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MatchConfig {
    /// Score (log2 Bayes factor, bits) at or above which a pair links automatically.
    pub match_threshold: f64,
    /// Score at or above which a pair that does not link goes to the review queue.
    pub review_threshold: f64,
    /// External id systems whose ids are believed (`healthie`, `intakeq`, `hint`, or a label
    /// the source modules give another system).
    pub trusted_id_systems: Vec<String>,
    /// Clinic numbers patients give as their own (front desk, shared family line): ignored.
    pub shared_phones: Vec<String>,
    /// Clinic addresses patients give as their own: ignored.
    pub shared_emails: Vec<String>,
    /// ISO 3166 region for phone numbers without a country code.
    pub default_region: String,
    /// Allow the `name_email_contact` rule: a record without a birth date links on the same
    /// full name, email and phone or address. Off by default: a namesake relative sharing the
    /// family's email and phone (a father and his junior) cannot be told apart without a date.
    pub link_without_birth_date: bool,
}

impl Default for MatchConfig {
    /// Thresholds fit the weights in `score`: exact name and birth date with agreeing sex
    /// score about 29 bits (links); the same with every contact field disagreeing about 21
    /// (review); a namesake with another birth date about 11 (nothing).
    fn default() -> Self {
        MatchConfig {
            match_threshold: 26.0,
            review_threshold: 14.0,
            trusted_id_systems: SourceKind::ALL.iter().map(|s| s.to_string()).collect(),
            shared_phones: Vec::new(),
            shared_emails: Vec::new(),
            default_region: super::normalize::DEFAULT_REGION.to_string(),
            link_without_birth_date: false,
        }
    }
}

/// An existing canonical patient found through blocking keys, with all its linked records.
#[derive(Clone)]
pub struct Candidate {
    pub patient_id: PatientId,
    pub records: Vec<SourceRecord>,
    /// An admin rejected pairing the incoming record with this patient.
    pub rejected: bool,
}

impl fmt::Debug for Candidate {
    /// Ids only: the records' fields are PHI.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Candidate")
            .field("patient_id", &self.patient_id)
            .field(
                "records",
                &self
                    .records
                    .iter()
                    .map(|r| r.key.to_string())
                    .collect::<Vec<_>>(),
            )
            .field("rejected", &self.rejected)
            .finish()
    }
}

/// Where the incoming record goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum LinkTarget {
    Existing {
        patient_id: PatientId,
        method: LinkMethod,
        /// The rule name for `Rule`, `explicit_id:<system>` for `ExplicitId`, none for `Score`.
        rule: Option<String>,
        /// The best pair score against the patient's records.
        score: Option<f64>,
    },
    NewPatient,
}

/// A pair worth a human look: the incoming record and an existing patient.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReviewProposal {
    pub patient_id: PatientId,
    pub score: f64,
}

/// The outcome of matching one record. Holds ids, methods, rule names and scores only, so it
/// may be logged.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub target: LinkTarget,
    /// Sorted by score (highest first), then patient id.
    pub reviews: Vec<ReviewProposal>,
}

/// Evidence rungs, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rung {
    Score,
    Rule,
    ExplicitId,
}

struct Assessment<'a> {
    patient_id: &'a PatientId,
    rung: Option<Rung>,
    rule: Option<String>,
    /// Best pair score over the patient's records.
    score: f64,
    /// The patient already has a live record from the incoming record's source.
    same_source: bool,
    /// An explicit id pointed here but the given name or birth date says otherwise.
    contradicted_id: bool,
}

/// A source record prepared for matching once: its normalized profile and trusted ids, so a
/// caller that compares it many times (rebuild) does not normalize it again for every pair.
pub struct Prepared {
    pub key: SourceKey,
    pub status: RecordStatus,
    version: (Option<DateTime<Utc>>, DateTime<Utc>),
    profile: Profile,
    ids: Vec<(String, String)>,
}

impl Prepared {
    pub fn new(record: &SourceRecord, cfg: &MatchConfig) -> Self {
        Self::with_context(record, &Context::new(cfg), cfg)
    }

    fn with_context(record: &SourceRecord, ctx: &Context<'_>, cfg: &MatchConfig) -> Self {
        Prepared {
            key: record.key.clone(),
            status: record.status,
            version: record.version_key(),
            profile: Profile::new(&record.fields, ctx),
            ids: trusted_ids(&record.fields, cfg),
        }
    }
}

impl Prepared {
    /// The same keys as [`super::record_blocking_keys`], from the prepared profile.
    pub fn record_blocking_keys(&self) -> Vec<String> {
        let mut keys = super::blocking::profile_keys(&self.profile, &self.ids);
        keys.insert(format!("src:{}:{}", self.key.source, self.key.id));
        keys.into_iter().collect()
    }
}

impl fmt::Debug for Prepared {
    /// The key only: the profile is PHI.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared").field("key", &self.key).finish()
    }
}

/// A candidate patient whose records are already prepared.
pub struct PreparedCandidate<'a> {
    pub patient_id: PatientId,
    pub records: Vec<&'a Prepared>,
    pub rejected: bool,
}

/// Decides where `incoming` belongs among `candidates`. Pure and deterministic: the order of
/// candidates and of their records does not matter. A candidate record with the incoming
/// record's own key is ignored (a record is not evidence for itself).
pub fn decide(incoming: &SourceRecord, candidates: &[Candidate], cfg: &MatchConfig) -> Decision {
    let ctx = Context::new(cfg);
    let me = Prepared::with_context(incoming, &ctx, cfg);
    let prepared: Vec<Vec<Prepared>> = candidates
        .iter()
        .map(|c| {
            c.records
                .iter()
                .map(|r| Prepared::with_context(r, &ctx, cfg))
                .collect()
        })
        .collect();
    let views: Vec<PreparedCandidate> = candidates
        .iter()
        .zip(&prepared)
        .map(|(c, records)| PreparedCandidate {
            patient_id: c.patient_id.clone(),
            records: records.iter().collect(),
            rejected: c.rejected,
        })
        .collect();
    decide_prepared(&me, &views, cfg)
}

/// [`decide`] over prepared records: the same decision, without normalizing anything.
pub fn decide_prepared(
    me: &Prepared,
    candidates: &[PreparedCandidate<'_>],
    cfg: &MatchConfig,
) -> Decision {
    let mut grouped: BTreeMap<&PatientId, (Vec<&Prepared>, bool)> = BTreeMap::new();
    for c in candidates {
        let entry = grouped.entry(&c.patient_id).or_default();
        entry
            .0
            .extend(c.records.iter().copied().filter(|r| r.key != me.key));
        entry.1 |= c.rejected;
    }

    let mut assessed = Vec::new();
    for (patient_id, (mut records, rejected)) in grouped {
        // An admin's "not this patient" sticks: never linked, never proposed again.
        if rejected {
            continue;
        }
        // Newest snapshot first within a key, so duplicates collapse the same way every time.
        records.sort_by(|a, b| a.key.cmp(&b.key).then_with(|| b.version.cmp(&a.version)));
        records.dedup_by(|a, b| a.key == b.key);
        if records.is_empty() {
            continue;
        }
        assessed.push(assess(me, patient_id, &records, cfg));
    }

    let mut auto: Vec<&Assessment> = assessed
        .iter()
        .filter(|a| a.rung.is_some() && !a.same_source)
        .collect();
    auto.sort_by(|a, b| {
        b.rung
            .cmp(&a.rung)
            .then(b.score.total_cmp(&a.score))
            .then(a.patient_id.cmp(b.patient_id))
    });

    let mut target = LinkTarget::NewPatient;
    if let Some(top) = auto.first() {
        let contested = auto[1..].iter().any(|a| {
            a.rung == top.rung
                && (top.rung == Some(Rung::ExplicitId)
                    || top.score - a.score < AMBIGUITY_MARGIN_BITS)
        });
        if !contested {
            let method = match top.rung {
                Some(Rung::ExplicitId) => LinkMethod::ExplicitId,
                Some(Rung::Rule) => LinkMethod::Rule,
                _ => LinkMethod::Score,
            };
            target = LinkTarget::Existing {
                patient_id: top.patient_id.clone(),
                method,
                rule: top.rule.clone(),
                score: Some(top.score),
            };
        }
    }

    let linked = match &target {
        LinkTarget::Existing { patient_id, .. } => Some(patient_id),
        LinkTarget::NewPatient => None,
    };
    let mut reviews: Vec<ReviewProposal> = assessed
        .iter()
        .filter(|a| Some(a.patient_id) != linked)
        .filter(|a| a.score >= cfg.review_threshold || a.rung.is_some() || a.contradicted_id)
        .map(|a| ReviewProposal {
            patient_id: a.patient_id.clone(),
            score: a.score,
        })
        .collect();
    reviews.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| a.patient_id.cmp(&b.patient_id))
    });
    Decision { target, reviews }
}

fn assess<'a>(
    me: &Prepared,
    patient_id: &'a PatientId,
    records: &[&Prepared],
    cfg: &MatchConfig,
) -> Assessment<'a> {
    let mut score = f64::NEG_INFINITY;
    let mut rule: Option<usize> = None;
    let mut score_qualifies = false;
    let mut all_contradict = true;
    for record in records {
        let cmp = Comparison::new(&me.profile, &record.profile);
        let total = cmp.score().total;
        score = score.max(total);
        if cmp.allows_auto_link() && total >= cfg.match_threshold {
            score_qualifies = true;
        }
        let allowed = |name: &&str| *name != RULE_NAME_EMAIL_CONTACT || cfg.link_without_birth_date;
        if let Some(name) = cmp.rule().filter(allowed) {
            let idx = RULES.iter().position(|r| *r == name).unwrap_or(RULES.len());
            rule = Some(rule.map_or(idx, |r| r.min(idx)));
        }
        all_contradict &= cmp.contradicts();
    }

    let explicit = explicit_id(me, records);
    let contradicted_id = explicit.is_some() && all_contradict;
    let (rung, rule) = match (explicit, rule) {
        (Some(system), _) if !contradicted_id => (
            Some(Rung::ExplicitId),
            Some(format!("explicit_id:{system}")),
        ),
        (_, Some(idx)) if idx < RULES.len() => (Some(Rung::Rule), Some(RULES[idx].to_string())),
        _ if score_qualifies => (Some(Rung::Score), None),
        _ => (None, None),
    };
    // At most one live record per source per patient.
    let same_source = records
        .iter()
        .any(|r| r.status.is_live() && r.key.source == me.key.source);
    Assessment {
        patient_id,
        rung,
        rule,
        score,
        same_source,
        contradicted_id,
    }
}

/// The trusted system through which an explicit id ties `incoming` to one of `records`: the
/// incoming record names a record, a record names the incoming one, or both carry the same id.
fn explicit_id(me: &Prepared, records: &[&Prepared]) -> Option<String> {
    let names = |(system, value): &(String, String), key: &crate::model::SourceKey| {
        system.parse::<SourceKind>().ok() == Some(key.source) && value == key.id.as_str()
    };
    for record in records {
        if let Some(id) = me.ids.iter().find(|id| names(id, &record.key)) {
            return Some(id.0.clone());
        }
        for id in &record.ids {
            if names(id, &me.key) || me.ids.contains(id) {
                return Some(id.0.clone());
            }
        }
    }
    None
}
