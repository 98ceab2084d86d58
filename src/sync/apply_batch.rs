//! Applying a page of records in one go: records never stored before (a resync's first pass,
//! an import into a new store) are decided one by one in memory, as [`apply_record`] would in
//! the same order, but read and written with a few multi-row statements for the whole group;
//! the decisions run on a blocking thread while the transaction writes the group's records.
//! Any other record (already stored or linked, merged away upstream, or listed twice) goes
//! through [`apply_record`] itself, in its place in the order.
//!
//! A page's candidates can also be read ahead ([`read_ahead`]), outside its transaction,
//! once the previous page's transaction has begun: on SQLite that read sees the store as the
//! previous page began or as it committed, so the page's own transaction only reads again what
//! the previous page changed, when its [`WriteStamp`] shows that nothing else committed since.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};

use crate::identity::{self, LinkTarget, MatchConfig, Prepared, PreparedCandidate, ReviewProposal};
use crate::model::{PatientId, RecordStatus, SourceId, SourceKey, SourceKind, SourceRecord};
use crate::store::{
    Link, LinkEvent, LinkMethod, SaveOutcome, Store, StoreResult, StoreTx, WriteStamp,
};
use crate::sync::apply::{apply_record, lock_records, next_row, Applied, IdentitySettings};

/// Applies `records` in order inside the caller's transaction; one [`Applied`] per record.
/// The result equals calling [`apply_record`] for each in turn.
pub async fn apply_records(
    tx: &mut dyn StoreTx,
    records: &[&SourceRecord],
    settings: &IdentitySettings,
    now: DateTime<Utc>,
) -> StoreResult<Vec<Applied>> {
    Ok(apply_page(tx, records, settings, now, None).await?.applied)
}

/// A page's candidates read outside its transaction by [`read_ahead`].
pub struct ReadAhead {
    /// The records it was read for.
    prepared: AheadPrepared,
    reach: HashMap<String, BTreeSet<PatientId>>,
    members: HashMap<PatientId, Vec<SourceRecord>>,
    /// The stamp of the write transaction that had begun when the read began.
    during: WriteStamp,
}

/// What a page's transaction changed in what candidates are read from: the blocking keys of
/// the records it created and the patients they joined or created.
#[derive(Debug, Default)]
pub struct Changed {
    keys: HashSet<String>,
    patients: HashSet<PatientId>,
}

/// The previous page's transaction, for checking a [`ReadAhead`].
pub struct Previous {
    /// Its stamp (taken inside it).
    pub stamp: WriteStamp,
    /// What it changed; `None` when a record took the one-at-a-time path (not tracked).
    pub changed: Option<Changed>,
}

/// What [`apply_page`] did.
pub struct Paged {
    pub applied: Vec<Applied>,
    /// What it changed, when every record was new (see [`Previous::changed`]).
    pub changed: Option<Changed>,
    /// The read-ahead was current and used.
    pub read_ahead_used: bool,
}

/// A page's records prepared for [`read_ahead`] (pure computation, done before the read).
pub struct AheadPrepared {
    /// The records, in order.
    records: Vec<SourceKey>,
    mine: Vec<Prepared>,
    keys: Vec<Vec<String>>,
    all_keys: Vec<String>,
}

impl AheadPrepared {
    /// Prepares the records of a page that can be new in a group: records merged away
    /// upstream and second listings of a record are left out.
    pub fn new(records: &[&SourceRecord], cfg: &MatchConfig) -> Self {
        let mut seen = HashSet::new();
        let group: Vec<&SourceRecord> = records
            .iter()
            .copied()
            .filter(|r| groupable(r) && seen.insert(&r.key))
            .collect();
        let (mine, keys, all_keys) = prepare(&group, cfg);
        Self {
            records: group.iter().map(|r| r.key.clone()).collect(),
            mine,
            keys,
            all_keys,
        }
    }
}

/// Reads the candidates of a page about to be applied (`prepared`) outside any transaction, on
/// a read connection, after the write transaction stamped `during` began (the caller makes
/// sure of it) and before the page's own begins: [`apply_page`] then knows what it may have
/// missed.
pub async fn read_ahead(
    store: &dyn Store,
    prepared: AheadPrepared,
    during: WriteStamp,
) -> StoreResult<ReadAhead> {
    let (found, linked) = store.read_candidates(&prepared.all_keys).await?;
    let mut reach: HashMap<String, BTreeSet<PatientId>> = HashMap::new();
    for (key, patient) in found {
        reach.entry(key).or_default().insert(patient);
    }
    let mut members: HashMap<PatientId, Vec<SourceRecord>> = HashMap::new();
    for (patient, record) in linked {
        members.entry(patient).or_default().push(record);
    }
    Ok(ReadAhead {
        prepared,
        reach,
        members,
        during,
    })
}

