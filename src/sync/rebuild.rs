//! `rebuild`: recomputes every link and canonical row from the stored source records, with no
//! API call. Source records are the truth (DESIGN invariant 5); running it twice changes
//! nothing; admin decisions stick (invariant 9).
//!
//! Shape, built for a million records on a small machine:
//!
//! 1. **Load** every source record in key order `(source, source_id)`, in pages, without its raw
//!    payload (matching and survivorship read normalized fields only). Each page is prepared
//!    for matching on every core (`identity::Prepared`: normalized profile, packed into one
//!    string, and trusted ids), packed for survivorship with its phone choice (module
//!    `compact`; each distinct phone number is parsed once per load, through an
//!    [`identity::PhoneMemo`] the loading threads share) and dropped. Blocking keys, computed
//!    from the prepared records, are kept as 64-bit hashes in one sorted array
//!    `(hash, record)` with a bucket table; a hash collision only adds a candidate that
//!    `decide` then turns down.
//!    Current links and rejected pairs are read in pages too.
//! 2. **Cluster** in key order, the way records would arrive one by one: an admin-linked record
//!    goes to its patient's cluster; a record an upstream merged away follows its surviving
//!    record; any other record runs [`identity::decide_prepared`] (the same ladder as
//!    `decide`, nothing normalized again) against the clusters its keys reach, each cluster's
//!    candidate view (label and records) kept from one decision to the next. A cluster is
//!    rejected for a record when an admin rejected the pair in either direction. Clustering
//!    uses one core, on a thread of its own; beside it, the stored blocking keys are read and
//!    those of records whose key set changed are rewritten (keys depend on the record alone).
//!    When none of those records has keys stored (a rebuild from bare records), or they are
//!    most records (every stored key is then deleted), their keys go in in one transaction,
//!    in record order, with the indexes dropped and built after, their sorts in temporary
//!    files ([`StoreTx::match_keys_bulk_load`], [`Store::sort_in_files`]).
//! 3. **Name** each cluster: an admin's patient keeps its id; any other cluster takes the
//!    patient most of its records are linked to now (largest first, each id used once), or a
//!    new id. So a record keeps its patient when the new decision agrees, and only links whose
//!    decision changed move (with `link_events`).
//! 4. **Write** in large transactions with multi-row statements: moved and new links, review
//!    proposals (idempotent inserts), canonical rows whose values changed (compared like
//!    `refresh_patient`, so an unchanged row gets no new version; computed on a thread of their
//!    own while this task reads and writes), rows left without records (`merged` into where
//!    their records went, else `deleted`).
//!
//! Run it with the workers stopped: it reads a snapshot and writes its result in batches.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, instrument};

use crate::identity::{self, LinkTarget, PreparedCandidate};
use crate::model::{PatientId, RecordStatus, SourceKey, SourceKind, SourceRecord};
use crate::store::{
    FieldSource, Link, LinkEvent, LinkMethod, PatientRow, ReviewState, Store, StoreResult, StoreTx,
};
use crate::sync::apply::{next_row, IdentitySettings};

mod compact;
#[cfg(test)]
mod tests;

/// How a rebuild runs.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// Compute and report, write nothing.
    pub dry_run: bool,
    /// Rows read per page.
    pub page_size: u32,
    /// Writes per transaction.
    pub batch_writes: usize,
    /// A blocking key shared by more records than this is skipped as a candidate source (a
    /// placeholder or clinic contact nobody configured); the other keys still find matches.
    pub max_key_fanout: usize,
    /// Page cache of the writing connection, in MiB (SQLite).
    pub cache_mib: u32,
    /// When at least this many records need their blocking keys written and none has any
    /// stored (a rebuild from bare records), or they are at least half of all records (every
    /// stored key is then deleted first), keys are written at once, with the indexes built
    /// after them (see [`StoreTx::match_keys_bulk_load`]).
    pub bulk_keys_min: usize,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            page_size: 10_000,
            batch_writes: 5_000,
            max_key_fanout: 5_000,
            cache_mib: 128,
            bulk_keys_min: 10_000,
        }
    }
}

/// What a rebuild did (or, dry, would do). Counts only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RebuildReport {
    pub dry_run: bool,
    pub records: u64,
    pub patients: u64,
    pub links_unchanged: u64,
    pub links_created: u64,
    pub links_moved: u64,
    pub manual_links_kept: u64,
    pub patients_created: u64,
    pub patients_updated: u64,
    pub patients_retired: u64,
    pub match_keys_rewritten: u64,
    pub review_proposals: u64,
    pub elapsed_ms: u64,
    /// When loading ended, from the start.
    pub loaded_ms: u64,
    /// When clustering (and naming) ended, from the start; writing took the rest. Blocking
    /// keys are read and written beside clustering.
    pub clustered_ms: u64,
}

impl RebuildReport {
    pub fn render_text(&self) -> String {
        format!(
            "rebuild{}: {} records, {} patients\n  links: {} unchanged, {} created, {} moved ({} admin links kept)\n  \
             patients: {} created, {} updated, {} retired\n  match keys rewritten for {} records; {} review proposals\n  took {:.1}s\n",
            if self.dry_run { " (dry run, nothing written)" } else { "" },
            self.records,
            self.patients,
            self.links_unchanged,
            self.links_created,
            self.links_moved,
            self.manual_links_kept,
            self.patients_created,
            self.patients_updated,
            self.patients_retired,
            self.match_keys_rewritten,
            self.review_proposals,
            self.elapsed_ms as f64 / 1000.0
        )
    }

    /// Whether the rebuild changed (or would change) anything.
    pub fn changes(&self) -> u64 {
        self.links_created
            + self.links_moved
            + self.patients_created
            + self.patients_updated
            + self.patients_retired
            + self.match_keys_rewritten
    }
}

const NONE: u32 = u32::MAX;

/// Buckets of the key-hash index: 2^20 (4 MiB of offsets), a few keys each at a million records.
const BUCKET_BITS: u32 = 20;

/// A record's current link, with the patient interned.
#[derive(Clone, Copy)]
struct Current {
    patient: u32,
    manual: bool,
}

/// The automatic decision for a record, its rule interned in [`Rules`].
#[derive(Clone, Copy)]
struct Decided {
    method: LinkMethod,
    rule: u32,
    score: Option<f64>,
}

/// Rule names of decisions, each kept once (there are a handful).
#[derive(Default)]
struct Rules {
    names: Vec<String>,
}

impl Rules {
    fn intern(&mut self, rule: Option<&str>) -> u32 {
        let Some(rule) = rule else { return NONE };
        match self.names.iter().position(|n| n == rule) {
            Some(i) => i as u32,
            None => {
                self.names.push(rule.to_string());
                self.names.len() as u32 - 1
            }
        }
    }

