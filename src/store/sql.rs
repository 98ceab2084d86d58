//! The SQL shared by both backends, as one macro body expanded once per database. Statements use
//! `$N` placeholders, which SQLite and Postgres both accept; the few dialect differences (the
//! claim's row locking, the transaction start) are passed in by the backend module.

macro_rules! impl_store {
    (
        store = $Store:ident,
        tx = $Tx:ident,
        db = $Db:ty,
        backend = $backend:expr,
        claim_lock = $claim_lock:expr,
        advisory_lock = $advisory_lock:expr,
        begin = $begin:expr $(,)?
    ) => {
        use std::collections::{HashMap, HashSet};
        use std::time::Duration;

        use async_trait::async_trait;
        use chrono::{DateTime, Utc};
        use sqlx::Row;

        use crate::model::{
            InboxId, PatientId, PersonFields, RecordStatus, SourceId, SourceKey, SourceKind,
            SourceRecord,
        };
        use crate::store::{
            Backend, FieldSource, InboxCount, InboxItem, InboxState, InsertOutcome, Link,
            LinkEvent, LinkMethod, NewInboxItem, PatientRow, PatientVersion, RetryAt, Review,
            ReviewState, SaveOutcome, Store, StoreError, StoreResult, StoreTx, SyncState,
        };
        use crate::store::{ResyncRun, UnseenRecord};

        type DbRow = <$Db as sqlx::Database>::Row;

        const INBOX_COLUMNS: &str = "id, source, origin, event_type, resource_type, resource_id, body, state, reason, \
             attempts, received_at_ms, available_at_ms, last_error_kind, last_http_status, finished_at_ms";
        const RECORD_COLUMNS: &str =
            "source, source_id, status, merged_into, fields, raw, source_updated_at, fetched_at";
        const PATIENT_COLUMNS: &str = "patient_id, given_name, middle_name, family_name, preferred_name, birth_date, \
             sex, gender_identity, email, phone, address_line1, address_line2, city, state, postal_code, country, \
             healthie_id, intakeq_id, hint_id, status, merged_into, first_seen_at, updated_at, version";
        const LINK_COLUMNS: &str =
            "source, source_id, patient_id, method, rule, score, decided_by, decided_at";
        const REVIEW_COLUMNS: &str =
            "id, source, source_id, patient_id, score, state, created_at, decided_at, decided_by";
        const LINK_EVENT_COLUMNS: &str =
            "source, source_id, action, patient_id, previous_patient_id, method, rule, score, decided_by, at";

        fn review_from_row(row: &DbRow) -> StoreResult<Review> {
            let state: String = row.try_get("state")?;
            Ok(Review {
                id: row.try_get("id")?,
                key: SourceKey::new(
                    parse_source(row.try_get::<&str, _>("source")?)?,
                    row.try_get::<String, _>("source_id")?,
                ),
                patient_id: PatientId(row.try_get("patient_id")?),
                score: row.try_get("score")?,
                state: ReviewState::parse(&state).ok_or_else(|| {
                    StoreError::corrupt("review state", crate::store::sql::BadValue("state"))
                })?,
                created_at: row.try_get("created_at")?,
                decided_at: row.try_get("decided_at")?,
                decided_by: row.try_get("decided_by")?,
            })
        }

        /// Keyset pagination bound: after this key, or before everything (the empty string
        /// sorts first).
        fn key_lower_bound(after: Option<&SourceKey>) -> (&str, &str) {
            after.map(|k| (k.source.as_str(), k.id.as_str())).unwrap_or(("", ""))
        }

        fn parse_source(s: &str) -> StoreResult<SourceKind> {
            s.parse().map_err(|e| StoreError::corrupt("source", e))
        }

        fn inbox_from_row(row: &DbRow) -> StoreResult<InboxItem> {
            let state: String = row.try_get("state")?;
            Ok(InboxItem {
                id: InboxId(row.try_get("id")?),
                source: parse_source(row.try_get::<&str, _>("source")?)?,
                origin: row.try_get("origin")?,
                event_type: row.try_get("event_type")?,
                resource_type: row.try_get("resource_type")?,
                resource_id: row.try_get("resource_id")?,
                body: row.try_get("body")?,
                state: InboxState::parse(&state).ok_or_else(|| {
                    StoreError::corrupt("inbox state", crate::store::sql::BadValue("state"))
                })?,
                reason: row.try_get("reason")?,
                attempts: row.try_get("attempts")?,
                received_at_ms: row.try_get("received_at_ms")?,
                available_at_ms: row.try_get("available_at_ms")?,
                last_error_kind: row.try_get("last_error_kind")?,
                last_http_status: row.try_get("last_http_status")?,
                finished_at_ms: row.try_get("finished_at_ms")?,
            })
        }

        /// Binds a source record's eight columns (`RECORD_COLUMNS` order) to `q`.
        fn bind_record<'q>(
            q: sqlx::query::Query<'q, $Db, <$Db as sqlx::Database>::Arguments<'q>>,
            record: &'q SourceRecord,
        ) -> StoreResult<sqlx::query::Query<'q, $Db, <$Db as sqlx::Database>::Arguments<'q>>> {
            let fields = serde_json::to_string(&record.fields)
                .map_err(|e| StoreError::corrupt("source record fields", e))?;
            let raw = serde_json::to_string(&record.raw)
                .map_err(|e| StoreError::corrupt("source record payload", e))?;
            Ok(q.bind(record.key.source.as_str())
                .bind(record.key.id.as_str())
                .bind(record.status.as_str())
                .bind(record.merged_into.as_ref().map(|m| m.as_str()))
                .bind(fields)
                .bind(raw)
                .bind(record.source_updated_at)
                .bind(record.fetched_at))
        }

        /// `(blocking key, patient)` for every linked record holding one of `keys`, other than
        /// `exclude`, in statements of at most [`bulk_params`](crate::store::sql::bulk_params)
        /// parameters.
        async fn patients_by_keys_in(
            tx: &mut sqlx::Transaction<'static, $Db>,
            keys: &[String],
            exclude: Option<&SourceKey>,
        ) -> StoreResult<Vec<(String, PatientId)>> {
            // No source is named "", so no row is left out without an `exclude`.
            let (source, id) = exclude.map_or(("", ""), |k| (k.source.as_str(), k.id.as_str()));
            let mut found = Vec::new();
            for chunk in keys.chunks(crate::store::sql::bulk_params($backend) - 2) {
                let n = chunk.len();
                let sql = format!(
                    "SELECT DISTINCT m.key, l.patient_id FROM match_keys m \
                     JOIN links l ON l.source = m.source AND l.source_id = m.source_id \
                     WHERE m.key IN ({}) AND NOT (m.source = {} AND m.source_id = {})",
                    crate::store::sql::bulk_list($backend, 1, n),
                    crate::store::sql::param($backend, n + 1),
                    crate::store::sql::param($backend, n + 2)
                );
                let mut q = sqlx::query(&sql);
                for k in chunk {
                    q = q.bind(k);
                }
                q = q.bind(source).bind(id);
                for row in q.fetch_all(&mut **tx).await? {
                    found.push((row.try_get("key")?, PatientId(row.try_get("patient_id")?)));
                }
            }
            Ok(found)
        }

        /// Every record linked to one of `patient_ids`, with its patient, `raw` left out.
        async fn linked_records_in(
            tx: &mut sqlx::Transaction<'static, $Db>,
            patient_ids: &[PatientId],
        ) -> StoreResult<Vec<(PatientId, SourceRecord)>> {
            let columns = RECORD_COLUMNS
                .split(", ")
                .map(|c| if c == "raw" { "'null' AS raw".to_string() } else { format!("r.{c}") })
                .collect::<Vec<_>>()
                .join(", ");
            let mut out = Vec::new();
            for chunk in patient_ids.chunks(crate::store::sql::bulk_params($backend)) {
                let sql = format!(
                    "SELECT l.patient_id AS linked_patient_id, {columns} FROM source_records r \
                     JOIN links l ON l.source = r.source AND l.source_id = r.source_id \
                     WHERE l.patient_id IN ({}) ORDER BY r.source, r.source_id",
                    crate::store::sql::bulk_list($backend, 1, chunk.len())
                );
                let mut q = sqlx::query(&sql);
                for id in chunk {
                    q = q.bind(id.as_str());
                }
                for row in q.fetch_all(&mut **tx).await? {
                    out.push((PatientId(row.try_get("linked_patient_id")?), record_from_row(&row)?));
                }
            }
            Ok(out)
        }

        /// The statement that writes one `sync_state` row.
        fn upsert_sync_state(
            state: &SyncState,
        ) -> sqlx::query::Query<'_, $Db, <$Db as sqlx::Database>::Arguments<'_>> {
            sqlx::query(
                "INSERT INTO sync_state (source, stream, cursor, checkpoint, last_success_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (source, stream) DO UPDATE SET cursor = excluded.cursor, checkpoint = excluded.checkpoint, \
                 last_success_at = excluded.last_success_at, updated_at = excluded.updated_at",
            )
            .bind(state.source.as_str())
            .bind(&state.stream)
            .bind(state.cursor.as_deref())
            .bind(state.checkpoint.as_deref())
            .bind(state.last_success_at)
            .bind(state.updated_at)
        }

        /// `col = excluded.col` for every `patient_history` column an upsert of a version
        /// rewrites (all but the key and the version).
        fn history_updates() -> String {
            PATIENT_COLUMNS
                .split(", ")
                .filter(|c| *c != "patient_id" && *c != "version")
                .map(|c| format!("{c} = excluded.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        }

        fn record_from_row(row: &DbRow) -> StoreResult<SourceRecord> {
            let fields: String = row.try_get("fields")?;
            let raw: String = row.try_get("raw")?;
            let status: String = row.try_get("status")?;
            Ok(SourceRecord {
                key: SourceKey::new(
                    parse_source(row.try_get::<&str, _>("source")?)?,
                    row.try_get::<String, _>("source_id")?,
                ),
                fields: serde_json::from_str::<PersonFields>(&fields)
                    .map_err(|e| StoreError::corrupt("source record fields", e))?,
                status: status.parse::<RecordStatus>().map_err(|_| {
                    StoreError::corrupt("record status", crate::store::sql::BadValue("status"))
                })?,
                merged_into: row.try_get::<Option<String>, _>("merged_into")?.map(SourceId),
                source_updated_at: row.try_get("source_updated_at")?,
                fetched_at: row.try_get("fetched_at")?,
                raw: serde_json::from_str(&raw)
                    .map_err(|e| StoreError::corrupt("source record payload", e))?,
            })
        }

        fn patient_from_row(row: &DbRow) -> StoreResult<PatientRow> {
            Ok(PatientRow {
                patient_id: PatientId(row.try_get("patient_id")?),
                given_name: row.try_get("given_name")?,
                middle_name: row.try_get("middle_name")?,
                family_name: row.try_get("family_name")?,
                preferred_name: row.try_get("preferred_name")?,
                birth_date: row.try_get("birth_date")?,
                sex: row.try_get("sex")?,
                gender_identity: row.try_get("gender_identity")?,
                email: row.try_get("email")?,
                phone: row.try_get("phone")?,
                address_line1: row.try_get("address_line1")?,
                address_line2: row.try_get("address_line2")?,
                city: row.try_get("city")?,
                state: row.try_get("state")?,
                postal_code: row.try_get("postal_code")?,
                country: row.try_get("country")?,
                healthie_id: row.try_get("healthie_id")?,
                intakeq_id: row.try_get("intakeq_id")?,
                hint_id: row.try_get("hint_id")?,
                status: row.try_get("status")?,
                merged_into: row.try_get::<Option<String>, _>("merged_into")?.map(PatientId),
                first_seen_at: row.try_get("first_seen_at")?,
                updated_at: row.try_get("updated_at")?,
                version: row.try_get("version")?,
            })
        }

        /// `patient_history` columns: the `patients` columns and the validity range.
        fn history_columns() -> String {
            format!("{PATIENT_COLUMNS}, valid_from, valid_to")
        }

        fn version_from_row(row: &DbRow) -> StoreResult<PatientVersion> {
            Ok(PatientVersion {
                row: patient_from_row(row)?,
                valid_from: row.try_get("valid_from")?,
                valid_to: row.try_get("valid_to")?,
            })
        }

        fn link_from_row(row: &DbRow) -> StoreResult<Link> {
            let method: String = row.try_get("method")?;
            Ok(Link {
                key: SourceKey::new(
                    parse_source(row.try_get::<&str, _>("source")?)?,
                    row.try_get::<String, _>("source_id")?,
                ),
                patient_id: PatientId(row.try_get("patient_id")?),
                method: LinkMethod::parse(&method).ok_or_else(|| {
                    StoreError::corrupt("link method", crate::store::sql::BadValue("method"))
                })?,
                rule: row.try_get("rule")?,
                score: row.try_get("score")?,
                decided_by: row.try_get("decided_by")?,
                decided_at: row.try_get("decided_at")?,
            })
        }

        fn link_event_from_row(row: &DbRow) -> StoreResult<LinkEvent> {
            let method: String = row.try_get("method")?;
            Ok(LinkEvent {
                key: SourceKey::new(
                    parse_source(row.try_get::<&str, _>("source")?)?,
                    row.try_get::<String, _>("source_id")?,
                ),
                action: row.try_get("action")?,
                patient_id: row.try_get::<Option<String>, _>("patient_id")?.map(PatientId),
                previous_patient_id: row
                    .try_get::<Option<String>, _>("previous_patient_id")?
                    .map(PatientId),
                method: LinkMethod::parse(&method).ok_or_else(|| {
                    StoreError::corrupt("link method", crate::store::sql::BadValue("method"))
                })?,
                rule: row.try_get("rule")?,
                score: row.try_get("score")?,
                decided_by: row.try_get("decided_by")?,
                at: row.try_get("at")?,
            })
        }

        fn sync_state_from_row(row: &DbRow) -> StoreResult<SyncState> {
            Ok(SyncState {
                source: parse_source(row.try_get::<&str, _>("source")?)?,
                stream: row.try_get("stream")?,
                cursor: row.try_get("cursor")?,
                checkpoint: row.try_get("checkpoint")?,
                last_success_at: row.try_get("last_success_at")?,
                updated_at: row.try_get("updated_at")?,
            })
        }

        async fn load_source_record_in<'e, E>(ex: E, key: &SourceKey) -> StoreResult<Option<SourceRecord>>
        where
            E: sqlx::Executor<'e, Database = $Db>,
        {
            let sql = format!("SELECT {RECORD_COLUMNS} FROM source_records WHERE source = $1 AND source_id = $2");
            let row = sqlx::query(&sql)
                .bind(key.source.as_str())
                .bind(key.id.as_str())
                .fetch_optional(ex)
                .await?;
            row.as_ref().map(record_from_row).transpose()
        }

        async fn load_patient_in<'e, E>(ex: E, id: &PatientId) -> StoreResult<Option<PatientRow>>
        where
            E: sqlx::Executor<'e, Database = $Db>,
        {
            let sql = format!("SELECT {PATIENT_COLUMNS} FROM patients WHERE patient_id = $1");
            let row = sqlx::query(&sql).bind(id.as_str()).fetch_optional(ex).await?;
            row.as_ref().map(patient_from_row).transpose()
        }

        async fn load_link_in<'e, E>(ex: E, key: &SourceKey) -> StoreResult<Option<Link>>
        where
            E: sqlx::Executor<'e, Database = $Db>,
        {
            let sql = format!("SELECT {LINK_COLUMNS} FROM links WHERE source = $1 AND source_id = $2");
            let row = sqlx::query(&sql)
                .bind(key.source.as_str())
                .bind(key.id.as_str())
                .fetch_optional(ex)
                .await?;
            row.as_ref().map(link_from_row).transpose()
        }

        async fn insert_inbox_in<'e, E>(ex: E, item: &NewInboxItem) -> StoreResult<InsertOutcome>
        where
            E: sqlx::Executor<'e, Database = $Db>,
        {
            let (state, finished) = match item.ignore_reason {
                Some(_) => (InboxState::Ignored, Some(item.received_at_ms)),
                None => (InboxState::Pending, None),
            };
            let row = sqlx::query(
                "INSERT INTO inbox (source, origin, event_type, resource_type, resource_id, body, dedupe_key, \
                 received_at_ms, state, reason, attempts, available_at_ms, finished_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $8, $11) \
                 ON CONFLICT (source, dedupe_key) WHERE dedupe_key IS NOT NULL DO NOTHING \
                 RETURNING id",
            )
            .bind(item.source.as_str())
            .bind(item.origin.as_str())
            .bind(&item.event_type)
            .bind(item.resource_type.as_deref())
            .bind(item.resource_id.as_deref())
            .bind(&item.body)
            .bind(item.dedupe_key.as_deref())
            .bind(item.received_at_ms)
            .bind(state.as_str())
            .bind(item.ignore_reason.as_deref())
            .bind(finished)
            .fetch_optional(ex)
            .await?;
            Ok(match row {
                Some(row) => InsertOutcome::Inserted(InboxId(row.try_get("id")?)),
                None => InsertOutcome::Duplicate,
            })
        }

        async fn insert_link_event_in<'e, E>(ex: E, event: &LinkEvent) -> StoreResult<()>
        where
            E: sqlx::Executor<'e, Database = $Db>,
        {
            sqlx::query(
                "INSERT INTO link_events (source, source_id, action, patient_id, previous_patient_id, method, rule, score, decided_by, at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(event.key.source.as_str())
            .bind(event.key.id.as_str())
            .bind(&event.action)
            .bind(event.patient_id.as_ref().map(|p| p.as_str()))
            .bind(event.previous_patient_id.as_ref().map(|p| p.as_str()))
            .bind(event.method.as_str())
            .bind(event.rule.as_deref())
            .bind(event.score)
            .bind(&event.decided_by)
            .bind(event.at)
            .execute(ex)
            .await?;
            Ok(())
        }

        #[async_trait]
        impl Store for $Store {
            fn backend(&self) -> Backend {
                $backend
            }

            async fn migrate(&self) -> StoreResult<()> {
                self.migrator().run(self.writer()).await?;
                Ok(())
            }

            async fn begin(&self) -> StoreResult<Box<dyn StoreTx>> {
                let tx = $begin(self.writer()).await?;
                Ok(Box::new($Tx { tx, committed: self.commit_signal(), clock: self.writer_clock() }))
            }

            fn shared(&self) -> std::sync::Arc<dyn Store> {
                std::sync::Arc::new(self.clone())
            }

            async fn read_candidates(&self, keys: &[String]) -> StoreResult<crate::store::CandidateRead> {
                // One read transaction: the patients and their records from one snapshot.
                let mut tx = self.pool().begin().await?;
                let reach = patients_by_keys_in(&mut tx, keys, None).await?;
                let patients: Vec<PatientId> = reach
                    .iter()
                    .map(|(_, p)| p.clone())
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                let records = linked_records_in(&mut tx, &patients).await?;
                tx.rollback().await?;
                Ok((reach, records))
            }

            async fn insert_inbox(&self, item: &NewInboxItem) -> StoreResult<InsertOutcome> {
                insert_inbox_in(self.writer(), item).await
            }

            async fn claim_inbox(
                &self,
                owner: &str,
                limit: u32,
                lease: Duration,
                now_ms: i64,
            ) -> StoreResult<Vec<InboxItem>> {
                let sql = format!(
                    "UPDATE inbox SET state = 'leased', lease_owner = $1, leased_until_ms = $2, attempts = attempts + 1 \
                     WHERE id IN (SELECT id FROM inbox \
                        WHERE (state = 'pending' AND available_at_ms <= $3) OR (state = 'leased' AND leased_until_ms < $3) \
                        ORDER BY available_at_ms, id LIMIT $4{}) \
                     RETURNING {INBOX_COLUMNS}",
                    $claim_lock
                );
                let rows = sqlx::query(&sql)
                    .bind(owner)
                    .bind(now_ms + lease.as_millis() as i64)
                    .bind(now_ms)
                    .bind(i64::from(limit))
                    .fetch_all(self.writer())
                    .await?;
                let mut items = rows.iter().map(inbox_from_row).collect::<StoreResult<Vec<_>>>()?;
                items.sort_by_key(|i| (i.available_at_ms, i.id));
                Ok(items)
            }

            async fn retry_inbox(&self, id: InboxId, owner: &str, retry: &RetryAt) -> StoreResult<bool> {
                let result = sqlx::query(
                    "UPDATE inbox SET state = 'pending', lease_owner = NULL, leased_until_ms = NULL, \
                     available_at_ms = $3, last_error_kind = $4, last_http_status = $5, \
                     attempts = CASE WHEN $6 THEN attempts ELSE attempts - 1 END \
                     WHERE id = $1 AND lease_owner = $2 AND state = 'leased'",
                )
                .bind(id.0)
                .bind(owner)
                .bind(retry.available_at_ms)
                .bind(&retry.error_kind)
                .bind(retry.http_status.map(i64::from))
                .bind(retry.count_attempt)
                .execute(self.writer())
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn dead_inbox(
                &self,
                id: InboxId,
                owner: &str,
                error_kind: &str,
                http_status: Option<u16>,
                now_ms: i64,
            ) -> StoreResult<bool> {
                let result = sqlx::query(
                    "UPDATE inbox SET state = 'dead', lease_owner = NULL, leased_until_ms = NULL, \
                     last_error_kind = $3, last_http_status = $4, finished_at_ms = $5 \
                     WHERE id = $1 AND lease_owner = $2 AND state = 'leased'",
                )
                .bind(id.0)
                .bind(owner)
                .bind(error_kind)
                .bind(http_status.map(i64::from))
                .bind(now_ms)
                .execute(self.writer())
                .await?;
                Ok(result.rows_affected() == 1)
            }

            async fn release_leases(&self, owner: &str) -> StoreResult<u64> {
                let result = sqlx::query(
                    "UPDATE inbox SET state = 'pending', lease_owner = NULL, leased_until_ms = NULL, attempts = attempts - 1 \
                     WHERE lease_owner = $1 AND state = 'leased'",
                )
                .bind(owner)
                .execute(self.writer())
                .await?;
                Ok(result.rows_affected())
            }

            async fn renew_leases(&self, owner: &str, until_ms: i64) -> StoreResult<u64> {
                let result = sqlx::query(
                    "UPDATE inbox SET leased_until_ms = $2 WHERE lease_owner = $1 AND state = 'leased'",
                )
                .bind(owner)
                .bind(until_ms)
                .execute(self.writer())
                .await?;
                Ok(result.rows_affected())
            }

            async fn load_inbox_item(&self, id: InboxId) -> StoreResult<Option<InboxItem>> {
                let sql = format!("SELECT {INBOX_COLUMNS} FROM inbox WHERE id = $1");
                let row = sqlx::query(&sql).bind(id.0).fetch_optional(&self.pool).await?;
                row.as_ref().map(inbox_from_row).transpose()
            }

            async fn list_inbox(
                &self,
                state: InboxState,
                source: Option<SourceKind>,
                since_ms: Option<i64>,
                limit: u32,
            ) -> StoreResult<Vec<InboxItem>> {
                let sql = format!(
                    "SELECT {INBOX_COLUMNS} FROM inbox WHERE state = $1 AND ($2 IS NULL OR source = $2) \
                     AND ($3 IS NULL OR received_at_ms >= $3) ORDER BY id LIMIT $4"
                );
                let rows = sqlx::query(&sql)
                    .bind(state.as_str())
                    .bind(source.map(|s| s.as_str()))
                    .bind(since_ms)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(inbox_from_row).collect()
            }

            async fn requeue_dead(
                &self,
                id: Option<InboxId>,
                source: Option<SourceKind>,
                since_ms: Option<i64>,
                now_ms: i64,
            ) -> StoreResult<u64> {
                let result = sqlx::query(
                    "UPDATE inbox SET state = 'pending', attempts = 0, available_at_ms = $4, finished_at_ms = NULL \
                     WHERE state = 'dead' AND ($1 IS NULL OR id = $1) AND ($2 IS NULL OR source = $2) \
                     AND ($3 IS NULL OR received_at_ms >= $3)",
                )
                .bind(id.map(|i| i.0))
                .bind(source.map(|s| s.as_str()))
                .bind(since_ms)
                .bind(now_ms)
                .execute(self.writer())
                .await?;
                Ok(result.rows_affected())
            }

            async fn inbox_counts(&self) -> StoreResult<Vec<InboxCount>> {
                let rows = sqlx::query(
                    "SELECT source, state, COUNT(*) AS n FROM inbox GROUP BY source, state ORDER BY source, state",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        let state: String = row.try_get("state")?;
                        Ok(InboxCount {
                            source: parse_source(row.try_get::<&str, _>("source")?)?,
                            state: InboxState::parse(&state).ok_or_else(|| {
                                StoreError::corrupt("inbox state", crate::store::sql::BadValue("state"))
                            })?,
                            count: row.try_get("n")?,
                        })
                    })
                    .collect()
            }

            async fn oldest_pending_ms(&self) -> StoreResult<Option<i64>> {
                let row = sqlx::query("SELECT MIN(received_at_ms) AS t FROM inbox WHERE state IN ('pending', 'leased')")
                    .fetch_one(&self.pool)
                    .await?;
                Ok(row.try_get("t")?)
            }

            async fn load_source_record(&self, key: &SourceKey) -> StoreResult<Option<SourceRecord>> {
                load_source_record_in(&self.pool, key).await
            }

            async fn load_patient(&self, id: &PatientId) -> StoreResult<Option<PatientRow>> {
                load_patient_in(&self.pool, id).await
            }

            async fn load_field_sources(&self, id: &PatientId) -> StoreResult<Vec<FieldSource>> {
                let rows = sqlx::query(
                    "SELECT field, source, source_id, source_updated_at FROM patient_field_sources \
                     WHERE patient_id = $1 ORDER BY field",
                )
                .bind(id.as_str())
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(FieldSource {
                            field: row.try_get("field")?,
                            key: SourceKey::new(
                                parse_source(row.try_get::<&str, _>("source")?)?,
                                row.try_get::<String, _>("source_id")?,
                            ),
                            source_updated_at: row.try_get("source_updated_at")?,
                        })
                    })
                    .collect()
            }

            async fn load_link(&self, key: &SourceKey) -> StoreResult<Option<Link>> {
                load_link_in(&self.pool, key).await
            }

            async fn load_link_events(&self, key: &SourceKey) -> StoreResult<Vec<LinkEvent>> {
                let sql = format!(
                    "SELECT {LINK_EVENT_COLUMNS} FROM link_events WHERE source = $1 AND source_id = $2 ORDER BY id"
                );
                let rows = sqlx::query(&sql)
                .bind(key.source.as_str())
                .bind(key.id.as_str())
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(link_event_from_row).collect()
            }

            async fn count_patients(&self) -> StoreResult<Vec<(String, i64)>> {
                let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM patients GROUP BY status ORDER BY status")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|row| Ok((row.try_get("status")?, row.try_get("n")?)))
                    .collect()
            }

            async fn load_sync_state(&self, source: SourceKind, stream: &str) -> StoreResult<Option<SyncState>> {
                let row = sqlx::query(
                    "SELECT source, stream, cursor, checkpoint, last_success_at, updated_at FROM sync_state \
                     WHERE source = $1 AND stream = $2",
                )
                .bind(source.as_str())
                .bind(stream)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(sync_state_from_row).transpose()
            }

            async fn save_sync_state(&self, state: &SyncState) -> StoreResult<()> {
                upsert_sync_state(state).execute(self.writer()).await?;
                Ok(())
            }

            async fn list_reviews(&self, state: Option<ReviewState>, limit: u32) -> StoreResult<Vec<Review>> {
                let sql = format!(
                    "SELECT {REVIEW_COLUMNS} FROM match_reviews WHERE ($1 IS NULL OR state = $1) ORDER BY id LIMIT $2"
                );
                let rows = sqlx::query(&sql)
                    .bind(state.map(|s| s.as_str()))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(review_from_row).collect()
            }

            async fn load_patient_links(&self, patient_id: &PatientId) -> StoreResult<Vec<Link>> {
                let sql = format!("SELECT {LINK_COLUMNS} FROM links WHERE patient_id = $1 ORDER BY source, source_id");
                let rows = sqlx::query(&sql).bind(patient_id.as_str()).fetch_all(&self.pool).await?;
                rows.iter().map(link_from_row).collect()
            }

            async fn load_patient_link_events(&self, patient_id: &PatientId) -> StoreResult<Vec<LinkEvent>> {
                let sql = format!(
                    "SELECT {LINK_EVENT_COLUMNS} FROM link_events WHERE id IN \
                     (SELECT id FROM link_events WHERE patient_id = $1 UNION SELECT id FROM link_events WHERE previous_patient_id = $1) \
                     ORDER BY id"
                );
                let rows = sqlx::query(&sql).bind(patient_id.as_str()).fetch_all(&self.pool).await?;
                rows.iter().map(link_event_from_row).collect()
            }

            async fn load_source_records_page(
                &self,
                after: Option<&SourceKey>,
                limit: u32,
                with_raw: bool,
            ) -> StoreResult<Vec<SourceRecord>> {
                let columns = if with_raw {
                    RECORD_COLUMNS.to_string()
                } else {
                    RECORD_COLUMNS.replace(", raw", ", 'null' AS raw")
                };
                let (source, id) = key_lower_bound(after);
                let sql = format!(
                    "SELECT {columns} FROM source_records WHERE (source, source_id) > ($1, $2) \
                     ORDER BY source, source_id LIMIT $3"
                );
                let rows = sqlx::query(&sql)
                    .bind(source)
                    .bind(id)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(record_from_row).collect()
            }

            async fn load_links_page(&self, after: Option<&SourceKey>, limit: u32) -> StoreResult<Vec<Link>> {
                let (source, id) = key_lower_bound(after);
                let sql = format!(
                    "SELECT {LINK_COLUMNS} FROM links WHERE (source, source_id) > ($1, $2) \
                     ORDER BY source, source_id LIMIT $3"
                );
                let rows = sqlx::query(&sql)
                    .bind(source)
                    .bind(id)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(link_from_row).collect()
            }

            async fn load_patients_page(&self, after: Option<&PatientId>, limit: u32) -> StoreResult<Vec<PatientRow>> {
                let sql = format!(
                    "SELECT {PATIENT_COLUMNS} FROM patients WHERE patient_id > $1 ORDER BY patient_id LIMIT $2"
                );
                let rows = sqlx::query(&sql)
                    .bind(after.map(|p| p.as_str()).unwrap_or(""))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(patient_from_row).collect()
            }

            async fn load_match_keys_page(
                &self,
                after: Option<&(SourceKey, String)>,
                limit: u32,
            ) -> StoreResult<Vec<(SourceKey, String)>> {
                let (source, id) = key_lower_bound(after.map(|(record, _)| record));
                // In the order of the key index (`match_keys_key` on SQLite, the primary key on
                // Postgres): the index alone answers, with no sort.
                let rows = sqlx::query(
                    "SELECT source, source_id, key FROM match_keys WHERE (key, source, source_id) > ($3, $1, $2) \
                     ORDER BY key, source, source_id LIMIT $4",
                )
                .bind(source)
                .bind(id)
                .bind(after.map(|(_, key)| key.as_str()).unwrap_or(""))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok((
                            SourceKey::new(
                                parse_source(row.try_get::<&str, _>("source")?)?,
                                row.try_get::<String, _>("source_id")?,
                            ),
                            row.try_get("key")?,
                        ))
                    })
                    .collect()
            }

            async fn sort_in_files(&self, on: bool) -> StoreResult<()> {
                if matches!($backend, Backend::Sqlite) {
                    // Outside a transaction: inside one SQLite refuses the switch once the
                    // connection has opened its temporary database.
                    let mut conn = self.writer().acquire().await?;
                    let store = if on { "FILE" } else { "MEMORY" };
                    sqlx::query(&format!("PRAGMA temp_store = {store}"))
                        .execute(&mut *conn)
                        .await?;
                }
                Ok(())
            }

            async fn for_each_match_key(
                &self,
                f: &mut (dyn for<'k> FnMut(SourceKind, &'k str, &'k str) + Send),
            ) -> StoreResult<()> {
                crate::store::sql::scan_table!(self.pool, $backend, "SELECT source, source_id, key FROM match_keys", |row| {
                    f(
                        parse_source(row.try_get::<&str, _>(0)?)?,
                        row.try_get::<&str, _>(1)?,
                        row.try_get::<&str, _>(2)?,
                    );
                })
            }

            async fn for_each_link_target(
                &self,
                f: &mut (dyn for<'k> FnMut(SourceKind, &'k str, &'k str, bool) + Send),
            ) -> StoreResult<()> {
                crate::store::sql::scan_table!(
                    self.pool,
                    $backend,
                    "SELECT source, source_id, patient_id, decided_by FROM links",
                    |row| {
                        f(
                            parse_source(row.try_get::<&str, _>(0)?)?,
                            row.try_get::<&str, _>(1)?,
                            row.try_get::<&str, _>(2)?,
                            row.try_get::<&str, _>(3)? == crate::store::ADMIN,
                        );
                    }
                )
            }

            async fn load_patient_history(&self, id: &PatientId) -> StoreResult<Vec<PatientVersion>> {
                let sql = format!(
                    "SELECT {} FROM patient_history WHERE patient_id = $1 ORDER BY version",
                    history_columns()
                );
                let rows = sqlx::query(&sql).bind(id.as_str()).fetch_all(&self.pool).await?;
                rows.iter().map(version_from_row).collect()
            }

            async fn load_patients_as_of_page(
                &self,
                at: DateTime<Utc>,
                after: Option<&PatientId>,
                limit: u32,
            ) -> StoreResult<Vec<PatientVersion>> {
                let sql = format!(
                    "SELECT {} FROM patient_history \
                     WHERE valid_from <= $1 AND (valid_to IS NULL OR valid_to > $1) AND patient_id > $2 \
                     ORDER BY patient_id LIMIT $3",
                    history_columns()
                );
                let rows = sqlx::query(&sql)
                    .bind(at)
                    .bind(after.map(|p| p.as_str()).unwrap_or(""))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(version_from_row).collect()
            }

            async fn count_reviews(&self) -> StoreResult<Vec<(ReviewState, i64)>> {
                let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM match_reviews GROUP BY state ORDER BY state")
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        let state: String = row.try_get("state")?;
                        Ok((
                            ReviewState::parse(&state).ok_or_else(|| {
                                StoreError::corrupt("review state", crate::store::sql::BadValue("state"))
                            })?,
                            row.try_get("n")?,
                        ))
                    })
                    .collect()
            }

            async fn list_sync_states(&self) -> StoreResult<Vec<SyncState>> {
                let rows = sqlx::query(
                    "SELECT source, stream, cursor, checkpoint, last_success_at, updated_at FROM sync_state \
                     ORDER BY source, stream",
                )
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(sync_state_from_row).collect()
            }

            async fn claim_inbox_resources(
                &self,
                owner: &str,
                source: SourceKind,
                resource_ids: &[String],
                lease: Duration,
                now_ms: i64,
            ) -> StoreResult<Vec<InboxItem>> {
                let mut items = Vec::new();
                for chunk in resource_ids.chunks(200) {
                    let list = (0..chunk.len())
                        .map(|i| format!("${}", i + 5))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let sql = format!(
                        "UPDATE inbox SET state = 'leased', lease_owner = $1, leased_until_ms = $2, attempts = attempts + 1 \
                         WHERE id IN (SELECT id FROM inbox \
                            WHERE source = $3 AND resource_id IN ({list}) \
                            AND (state = 'pending' OR (state = 'leased' AND leased_until_ms < $4)) \
                            ORDER BY id{}) \
                         RETURNING {INBOX_COLUMNS}",
                        $claim_lock
                    );
                    let mut query = sqlx::query(&sql)
                        .bind(owner)
                        .bind(now_ms + lease.as_millis() as i64)
                        .bind(source.as_str())
                        .bind(now_ms);
                    for id in chunk {
                        query = query.bind(id.as_str());
                    }
                    let rows = query.fetch_all(self.writer()).await?;
                    for row in &rows {
                        items.push(inbox_from_row(row)?);
                    }
                }
                items.sort_by_key(|i| i.id);
                Ok(items)
            }

            async fn claim_resync(
                &self,
                source: SourceKind,
                owner: &str,
                now_ms: i64,
                until_ms: i64,
            ) -> StoreResult<Option<ResyncRun>> {
                sqlx::query("INSERT INTO resync_runs (source) VALUES ($1) ON CONFLICT (source) DO NOTHING")
                    .bind(source.as_str())
                    .execute(self.writer())
                    .await?;
                let row = sqlx::query(
                    "UPDATE resync_runs SET owner = $2, leased_until_ms = $3 \
                     WHERE source = $1 AND (owner IS NULL OR owner = $2 OR leased_until_ms IS NULL OR leased_until_ms < $4) \
                     RETURNING source, owner, leased_until_ms, pass, in_progress, pass_started_at_ms, completed_pass",
                )
                .bind(source.as_str())
                .bind(owner)
                .bind(until_ms)
                .bind(now_ms)
                .fetch_optional(self.writer())
                .await?;
                row.as_ref().map(resync_run_from_row).transpose()
            }

            async fn renew_resync(&self, source: SourceKind, owner: &str, until_ms: i64) -> StoreResult<bool> {
                let done = sqlx::query("UPDATE resync_runs SET leased_until_ms = $3 WHERE source = $1 AND owner = $2")
                    .bind(source.as_str())
                    .bind(owner)
                    .bind(until_ms)
                    .execute(self.writer())
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn release_resync(&self, source: SourceKind, owner: &str) -> StoreResult<()> {
                sqlx::query("UPDATE resync_runs SET owner = NULL, leased_until_ms = NULL WHERE source = $1 AND owner = $2")
                    .bind(source.as_str())
                    .bind(owner)
                    .execute(self.writer())
                    .await?;
                Ok(())
            }

            async fn start_resync_pass(&self, source: SourceKind, owner: &str, now_ms: i64) -> StoreResult<Option<i64>> {
                let row = sqlx::query(
                    "UPDATE resync_runs SET pass = pass + 1, in_progress = 1, pass_started_at_ms = $3 \
                     WHERE source = $1 AND owner = $2 RETURNING pass",
                )
                .bind(source.as_str())
                .bind(owner)
                .bind(now_ms)
                .fetch_optional(self.writer())
                .await?;
                row.map(|r| r.try_get::<i64, _>("pass")).transpose().map_err(Into::into)
            }

            async fn complete_resync_pass(&self, source: SourceKind, owner: &str, pass: i64) -> StoreResult<bool> {
                let done = sqlx::query(
                    "UPDATE resync_runs SET in_progress = 0, completed_pass = $3 \
                     WHERE source = $1 AND owner = $2 AND pass = $3",
                )
                .bind(source.as_str())
                .bind(owner)
                .bind(pass)
                .execute(self.writer())
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn load_resync_run(&self, source: SourceKind) -> StoreResult<Option<ResyncRun>> {
                let row = sqlx::query(
                    "SELECT source, owner, leased_until_ms, pass, in_progress, pass_started_at_ms, completed_pass \
                     FROM resync_runs WHERE source = $1",
                )
                .bind(source.as_str())
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(resync_run_from_row).transpose()
            }

            async fn load_unseen_records(
                &self,
                source: SourceKind,
                pass: i64,
                after: Option<&str>,
                limit: u32,
            ) -> StoreResult<Vec<UnseenRecord>> {
                let rows = sqlx::query(
                    "SELECT source, source_id, fetched_at, source_updated_at, missing_passes, missing_checked_pass, missing_since \
                     FROM source_records WHERE source = $1 AND source_id > $2 AND status <> 'deleted' \
                     AND (resync_pass IS NULL OR resync_pass < $3) ORDER BY source_id LIMIT $4",
                )
                .bind(source.as_str())
                .bind(after.unwrap_or(""))
                .bind(pass)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok(UnseenRecord {
                            key: SourceKey::new(
                                parse_source(row.try_get::<&str, _>("source")?)?,
                                row.try_get::<String, _>("source_id")?,
                            ),
                            fetched_at: row.try_get("fetched_at")?,
                            source_updated_at: row.try_get("source_updated_at")?,
                            missing_passes: row.try_get("missing_passes")?,
                            missing_checked_pass: row.try_get("missing_checked_pass")?,
                            missing_since: row.try_get("missing_since")?,
                        })
                    })
                    .collect()
            }

            async fn mark_resync_missing(
                &self,
                key: &SourceKey,
                missing_passes: i64,
                checked_pass: Option<i64>,
                since: Option<DateTime<Utc>>,
            ) -> StoreResult<()> {
                sqlx::query(
                    "UPDATE source_records SET missing_passes = $3, missing_checked_pass = $4, missing_since = $5 \
                     WHERE source = $1 AND source_id = $2",
                )
                .bind(key.source.as_str())
                .bind(key.id.as_str())
                .bind(missing_passes)
                .bind(checked_pass)
                .bind(since)
                .execute(self.writer())
                .await?;
                Ok(())
            }

            async fn insert_inbox_batch(&self, items: &[NewInboxItem]) -> StoreResult<Vec<InsertOutcome>> {
                let mut tx = $begin(self.writer()).await?;
                let mut outcomes = Vec::with_capacity(items.len());
                for item in items {
                    outcomes.push(insert_inbox_in(&mut *tx, item).await?);
                }
                tx.commit().await?;
                Ok(outcomes)
            }

            async fn reserve_rate_slot(&self, key: &str, now_us: i64, interval_us: i64) -> StoreResult<i64> {
                let row = sqlx::query(
                    "INSERT INTO rate_slots (key, tat_us) VALUES ($1, $2 + $3) \
                     ON CONFLICT (key) DO UPDATE SET tat_us = \
                     CASE WHEN rate_slots.tat_us > $2 THEN rate_slots.tat_us ELSE $2 END + $3 \
                     RETURNING tat_us",
                )
                .bind(key)
                .bind(now_us)
                .bind(interval_us)
                .fetch_one(self.limits())
                .await?;
                Ok(row.try_get("tat_us")?)
            }

            async fn defer_rate_slots(&self, key: &str, at_us: i64) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO rate_slots (key, tat_us) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET tat_us = $2 WHERE rate_slots.tat_us < $2",
                )
                .bind(key)
                .bind(at_us)
                .execute(self.limits())
                .await?;
                Ok(())
            }

            async fn read_rate_budget(&self, key: &str) -> StoreResult<Option<(i64, i64)>> {
                let row = sqlx::query("SELECT window_end_us, used FROM rate_budgets WHERE key = $1")
                    .bind(key)
                    .fetch_optional(self.limits())
                    .await?;
                Ok(match row {
                    Some(r) => Some((r.try_get("window_end_us")?, r.try_get("used")?)),
                    None => None,
                })
            }

            async fn take_rate_budget(
                &self,
                key: &str,
                window_end_us: i64,
                limit: i64,
                keep: i64,
            ) -> StoreResult<Option<i64>> {
                let row = sqlx::query(
                    "INSERT INTO rate_budgets (key, window_end_us, used) \
                     VALUES ($1, $2, 1) \
                     ON CONFLICT (key) DO UPDATE SET \
                     used = CASE WHEN rate_budgets.window_end_us < $2 THEN 1 ELSE rate_budgets.used + 1 END, \
                     window_end_us = CASE WHEN rate_budgets.window_end_us < $2 THEN $2 ELSE rate_budgets.window_end_us END \
                     WHERE rate_budgets.window_end_us < $2 OR rate_budgets.used + $3 < $4 \
                     RETURNING used",
                )
                .bind(key)
                .bind(window_end_us)
                .bind(keep)
                .bind(limit)
                .fetch_optional(self.limits())
                .await?;
                row.map(|r| r.try_get::<i64, _>("used")).transpose().map_err(Into::into)
            }
        }

        fn resync_run_from_row(row: &DbRow) -> StoreResult<ResyncRun> {
            Ok(ResyncRun {
                source: parse_source(row.try_get::<&str, _>("source")?)?,
                owner: row.try_get("owner")?,
                leased_until_ms: row.try_get("leased_until_ms")?,
                pass: row.try_get("pass")?,
                in_progress: row.try_get::<i64, _>("in_progress")? != 0,
                pass_started_at_ms: row.try_get("pass_started_at_ms")?,
                completed_pass: row.try_get("completed_pass")?,
            })
        }

        /// History: closes the open version of `row` (none for a new row) where the new one
        /// begins, at its change but never before the closed version began, so ranges cannot
        /// overlap, and stores the row as it now is. Saving the same version again rewrites it
        /// in place. Runs after the `patients` write, in the same transaction.
        async fn write_history(
            tx: &mut sqlx::Transaction<'static, $Db>,
            row: &PatientRow,
        ) -> StoreResult<()> {
            let closed = if row.version > 1 {
                sqlx::query(
                    "UPDATE patient_history SET valid_to = CASE WHEN valid_from > $2 THEN valid_from ELSE $2 END \
                     WHERE patient_id = $1 AND valid_to IS NULL AND version <> $3 RETURNING valid_to",
                )
                .bind(row.patient_id.as_str())
                .bind(row.updated_at)
                .bind(row.version)
                .fetch_all(&mut **tx)
                .await?
            } else {
                Vec::new()
            };
            let mut valid_from = row.updated_at;
            for prev in &closed {
                valid_from = valid_from.max(prev.try_get::<DateTime<Utc>, _>("valid_to")?);
            }
            let sql = format!(
                "INSERT INTO patient_history ({PATIENT_COLUMNS}, valid_from) SELECT {PATIENT_COLUMNS}, $2 FROM patients WHERE patient_id = $1 \
                 ON CONFLICT (patient_id, version) DO UPDATE SET {}, valid_to = NULL",
                history_updates()
            );
            sqlx::query(&sql)
                .bind(row.patient_id.as_str())
                .bind(valid_from)
                .execute(&mut **tx)
                .await?;
            Ok(())
        }

        /// [`write_history`] for many rows at once (each a later version of its patient, after
        /// the `patients` write): one statement closes the open versions, one stores the rows.
        async fn write_history_many(
            tx: &mut sqlx::Transaction<'static, $Db>,
            backend: crate::store::Backend,
            rows: &[&PatientRow],
        ) -> StoreResult<()> {
            let distinct: HashSet<&str> = rows.iter().map(|r| r.patient_id.as_str()).collect();
            if distinct.len() != rows.len() {
                for row in rows {
                    write_history(tx, row).await?;
                }
                return Ok(());
            }
            for chunk in rows.chunks(crate::store::sql::bulk_params(backend) / 2) {
                let sql = format!(
                    "UPDATE patient_history SET valid_to = CASE WHEN patient_history.valid_from > p.updated_at \
                     THEN patient_history.valid_from ELSE p.updated_at END \
                     FROM patients p WHERE p.patient_id IN ({}) AND patient_history.patient_id = p.patient_id \
                     AND patient_history.valid_to IS NULL AND patient_history.version <> p.version \
                     RETURNING patient_history.patient_id AS patient_id, patient_history.valid_to AS valid_to",
                    crate::store::sql::bulk_list(backend, 1, chunk.len())
                );
                let mut q = sqlx::query(&sql);
                for row in chunk {
                    q = q.bind(row.patient_id.as_str());
                }
                let mut valid_from: HashMap<&str, DateTime<Utc>> = chunk
                    .iter()
                    .map(|r| (r.patient_id.as_str(), r.updated_at))
                    .collect();
                for closed in q.fetch_all(&mut **tx).await? {
                    let id: String = closed.try_get("patient_id")?;
                    let to: DateTime<Utc> = closed.try_get("valid_to")?;
                    if let Some(from) = valid_from.get_mut(id.as_str()) {
                        *from = (*from).max(to);
                    }
                }
                let sql = format!(
                    "WITH v (pid, vf) AS (VALUES {}) \
                     INSERT INTO patient_history ({PATIENT_COLUMNS}, valid_from) SELECT {PATIENT_COLUMNS}, v.vf FROM patients, v \
                     WHERE patients.patient_id = v.pid \
                     ON CONFLICT (patient_id, version) DO UPDATE SET {}, valid_to = NULL",
                    crate::store::sql::bulk_placeholders(backend, chunk.len(), 2),
                    history_updates()
                );
                let mut q = sqlx::query(&sql);
                for row in chunk {
                    q = q.bind(row.patient_id.as_str()).bind(valid_from[row.patient_id.as_str()]);
                }
                q.execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Deletes the provenance rows of `rows`' patients for fields their new provenance
        /// does not list.
        async fn delete_stale_field_sources(
            tx: &mut sqlx::Transaction<'static, $Db>,
            backend: crate::store::Backend,
            rows: &[&(PatientRow, Vec<FieldSource>)],
        ) -> StoreResult<()> {
            if rows.is_empty() {
                return Ok(());
            }
            let kept: usize = rows.iter().map(|(_, fs)| fs.len()).sum();
            let keep = if kept == 0 {
                String::new()
            } else {
                let pairs = match backend {
                    crate::store::Backend::Sqlite => vec!["(?, ?)"; kept].join(", "),
                    _ => (0..kept)
                        .map(|i| format!("(${}, ${})", rows.len() + 2 * i + 1, rows.len() + 2 * i + 2))
                        .collect::<Vec<_>>()
                        .join(", "),
                };
                format!(" AND (patient_id, field) NOT IN (VALUES {pairs})")
            };
            let sql = format!(
                "DELETE FROM patient_field_sources WHERE patient_id IN ({}){keep}",
                crate::store::sql::bulk_list(backend, 1, rows.len())
            );
            let mut q = sqlx::query(&sql);
            for (row, _) in rows {
                q = q.bind(row.patient_id.as_str());
            }
            for (row, fs) in rows {
                for f in fs {
                    q = q.bind(row.patient_id.as_str()).bind(&f.field);
                }
            }
            q.execute(&mut **tx).await?;
            Ok(())
        }

        /// A write transaction on this backend.
        pub struct $Tx {
            tx: sqlx::Transaction<'static, $Db>,
            /// Notified after a successful commit.
            committed: Option<std::sync::Arc<tokio::sync::Notify>>,
            /// The writer's commit count, for [`StoreTx::write_stamp`] (SQLite).
            clock: Option<std::sync::Arc<crate::store::WriterClock>>,
        }

        #[async_trait]
        impl StoreTx for $Tx {
            async fn load_source_record(&mut self, key: &SourceKey) -> StoreResult<Option<SourceRecord>> {
                load_source_record_in(&mut *self.tx, key).await
            }

            async fn save_source_record(&mut self, record: &SourceRecord) -> StoreResult<SaveOutcome> {
                let existing = load_source_record_in(&mut *self.tx, &record.key).await?;
                let outcome = match &existing {
                    None => SaveOutcome::Created,
                    Some(old) if old.version_key() > record.version_key() => return Ok(SaveOutcome::Stale),
                    Some(old)
                        if old.fields == record.fields
                            && old.status == record.status
                            && old.merged_into == record.merged_into
                            && old.raw == record.raw =>
                    {
                        SaveOutcome::Unchanged
                    }
                    Some(_) => SaveOutcome::Updated,
                };
                let q = sqlx::query(
                    "INSERT INTO source_records (source, source_id, status, merged_into, fields, raw, source_updated_at, fetched_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (source, source_id) DO UPDATE SET status = excluded.status, merged_into = excluded.merged_into, \
                     fields = excluded.fields, raw = excluded.raw, source_updated_at = excluded.source_updated_at, \
                     fetched_at = excluded.fetched_at",
                );
                bind_record(q, record)?.execute(&mut *self.tx).await?;
                Ok(outcome)
            }

            async fn load_link(&mut self, key: &SourceKey) -> StoreResult<Option<Link>> {
                load_link_in(&mut *self.tx, key).await
            }

            async fn save_link(&mut self, link: &Link, event: &LinkEvent) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO links (source, source_id, patient_id, method, rule, score, decided_by, decided_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (source, source_id) DO UPDATE SET patient_id = excluded.patient_id, method = excluded.method, \
                     rule = excluded.rule, score = excluded.score, decided_by = excluded.decided_by, decided_at = excluded.decided_at",
                )
                .bind(link.key.source.as_str())
                .bind(link.key.id.as_str())
                .bind(link.patient_id.as_str())
                .bind(link.method.as_str())
                .bind(link.rule.as_deref())
                .bind(link.score)
                .bind(&link.decided_by)
                .bind(link.decided_at)
                .execute(&mut *self.tx)
                .await?;
                insert_link_event_in(&mut *self.tx, event).await
            }

            async fn delete_link(&mut self, key: &SourceKey, event: &LinkEvent) -> StoreResult<()> {
                sqlx::query("DELETE FROM links WHERE source = $1 AND source_id = $2")
                    .bind(key.source.as_str())
                    .bind(key.id.as_str())
                    .execute(&mut *self.tx)
                    .await?;
                insert_link_event_in(&mut *self.tx, event).await
            }

            async fn load_linked_records(&mut self, patient_id: &PatientId) -> StoreResult<Vec<SourceRecord>> {
                let sql = format!(
                    "SELECT {} FROM source_records r JOIN links l ON l.source = r.source AND l.source_id = r.source_id \
                     WHERE l.patient_id = $1 ORDER BY r.source, r.source_id",
                    RECORD_COLUMNS
                        .split(", ")
                        .map(|c| format!("r.{c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                let rows = sqlx::query(&sql).bind(patient_id.as_str()).fetch_all(&mut *self.tx).await?;
                rows.iter().map(record_from_row).collect()
            }

            async fn load_patient(&mut self, id: &PatientId) -> StoreResult<Option<PatientRow>> {
                load_patient_in(&mut *self.tx, id).await
            }

            async fn save_patient(&mut self, row: &PatientRow, provenance: &[FieldSource]) -> StoreResult<()> {
                self.save_patients(&[(row.clone(), provenance.to_vec())]).await
            }

            async fn finish_inbox(
                &mut self,
                ids: &[InboxId],
                owner: &str,
                ignore_reason: Option<&str>,
                now_ms: i64,
            ) -> StoreResult<u64> {
                let state = if ignore_reason.is_some() { InboxState::Ignored } else { InboxState::Done };
                let mut finished = 0;
                for id in ids {
                    let result = sqlx::query(
                        "UPDATE inbox SET state = $3, reason = $4, lease_owner = NULL, leased_until_ms = NULL, finished_at_ms = $5 \
                         WHERE id = $1 AND lease_owner = $2 AND state = 'leased'",
                    )
                    .bind(id.0)
                    .bind(owner)
                    .bind(state.as_str())
                    .bind(ignore_reason)
                    .bind(now_ms)
                    .execute(&mut *self.tx)
                    .await?;
                    finished += result.rows_affected();
                }
                Ok(finished)
            }

            async fn lock(&mut self, name: &str) -> StoreResult<()> {
                let sql: Option<&str> = $advisory_lock;
                if let Some(sql) = sql {
                    sqlx::query(sql).bind(name).execute(&mut *self.tx).await?;
                }
                Ok(())
            }

            async fn replace_match_keys(&mut self, key: &SourceKey, keys: &[String]) -> StoreResult<()> {
                sqlx::query("DELETE FROM match_keys WHERE source = $1 AND source_id = $2")
                    .bind(key.source.as_str())
                    .bind(key.id.as_str())
                    .execute(&mut *self.tx)
                    .await?;
                let mut keys: Vec<&String> = keys.iter().collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    sqlx::query("INSERT INTO match_keys (key, source, source_id) VALUES ($1, $2, $3)")
                        .bind(k)
                        .bind(key.source.as_str())
                        .bind(key.id.as_str())
                        .execute(&mut *self.tx)
                        .await?;
                }
                Ok(())
            }

            async fn find_candidate_patients(
                &mut self,
                keys: &[String],
                exclude: &SourceKey,
            ) -> StoreResult<Vec<PatientId>> {
                let found = patients_by_keys_in(&mut self.tx, keys, Some(exclude)).await?;
                let patients: std::collections::BTreeSet<PatientId> = found.into_iter().map(|(_, p)| p).collect();
                Ok(patients.into_iter().collect())
            }

            async fn load_patient_links(&mut self, patient_id: &PatientId) -> StoreResult<Vec<Link>> {
                let sql = format!("SELECT {LINK_COLUMNS} FROM links WHERE patient_id = $1 ORDER BY source, source_id");
                let rows = sqlx::query(&sql).bind(patient_id.as_str()).fetch_all(&mut *self.tx).await?;
                rows.iter().map(link_from_row).collect()
            }

            async fn load_rejected_patients(&mut self, key: &SourceKey) -> StoreResult<Vec<PatientId>> {
                let rows = sqlx::query(
                    "SELECT patient_id FROM match_reviews WHERE source = $1 AND source_id = $2 AND state = 'rejected' \
                     ORDER BY patient_id",
                )
                .bind(key.source.as_str())
                .bind(key.id.as_str())
                .fetch_all(&mut *self.tx)
                .await?;
                rows.iter().map(|r| Ok(PatientId(r.try_get("patient_id")?))).collect()
            }

            async fn open_review(
                &mut self,
                key: &SourceKey,
                patient_id: &PatientId,
                score: f64,
                now: DateTime<Utc>,
            ) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO match_reviews (source, source_id, patient_id, score, state, created_at) \
                     VALUES ($1, $2, $3, $4, 'open', $5) \
                     ON CONFLICT (source, source_id, patient_id) DO NOTHING",
                )
                .bind(key.source.as_str())
                .bind(key.id.as_str())
                .bind(patient_id.as_str())
                .bind(score)
                .bind(now)
                .execute(&mut *self.tx)
                .await?;
                Ok(())
            }

            async fn load_review(&mut self, id: i64) -> StoreResult<Option<Review>> {
                let sql = format!("SELECT {REVIEW_COLUMNS} FROM match_reviews WHERE id = $1");
                let row = sqlx::query(&sql).bind(id).fetch_optional(&mut *self.tx).await?;
                row.as_ref().map(review_from_row).transpose()
            }

            async fn save_review_decision(
                &mut self,
                key: &SourceKey,
                patient_id: &PatientId,
                state: ReviewState,
                decided_by: &str,
                now: DateTime<Utc>,
            ) -> StoreResult<()> {
                sqlx::query(
                    "INSERT INTO match_reviews (source, source_id, patient_id, score, state, created_at, decided_at, decided_by) \
                     VALUES ($1, $2, $3, 0, $4, $5, $5, $6) \
                     ON CONFLICT (source, source_id, patient_id) DO UPDATE SET state = excluded.state, \
                     decided_at = excluded.decided_at, decided_by = excluded.decided_by",
                )
                .bind(key.source.as_str())
                .bind(key.id.as_str())
                .bind(patient_id.as_str())
                .bind(state.as_str())
                .bind(now)
                .bind(decided_by)
                .execute(&mut *self.tx)
                .await?;
                Ok(())
            }

            async fn write_stamp(&mut self) -> StoreResult<Option<crate::store::WriteStamp>> {
                let Some(clock) = &self.clock else {
                    return Ok(None);
                };
                let data_version: i64 = sqlx::query_scalar("PRAGMA data_version")
                    .fetch_one(&mut *self.tx)
                    .await?;
                Ok(Some(clock.stamp(data_version)))
            }

            async fn commit(self: Box<Self>) -> StoreResult<()> {
                let $Tx { tx, committed, clock: _ } = *self;
                tx.commit().await?;
                if let Some(committed) = committed {
                    committed.notify_one();
                }
                Ok(())
            }

            async fn save_sync_state(&mut self, state: &SyncState) -> StoreResult<()> {
                upsert_sync_state(state).execute(&mut *self.tx).await?;
                Ok(())
            }

            async fn mark_resync_seen(&mut self, source: SourceKind, ids: &[SourceId], pass: i64) -> StoreResult<()> {
                for chunk in ids.chunks(crate::store::sql::bulk_params($backend) - 2) {
                    // Placeholders in the order of the text: `?` binds by position on SQLite.
                    let sql = format!(
                        "UPDATE source_records SET resync_pass = {}, missing_passes = 0, missing_checked_pass = NULL, \
                         missing_since = NULL WHERE source = {} AND source_id IN ({})",
                        crate::store::sql::param($backend, 1),
                        crate::store::sql::param($backend, 2),
                        crate::store::sql::bulk_list($backend, 3, chunk.len())
                    );
                    let mut q = sqlx::query(&sql).bind(pass).bind(source.as_str());
                    for id in chunk {
                        q = q.bind(id.as_str());
                    }
                    q.execute(&mut *self.tx).await?;
                }
                Ok(())
            }

            async fn save_links(&mut self, links: &[(Link, LinkEvent)]) -> StoreResult<()> {
                for chunk in links.chunks(crate::store::sql::bulk_params($backend) / 10) {
                    let sql = format!(
                        "INSERT INTO links (source, source_id, patient_id, method, rule, score, decided_by, decided_at) \
                         VALUES {} \
                         ON CONFLICT (source, source_id) DO UPDATE SET patient_id = excluded.patient_id, method = excluded.method, \
                         rule = excluded.rule, score = excluded.score, decided_by = excluded.decided_by, decided_at = excluded.decided_at",
                        crate::store::sql::bulk_placeholders($backend, chunk.len(), 8)
                    );
                    let mut q = sqlx::query(&sql);
                    for (link, _) in chunk {
                        q = q
                            .bind(link.key.source.as_str())
                            .bind(link.key.id.as_str())
                            .bind(link.patient_id.as_str())
                            .bind(link.method.as_str())
                            .bind(link.rule.as_deref())
                            .bind(link.score)
                            .bind(&link.decided_by)
                            .bind(link.decided_at);
                    }
                    q.execute(&mut *self.tx).await?;
                    let sql = format!(
                        "INSERT INTO link_events (source, source_id, action, patient_id, previous_patient_id, method, rule, score, decided_by, at) \
                         VALUES {}",
                        crate::store::sql::bulk_placeholders($backend, chunk.len(), 10)
                    );
                    let mut q = sqlx::query(&sql);
                    for (_, event) in chunk {
                        q = q
                            .bind(event.key.source.as_str())
                            .bind(event.key.id.as_str())
                            .bind(&event.action)
                            .bind(event.patient_id.as_ref().map(|p| p.as_str()))
                            .bind(event.previous_patient_id.as_ref().map(|p| p.as_str()))
                            .bind(event.method.as_str())
                            .bind(event.rule.as_deref())
                            .bind(event.score)
                            .bind(&event.decided_by)
                            .bind(event.at);
                    }
                    q.execute(&mut *self.tx).await?;
                }
                Ok(())
            }

            async fn save_patients(&mut self, rows: &[(PatientRow, Vec<FieldSource>)]) -> StoreResult<()> {
                for chunk in rows.chunks(crate::store::sql::bulk_params($backend) / 24) {
                    let sql = format!(
                        "INSERT INTO patients ({PATIENT_COLUMNS}) VALUES {} \
                         ON CONFLICT (patient_id) DO UPDATE SET given_name = excluded.given_name, middle_name = excluded.middle_name, \
                         family_name = excluded.family_name, preferred_name = excluded.preferred_name, birth_date = excluded.birth_date, \
                         sex = excluded.sex, gender_identity = excluded.gender_identity, email = excluded.email, phone = excluded.phone, \
                         address_line1 = excluded.address_line1, address_line2 = excluded.address_line2, city = excluded.city, \
                         state = excluded.state, postal_code = excluded.postal_code, country = excluded.country, \
                         healthie_id = excluded.healthie_id, intakeq_id = excluded.intakeq_id, hint_id = excluded.hint_id, \
                         status = excluded.status, merged_into = excluded.merged_into, updated_at = excluded.updated_at, \
                         version = excluded.version",
                        crate::store::sql::bulk_placeholders($backend, chunk.len(), 24)
                    );
                    let mut q = sqlx::query(&sql);
                    for (row, _) in chunk {
                        q = q
                            .bind(row.patient_id.as_str())
                            .bind(row.given_name.as_deref())
                            .bind(row.middle_name.as_deref())
                            .bind(row.family_name.as_deref())
                            .bind(row.preferred_name.as_deref())
                            .bind(row.birth_date)
                            .bind(row.sex.as_deref())
                            .bind(row.gender_identity.as_deref())
                            .bind(row.email.as_deref())
                            .bind(row.phone.as_deref())
                            .bind(row.address_line1.as_deref())
                            .bind(row.address_line2.as_deref())
                            .bind(row.city.as_deref())
                            .bind(row.state.as_deref())
                            .bind(row.postal_code.as_deref())
                            .bind(row.country.as_deref())
                            .bind(row.healthie_id.as_deref())
                            .bind(row.intakeq_id.as_deref())
                            .bind(row.hint_id.as_deref())
                            .bind(&row.status)
                            .bind(row.merged_into.as_ref().map(|m| m.as_str()))
                            .bind(row.first_seen_at)
                            .bind(row.updated_at)
                            .bind(row.version);
                    }
                    q.execute(&mut *self.tx).await?;
                    // A first version closes nothing and begins when the row was written, so
                    // new rows take one statement together; later versions go one by one.
                    let (fresh, changed): (Vec<&PatientRow>, Vec<&PatientRow>) =
                        chunk.iter().map(|(row, _)| row).partition(|row| row.version <= 1);
                    if !fresh.is_empty() {
                        let sql = format!(
                            "INSERT INTO patient_history ({PATIENT_COLUMNS}, valid_from) SELECT {PATIENT_COLUMNS}, updated_at FROM patients \
                             WHERE patient_id IN ({}) \
                             ON CONFLICT (patient_id, version) DO UPDATE SET {}, valid_to = NULL",
                            crate::store::sql::bulk_placeholders($backend, fresh.len(), 1),
                            history_updates()
                        );
                        let mut q = sqlx::query(&sql);
                        for row in &fresh {
                            q = q.bind(row.patient_id.as_str());
                        }
                        q.execute(&mut *self.tx).await?;
                    }
                    write_history_many(&mut self.tx, $backend, &changed).await?;
                    // Provenance: rows for fields a patient no longer has go, the rest are
                    // upserted and rewritten only when another record (or version) supplies
                    // the field, so an unchanged field keeps its row and when it was decided.
                    // A first version has no earlier rows to remove.
                    let limit = crate::store::sql::bulk_params($backend);
                    let mut part: Vec<&(PatientRow, Vec<FieldSource>)> = Vec::new();
                    let mut params = 0;
                    for item in chunk.iter().filter(|(row, _)| row.version > 1) {
                        let needed = 1 + 2 * item.1.len();
                        if !part.is_empty() && params + needed > limit {
                            delete_stale_field_sources(&mut self.tx, $backend, &part).await?;
                            part.clear();
                            params = 0;
                        }
                        part.push(item);
                        params += needed;
                    }
                    delete_stale_field_sources(&mut self.tx, $backend, &part).await?;
                    let sources: Vec<(&PatientRow, &FieldSource)> = chunk
                        .iter()
                        .flat_map(|(row, fs)| fs.iter().map(move |f| (row, f)))
                        .collect();
                    for part in sources.chunks(crate::store::sql::bulk_params($backend) / 6) {
                        let sql = format!(
                            "INSERT INTO patient_field_sources (patient_id, field, source, source_id, source_updated_at, decided_at) \
                             VALUES {} \
                             ON CONFLICT (patient_id, field) DO UPDATE SET source = excluded.source, source_id = excluded.source_id, \
                             source_updated_at = excluded.source_updated_at, decided_at = excluded.decided_at \
                             WHERE patient_field_sources.source IS DISTINCT FROM excluded.source \
                             OR patient_field_sources.source_id IS DISTINCT FROM excluded.source_id \
                             OR patient_field_sources.source_updated_at IS DISTINCT FROM excluded.source_updated_at",
                            crate::store::sql::bulk_placeholders($backend, part.len(), 6)
                        );
                        let mut q = sqlx::query(&sql);
                        for (row, fs) in part {
                            q = q
                                .bind(row.patient_id.as_str())
                                .bind(&fs.field)
                                .bind(fs.key.source.as_str())
                                .bind(fs.key.id.as_str())
                                .bind(fs.source_updated_at)
                                .bind(row.updated_at);
                        }
                        q.execute(&mut *self.tx).await?;
                    }
                }
                Ok(())
            }

            async fn replace_match_keys_many(&mut self, items: &[(SourceKey, Vec<String>)]) -> StoreResult<()> {
                for chunk in items.chunks(crate::store::sql::bulk_params($backend) / 20) {
                    let sql = format!(
                        "DELETE FROM match_keys WHERE (source, source_id) IN (VALUES {})",
                        crate::store::sql::bulk_placeholders($backend, chunk.len(), 2)
                    );
                    let mut q = sqlx::query(&sql);
                    for (key, _) in chunk {
                        q = q.bind(key.source.as_str()).bind(key.id.as_str());
                    }
                    q.execute(&mut *self.tx).await?;
                    let rows: Vec<(&str, &SourceKey)> = chunk
                        .iter()
                        .flat_map(|(key, keys)| {
                            let mut keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                            keys.sort_unstable();
                            keys.dedup();
                            keys.into_iter().map(move |k| (k, key))
                        })
                        .collect();
                    self.insert_match_keys(&rows).await?;
                }
                Ok(())
            }

            async fn delete_all_match_keys(&mut self) -> StoreResult<()> {
                sqlx::query("DELETE FROM match_keys").execute(&mut *self.tx).await?;
                Ok(())
            }

            async fn insert_match_keys(&mut self, rows: &[(&str, &SourceKey)]) -> StoreResult<()> {
                for part in rows.chunks(crate::store::sql::bulk_params($backend) / 3) {
                    let sql = format!(
                        "INSERT INTO match_keys (key, source, source_id) VALUES {}",
                        crate::store::sql::bulk_placeholders($backend, part.len(), 3)
                    );
                    let mut q = sqlx::query(&sql);
                    for (k, key) in part {
                        q = q.bind(*k).bind(key.source.as_str()).bind(key.id.as_str());
                    }
                    q.execute(&mut *self.tx).await?;
                }
                Ok(())
            }

            async fn match_keys_bulk_load(&mut self, start: bool) -> StoreResult<()> {
                if matches!($backend, Backend::Sqlite) {
                    if start {
                        for index in ["match_keys_key", "match_keys_record"] {
                            sqlx::query(&format!("DROP INDEX IF EXISTS {index}"))
                                .execute(&mut *self.tx)
                                .await?;
                        }
                    } else {
                        // The same definitions as the migration's.
                        for sql in [
                            "CREATE UNIQUE INDEX IF NOT EXISTS match_keys_key ON match_keys (key, source, source_id)",
                            "CREATE INDEX IF NOT EXISTS match_keys_record ON match_keys (source, source_id)",
                        ] {
                            sqlx::query(sql).execute(&mut *self.tx).await?;
                        }
                    }
                }
                Ok(())
            }

            async fn known_source_ids(
                &mut self,
                source: SourceKind,
                ids: &[SourceId],
            ) -> StoreResult<std::collections::HashSet<SourceId>> {
                let mut known = std::collections::HashSet::new();
                for chunk in ids.chunks(crate::store::sql::bulk_params($backend) / 2 - 1) {
                    // Each list and its source bound in the order of the text.
                    let n = chunk.len();
                    let sql = format!(
                        "SELECT source_id FROM source_records WHERE source_id IN ({}) AND source = {} \
                         UNION SELECT source_id FROM links WHERE source_id IN ({}) AND source = {}",
                        crate::store::sql::bulk_list($backend, 1, n),
                        crate::store::sql::param($backend, n + 1),
                        crate::store::sql::bulk_list($backend, n + 2, n),
                        crate::store::sql::param($backend, 2 * n + 2)
                    );
                    let mut q = sqlx::query(&sql);
                    for _ in 0..2 {
                        for id in chunk {
                            q = q.bind(id.as_str());
                        }
                        q = q.bind(source.as_str());
                    }
                    for row in q.fetch_all(&mut *self.tx).await? {
                        known.insert(SourceId(row.try_get("source_id")?));
                    }
                }
                Ok(known)
            }

            async fn insert_new_source_records(&mut self, records: &[&SourceRecord]) -> StoreResult<()> {
                for chunk in records.chunks(crate::store::sql::bulk_params($backend) / 8) {
                    let sql = format!(
                        "INSERT INTO source_records (source, source_id, status, merged_into, fields, raw, source_updated_at, fetched_at) \
                         VALUES {}",
                        crate::store::sql::bulk_placeholders($backend, chunk.len(), 8)
                    );
                    let mut q = sqlx::query(&sql);
                    for record in chunk {
                        q = bind_record(q, record)?;
                    }
                    q.execute(&mut *self.tx).await?;
                }
                Ok(())
            }

            async fn find_patients_by_keys(&mut self, keys: &[String]) -> StoreResult<Vec<(String, PatientId)>> {
                patients_by_keys_in(&mut self.tx, keys, None).await
            }

            async fn load_linked_records_many(
                &mut self,
                patient_ids: &[PatientId],
            ) -> StoreResult<Vec<(PatientId, SourceRecord)>> {
                linked_records_in(&mut self.tx, patient_ids).await
            }

            async fn load_patients_many(&mut self, ids: &[PatientId]) -> StoreResult<Vec<PatientRow>> {
                let mut out = Vec::new();
                for chunk in ids.chunks(crate::store::sql::bulk_params($backend)) {
                    let sql = format!(
                        "SELECT {PATIENT_COLUMNS} FROM patients WHERE patient_id IN ({})",
                        crate::store::sql::bulk_list($backend, 1, chunk.len())
                    );
                    let mut q = sqlx::query(&sql);
                    for id in chunk {
                        q = q.bind(id.as_str());
                    }
                    for row in q.fetch_all(&mut *self.tx).await? {
                        out.push(patient_from_row(&row)?);
                    }
                }
                Ok(out)
            }

            async fn load_rejected_many(
                &mut self,
                source: SourceKind,
                ids: &[SourceId],
            ) -> StoreResult<Vec<(SourceId, PatientId)>> {
                let mut out = Vec::new();
                for chunk in ids.chunks(crate::store::sql::bulk_params($backend) - 1) {
                    let n = chunk.len();
                    let sql = format!(
                        "SELECT source_id, patient_id FROM match_reviews \
                         WHERE source_id IN ({}) AND source = {} AND state = 'rejected'",
                        crate::store::sql::bulk_list($backend, 1, n),
                        crate::store::sql::param($backend, n + 1)
                    );
                    let mut q = sqlx::query(&sql);
                    for id in chunk {
                        q = q.bind(id.as_str());
                    }
                    q = q.bind(source.as_str());
                    for row in q.fetch_all(&mut *self.tx).await? {
                        out.push((SourceId(row.try_get("source_id")?), PatientId(row.try_get("patient_id")?)));
                    }
                }
                Ok(out)
            }
            async fn bulk_write_cache(&mut self, mib: u32) -> StoreResult<()> {
                if matches!($backend, Backend::Sqlite) {
                    // A negative size is in KiB (0 restores the size every connection opens with); a pragma takes no
                    // bound parameter.
                    let kib = if mib == 0 { crate::store::sqlite::CACHE_KIB } else { i64::from(mib) * 1024 };
                    sqlx::query(&format!("PRAGMA cache_size = -{kib}"))
                        .execute(&mut *self.tx)
                        .await?;
                }
                Ok(())
            }
        }
    };
}