/// The group's records prepared, each one's blocking keys, and all their keys sorted.
fn prepare(
    records: &[&SourceRecord],
    cfg: &MatchConfig,
) -> (Vec<Prepared>, Vec<Vec<String>>, Vec<String>) {
    let mine: Vec<Prepared> = records.iter().map(|r| Prepared::new(r, cfg)).collect();
    let keys: Vec<Vec<String>> = mine.iter().map(|p| p.record_blocking_keys()).collect();
    let all_keys: Vec<String> = keys
        .iter()
        .flatten()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    (mine, keys, all_keys)
}

/// [`apply_records`], using `ahead` (a read-ahead of these records, the previous page and
/// this transaction's stamp) when it can be made current: it was read after the previous
/// page's transaction began, that transaction's commit is the only one since (its changes
/// are known and read again), and every record of the page is new. Otherwise reads in the
/// transaction as [`apply_records`] does. Either way the result is the same.
pub async fn apply_page(
    tx: &mut dyn StoreTx,
    records: &[&SourceRecord],
    settings: &IdentitySettings,
    now: DateTime<Utc>,
    ahead: Option<(ReadAhead, &Previous, WriteStamp)>,
) -> StoreResult<Paged> {
    // Every record's key first, so that another transaction storing one of these records (a
    // worker, another process) has committed before the records are sorted into stored and
    // new, or waits until this one commits.
    lock_records(tx, records.iter().map(|r| &r.key)).await?;
    let mut known: HashSet<SourceKey> = HashSet::new();
    for (source, ids) in ids_by_source(records) {
        known.extend(
            tx.known_source_ids(source, &ids)
                .await?
                .into_iter()
                .map(|id| SourceKey::new(source, id)),
        );
    }

    let mut out = Vec::with_capacity(records.len());
    let mut group: Vec<&SourceRecord> = Vec::new();
    let mut grouped: HashSet<&SourceKey> = HashSet::new();
    let mut changed = Some(Changed::default());
    for &record in records {
        let new = !known.contains(&record.key) && groupable(record) && grouped.insert(&record.key);
        if new {
            group.push(record);
            continue;
        }
        out.extend(apply_new_records(tx, &group, settings, now, None, &mut changed).await?);
        group.clear();
        out.push(apply_record(tx, record, settings, now).await?);
        changed = None;
    }
    // The read-ahead serves a page that is one group, when nothing but the previous page, whose
    // changes are known, committed since it was read.
    let current = ahead.and_then(|(read, previous, stamp)| {
        let whole = out.is_empty()
            && read.prepared.records.len() == group.len()
            && read
                .prepared
                .records
                .iter()
                .zip(&group)
                .all(|(a, b)| *a == b.key);
        let fresh = read.during == previous.stamp && stamp.follows(&previous.stamp);
        match &previous.changed {
            Some(since) if whole && fresh => Some((read, since)),
            _ => None,
        }
    });
    let read_ahead_used = current.is_some();
    out.extend(apply_new_records(tx, &group, settings, now, current, &mut changed).await?);
    Ok(Paged {
        applied: out,
        changed,
        read_ahead_used,
    })
}

/// A record that can be decided in a group when it is new: not merged away upstream.
fn groupable(record: &SourceRecord) -> bool {
    record.status != RecordStatus::Merged && record.merged_into.is_none()
}

/// The records' ids, by source.
fn ids_by_source(records: &[&SourceRecord]) -> HashMap<SourceKind, Vec<SourceId>> {
    let mut out: HashMap<SourceKind, Vec<SourceId>> = HashMap::new();
    for r in records {
        out.entry(r.key.source).or_default().push(r.key.id.clone());
    }
    out
}