    fn get(&self, i: u32) -> Option<&str> {
        self.names.get(i as usize).map(String::as_str)
    }
}

struct Cluster {
    members: Vec<u32>,
    /// The admin-linked patient this cluster is.
    seed: Option<u32>,
}

/// Each cluster as `decide_prepared` sees it, kept while clustering so a decision borrows them
/// instead of building a label and a record list for every candidate every time.
#[derive(Default)]
struct Views<'a> {
    /// By cluster; the label (the cluster number, zero-padded so labels sort as numbers) is
    /// set when the cluster is first a candidate.
    views: Vec<PreparedCandidate<'a>>,
}

impl<'a> Views<'a> {
    fn empty() -> PreparedCandidate<'a> {
        PreparedCandidate {
            patient_id: PatientId(String::new()),
            records: Vec::new(),
            rejected: false,
        }
    }

    /// Cluster `c` gained a record.
    fn add(&mut self, c: u32, record: &'a identity::Prepared) {
        let c = c as usize;
        if self.views.len() <= c {
            self.views.resize_with(c + 1, Self::empty);
        }
        self.views[c].records.push(record);
    }

    /// Moves cluster `c`'s view out, labelled, until [`Views::put`] gives it back.
    fn take(&mut self, c: u32) -> PreparedCandidate<'a> {
        let c_us = c as usize;
        if self.views.len() <= c_us {
            self.views.resize_with(c_us + 1, Self::empty);
        }
        let mut view = std::mem::replace(&mut self.views[c_us], Self::empty());
        if view.patient_id.0.is_empty() {
            view.patient_id = PatientId(format!("{c:010}"));
        }
        view
    }

    fn put(&mut self, c: u32, view: PreparedCandidate<'a>) {
        self.views[c as usize] = view;
    }
}

/// Interned patient ids, numbered: stored ones that are UUIDs in the form this program writes
/// them are kept as 16-byte UUIDs (most stored ids; a 36-character string twice, in the list
/// and in its index, took about 80 MiB more at 645,000 patients), any other stored id as its
/// text, marked by [`OTHER`]; new ones as UUIDs, marked by [`FRESH`].
#[derive(Default)]
struct Patients {
    stored: Vec<uuid::Uuid>,
    stored_index: HashMap<uuid::Uuid, u32>,
    others: Vec<PatientId>,
    others_index: HashMap<PatientId, u32>,
    fresh: Vec<uuid::Uuid>,
}

/// The bit that marks a new patient's number in [`Patients`].
const FRESH: u32 = 1 << 31;
/// The bit that marks a stored id kept as text in [`Patients`].
const OTHER: u32 = 1 << 30;

impl Patients {
    fn intern(&mut self, id: &PatientId) -> u32 {
        self.intern_str(id.as_str())
    }

    fn intern_str(&mut self, id: &str) -> u32 {
        let i = match as_uuid(id) {
            Some(u) => *self.stored_index.entry(u).or_insert_with(|| {
                self.stored.push(u);
                self.stored.len() as u32 - 1
            }),
            None => {
                let id = PatientId(id.to_string());
                *self.others_index.entry(id.clone()).or_insert_with(|| {
                    self.others.push(id);
                    self.others.len() as u32 - 1
                }) | OTHER
            }
        };
        assert!(i & !OTHER < OTHER, "fewer than 2^30 stored patients");
        i
    }

    /// The number of a stored id interned before.
    fn find(&self, id: &PatientId) -> Option<u32> {
        match as_uuid(id.as_str()) {
            Some(u) => self.stored_index.get(&u).copied(),
            None => self.others_index.get(id).map(|i| i | OTHER),
        }
    }

    /// A new id (as [`PatientId::generate`] makes them), never looked up by value during this
    /// rebuild (no stored row or link has it), so kept without an index entry.
    fn push_new(&mut self) -> u32 {
        self.fresh.push(PatientId::new_uuid());
        assert!(
            self.fresh.len() < FRESH as usize,
            "fewer than 2^31 patients"
        );
        (self.fresh.len() as u32 - 1) | FRESH
    }

    /// Patient number `i`'s id.
    fn id(&self, i: u32) -> PatientId {
        if i & FRESH != 0 {
            PatientId::from_uuid(self.fresh[(i & !FRESH) as usize])
        } else if i & OTHER != 0 {
            self.others[(i & !OTHER) as usize].clone()
        } else {
            PatientId::from_uuid(self.stored[i as usize])
        }
    }

    /// Stored patients `a` and `b` in the order of their ids' text.
    fn cmp_stored(&self, a: u32, b: u32) -> std::cmp::Ordering {
        if (a | b) & OTHER == 0 {
            // A UUID's bytes order as its lowercase hexadecimal text does.
            self.stored[a as usize].cmp(&self.stored[b as usize])
        } else {
            self.id(a).cmp(&self.id(b))
        }
    }

    fn is_fresh(i: u32) -> bool {
        i != NONE && i & FRESH != 0
    }
}

/// The UUID an id is the text of, when [`PatientId::from_uuid`] writes it back the same.
fn as_uuid(id: &str) -> Option<uuid::Uuid> {
    let u = uuid::Uuid::try_parse(id).ok()?;
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    (u.hyphenated().encode_lower(&mut text) == id).then_some(u)
}

fn bucket_of(h: u64) -> usize {
    (h >> (64 - BUCKET_BITS)) as usize
}

/// The key-hash index of [`Loaded`]: every record's key hashes placed by bucket (a counting
/// sort, so no 16-byte entries are ever held), then each bucket sorted and deduplicated.
/// Entries keep the low 32 bits of the hash; the bucket is the top [`BUCKET_BITS`].
fn key_index(key_hashes: &[u64], key_offsets: &[u32]) -> (Vec<(u32, u32)>, Vec<u32>) {
    let buckets_n = 1usize << BUCKET_BITS;
    let mut starts = vec![0u32; buckets_n + 1];
    for &h in key_hashes {
        starts[bucket_of(h) + 1] += 1;
    }
    for b in 0..buckets_n {
        starts[b + 1] += starts[b];
    }
    let mut index = vec![(0u32, 0u32); key_hashes.len()];
    let mut fill = starts.clone();
    for (i, w) in key_offsets.windows(2).enumerate() {
        for &h in &key_hashes[w[0] as usize..w[1] as usize] {
            let at = &mut fill[bucket_of(h)];
            index[*at as usize] = (h as u32, i as u32);
            *at += 1;
        }
    }
    drop(fill);
    let mut buckets = Vec::with_capacity(buckets_n + 1);
    let mut out = 0usize;
    for b in 0..buckets_n {
        buckets.push(out as u32);
        let (start, end) = (starts[b] as usize, starts[b + 1] as usize);
        index[start..end].sort_unstable();
        let mut last = None;
        for at in start..end {
            let entry = index[at];
            if last != Some(entry) {
                index[out] = entry;
                out += 1;
                last = Some(entry);
            }
        }
    }
    buckets.push(out as u32);
    index.truncate(out);
    index.shrink_to_fit();
    (index, buckets)
}