/// The page cache (KiB) of a pooled SQLite connection while it scans a whole table once: no
/// page is read twice, and a full cache (32 MiB) would stay resident beside a rebuild's peak.
pub(crate) const SCAN_CACHE_KIB: i64 = 1024;

/// Streams every row of `$sql` on one pooled connection into `$each`; on SQLite the
/// connection's page cache is held to [`SCAN_CACHE_KIB`] meanwhile and set back after.
macro_rules! scan_table {
    ($pool:expr, $backend:expr, $sql:expr, |$row:ident| $each:block) => {{
        use futures::TryStreamExt;
        let sqlite = matches!($backend, Backend::Sqlite);
        let mut conn = $pool.acquire().await?;
        if sqlite {
            let kib = crate::store::sql::SCAN_CACHE_KIB;
            sqlx::query(&format!("PRAGMA cache_size = -{kib}"))
                .execute(&mut *conn)
                .await?;
        }
        let scanned: StoreResult<()> = async {
            let mut rows = sqlx::query($sql).fetch(&mut *conn);
            while let Some($row) = rows.try_next().await? $each
            Ok(())
        }
        .await;
        if sqlite {
            let kib = crate::store::sqlite::CACHE_KIB;
            sqlx::query(&format!("PRAGMA cache_size = -{kib}"))
                .execute(&mut *conn)
                .await?;
        }
        scanned
    }};
}
pub(crate) use scan_table;

