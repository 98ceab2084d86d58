//! Rebuild on SQLite: the bulk load of blocking keys (a rebuild from bare records) leaves the
//! same keys, links and indexes as writing them record by record; a later rebuild rewrites the
//! keys of exactly the records whose stored set differs, and replaces every key in bulk when
//! most differ; a whole-table scan sets its connection's page cache back. And the key-hash
//! index finds exactly the records a plain search finds.

use chrono::{NaiveDate, TimeZone, Utc};

use super::{rebuild, RebuildOptions};
use crate::model::{Address, PersonFields, RecordStatus, SourceKey, SourceKind, SourceRecord};
use crate::store::{SqliteStore, Store};
use crate::sync::apply::IdentitySettings;

/// Person `p` as seen by `source`: people 0..40 are in two systems, with a nickname in one.
fn record(source: SourceKind, p: u32) -> SourceRecord {
    let at = Utc.timestamp_opt(1_700_000_000 + i64::from(p), 0).unwrap();
    let given = match (p % 5, source) {
        (0, SourceKind::Intakeq) => "Bob",
        (0, _) => "Robert",
        (1, _) => "Maria",
        (2, _) => "Wei",
        (3, _) => "Aisha",
        _ => "Sofia",
    };
    SourceRecord {
        key: SourceKey::new(source, format!("{source}-{p}")),
        fields: PersonFields {
            given_name: Some(given.into()),
            family_name: Some(format!("Family{}", p / 3)),
            birth_date: NaiveDate::from_ymd_opt(1950 + (p % 40) as i32, 1 + p % 12, 1 + p % 28),
            sex: Some(if p % 2 == 0 { "male" } else { "female" }.into()),
            email: (p % 4 != 0).then(|| format!("person{p}@mail.com")),
            phones: vec![format!("415555{:04}", 2000 + p)],
            address: Address {
                line1: Some(format!("{} Main St", p + 1)),
                postal_code: Some("94110".into()),
                ..Address::default()
            },
            ..PersonFields::default()
        },
        status: RecordStatus::Active,
        merged_into: None,
        source_updated_at: Some(at),
        fetched_at: at,
        raw: serde_json::Value::Null,
    }
}

async fn store_with_records(dir: &tempfile::TempDir) -> SqliteStore {
    let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
    let store = SqliteStore::connect(&url, 2).await.unwrap();
    store.migrate().await.unwrap();
    let mut tx = store.begin().await.unwrap();
    for p in 0..120 {
        tx.save_source_record(&record(SourceKind::Healthie, p))
            .await
            .unwrap();
        if p < 40 {
            tx.save_source_record(&record(SourceKind::Intakeq, p))
                .await
                .unwrap();
        }
    }
    tx.commit().await.unwrap();
    store
}

async fn all_keys(store: &SqliteStore) -> Vec<(SourceKey, String)> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .load_match_keys_page(after.as_ref(), 50)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.clone());
        out.extend(page);
    }
    out.sort();
    out
}

async fn links(store: &SqliteStore) -> Vec<(SourceKey, String)> {
    let page = store.load_links_page(None, 10_000).await.unwrap();
    page.into_iter()
        .map(|l| (l.key, l.method.as_str().to_string()))
        .collect()
}

async fn indexes(store: &SqliteStore) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'match_keys' \
         AND sql IS NOT NULL ORDER BY name",
    )
    .fetch_all(store.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_key_load_writes_what_record_by_record_writes() {
    let settings = IdentitySettings::default();
    let now = Utc::now();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        store_with_records(&a_dir).await,
        store_with_records(&b_dir).await,
    );
    let indexes_before = indexes(&a).await;
    assert_eq!(indexes_before.len(), 2, "{indexes_before:?}");

    let one_by_one = RebuildOptions {
        bulk_keys_min: usize::MAX,
        page_size: 37,
        ..RebuildOptions::default()
    };
    let bulk = RebuildOptions {
        bulk_keys_min: 1,
        page_size: 37,
        ..RebuildOptions::default()
    };
    let first_a = rebuild(&a, &settings, &one_by_one, now).await.unwrap();
    let first_b = rebuild(&b, &settings, &bulk, now).await.unwrap();
    assert_eq!(first_a.match_keys_rewritten, 160);
    assert_eq!(
        (
            first_a.patients,
            first_a.links_created,
            first_a.match_keys_rewritten
        ),
        (
            first_b.patients,
            first_b.links_created,
            first_b.match_keys_rewritten
        )
    );
    assert!(first_b.patients < 160, "some records matched: {first_b:?}");

    let keys = all_keys(&a).await;
    assert!(keys.len() > 160 * 4, "{}", keys.len());
    assert_eq!(keys, all_keys(&b).await);
    assert_eq!(links(&a).await, links(&b).await);
    assert_eq!(indexes(&b).await, indexes_before, "both indexes are back");

    // Nothing left to change, whichever way the keys went in.
    for store in [&a, &b] {
        let again = rebuild(store, &settings, &bulk, now).await.unwrap();
        assert_eq!(again.changes(), 0, "{again:?}");
    }
}