/// The entries of a [`key_index`] for hash `h`.
fn with_hash<'i>(index: &'i [(u32, u32)], buckets: &[u32], h: u64) -> &'i [(u32, u32)] {
    let b = bucket_of(h);
    let low = h as u32;
    let bucket = &index[buckets[b] as usize..buckets[b + 1] as usize];
    let start = bucket.partition_point(|&(x, _)| x < low);
    let end = start + bucket[start..].partition_point(|&(x, _)| x == low);
    &bucket[start..end]
}

fn hash_key(key: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

fn hash_source_key(key: &SourceKey) -> u64 {
    hash_source_key_parts(key.source, key.id.as_str())
}

/// [`hash_source_key`] of the key `(source, id)`, without making one.
fn hash_source_key_parts(source: SourceKind, id: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    source.hash(&mut h);
    id.hash(&mut h);
    h.finish()
}

/// Record keys by hash, placed like the blocking-key index ([`key_index`]): a probe reads a
/// few neighbouring 8-byte entries instead of binary-searching a million keys, and the whole
/// table is 12 bytes a record. Exact: every entry with the hash is checked against the key.
struct KeyLookup {
    index: Vec<(u32, u32)>,
    buckets: Vec<u32>,
}

impl KeyLookup {
    /// The record `(source, id)`.
    fn find(&self, loaded: &Loaded, source: SourceKind, id: &str) -> Option<u32> {
        with_hash(
            &self.index,
            &self.buckets,
            hash_source_key_parts(source, id),
        )
        .iter()
        .map(|&(_, i)| i)
        .find(|&i| {
            let key = loaded.key(i);
            key.source == source && key.id.as_str() == id
        })
    }
}

/// Order-independent fingerprint of a key set, accumulated one key hash at a time (the two
/// backends may sort text differently).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Fingerprint {
    sum: u64,
    count: u64,
}

impl Fingerprint {
    fn add(&mut self, hash: u64) {
        self.sum = self
            .sum
            .wrapping_add(hash.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15);
        self.count += 1;
    }
}

/// Everything loaded for a rebuild.
struct Loaded {
    /// The records packed, for survivorship; decoded a cluster at a time.
    records: compact::Records,
    /// Each record normalized once for matching (with its key), in the order of `records`.
    prepared: Vec<identity::Prepared>,
    /// Indexes into `records`, sorted by `SourceKey`'s own order, for lookups.
    by_key: Vec<u32>,
    /// Flat key hashes per record: `key_hashes[key_offsets[i]..key_offsets[i + 1]]`.
    key_hashes: Vec<u64>,
    key_offsets: Vec<u32>,
    fingerprints: Vec<Fingerprint>,
    /// `(low 32 bits of the hash, record)`, sorted within each bucket.
    index: Vec<(u32, u32)>,
    /// Where each bucket of hashes (their top [`BUCKET_BITS`] bits) starts in `index`, so a
    /// lookup touches a few neighbouring entries instead of binary-searching millions.
    buckets: Vec<u32>,
    current: Vec<Option<Current>>,
    patients: Patients,
    /// (record, patient) pairs an admin rejected.
    rejected: HashSet<(u32, u32)>,
}

impl Loaded {
    fn find(&self, key: &SourceKey) -> Option<u32> {
        self.by_key
            .binary_search_by(|&i| self.prepared[i as usize].key.cmp(key))
            .ok()
            .map(|pos| self.by_key[pos])
    }

    /// A table of the record keys by hash, for scans that look up every stored row.
    fn lookup(&self) -> KeyLookup {
        let hashes: Vec<u64> = self
            .prepared
            .iter()
            .map(|p| hash_source_key(&p.key))
            .collect();
        let offsets: Vec<u32> = (0..=hashes.len() as u32).collect();
        let (index, buckets) = key_index(&hashes, &offsets);
        KeyLookup { index, buckets }
    }

    fn key(&self, i: u32) -> &SourceKey {
        &self.prepared[i as usize].key
    }

    /// The records of a cluster, decoded, with their phone choices.
    fn members(&self, members: &[u32]) -> (Vec<SourceRecord>, Vec<Option<identity::RecordPhone>>) {
        members
            .iter()
            .map(|&m| self.records.get_with_phone(m as usize))
            .unzip()
    }

    /// The records with key hash `h` (the top [`BUCKET_BITS`] and the low 32 bits agreeing:
    /// a record whose hash differs only in between is one more candidate, which `decide`
    /// turns down).
    fn with_hash(&self, h: u64) -> &[(u32, u32)] {
        with_hash(&self.index, &self.buckets, h)
    }

    fn hashes(&self, i: u32) -> &[u64] {
        let i = i as usize;
        &self.key_hashes[self.key_offsets[i] as usize..self.key_offsets[i + 1] as usize]
    }
}