/// Applies records with distinct keys that have no stored record and no link, none merged
/// away. Each is decided against the patients its blocking keys reach, including patients
/// the group's earlier records created or joined.
///
/// With `ahead` (a current read-ahead of exactly these records and what was committed since
/// it was read), only the blocking keys and patients those commits changed are read again.
/// Adds what the group changes to `changed`, if it is tracked.
async fn apply_new_records(
    tx: &mut dyn StoreTx,
    records: &[&SourceRecord],
    settings: &IdentitySettings,
    now: DateTime<Utc>,
    ahead: Option<(ReadAhead, &Changed)>,
    changed: &mut Option<Changed>,
) -> StoreResult<Vec<Applied>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let cfg = &settings.matching;
    let (mine, keys, all_keys, mut reach, mut members, since) = match ahead {
        Some((read, since)) => (
            read.prepared.mine,
            read.prepared.keys,
            read.prepared.all_keys,
            read.reach,
            read.members,
            Some(since),
        ),
        None => {
            let (mine, keys, all_keys) = prepare(records, cfg);
            (mine, keys, all_keys, HashMap::new(), HashMap::new(), None)
        }
    };
    // The locks `apply_record` takes, in its order: the record keys (held since
    // `apply_records`), then blocking keys.
    for k in &all_keys {
        tx.lock(&format!("match_key:{k}")).await?;
    }

    // Patients reachable now, through records linked before this group. The group's own
    // records are not linked yet, so reading before inserting them finds the same patients.
    // A read-ahead is read again only for keys whose records changed since.
    let stale: Vec<String> = match since {
        Some(since) => all_keys
            .iter()
            .filter(|k| since.keys.contains(*k))
            .cloned()
            .collect(),
        None => all_keys.clone(),
    };
    for k in &stale {
        reach.remove(k);
    }
    if !stale.is_empty() {
        for (key, patient) in tx.find_patients_by_keys(&stale).await? {
            reach.entry(key).or_default().insert(patient);
        }
    }
    let candidates: BTreeSet<PatientId> = reach.values().flatten().cloned().collect();
    for p in &candidates {
        tx.lock(p.as_str()).await?;
    }
    // A read-ahead's patients keep their records unless they changed since.
    members.retain(|p, _| candidates.contains(p) && !since.is_some_and(|s| s.patients.contains(p)));
    let unread: Vec<PatientId> = candidates
        .into_iter()
        .filter(|p| !members.contains_key(p))
        .collect();
    if !unread.is_empty() {
        for (patient, record) in tx.load_linked_records_many(&unread).await? {
            members.entry(patient).or_default().push(record);
        }
    }
    let mut rejected: HashSet<(SourceKey, PatientId)> = HashSet::new();
    for (source, ids) in ids_by_source(records) {
        for (id, patient) in tx.load_rejected_many(source, &ids).await? {
            rejected.insert((SourceKey::new(source, id), patient));
        }
    }

    // Decisions are pure computation: they run on a blocking thread while this transaction
    // writes the group's records and keys.
    let key_items: Vec<(SourceKey, Vec<String>)> = records
        .iter()
        .zip(&keys)
        .map(|(r, k)| (r.key.clone(), k.clone()))
        .collect();
    let group = Group {
        mine,
        keys,
        members,
        reach,
        rejected,
        cfg: cfg.clone(),
    };
    let deciding = tokio::task::spawn_blocking(move || group.decide());
    let written = async {
        tx.insert_new_source_records(records).await?;
        tx.replace_match_keys_many(&key_items).await
    };
    let (written, decided) = tokio::join!(written, deciding);
    let (decisions, mut members) =
        decided.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    written?;

    let mut links = Vec::with_capacity(records.len());
    let mut touched: Vec<PatientId> = Vec::new();
    let mut applied = Vec::with_capacity(records.len());
    for (record, decided) in records.iter().zip(decisions) {
        for review in &decided.reviews {
            tx.open_review(&record.key, &review.patient_id, review.score, now)
                .await?;
        }
        let Decided {
            patient_id,
            method,
            rule,
            score,
            reviews: _,
        } = decided;
        if method == LinkMethod::New {
            tx.lock(patient_id.as_str()).await?;
        }
        links.push((
            Link {
                key: record.key.clone(),
                patient_id: patient_id.clone(),
                method,
                rule: rule.clone(),
                score,
                decided_by: "auto".into(),
                decided_at: now,
            },
            LinkEvent {
                key: record.key.clone(),
                action: "link".into(),
                patient_id: Some(patient_id.clone()),
                previous_patient_id: None,
                method,
                rule,
                score,
                decided_by: "auto".into(),
                at: now,
            },
        ));
        members
            .entry(patient_id.clone())
            .or_default()
            .push((*record).clone());
        if !touched.contains(&patient_id) {
            touched.push(patient_id.clone());
        }
        applied.push(Applied {
            outcome: SaveOutcome::Created,
            patient_id: Some(patient_id),
        });
    }
    tx.save_links(&links).await?;

    // The golden rows of every patient the group joined or created, as `refresh_patient`
    // computes them.
    let previous: HashMap<PatientId, _> = tx
        .load_patients_many(&touched)
        .await?
        .into_iter()
        .map(|row| (row.patient_id.clone(), row))
        .collect();
    let mut rows = Vec::with_capacity(touched.len());
    for patient_id in &touched {
        let golden = identity::golden_record(
            patient_id,
            &members[patient_id],
            &settings.survivorship,
            now,
        );
        if let Some(row) = next_row(golden.row, previous.get(patient_id), now) {
            rows.push((row, golden.provenance));
        }
    }
    tx.save_patients(&rows).await?;
    if let Some(changed) = changed {
        changed.keys.extend(all_keys);
        changed.patients.extend(touched);
    }
    Ok(applied)
}