/// Bound parameters per multi-row statement with numbered (`$N`) placeholders. Small on
/// purpose: the SQLite driver resolves each `$N` by name with a scan of the statement's
/// parameters, so binding costs grow with the square of the parameter count.
pub(crate) const BATCH_PARAMS: usize = 240;

/// `($1, $2), ($3, $4)` for `rows` rows of `cols` columns.
pub(crate) fn placeholders(rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(r * cols + c + 1).to_string());
        }
        out.push(')');
    }
    out
}

/// `$first, $first+1, ...`: `count` numbered placeholders for an `IN (...)` list.
pub(crate) fn numbered(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Bound parameters per multi-row statement of the bulk writers (`save_links`, `save_patients`,
/// `replace_match_keys_many`) and of a page's reads. SQLite gets anonymous `?` placeholders
/// there, which its driver binds in order (a `$N` is looked up by name, in time growing with
/// the square of the count), so its statements can be ten times larger.
pub(crate) fn bulk_params(backend: crate::store::Backend) -> usize {
    match backend {
        crate::store::Backend::Sqlite => 2_400,
        _ => BATCH_PARAMS,
    }
}

/// A plain list of `count` placeholders for [`bulk_params`]-sized statements, numbered from
/// `first` where the backend numbers them (`?, ?` on SQLite, `$3, $4` elsewhere).
pub(crate) fn bulk_list(backend: crate::store::Backend, first: usize, count: usize) -> String {
    match backend {
        crate::store::Backend::Sqlite => vec!["?"; count].join(", "),
        _ => numbered(first, count),
    }
}

/// Placeholder number `n` (from 1) of a [`bulk_params`]-sized statement: `?` on SQLite, which binds
/// by position (so its placeholders must appear in the text in binding order), `$n` elsewhere.
pub(crate) fn param(backend: crate::store::Backend, n: usize) -> String {
    match backend {
        crate::store::Backend::Sqlite => "?".to_string(),
        _ => format!("${n}"),
    }
}

/// `rows` rows of `cols` placeholders for [`bulk_params`]-sized statements: `(?, ?), (?, ?)` on
/// SQLite, `($1, $2), ($3, $4)` elsewhere; with one column, a plain list (`?, ?` or `$1, $2`).
pub(crate) fn bulk_placeholders(
    backend: crate::store::Backend,
    rows: usize,
    cols: usize,
) -> String {
    if cols == 1 {
        return bulk_list(backend, 1, rows);
    }
    match backend {
        crate::store::Backend::Sqlite => {
            let row = format!("({})", vec!["?"; cols].join(", "));
            vec![row.as_str(); rows].join(", ")
        }
        _ => placeholders(rows, cols),
    }
}

pub(crate) use impl_store;

/// A stored value outside its column's allowed set.
#[derive(Debug, thiserror::Error)]
#[error("unexpected value in column {0}")]
pub(crate) struct BadValue(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Backend;

    #[test]
    fn placeholders_follow_each_backends_style() {
        assert_eq!(bulk_placeholders(Backend::Sqlite, 2, 1), "?, ?");
        assert_eq!(bulk_placeholders(Backend::Postgres, 2, 1), "$1, $2");
        assert_eq!(bulk_placeholders(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
        assert_eq!(
            bulk_placeholders(Backend::Postgres, 2, 2),
            "($1, $2), ($3, $4)"
        );
        assert_eq!(bulk_list(Backend::Postgres, 3, 2), "$3, $4");
        assert_eq!(param(Backend::Sqlite, 5), "?");
        assert_eq!(param(Backend::Postgres, 5), "$5");
    }
}