/// Recomputes every link and canonical row from stored source records.
#[instrument(skip_all, fields(dry_run = options.dry_run))]
pub async fn rebuild(
    store: &dyn Store,
    settings: &IdentitySettings,
    options: &RebuildOptions,
    now: DateTime<Utc>,
) -> StoreResult<RebuildReport> {
    // Each phase frees what the next does not need; the next phase's peak counts only if the
    // allocator gives it back at once.
    let _prompt_free = crate::alloc::PromptFree::start();
    let started = Instant::now();
    let mut report = RebuildReport {
        dry_run: options.dry_run,
        ..Default::default()
    };
    let loaded = Arc::new(load(store, settings, options).await?);
    report.records = loaded.records.len() as u64;
    report.loaded_ms = started.elapsed().as_millis() as u64;
    info!(
        records = loaded.records.len(),
        keys = loaded.index.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Rebuild loaded the source records."
    );

    // Clustering runs on one core, on a thread of its own. Beside it, this task brings the
    // stored blocking keys up to date: they depend on the records alone.
    let clustering = {
        let (loaded, settings, options) = (loaded.clone(), settings.clone(), options.clone());
        std::thread::spawn(move || cluster(&loaded, &settings, &options))
    };
    let keys = write_keys(store, &loaded, options, started).await;
    let clustered = tokio::task::spawn_blocking(move || clustering.join())
        .await
        .expect("the join task is not cancelled")
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    report.match_keys_rewritten = keys?;
    let (cluster_of, clusters, decided, rules, proposals) = clustered;
    let loaded = Arc::try_unwrap(loaded)
        .unwrap_or_else(|_| panic!("clustering and the key writer are done with the records"));
    let mut patients = loaded.patients;
    let names = name_clusters(&clusters, &loaded.current, &mut patients);
    // What only clustering reads (every record's key hashes and their index, about 110 MiB
    // at a million records) is freed before writing.
    let loaded = Loaded {
        patients,
        key_hashes: Vec::new(),
        key_offsets: Vec::new(),
        index: Vec::new(),
        buckets: Vec::new(),
        ..loaded
    };
    report.patients = clusters.len() as u64;
    report.clustered_ms = started.elapsed().as_millis() as u64;
    info!(
        patients = clusters.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Rebuild clustered the records."
    );

    let mut writer = Writer::new(store, options);

    // Links.
    for i in 0..loaded.records.len() {
        let target = names[cluster_of[i] as usize];
        match loaded.current[i] {
            Some(cur) if cur.patient == target => {
                report.links_unchanged += 1;
                if cur.manual {
                    report.manual_links_kept += 1;
                }
            }
            previous => {
                let d = decided[i].unwrap_or(Decided {
                    method: LinkMethod::New,
                    rule: NONE,
                    score: None,
                });
                let patient_id = loaded.patients.id(target);
                let previous_patient_id = previous.map(|p| loaded.patients.id(p.patient));
                if previous.is_some() {
                    report.links_moved += 1;
                } else {
                    report.links_created += 1;
                }
                let rule = Some(rules.get(d.rule).unwrap_or("rebuild").to_string());
                let link = Link {
                    key: loaded.key(i as u32).clone(),
                    patient_id: patient_id.clone(),
                    method: d.method,
                    rule: rule.clone(),
                    score: d.score,
                    decided_by: "auto".into(),
                    decided_at: now,
                };
                let event = LinkEvent {
                    key: loaded.key(i as u32).clone(),
                    action: if previous.is_some() { "relink" } else { "link" }.into(),
                    patient_id: Some(patient_id),
                    previous_patient_id,
                    method: d.method,
                    rule,
                    score: d.score,
                    decided_by: "auto".into(),
                    at: now,
                };
                writer.link(link, event).await?;
            }
        }
    }

    writer.flush().await?;
    drop(decided);
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Rebuild wrote the links."
    );

    // Review proposals: idempotent inserts, skipped for pairs already reviewed.
    for (record, cluster, score) in &proposals {
        let patient = names[*cluster as usize];
        if loaded.rejected.contains(&(*record, patient)) {
            continue;
        }
        report.review_proposals += 1;
        if let Some(tx) = writer.tx().await? {
            tx.open_review(
                loaded.key(*record),
                &loaded.patients.id(patient),
                *score,
                now,
            )
            .await?;
        }
        writer.wrote().await?;
    }

    // Canonical rows: every stored row is compared with its recomputation, on a thread of its
    // own while this task reads stored rows and writes the results.
    let loaded = Arc::new(loaded);
    let rows = Rows::new(&loaded, clusters, &names, &cluster_of, settings, now);
    let rows = write_rows(store, &mut writer, Arc::new(rows), options.page_size).await?;
    report.patients_updated = rows.updated;
    report.patients_created = rows.created;
    report.patients_retired = rows.retired;
    writer.flush().await?;
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Rebuild wrote the canonical rows."
    );

    writer.finish().await?;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    info!(
        records = report.records,
        patients = report.patients,
        links_moved = report.links_moved,
        links_created = report.links_created,
        patients_updated = report.patients_updated,
        elapsed_ms = report.elapsed_ms,
        "Rebuild finished."
    );
    Ok(report)
}

/// Reads the stored blocking keys and rewrites those of records whose key set changed; in one
/// bulk load ([`Writer::bulk_keys`]) when those records are many and none has keys stored (a
/// rebuild from bare records), or they are most records (a version that makes other keys).
/// Returns how many records' keys were (or, dry, would be) rewritten.
async fn write_keys(
    store: &dyn Store,
    loaded: &Loaded,
    options: &RebuildOptions,
    started: Instant,
) -> StoreResult<u64> {
    // Each record's stored keys, as a fingerprint in two arrays (12 bytes a record: this runs
    // beside clustering, at the rebuild's peak); a count of 0 means none stored.
    let n = loaded.prepared.len();
    let (mut sums, mut counts) = (vec![0u64; n], vec![0u32; n]);
    let mut lookup: Option<KeyLookup> = None;
    store
        .for_each_match_key(&mut |source, id, key| {
            let lookup = lookup.get_or_insert_with(|| loaded.lookup());
            if let Some(i) = lookup.find(loaded, source, id) {
                let mut fingerprint = Fingerprint {
                    sum: sums[i as usize],
                    count: u64::from(counts[i as usize]),
                };
                fingerprint.add(hash_key(key));
                sums[i as usize] = fingerprint.sum;
                counts[i as usize] = fingerprint.count as u32;
            }
        })
        .await?;
    drop(lookup);
    let stored = |i: u32| {
        (counts[i as usize] > 0).then_some(Fingerprint {
            sum: sums[i as usize],
            count: u64::from(counts[i as usize]),
        })
    };
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Rebuild read the stored blocking keys."
    );
    let rewrite: Vec<u32> = (0..n as u32)
        .filter(|&i| stored(i) != Some(loaded.fingerprints[i as usize]))
        .collect();
    let bulk = !options.dry_run && rewrite.len() >= options.bulk_keys_min;
    let fresh = bulk && rewrite.iter().all(|&i| stored(i).is_none());
    // Most records' keys changed (a version that makes other keys): deleting them all and
    // loading every record's keys in bulk beats deleting and inserting record by record.
    let replace = bulk && !fresh && rewrite.len() * 2 >= n;
    drop((sums, counts));
    let rewritten = rewrite.len() as u64;
    // The connection's usual page cache: clustering holds most of the memory meanwhile.
    let mut writer = Writer::new(
        store,
        &RebuildOptions {
            cache_mib: 0,
            ..options.clone()
        },
    );
    if replace {
        let every: Vec<u32> = (0..n as u32).collect();
        writer.bulk_keys(loaded, &every, true).await?;
    } else if fresh {
        writer.bulk_keys(loaded, &rewrite, false).await?;
    } else {
        for &i in &rewrite {
            let prepared = &loaded.prepared[i as usize];
            let keys = prepared.record_blocking_keys();
            writer.keys(prepared.key.clone(), keys).await?;
        }
    }
    writer.finish().await?;
    info!(
        rewritten,
        bulk = fresh || replace,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "Rebuild wrote the blocking keys."
    );
    Ok(rewritten)
}