/// What deciding a group needs, owned so that it can move to a blocking thread.
struct Group {
    /// The group's records, prepared, in order.
    mine: Vec<Prepared>,
    /// Each record's blocking keys.
    keys: Vec<Vec<String>>,
    /// The records linked to each reachable patient.
    members: HashMap<PatientId, Vec<SourceRecord>>,
    /// The patients each blocking key reaches.
    reach: HashMap<String, BTreeSet<PatientId>>,
    /// Pairs of a group record and a patient an admin rejected.
    rejected: HashSet<(SourceKey, PatientId)>,
    cfg: MatchConfig,
}

/// Where one record of a group goes, and the reviews its decision proposes.
struct Decided {
    patient_id: PatientId,
    method: LinkMethod,
    rule: Option<String>,
    score: Option<f64>,
    reviews: Vec<ReviewProposal>,
}

impl Group {
    /// Decides each record in order, as [`apply_record`] would one after another: a record
    /// also reaches the patients the group's earlier records created or joined. Gives back
    /// `members` unchanged.
    fn decide(self) -> (Vec<Decided>, HashMap<PatientId, Vec<SourceRecord>>) {
        let Group {
            mine,
            keys,
            members,
            mut reach,
            rejected,
            cfg,
        } = self;
        // Every record a decision can look at, prepared once.
        let order: Vec<SourceKey> = mine.iter().map(|p| p.key.clone()).collect();
        let mut prepared: HashMap<SourceKey, Prepared> = members
            .values()
            .flatten()
            .map(|r| (r.key.clone(), Prepared::new(r, &cfg)))
            .collect();
        for p in mine {
            prepared.insert(p.key.clone(), p);
        }
        let mut member_keys: HashMap<PatientId, Vec<SourceKey>> = members
            .iter()
            .map(|(p, rs)| (p.clone(), rs.iter().map(|r| r.key.clone()).collect()))
            .collect();
        let mut out = Vec::with_capacity(order.len());
        for (key, record_keys) in order.iter().zip(&keys) {
            let reached: BTreeSet<&PatientId> = record_keys
                .iter()
                .filter_map(|k| reach.get(k))
                .flatten()
                .collect();
            let decision = (!reached.is_empty()).then(|| {
                let views: Vec<PreparedCandidate> = reached
                    .iter()
                    .map(|&p| PreparedCandidate {
                        patient_id: p.clone(),
                        records: member_keys
                            .get(p)
                            .map(|ks| ks.iter().map(|k| &prepared[k]).collect())
                            .unwrap_or_default(),
                        rejected: rejected.contains(&(key.clone(), p.clone())),
                    })
                    .collect();
                identity::decide_prepared(&prepared[key], &views, &cfg)
            });
            let (target, reviews) = match decision {
                Some(d) => (Some(d.target), d.reviews),
                None => (None, Vec::new()),
            };
            let decided = match target {
                Some(LinkTarget::Existing {
                    patient_id,
                    method,
                    rule,
                    score,
                }) => Decided {
                    patient_id,
                    method,
                    rule,
                    score,
                    reviews,
                },
                _ => Decided {
                    patient_id: PatientId::generate(),
                    method: LinkMethod::New,
                    rule: None,
                    score: None,
                    reviews,
                },
            };
            for k in record_keys {
                reach
                    .entry(k.clone())
                    .or_default()
                    .insert(decided.patient_id.clone());
            }
            member_keys
                .entry(decided.patient_id.clone())
                .or_default()
                .push(key.clone());
            out.push(decided);
        }
        (out, members)
    }
}