/// The test store, rebuilt once, and the keys that rebuild stored.
async fn rebuilt(
    dir: &tempfile::TempDir,
    options: &RebuildOptions,
) -> (SqliteStore, Vec<(SourceKey, String)>) {
    let store = store_with_records(dir).await;
    rebuild(&store, &IdentitySettings::default(), options, Utc::now())
        .await
        .unwrap();
    let keys = all_keys(&store).await;
    (store, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_records_whose_stored_keys_differ_get_them_rewritten() {
    let (settings, now) = (IdentitySettings::default(), Utc::now());
    let dir = tempfile::tempdir().unwrap();
    let options = RebuildOptions {
        page_size: 37,
        ..RebuildOptions::default()
    };
    let (store, right) = rebuilt(&dir, &options).await;

    // Three records lose their keys, two gain a stale one, one has a key swapped for another:
    // six records whose stored set differs from the computed one.
    let pool = store.pool();
    for id in ["healthie-3", "healthie-70", "intakeq-12"] {
        sqlx::query("DELETE FROM match_keys WHERE source_id = ?")
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }
    for (source, id) in [("healthie", "healthie-5"), ("intakeq", "intakeq-39")] {
        sqlx::query("INSERT INTO match_keys (key, source, source_id) VALUES ('stale', ?, ?)")
            .bind(source)
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
    }
    let (_, swapped) = right
        .iter()
        .find(|(k, _)| k.id.as_str() == "healthie-100")
        .unwrap();
    sqlx::query("UPDATE match_keys SET key = 'other' WHERE source_id = 'healthie-100' AND key = ?")
        .bind(swapped)
        .execute(pool)
        .await
        .unwrap();

    let again = rebuild(&store, &settings, &options, now).await.unwrap();
    assert_eq!(again.match_keys_rewritten, 6, "{again:?}");
    assert_eq!(again.changes(), 6, "only keys changed: {again:?}");
    assert_eq!(all_keys(&store).await, right);
    let third = rebuild(&store, &settings, &options, now).await.unwrap();
    assert_eq!(third.changes(), 0, "{third:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_changed_for_most_records_are_replaced_in_bulk() {
    let (settings, now) = (IdentitySettings::default(), Utc::now());
    let dir = tempfile::tempdir().unwrap();
    let options = RebuildOptions {
        page_size: 37,
        bulk_keys_min: 10,
        ..RebuildOptions::default()
    };
    let (store, right) = rebuilt(&dir, &options).await;
    let indexes_before = indexes(&store).await;

    // A version that makes other keys: every stored key differs. And a key of a record that
    // is not stored, which only a replacement of every key removes.
    let pool = store.pool();
    sqlx::query("UPDATE match_keys SET key = key || '~' WHERE source_id <> 'healthie-7'")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO match_keys (key, source, source_id) VALUES ('k', 'hint', 'gone')")
        .execute(pool)
        .await
        .unwrap();

    let again = rebuild(&store, &settings, &options, now).await.unwrap();
    assert_eq!(again.match_keys_rewritten, 159, "{again:?}");
    assert_eq!(again.changes(), 159, "only keys changed: {again:?}");
    assert_eq!(all_keys(&store).await, right);
    assert_eq!(indexes(&store).await, indexes_before);
    let third = rebuild(&store, &settings, &options, now).await.unwrap();
    assert_eq!(third.changes(), 0, "{third:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_sets_its_connections_page_cache_back() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("db.sqlite").display());
    // One reading connection: the scans and the check below share it.
    let store = SqliteStore::connect(&url, 1).await.unwrap();
    store.migrate().await.unwrap();
    let cache = || async {
        let (kib,): (i64,) = sqlx::query_as("PRAGMA cache_size")
            .fetch_one(store.pool())
            .await
            .unwrap();
        kib
    };
    let usual = cache().await;
    assert_eq!(usual, -32_768, "32 MiB, as every connection opens with");
    store.for_each_match_key(&mut |_, _, _| {}).await.unwrap();
    assert_eq!(cache().await, usual);
    store
        .for_each_link_target(&mut |_, _, _, _| {})
        .await
        .unwrap();
    assert_eq!(cache().await, usual);
}

#[test]
fn the_key_index_finds_every_record_with_a_hash_and_no_other() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // 3,000 records of 0-9 keys drawn from 5,000 hashes (so many are shared), one hash twice
    // in a record, and hashes that share a bucket and the low 32 bits.
    let pool: Vec<u64> = (0..5_000)
        .map(|i| match i {
            0 => 0,
            1 => u64::MAX,
            2 => 0xFFFF_F000_0000_0001,
            3 => 0xFFFF_F0FF_0000_0001, // same bucket and low bits as 2
            _ => rng.gen(),
        })
        .collect();
    let mut key_hashes = Vec::new();
    let mut key_offsets = vec![0u32];
    for r in 0..3_000u32 {
        for _ in 0..rng.gen_range(0..10) {
            key_hashes.push(pool[rng.gen_range(0..pool.len())]);
        }
        if r == 5 {
            key_hashes.extend([pool[2], pool[2], pool[3]]);
        }
        key_offsets.push(key_hashes.len() as u32);
    }
    let (index, buckets) = super::key_index(&key_hashes, &key_offsets);
    let loaded_like = |h: u64| -> Vec<u32> {
        super::with_hash(&index, &buckets, h)
            .iter()
            .map(|e| e.1)
            .collect()
    };
    let mut expected_len = 0;
    for &h in &pool {
        let same = |x: u64| super::bucket_of(x) == super::bucket_of(h) && x as u32 == h as u32;
        let mut want: Vec<u32> = key_offsets
            .windows(2)
            .enumerate()
            .filter(|(_, w)| {
                key_hashes[w[0] as usize..w[1] as usize]
                    .iter()
                    .any(|&x| same(x))
            })
            .map(|(i, _)| i as u32)
            .collect();
        want.sort_unstable();
        assert_eq!(loaded_like(h), want, "hash {h:x}");
    }
    for b in 0..(buckets.len() - 1) {
        let bucket = &index[buckets[b] as usize..buckets[b + 1] as usize];
        assert!(bucket.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        expected_len += bucket.len();
    }
    assert_eq!(index.len(), expected_len);
    assert!(loaded_like(pool[2]).contains(&5) && loaded_like(pool[3]).contains(&5));
}

#[test]
fn interned_patient_ids_come_back_as_written_and_sort_as_text() {
    use super::{Patients, OTHER};
    use crate::model::PatientId;
    let written = [
        "0190b2f4-5c3a-7d2e-9a1b-3c4d5e6f7a8b",
        "p-42",
        "0190B2F4-5C3A-7D2E-9A1B-3C4D5E6F7A8C",
        "00000000-0000-0000-0000-000000000001",
        "{0190b2f4-5c3a-7d2e-9a1b-3c4d5e6f7a8b}",
        "f190b2f4-5c3a-7d2e-9a1b-3c4d5e6f7a8b",
    ];
    let mut patients = Patients::default();
    let numbers: Vec<u32> = written
        .iter()
        .map(|w| patients.intern(&PatientId::from(*w)))
        .collect();
    // Only ids in the form this program writes are kept as UUIDs.
    let as_text: Vec<bool> = numbers.iter().map(|n| n & OTHER != 0).collect();
    assert_eq!(as_text, [false, true, true, false, true, false]);
    for (w, &n) in written.iter().zip(&numbers) {
        assert_eq!(patients.id(n).as_str(), *w);
        assert_eq!(patients.find(&PatientId::from(*w)), Some(n));
        assert_eq!(patients.intern(&PatientId::from(*w)), n, "interned once");
    }
    assert_eq!(patients.find(&PatientId::from("p-43")), None);
    for (a, &na) in written.iter().zip(&numbers) {
        for (b, &nb) in written.iter().zip(&numbers) {
            assert_eq!(patients.cmp_stored(na, nb), a.cmp(b), "{a} against {b}");
        }
    }
    let new = patients.push_new();
    assert!(Patients::is_fresh(new) && !Patients::is_fresh(numbers[0]));
}