/// What the canonical-row phase needs, shared with its computing thread.
struct Rows {
    loaded: Arc<Loaded>,
    members: Vec<Vec<u32>>,
    names: Vec<u32>,
    cluster_of_patient: HashMap<u32, u32>,
    /// Where a patient's records went, for rows left empty: patient -> (patient, records).
    went_to: HashMap<u32, BTreeMap<u32, u32>>,
    survivorship: identity::SurvivorshipConfig,
    now: DateTime<Utc>,
}

/// Canonical rows written (or, dry, to write).
#[derive(Default)]
struct RowCounts {
    updated: u64,
    created: u64,
    retired: u64,
}

/// Rows to save, one message per page of stored rows or of new clusters.
type RowBatch = Vec<(PatientRow, Vec<FieldSource>)>;

impl Rows {
    fn new(
        loaded: &Arc<Loaded>,
        clusters: Vec<Cluster>,
        names: &[u32],
        cluster_of: &[u32],
        settings: &IdentitySettings,
        now: DateTime<Utc>,
    ) -> Self {
        let mut cluster_of_patient = HashMap::new();
        // Only stored patients are looked up by id.
        for (c, &p) in names.iter().enumerate() {
            if !Patients::is_fresh(p) {
                cluster_of_patient.insert(p, c as u32);
            }
        }
        let mut went_to: HashMap<u32, BTreeMap<u32, u32>> = HashMap::new();
        for (i, cur) in loaded.current.iter().enumerate() {
            if let Some(cur) = cur {
                let target = names[cluster_of[i] as usize];
                if target != cur.patient {
                    *went_to
                        .entry(cur.patient)
                        .or_default()
                        .entry(target)
                        .or_default() += 1;
                }
            }
        }
        Rows {
            loaded: loaded.clone(),
            members: clusters.into_iter().map(|c| c.members).collect(),
            names: names.to_vec(),
            cluster_of_patient,
            went_to,
            survivorship: settings.survivorship.clone(),
            now,
        }
    }

    fn cluster(&self, patient_id: &PatientId) -> Option<u32> {
        self.loaded
            .patients
            .find(patient_id)
            .and_then(|p| self.cluster_of_patient.get(&p))
            .copied()
    }

    /// The new version of a stored row, if any; marks its cluster seen.
    fn next_stored(
        &self,
        old: PatientRow,
        seen: &mut [bool],
        counts: &mut RowCounts,
    ) -> Option<(PatientRow, Vec<FieldSource>)> {
        let loaded = &self.loaded;
        match self.cluster(&old.patient_id) {
            Some(c) => {
                seen[c as usize] = true;
                let (members, phones) = loaded.members(&self.members[c as usize]);
                let golden = identity::golden_record_with_phones(
                    &old.patient_id,
                    &members,
                    &phones,
                    &self.survivorship,
                    self.now,
                );
                let row = next_row(golden.row, Some(&old), self.now)?;
                counts.updated += 1;
                Some((row, golden.provenance))
            }
            None if old.status != "merged" && old.status != "deleted" => {
                let into = loaded
                    .patients
                    .find(&old.patient_id)
                    .and_then(|p| self.went_to.get(&p))
                    .and_then(|targets| {
                        targets
                            .iter()
                            .max_by_key(|(p, n)| (**n, std::cmp::Reverse(**p)))
                            .map(|(p, _)| loaded.patients.id(*p))
                    });
                let mut row = old;
                row.status = if into.is_some() { "merged" } else { "deleted" }.into();
                row.merged_into = into;
                row.updated_at = self.now;
                row.version += 1;
                counts.retired += 1;
                Some((row, Vec::new()))
            }
            None => None,
        }
    }

    /// The row of a cluster no stored row stands for.
    fn new_row(&self, c: usize, counts: &mut RowCounts) -> Option<(PatientRow, Vec<FieldSource>)> {
        let patient_id = &self.loaded.patients.id(self.names[c]);
        let (members, phones) = self.loaded.members(&self.members[c]);
        let golden = identity::golden_record_with_phones(
            patient_id,
            &members,
            &phones,
            &self.survivorship,
            self.now,
        );
        let row = next_row(golden.row, None, self.now)?;
        counts.created += 1;
        Some((row, golden.provenance))
    }
}

/// Compares every stored canonical row with its recomputation and writes the changes, then
/// writes the rows of clusters no stored row stands for. A thread computes golden rows while
/// this task reads pages of stored rows and writes results, so the two cores overlap.
async fn write_rows(
    store: &dyn Store,
    writer: &mut Writer<'_>,
    rows: Arc<Rows>,
    page_size: u32,
) -> StoreResult<RowCounts> {
    // `None` after the last page: only then are the clusters left over known.
    let (page_tx, mut page_rx) = tokio::sync::mpsc::channel::<Option<Vec<PatientRow>>>(2);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<RowBatch>(2);
    let worker = {
        let rows = rows.clone();
        std::thread::spawn(move || {
            let mut counts = RowCounts::default();
            let mut seen = vec![false; rows.members.len()];
            loop {
                let page = match page_rx.blocking_recv() {
                    Some(Some(page)) => page,
                    Some(None) => break,
                    // Reading failed: nothing more to write.
                    None => return counts,
                };
                let batch: RowBatch = page
                    .into_iter()
                    .filter_map(|old| rows.next_stored(old, &mut seen, &mut counts))
                    .collect();
                if out_tx.blocking_send(batch).is_err() {
                    return counts;
                }
            }
            let mut batch = Vec::new();
            for c in (0..rows.members.len()).filter(|&c| !seen[c]) {
                batch.extend(rows.new_row(c, &mut counts));
                if batch.len() >= 1_000 && out_tx.blocking_send(std::mem::take(&mut batch)).is_err()
                {
                    return counts;
                }
            }
            if !batch.is_empty() {
                let _ = out_tx.blocking_send(batch);
            }
            counts
        })
    };
    // Reading and writing take turns on this task; either waits on its database thread while
    // the other goes on. The worker's channel closes when it is done (or on an error here).
    let read = async move {
        let mut after: Option<PatientId> = None;
        loop {
            let page = store.load_patients_page(after.as_ref(), page_size).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.patient_id.clone());
            if page_tx.send(Some(page)).await.is_err() {
                return StoreResult::Ok(());
            }
        }
        let _ = page_tx.send(None).await;
        StoreResult::Ok(())
    };
    let write = async {
        while let Some(batch) = out_rx.recv().await {
            for (row, provenance) in batch {
                writer.patient(row, provenance).await?;
            }
        }
        StoreResult::Ok(())
    };
    let (read, write) = futures::join!(read, write);
    let counts = tokio::task::spawn_blocking(move || worker.join())
        .await
        .expect("the join task is not cancelled")
        .expect("golden rows do not panic");
    read?;
    write?;
    Ok(counts)
}

async fn load(
    store: &dyn Store,
    settings: &IdentitySettings,
    options: &RebuildOptions,
) -> StoreResult<Loaded> {
    // Page by page: each page is prepared on every core (normalisation, phones especially, is
    // the costly part) and packed, then dropped, so whole records are never all in memory. The
    // next page is read (and its rows decoded) while this one is prepared.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(1);
    let mut records = compact::Records::default();
    let mut prepared = Vec::new();
    let mut key_hashes = Vec::new();
    let mut key_offsets = vec![0u32];
    let mut fingerprints = Vec::new();
    // The same number comes back from several systems: each is parsed once for the whole load.
    let phones = identity::PhoneMemo::new(&settings.matching.default_region);
    let matching = Arc::new(settings.matching.clone());
    let (page_tx, mut page_rx) = tokio::sync::mpsc::channel::<Vec<SourceRecord>>(1);
    let read = async move {
        let mut after: Option<SourceKey> = None;
        loop {
            let page = store
                .load_source_records_page(after.as_ref(), options.page_size, false)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            if page_tx.send(page).await.is_err() {
                break;
            }
        }
        StoreResult::Ok(())
    };
    // Every loading thread but the first parses phones with a metadata database of its own, so
    // that they do not take turns on the built-in one's lock; worth reading only for big pages.
    let mut databases: Arc<Vec<Arc<identity::PhoneDatabase>>> = Arc::default();
    let prepare = async {
        while let Some(page) = page_rx.recv().await {
            if databases.is_empty() && threads > 1 && page.len() >= PHONE_DATABASES_FROM {
                let made = tokio::task::spawn_blocking(move || {
                    (1..threads)
                        .map(|_| identity::PhoneDatabase::new())
                        .collect()
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                databases = Arc::new(made);
            }
            let (phones, matching, own) = (phones.clone(), matching.clone(), databases.clone());
            let per_chunk = tokio::task::spawn_blocking(move || {
                prepare_page(&page, threads, &phones, &own, &matching)
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            for (computed, packed) in per_chunk {
                records.append(&packed);
                for (p, hashes, fp) in computed {
                    prepared.push(p);
                    key_hashes.extend(hashes);
                    key_offsets.push(key_hashes.len() as u32);
                    fingerprints.push(fp);
                }
            }
        }
    };
    let (read, ()) = futures::join!(read, prepare);
    read?;
    records.shrink_to_fit();
    prepared.shrink_to_fit();
    key_hashes.shrink_to_fit();
    let mut by_key: Vec<u32> = (0..prepared.len() as u32).collect();
    by_key.sort_by(|&a, &b| prepared[a as usize].key.cmp(&prepared[b as usize].key));
    let (index, buckets) = key_index(&key_hashes, &key_offsets);

    info!(
        records = prepared.len(),
        distinct_phones = phones.len(),
        "Rebuild read and prepared the source records."
    );
    drop(phones);
    let mut loaded = Loaded {
        current: vec![None; prepared.len()],
        records,
        prepared,
        by_key,
        key_hashes,
        key_offsets,
        fingerprints,
        index,
        buckets,
        patients: Patients::default(),
        rejected: HashSet::new(),
    };

    // Every link, streamed: only its record, patient and whether an admin made it.
    let mut current = std::mem::take(&mut loaded.current);
    let mut patients = std::mem::take(&mut loaded.patients);
    let mut lookup: Option<KeyLookup> = None;
    let records = &loaded;
    store
        .for_each_link_target(&mut |source, id, patient, manual| {
            let lookup = lookup.get_or_insert_with(|| records.lookup());
            if let Some(i) = lookup.find(records, source, id) {
                let patient = patients.intern_str(patient);
                current[i as usize] = Some(Current { patient, manual });
            }
        })
        .await?;
    drop(lookup);
    loaded.current = current;
    loaded.patients = patients;
    for review in store
        .list_reviews(Some(ReviewState::Rejected), u32::MAX)
        .await?
    {
        if let Some(i) = loaded.find(&review.key) {
            let patient = loaded.patients.intern(&review.patient_id);
            loaded.rejected.insert((i, patient));
        }
    }
    Ok(loaded)
}

/// One loaded record, prepared: its matching profile, its blocking keys' hashes and their
/// fingerprint.
type Computed = (identity::Prepared, Vec<u64>, Fingerprint);

/// Pages of at least this many records are prepared with a phone database per extra thread.
const PHONE_DATABASES_FROM: usize = 4_000;

/// Prepares a page of records on `threads` threads, each a contiguous part of it, in order;
/// part `k > 0` parses phones with `databases[k - 1]` when there is one.
fn prepare_page(
    page: &[SourceRecord],
    threads: usize,
    phones: &Arc<identity::PhoneMemo>,
    databases: &[Arc<identity::PhoneDatabase>],
    matching: &identity::MatchConfig,
) -> Vec<(Vec<Computed>, compact::Records)> {
    let chunk = page.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = page
            .chunks(chunk)
            .enumerate()
            .map(|(k, part)| {
                let database = k.checked_sub(1).and_then(|d| databases.get(d));
                scope.spawn(move || {
                    let _phones = phones.install();
                    let _database = database.map(|d| d.install());
                    let mut packed = compact::Records::default();
                    let computed = part
                        .iter()
                        .map(|r| {
                            let prepared = identity::Prepared::new(r, matching);
                            // Right after preparing: the phones just parsed are remembered.
                            let phone = identity::record_phone(&r.fields.phones);
                            packed.push(r, phone.as_ref());
                            let keys = prepared.record_blocking_keys();
                            let hashes: Vec<u64> = keys.iter().map(|k| hash_key(k)).collect();
                            let mut fp = Fingerprint::default();
                            hashes.iter().for_each(|&h| fp.add(h));
                            (prepared, hashes, fp)
                        })
                        .collect();
                    (computed, packed)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("key computation does not panic"))
            .collect()
    })
}

type Clustering = (
    Vec<u32>,
    Vec<Cluster>,
    Vec<Option<Decided>>,
    Rules,
    Vec<(u32, u32, f64)>,
);

/// Assigns every record to a cluster, in key order. Returns the cluster of each record, the
/// clusters, each record's automatic decision (with the rule names it refers to) and the review
/// proposals `(record, cluster, score)`.
fn cluster(loaded: &Loaded, settings: &IdentitySettings, options: &RebuildOptions) -> Clustering {
    let n = loaded.records.len();
    let mut cluster_of = vec![NONE; n];
    let mut clusters: Vec<Cluster> = Vec::new();
    let mut seeds: HashMap<u32, u32> = HashMap::new();
    let mut decided: Vec<Option<Decided>> = vec![None; n];
    let mut rules = Rules::default();
    let mut proposals = Vec::new();

    let mut views = Views::default();
    let mut scratch = Vec::new();
    fn assign<'a>(
        loaded: &'a Loaded,
        cluster_of: &mut [u32],
        clusters: &mut [Cluster],
        views: &mut Views<'a>,
        i: u32,
        c: u32,
    ) {
        cluster_of[i as usize] = c;
        clusters[c as usize].members.push(i);
        views.add(c, &loaded.prepared[i as usize]);
    }

    // Admin-linked records first: each admin patient is one cluster from the start, so records
    // before them in key order can already meet them.
    for i in 0..n as u32 {
        if let Some(cur) = loaded.current[i as usize].filter(|c| c.manual) {
            let c = *seeds.entry(cur.patient).or_insert_with(|| {
                clusters.push(Cluster {
                    members: Vec::new(),
                    seed: Some(cur.patient),
                });
                clusters.len() as u32 - 1
            });
            assign(loaded, &mut cluster_of, &mut clusters, &mut views, i, c);
        }
    }
    // Records an upstream merged away follow their surviving record, after everything else.
    let mut deferred = Vec::new();
    for i in 0..n as u32 {
        if cluster_of[i as usize] != NONE {
            continue;
        }
        if loaded.prepared[i as usize].status == RecordStatus::Merged {
            let record = loaded.records.get(i as usize);
            if let Some(into) = &record.merged_into {
                let target = SourceKey::new(record.key.source, into.clone());
                if let Some(t) = loaded.find(&target).filter(|&t| t != i) {
                    deferred.push((i, t));
                    continue;
                }
            }
        }
        decide_one(
            loaded,
            settings,
            options,
            &seeds,
            i,
            &mut cluster_of,
            &mut clusters,
            &mut views,
            &mut scratch,
            &mut decided,
            &mut rules,
            &mut proposals,
        );
    }
    // Follow merge chains (a few hops at most) to a placed record.
    for (i, mut t) in deferred.clone() {
        for _ in 0..8 {
            if cluster_of[t as usize] != NONE {
                break;
            }
            match deferred.iter().find(|(d, _)| *d == t) {
                Some((_, next)) => t = *next,
                None => break,
            }
        }
        let c = cluster_of[t as usize];
        if c != NONE {
            assign(loaded, &mut cluster_of, &mut clusters, &mut views, i, c);
            decided[i as usize] = Some(Decided {
                method: LinkMethod::SourceMerge,
                rule: rules.intern(Some("source_merged")),
                score: None,
            });
        } else {
            decide_one(
                loaded,
                settings,
                options,
                &seeds,
                i,
                &mut cluster_of,
                &mut clusters,
                &mut views,
                &mut scratch,
                &mut decided,
                &mut rules,
                &mut proposals,
            );
        }
    }
    (cluster_of, clusters, decided, rules, proposals)
}

#[allow(clippy::too_many_arguments)]
fn decide_one<'a>(
    loaded: &'a Loaded,
    settings: &IdentitySettings,
    options: &RebuildOptions,
    seeds: &HashMap<u32, u32>,
    i: u32,
    cluster_of: &mut [u32],
    clusters: &mut Vec<Cluster>,
    views: &mut Views<'a>,
    reached: &mut Vec<u32>,
    decided: &mut [Option<Decided>],
    rules: &mut Rules,
    proposals: &mut Vec<(u32, u32, f64)>,
) {
    reached.clear();
    for &h in loaded.hashes(i) {
        let with_hash = loaded.with_hash(h);
        if with_hash.len() > options.max_key_fanout {
            continue;
        }
        for &(_, j) in with_hash {
            let c = cluster_of[j as usize];
            if j != i && c != NONE {
                reached.push(c);
            }
        }
    }
    reached.sort_unstable();
    reached.dedup();
    let mine = loaded.current[i as usize].map(|c| c.patient);
    let candidates: Vec<PreparedCandidate> = reached
        .iter()
        .map(|&c| {
            let cl = &clusters[c as usize];
            let rejected_patient = |p: u32| loaded.rejected.contains(&(i, p));
            // Nothing to look up when no admin rejected anything (the usual case).
            let rejected = !loaded.rejected.is_empty()
                && (cl.seed.is_some_and(rejected_patient)
                    || cl.members.iter().any(|&m| {
                        loaded.current[m as usize].is_some_and(|cur| rejected_patient(cur.patient))
                            || mine.is_some_and(|p| loaded.rejected.contains(&(m, p)))
                    }));
            let mut view = views.take(c);
            view.rejected = rejected;
            view
        })
        .collect();
    let decision = if candidates.is_empty() {
        None
    } else {
        Some(identity::decide_prepared(
            &loaded.prepared[i as usize],
            &candidates,
            &settings.matching,
        ))
    };
    for (&c, view) in reached.iter().zip(candidates) {
        views.put(c, view);
    }
    let label = |p: &PatientId| {
        p.as_str()
            .parse::<u32>()
            .expect("cluster labels are numbers")
    };
    let target = match &decision {
        Some(d) => match &d.target {
            LinkTarget::Existing {
                patient_id,
                method,
                rule,
                score,
            } => {
                decided[i as usize] = Some(Decided {
                    method: *method,
                    rule: rules.intern(rule.as_deref()),
                    score: *score,
                });
                Some(label(patient_id))
            }
            LinkTarget::NewPatient => None,
        },
        None => None,
    };
    // A record of an admin-anchored patient stays with it unless the evidence points elsewhere:
    // the admin's decision about the patient's other records stands for this one too.
    let anchored = mine
        .and_then(|p| seeds.get(&p).copied())
        .filter(|&c| c != cluster_of[i as usize])
        .filter(|&c| {
            let cl = &clusters[c as usize];
            !cl.seed.is_some_and(|p| loaded.rejected.contains(&(i, p)))
                && !cl
                    .members
                    .iter()
                    .any(|&m| mine.is_some_and(|p| loaded.rejected.contains(&(m, p))))
        });
    let c = target.or(anchored).unwrap_or_else(|| {
        clusters.push(Cluster {
            members: Vec::new(),
            seed: None,
        });
        clusters.len() as u32 - 1
    });
    cluster_of[i as usize] = c;
    clusters[c as usize].members.push(i);
    views.add(c, &loaded.prepared[i as usize]);
    if let Some(d) = decision {
        for review in d.reviews {
            let rc = label(&review.patient_id);
            if rc != c {
                proposals.push((i, rc, review.score));
            }
        }
    }
}

/// Gives every cluster a patient id: admin seeds keep theirs, others take the patient most of
/// their records are linked to now (each id once, biggest claims first), else a new id.
fn name_clusters(
    clusters: &[Cluster],
    current: &[Option<Current>],
    patients: &mut Patients,
) -> Vec<u32> {
    let mut names = vec![NONE; clusters.len()];
    let mut taken: HashSet<u32> = HashSet::new();
    for (c, cl) in clusters.iter().enumerate() {
        if let Some(seed) = cl.seed {
            names[c] = seed;
            taken.insert(seed);
        }
    }
    let mut claims: Vec<(u32, u32, u32, u32)> = Vec::new(); // (count, first member, cluster, patient)
    for (c, cl) in clusters.iter().enumerate() {
        if cl.seed.is_some() {
            continue;
        }
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for &m in &cl.members {
            if let Some(cur) = current[m as usize] {
                *counts.entry(cur.patient).or_default() += 1;
            }
        }
        let first = cl.members.iter().copied().min().unwrap_or(NONE);
        for (p, n) in counts {
            claims.push((n, first, c as u32, p));
        }
    }
    claims.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then_with(|| patients.cmp_stored(a.3, b.3))
    });
    for (_, _, c, p) in claims {
        if names[c as usize] == NONE && !taken.contains(&p) {
            names[c as usize] = p;
            taken.insert(p);
        }
    }
    for name in names.iter_mut().filter(|n| **n == NONE) {
        *name = patients.push_new();
    }
    names
}

/// Batches writes into large transactions; in a dry run it hands out no transaction and
/// buffers nothing. Links, canonical rows and blocking keys are buffered and written with the
/// store's multi-row methods; each buffer is flushed when full and by [`Writer::flush`].
struct Writer<'a> {
    store: &'a dyn Store,
    dry_run: bool,
    batch: usize,
    cache_mib: u32,
    pending: usize,
    tx: Option<Box<dyn StoreTx>>,
    links: Vec<(Link, LinkEvent)>,
    patients: Vec<(PatientRow, Vec<FieldSource>)>,
    keys: Vec<(SourceKey, Vec<String>)>,
}

impl<'a> Writer<'a> {
    fn new(store: &'a dyn Store, options: &RebuildOptions) -> Self {
        Self {
            store,
            dry_run: options.dry_run,
            batch: options.batch_writes.max(1),
            cache_mib: options.cache_mib,
            pending: 0,
            tx: None,
            links: Vec::new(),
            patients: Vec::new(),
            keys: Vec::new(),
        }
    }

    async fn tx(&mut self) -> StoreResult<Option<&mut dyn StoreTx>> {
        if self.dry_run {
            return Ok(None);
        }
        if self.tx.is_none() {
            let mut tx = self.store.begin().await?;
            tx.bulk_write_cache(self.cache_mib).await?;
            self.tx = Some(tx);
        }
        Ok(self.tx.as_deref_mut().map(|t| t as &mut dyn StoreTx))
    }

    async fn wrote(&mut self) -> StoreResult<()> {
        self.wrote_n(1).await
    }

    async fn wrote_n(&mut self, n: usize) -> StoreResult<()> {
        self.pending += n;
        if self.pending >= self.batch {
            self.pending = 0;
            if let Some(tx) = self.tx.take() {
                commit(tx).await?;
            }
        }
        Ok(())
    }

    async fn link(&mut self, link: Link, event: LinkEvent) -> StoreResult<()> {
        if !self.dry_run {
            self.links.push((link, event));
            if self.links.len() >= self.batch {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn patient(&mut self, row: PatientRow, provenance: Vec<FieldSource>) -> StoreResult<()> {
        if !self.dry_run {
            self.patients.push((row, provenance));
            if self.patients.len() >= self.batch {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn keys(&mut self, key: SourceKey, keys: Vec<String>) -> StoreResult<()> {
        if !self.dry_run {
            self.keys.push((key, keys));
            if self.keys.len() >= self.batch {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Writes every buffered item, links first, then rows, then keys.
    async fn flush(&mut self) -> StoreResult<()> {
        let links = std::mem::take(&mut self.links);
        let patients = std::mem::take(&mut self.patients);
        let keys = std::mem::take(&mut self.keys);
        let n = links.len() + patients.len() + keys.len();
        if n == 0 {
            return Ok(());
        }
        if let Some(tx) = self.tx().await? {
            if !links.is_empty() {
                tx.save_links(&links).await?;
            }
            if !patients.is_empty() {
                tx.save_patients(&patients).await?;
            }
            if !keys.is_empty() {
                tx.replace_match_keys_many(&keys).await?;
            }
        }
        self.wrote_n(n).await
    }

    /// Inserts the keys of `records` in one transaction, in record order, with the indexes
    /// built after them (see [`StoreTx::match_keys_bulk_load`]) and their sorts in temporary
    /// files: the records have none stored, or, with `replace`, every stored key is deleted
    /// first.
    async fn bulk_keys(
        &mut self,
        loaded: &Loaded,
        records: &[u32],
        replace: bool,
    ) -> StoreResult<()> {
        if self.dry_run {
            return Ok(());
        }
        self.flush().await?;
        if let Some(tx) = self.tx.take() {
            commit(tx).await?;
        }
        self.pending = 0;
        self.store.sort_in_files(true).await?;
        let loaded_keys = self.bulk_keys_in_tx(loaded, records, replace).await;
        let back = self.store.sort_in_files(false).await;
        loaded_keys?;
        back
    }

    async fn bulk_keys_in_tx(
        &mut self,
        loaded: &Loaded,
        records: &[u32],
        replace: bool,
    ) -> StoreResult<()> {
        let Some(tx) = self.tx().await? else {
            return Ok(());
        };
        if replace {
            tx.delete_all_match_keys().await?;
        }
        tx.match_keys_bulk_load(true).await?;
        // A few statements' worth at a time.
        let mut keys: Vec<(String, u32)> = Vec::new();
        for part in records.chunks(2_000) {
            keys.clear();
            for &i in part {
                let prepared = &loaded.prepared[i as usize];
                keys.extend(prepared.record_blocking_keys().into_iter().map(|k| (k, i)));
            }
            let rows: Vec<(&str, &SourceKey)> = keys
                .iter()
                .map(|(k, i)| (k.as_str(), loaded.key(*i)))
                .collect();
            tx.insert_match_keys(&rows).await?;
        }
        tx.match_keys_bulk_load(false).await?;
        if let Some(tx) = self.tx.take() {
            commit(tx).await?;
        }
        Ok(())
    }

    async fn finish(mut self) -> StoreResult<()> {
        self.flush().await?;
        if let Some(tx) = self.tx.take() {
            commit(tx).await?;
        }
        Ok(())
    }
}

/// Commits a writer's transaction, its connection's page cache set back first so the pooled
/// connection does not keep (and later fill) the bulk writer's cache.
async fn commit(mut tx: Box<dyn StoreTx>) -> StoreResult<()> {
    tx.bulk_write_cache(0).await?;
    tx.commit().await
}
