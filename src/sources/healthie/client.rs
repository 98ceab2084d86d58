//! The Healthie GraphQL client. One generic [`HealthieClient::post`] sends any generated
//! operation through the shared [`Upstream`] (rate limiter, retries, timeouts) and treats both
//! HTTP errors and a GraphQL `errors` array as failures; the `fetch_*` methods build on it.
//!
//! GraphQL errors are classified by code and shape, never by copying their text, which may echo
//! submitted values: `TOO_MANY_REQUESTS` is a rate limit (retried by the upstream layer),
//! complexity and depth limits, `UNSUPPORTED_API_VERSION` and anything else are rejections.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use graphql_client::GraphQLQuery;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;

use super::convert::{parse_updated_at, user_to_record, HealthieUser};
use super::operations::{get_user, get_users, list_users, GetUser, GetUsers, ListUsers};
pub use super::operations::{MAX_BATCH_SIZE, MAX_PAGE_SIZE};
use crate::config::{HealthieSettings, Secret};
use crate::model::{SourceId, SourceRecord};
use crate::sources::http::{FetchError, RawResponse, Upstream};

const AUTHORIZATION_SOURCE: HeaderName = HeaderName::from_static("authorizationsource");
const AUTHORIZATION_SHARD: HeaderName = HeaderName::from_static("authorizationshard");
const API_VERSION: HeaderName = HeaderName::from_static("healthie-graphql-api-version");

/// The `active_status` filter of `users`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveStatus {
    Active,
    Archived,
}

impl ActiveStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ActiveStatus::Active => "active",
            ActiveStatus::Archived => "archived",
        }
    }
}

/// The order of a `users` listing. Changing it means starting again from the first page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserOrder {
    /// Stable for a full resync: new patients land on later pages.
    CreatedAtAsc,
    UpdatedAtAsc,
    /// Newest changes first, for an incremental sweep that stops at its watermark.
    UpdatedAtDesc,
}

impl UserOrder {
    fn key(self) -> list_users::UserOrderKeys {
        match self {
            UserOrder::CreatedAtAsc => list_users::UserOrderKeys::CREATED_AT_ASC,
            UserOrder::UpdatedAtAsc => list_users::UserOrderKeys::UPDATED_AT_ASC,
            UserOrder::UpdatedAtDesc => list_users::UserOrderKeys::UPDATED_AT_DESC,
        }
    }
}

/// One listed user: enough to decide whether to refetch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    pub id: SourceId,
    /// `None` when absent or in a format we do not read.
    pub updated_at: Option<DateTime<Utc>>,
    pub active: bool,
}

/// One page of `users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPage {
    pub users: Vec<UserSummary>,
    /// Pass as `after` for the next page.
    pub end_cursor: Option<String>,
    pub has_next_page: bool,
    /// Users matching the filter across all pages.
    pub total_count: i64,
}

/// One fetch outcome per id, as [`crate::sources::Source::fetch_records`] returns them.
pub type FetchResult = Result<Option<SourceRecord>, FetchError>;

/// A client for one Healthie API key. Cheap to clone; clones share the [`Upstream`].
#[derive(Clone)]
pub struct HealthieClient {
    upstream: Arc<Upstream>,
    api_url: String,
    api_key: Secret,
    api_version: String,
    shard: Option<String>,
    batch_size: usize,
}

impl fmt::Debug for HealthieClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthieClient")
            .field("api_url", &self.api_url)
            .field("api_key", &self.api_key)
            .field("api_version", &self.api_version)
            .field("shard", &self.shard)
            .field("batch_size", &self.batch_size)
            .finish_non_exhaustive()
    }
}

impl HealthieClient {
    /// A client sending through `upstream` (shared by everything using this API key).
    /// `batch_size` is clamped to `1..=MAX_BATCH_SIZE`; an empty shard sends no shard header.
    pub fn new(upstream: Arc<Upstream>, settings: &HealthieSettings) -> Self {
        let shard = settings.authorization_shard.trim();
        Self {
            upstream,
            api_url: settings.api_url.clone(),
            api_key: settings.api_key.clone(),
            api_version: settings.api_version.clone(),
            shard: (!shard.is_empty()).then(|| shard.to_string()),
            batch_size: (settings.batch_size as usize).clamp(1, MAX_BATCH_SIZE),
        }
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Sends one operation and returns its typed `data`. HTTP errors and a non-empty GraphQL
    /// `errors` array are failures; rate limits and transient failures are retried by the
    /// upstream layer within its budget.
    pub async fn post<Q: GraphQLQuery>(
        &self,
        variables: Q::Variables,
    ) -> Result<Q::ResponseData, FetchError> {
        Ok(self.post_with_raw::<Q>(variables).await?.0)
    }

    /// Like [`Self::post`], also returning `data` as received, so records keep their raw JSON.
    pub async fn post_with_raw<Q: GraphQLQuery>(
        &self,
        variables: Q::Variables,
    ) -> Result<(Q::ResponseData, Value), FetchError> {
        let body =
            serde_json::to_vec(&Q::build_query(variables)).map_err(|_| FetchError::Rejected {
                kind: "request_encoding",
                status: None,
            })?;
        let body = Bytes::from(body);
        let headers = self.headers()?;
        let response = self
            .upstream
            .execute(
                |client| {
                    client
                        .post(&self.api_url)
                        .headers(headers.clone())
                        .body(body.clone())
                },
                check_response,
            )
            .await?;
        decode_data::<Q::ResponseData>(&response.body)
    }

    fn headers(&self) -> Result<HeaderMap, FetchError> {
        let invalid = |kind| FetchError::Rejected { kind, status: None };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let mut auth = HeaderValue::from_str(&format!("Basic {}", self.api_key.expose()))
            .map_err(|_| invalid("invalid_api_key_header"))?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        headers.insert(AUTHORIZATION_SOURCE, HeaderValue::from_static("API"));
        headers.insert(
            API_VERSION,
            HeaderValue::from_str(&self.api_version)
                .map_err(|_| invalid("invalid_api_version_header"))?,
        );
        if let Some(shard) = &self.shard {
            headers.insert(
                AUTHORIZATION_SHARD,
                HeaderValue::from_str(shard).map_err(|_| invalid("invalid_shard_header"))?,
            );
        }
        Ok(headers)
    }

    /// The current snapshot of one user via `user(id:, clear_notifs: false)`. `Ok(None)` when
    /// Healthie returns no user, or a user that is not a patient (a provider's id from a
    /// `location.*` event).
    pub async fn fetch_user(&self, id: &SourceId) -> FetchResult {
        let (data, raw) = self
            .post_with_raw::<GetUser>(get_user::Variables {
                id: id.as_str().to_string(),
            })
            .await?;
        let fetched_at = Utc::now();
        let Some(user) = data.user else {
            return Ok(None);
        };
        if user.id != id.as_str() {
            return Err(FetchError::Rejected {
                kind: "user_id_mismatch",
                status: None,
            });
        }
        let raw_user = raw.get("user").cloned().unwrap_or(Value::Null);
        to_record(HealthieUser::from(&user), raw_user, fetched_at)
    }

    /// The current snapshot of each id, one result per id in order. Ids go out in batches of
    /// `users(ids:)`; ids a batch did not return are asked for again with
    /// `active_status: "archived"` (when more than one is missing), then one by one with
    /// [`Self::fetch_user`], so the answer never depends on which users `users` includes.
    pub async fn fetch_users(&self, ids: &[SourceId]) -> Vec<(SourceId, FetchResult)> {
        let mut seen = HashSet::new();
        let unique: Vec<&SourceId> = ids.iter().filter(|id| seen.insert(*id)).collect();
        let mut results: HashMap<SourceId, FetchResult> = HashMap::new();
        for chunk in unique.chunks(self.batch_size) {
            self.fetch_chunk(chunk, &mut results).await;
        }
        ids.iter()
            .map(|id| {
                let result = match results.get(id) {
                    Some(r) => copy_result(r),
                    None => Err(FetchError::Decode { what: "users" }),
                };
                (id.clone(), result)
            })
            .collect()
    }

    async fn fetch_chunk(&self, chunk: &[&SourceId], results: &mut HashMap<SourceId, FetchResult>) {
        if let [id] = chunk {
            results.insert((*id).clone(), self.fetch_user(id).await);
            return;
        }
        let mut found = match self.fetch_batch(chunk, None).await {
            Ok(found) => found,
            Err(e) => {
                for id in chunk {
                    results.insert((*id).clone(), Err(FetchError::copy_kind(&e)));
                }
                return;
            }
        };
        let mut missing: Vec<&SourceId> = Vec::new();
        for id in chunk {
            match found.remove(id.as_str()) {
                Some(r) => {
                    results.insert((*id).clone(), r);
                }
                None => missing.push(id),
            }
        }
        if missing.len() > 1 {
            match self
                .fetch_batch(&missing, Some(ActiveStatus::Archived))
                .await
            {
                Ok(mut archived) => missing.retain(|id| match archived.remove(id.as_str()) {
                    Some(r) => {
                        results.insert((*id).clone(), r);
                        false
                    }
                    None => true,
                }),
                Err(e) => tracing::debug!(
                    source = "healthie",
                    kind = e.kind(),
                    ids = missing.len(),
                    "Archived batch refetch failed; fetching the ids one by one."
                ),
            }
        }
        for id in missing {
            results.insert(id.clone(), self.fetch_user(id).await);
        }
    }

    /// One `users(ids:)` request: the requested users it returned, by id.
    async fn fetch_batch(
        &self,
        ids: &[&SourceId],
        active_status: Option<ActiveStatus>,
    ) -> Result<HashMap<String, FetchResult>, FetchError> {
        let requested: HashSet<&str> = ids.iter().map(|id| id.as_str()).collect();
        let (data, raw) = self
            .post_with_raw::<GetUsers>(get_users::Variables {
                ids: ids.iter().map(|id| id.as_str().to_string()).collect(),
                first: ids.len() as i64,
                active_status: active_status.map(|s| s.as_str().to_string()),
            })
            .await?;
        let fetched_at = Utc::now();
        let raw_nodes = raw.pointer("/users/nodes").and_then(Value::as_array);
        let mut found = HashMap::new();
        for (i, node) in data.users.nodes.unwrap_or_default().iter().enumerate() {
            let Some(user) = node else { continue };
            if !requested.contains(user.id.as_str()) {
                continue;
            }
            let raw_user = raw_nodes
                .and_then(|nodes| nodes.get(i))
                .cloned()
                .unwrap_or(Value::Null);
            found.insert(
                user.id.clone(),
                to_record(HealthieUser::from(user), raw_user, fetched_at),
            );
        }
        Ok(found)
    }

    /// One page of the patient list (ids, `updated_at`, `active`). `first` is clamped to
    /// `1..=MAX_PAGE_SIZE`; without `active_status` Healthie decides whether archived patients
    /// are included (undocumented), so a full sweep asks for each status.
    pub async fn fetch_user_page(
        &self,
        after: Option<String>,
        first: u32,
        active_status: Option<ActiveStatus>,
        order: UserOrder,
    ) -> Result<UserPage, FetchError> {
        let data = self
            .post::<ListUsers>(list_users::Variables {
                first: i64::from(first.clamp(1, MAX_PAGE_SIZE)),
                after,
                order_by: Some(order.key()),
                active_status: active_status.map(|s| s.as_str().to_string()),
            })
            .await?;
        let users = data
            .users
            .nodes
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .map(|node| UserSummary {
                id: SourceId(node.id),
                updated_at: node.updated_at.as_deref().and_then(parse_updated_at),
                active: node.active,
            })
            .collect();
        Ok(UserPage {
            users,
            end_cursor: data.users.page_info.end_cursor,
            has_next_page: data.users.page_info.has_next_page,
            total_count: data.users.total_count,
        })
    }
}

fn to_record(user: HealthieUser, raw: Value, fetched_at: DateTime<Utc>) -> FetchResult {
    if user.is_patient == Some(false) {
        return Ok(None);
    }
    user_to_record(&user, raw, fetched_at)
        .map(Some)
        .map_err(|e| e.into_fetch_error("user"))
}

/// The same outcome for another id (errors are not `Clone`: the `reqwest` source is dropped,
/// the kind and status are kept).
fn copy_result(result: &FetchResult) -> FetchResult {
    match result {
        Ok(record) => Ok(record.clone()),
        Err(e) => Err(e.copy_kind()),
    }
}

/// The parts of a GraphQL answer the check reads; `data` is skipped here.
#[derive(Deserialize)]
struct ErrorsOnly {
    #[serde(default)]
    errors: Option<Vec<GraphqlError>>,
}

#[derive(Deserialize)]
struct GraphqlError {
    #[serde(default)]
    message: Value,
    #[serde(default)]
    extensions: Value,
}

/// The `check` of every Healthie request: a 404 (sometimes not GraphQL at all, reference §3)
/// and any GraphQL error are failures.
fn check_response(response: &RawResponse) -> Result<(), FetchError> {
    if response.status == StatusCode::NOT_FOUND {
        return Err(FetchError::Rejected {
            kind: "not_found_http",
            status: Some(404),
        });
    }
    let answer: ErrorsOnly =
        serde_json::from_slice(&response.body).map_err(|_| FetchError::Decode {
            what: "graphql response",
        })?;
    match answer.errors {
        Some(errors) if !errors.is_empty() => {
            match classify_errors(&errors, response.status.as_u16()) {
                // Honour a `Retry-After` when Healthie sends one with its rate-limit error.
                FetchError::RateLimited { status, .. } => Err(FetchError::RateLimited {
                    retry_after: crate::sources::http::parse_retry_after(&response.headers),
                    status,
                }),
                other => Err(other),
            }
        }
        _ => Ok(()),
    }
}

/// Turns a GraphQL `errors` array into an error kind, most actionable first. Reads codes and
/// matches messages, but never copies message text.
fn classify_errors(errors: &[GraphqlError], status: u16) -> FetchError {
    let has_code = |code: &str| {
        errors
            .iter()
            .any(|e| e.extensions.get("code").and_then(Value::as_str) == Some(code))
    };
    let mentions = |word: &str| {
        errors.iter().any(|e| {
            e.message
                .as_str()
                .is_some_and(|m| m.to_ascii_lowercase().contains(word))
        })
    };
    let rejected = |kind| FetchError::Rejected {
        kind,
        status: Some(status),
    };
    if has_code("TOO_MANY_REQUESTS") {
        FetchError::RateLimited {
            retry_after: None,
            status: Some(status),
        }
    } else if has_code("UNSUPPORTED_API_VERSION") {
        rejected("unsupported_api_version")
    } else if mentions("complexity") {
        rejected("graphql_complexity")
    } else if mentions("depth") {
        rejected("graphql_depth")
    } else {
        rejected("graphql_error")
    }
}

/// The typed `data` of a checked answer, with `data` as received.
fn decode_data<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<(T, Value), FetchError> {
    let answer: Value = serde_json::from_slice(body).map_err(|_| FetchError::Decode {
        what: "graphql response",
    })?;
    let data = match answer {
        Value::Object(mut fields) => fields.remove("data"),
        _ => None,
    }
    .filter(|d| !d.is_null())
    .ok_or(FetchError::Decode {
        what: "graphql data",
    })?;
    let typed = T::deserialize(&data).map_err(|_| FetchError::Decode {
        what: "graphql data",
    })?;
    Ok((typed, data))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use axum::extract::State;
    use axum::response::{IntoResponse, Response};
    use serde_json::json;

    use super::*;
    use crate::metrics::Metrics;
    use crate::model::{RecordStatus, SourceKind};
    use crate::sources::http::UpstreamPolicy;

    type Responder = Box<dyn Fn(&Value) -> (u16, String) + Send + Sync>;

    /// A request the fake Healthie received.
    #[derive(Debug, Clone)]
    struct Recorded {
        headers: HeaderMap,
        body: Value,
    }

    struct FakeState {
        requests: Mutex<Vec<Recorded>>,
        /// Answers by request body; the last one repeats.
        answers: Mutex<Vec<Responder>>,
    }

    /// A tiny Healthie on `127.0.0.1:0` that records requests and answers canned JSON.
    struct FakeHealthie {
        url: String,
        state: Arc<FakeState>,
    }

    impl FakeHealthie {
        async fn start(answers: Vec<Responder>) -> Self {
            let state = Arc::new(FakeState {
                requests: Mutex::new(Vec::new()),
                answers: Mutex::new(answers),
            });
            let app = axum::Router::new()
                .route("/graphql", axum::routing::post(answer))
                .with_state(state.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/graphql", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            Self { url, state }
        }

        fn requests(&self) -> Vec<Recorded> {
            self.state.requests.lock().unwrap().clone()
        }

        fn operations(&self) -> Vec<String> {
            self.requests()
                .iter()
                .map(|r| r.body["operationName"].as_str().unwrap_or("").to_string())
                .collect()
        }
    }

    async fn answer(
        State(state): State<Arc<FakeState>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        state.requests.lock().unwrap().push(Recorded {
            headers,
            body: body.clone(),
        });
        let (status, text) = {
            let mut answers = state.answers.lock().unwrap();
            if answers.len() > 1 {
                answers.remove(0)(&body)
            } else {
                answers[0](&body)
            }
        };
        (
            StatusCode::from_u16(status).unwrap(),
            [(CONTENT_TYPE, "application/json")],
            text,
        )
            .into_response()
    }

    fn json_answer(status: u16, value: Value) -> Responder {
        Box::new(move |_| (status, value.to_string()))
    }

    fn settings(url: &str, shard: &str) -> HealthieSettings {
        HealthieSettings {
            enabled: true,
            api_url: url.to_string(),
            api_version: "2026-01-01".into(),
            authorization_shard: shard.into(),
            webhook_public_path: "/webhooks/healthie".into(),
            requests_per_second: 1000,
            burst: 1000,
            timeout_ms: 5000,
            batch_size: 50,
            live_reserved_share: 0.2,
            batch_window_ms: 0,
            api_key: Secret::new("hk_test_123"),
            webhook_secret: Vec::new(),
        }
    }

    /// Fast limits and retries, so a retried rate limit takes milliseconds.
    fn client(fake: &FakeHealthie, shard: &str) -> HealthieClient {
        let mut policy = UpstreamPolicy::per_second(1000, 1000, Duration::from_secs(5));
        policy.retry_initial = Duration::from_millis(1);
        policy.retry_max = Duration::from_millis(5);
        policy.rate_limit_pause = Duration::from_millis(1);
        policy.max_retry_elapsed = Duration::from_secs(5);
        let upstream = Upstream::new(SourceKind::Healthie, policy, Arc::new(Metrics::new()));
        HealthieClient::new(Arc::new(upstream), &settings(&fake.url, shard))
    }

    fn user(id: &str, last_name: &str, active: bool) -> Value {
        json!({
            "id": id, "active": active, "is_patient": true,
            "first_name": "Ada", "last_name": last_name, "legal_name": null,
            "dob": "1990-02-03", "sex": "Female", "gender": null, "gender_identity": null,
            "email": format!("{last_name}@example.org").to_lowercase(), "skipped_email": false,
            "phone_number": "555-0101", "additional_phone_number": null,
            "record_identifier": null, "additional_record_identifier": null,
            "archived_at": null, "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2025-06-01 12:00:00 -0400",
            "location": null, "locations": []
        })
    }

    /// Answers `GetUser` from `users` and `GetUsers` with the users among `ids` that match
    /// the `active_status` filter (`None` answers only active ones).
    fn directory(users: Vec<Value>) -> Responder {
        Box::new(move |body| {
            let vars = &body["variables"];
            let data = match body["operationName"].as_str() {
                Some("GetUser") => {
                    let found = users.iter().find(|u| u["id"] == vars["id"]).cloned();
                    json!({ "user": found })
                }
                Some("GetUsers") => {
                    let ids = vars["ids"].as_array().cloned().unwrap_or_default();
                    let archived = vars["active_status"] == json!("archived");
                    let nodes: Vec<Value> = users
                        .iter()
                        .filter(|u| ids.contains(&u["id"]) && u["active"] == json!(!archived))
                        .cloned()
                        .collect();
                    json!({ "users": { "nodes": nodes } })
                }
                _ => return (400, "{}".to_string()),
            };
            (200, json!({ "data": data }).to_string())
        })
    }

    fn graphql_error(message: &str, code: Option<&str>) -> Value {
        let mut error = json!({ "message": message, "locations": [], "path": ["user"] });
        if let Some(code) = code {
            error["extensions"] = json!({ "code": code });
        }
        json!({ "data": null, "errors": [error] })
    }

    #[tokio::test]
    async fn request_carries_healthie_headers_and_a_graphql_body() {
        let fake = FakeHealthie::start(vec![directory(vec![user("77", "Lovelace", true)])]).await;
        let record = client(&fake, "shard-9")
            .fetch_user(&SourceId::from("77"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.key.id.as_str(), "77");
        let requests = fake.requests();
        assert_eq!(requests.len(), 1);
        let h = &requests[0].headers;
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h["authorization"], "Basic hk_test_123");
        assert_eq!(h["authorizationsource"], "API");
        assert_eq!(h["healthie-graphql-api-version"], "2026-01-01");
        assert_eq!(h["authorizationshard"], "shard-9");
        let body = &requests[0].body;
        assert_eq!(body["operationName"], "GetUser");
        assert_eq!(body["variables"], json!({ "id": "77" }));
        assert_eq!(body["query"], get_user::QUERY);
    }

    #[tokio::test]
    async fn no_shard_header_is_sent_without_a_configured_shard() {
        let fake = FakeHealthie::start(vec![directory(vec![])]).await;
        let found = client(&fake, " ")
            .fetch_user(&SourceId::from("1"))
            .await
            .unwrap();
        assert_eq!(found, None);
        assert!(fake.requests()[0]
            .headers
            .get("authorizationshard")
            .is_none());
    }

    #[tokio::test]
    async fn fetched_user_keeps_its_raw_json() {
        let ada = user("77", "Lovelace", false);
        let fake = FakeHealthie::start(vec![directory(vec![ada.clone()])]).await;
        let record = client(&fake, "")
            .fetch_user(&SourceId::from("77"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.raw, ada);
        assert_eq!(record.status, RecordStatus::Archived);
        assert_eq!(record.fields.family_name.as_deref(), Some("Lovelace"));
        assert!(record.source_updated_at.is_some());
    }

    #[tokio::test]
    async fn a_user_who_is_not_a_patient_is_not_returned() {
        let mut provider = user("5", "Provider", true);
        provider["is_patient"] = json!(false);
        let fake = FakeHealthie::start(vec![directory(vec![provider])]).await;
        let found = client(&fake, "")
            .fetch_user(&SourceId::from("5"))
            .await
            .unwrap();
        assert_eq!(found, None);
    }

    #[tokio::test]
    async fn a_different_user_than_asked_for_is_rejected() {
        let fake = FakeHealthie::start(vec![json_answer(
            200,
            json!({ "data": { "user": user("1", "Someone", true) } }),
        )])
        .await;
        let e = client(&fake, "")
            .fetch_user(&SourceId::from("2"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "user_id_mismatch");
    }

    #[tokio::test]
    async fn too_many_requests_is_retried_until_it_succeeds() {
        let fake = FakeHealthie::start(vec![
            json_answer(
                200,
                graphql_error(
                    "Too many requests. Please try again later.",
                    Some("TOO_MANY_REQUESTS"),
                ),
            ),
            directory(vec![user("8", "Hopper", true)]),
        ])
        .await;
        let found = client(&fake, "")
            .fetch_user(&SourceId::from("8"))
            .await
            .unwrap();
        assert_eq!(found.unwrap().key.id.as_str(), "8");
        assert_eq!(fake.requests().len(), 2);
    }

    #[tokio::test]
    async fn complexity_error_is_rejected_without_retrying() {
        let fake = FakeHealthie::start(vec![json_answer(
            200,
            graphql_error(
                "Query has complexity of 2274, which exceeds max complexity of 2000",
                None,
            ),
        )])
        .await;
        let e = client(&fake, "")
            .fetch_user(&SourceId::from("8"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                FetchError::Rejected {
                    kind: "graphql_complexity",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!e.is_retryable());
        assert_eq!(fake.requests().len(), 1);
    }

    #[tokio::test]
    async fn http_401_is_an_auth_error() {
        let fake = FakeHealthie::start(vec![json_answer(401, json!({ "errors": [] }))]).await;
        let e = client(&fake, "")
            .fetch_user(&SourceId::from("8"))
            .await
            .unwrap_err();
        assert!(matches!(e, FetchError::Auth { status: 401 }), "{e:?}");
        assert_eq!(fake.requests().len(), 1);
    }

    #[tokio::test]
    async fn http_404_is_rejected_as_not_found() {
        let fake = FakeHealthie::start(vec![Box::new(|_| (404, "Not Found".to_string()))]).await;
        let e = client(&fake, "")
            .fetch_user(&SourceId::from("8"))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                FetchError::Rejected {
                    kind: "not_found_http",
                    status: Some(404)
                }
            ),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn undecodable_answers_are_decode_errors() {
        for body in [
            "<html>oops</html>",
            "{\"data\": null}",
            "{\"data\": {\"user\": 7}}",
        ] {
            let text = body.to_string();
            let fake = FakeHealthie::start(vec![Box::new(move |_| (200, text.clone()))]).await;
            let e = client(&fake, "")
                .fetch_user(&SourceId::from("8"))
                .await
                .unwrap_err();
            assert!(matches!(e, FetchError::Decode { .. }), "{body}: {e:?}");
        }
    }

    #[tokio::test]
    async fn batch_fetch_falls_back_to_user_for_an_id_missing_from_users() {
        // "2" is archived: `users` without active_status leaves it out in this fake.
        let fake = FakeHealthie::start(vec![directory(vec![
            user("1", "One", true),
            user("2", "Two", false),
            user("3", "Three", true),
        ])])
        .await;
        let ids: Vec<SourceId> = ["1", "2", "3"].into_iter().map(SourceId::from).collect();
        let results = client(&fake, "").fetch_users(&ids).await;
        let got: Vec<(&str, Option<&str>)> = results
            .iter()
            .map(|(id, r)| {
                let r = r.as_ref().unwrap().as_ref();
                (id.as_str(), r.map(|r| r.key.id.as_str()))
            })
            .collect();
        assert_eq!(
            got,
            vec![("1", Some("1")), ("2", Some("2")), ("3", Some("3"))]
        );
        assert_eq!(fake.operations(), vec!["GetUsers", "GetUser"]);
        let batch = &fake.requests()[0].body["variables"];
        assert_eq!(
            batch,
            &json!({ "ids": ["1", "2", "3"], "first": 3, "active_status": null })
        );
        assert_eq!(
            results[1].1.as_ref().unwrap().as_ref().unwrap().status,
            RecordStatus::Archived
        );
    }

    #[tokio::test]
    async fn several_missing_ids_are_asked_for_as_archived_then_one_by_one() {
        let fake = FakeHealthie::start(vec![directory(vec![
            user("1", "One", true),
            user("2", "Two", false),
            user("4", "Four", false),
        ])])
        .await;
        let ids: Vec<SourceId> = ["1", "2", "3", "4", "1"]
            .into_iter()
            .map(SourceId::from)
            .collect();
        let results = client(&fake, "").fetch_users(&ids).await;
        let got: Vec<(&str, Option<&str>)> = results
            .iter()
            .map(|(id, r)| {
                let r = r.as_ref().unwrap().as_ref();
                (id.as_str(), r.map(|r| r.key.id.as_str()))
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("1", Some("1")),
                ("2", Some("2")),
                ("3", None),
                ("4", Some("4")),
                ("1", Some("1"))
            ]
        );
        assert_eq!(fake.operations(), vec!["GetUsers", "GetUsers", "GetUser"]);
        assert_eq!(
            fake.requests()[1].body["variables"],
            json!({ "ids": ["2", "3", "4"], "first": 3, "active_status": "archived" })
        );
    }

    #[tokio::test]
    async fn batches_respect_the_batch_size_and_a_failed_batch_fails_each_id() {
        let fake = FakeHealthie::start(vec![json_answer(
            200,
            graphql_error("Something went wrong for Lovelace", None),
        )])
        .await;
        let mut client = client(&fake, "");
        client.batch_size = 2;
        let ids: Vec<SourceId> = ["1", "2", "3", "4"]
            .into_iter()
            .map(SourceId::from)
            .collect();
        let results = client.fetch_users(&ids).await;
        assert_eq!(results.len(), 4);
        for (_, r) in &results {
            assert!(matches!(
                r,
                Err(FetchError::Rejected {
                    kind: "graphql_error",
                    ..
                })
            ));
        }
        assert_eq!(fake.operations(), vec!["GetUsers", "GetUsers"]);
    }

    #[tokio::test]
    async fn user_page_lists_ids_with_their_update_times() {
        let fake = FakeHealthie::start(vec![json_answer(
            200,
            json!({ "data": { "users": {
                "total_count": 3,
                "page_info": { "has_next_page": true, "end_cursor": "MjA=" },
                "nodes": [
                    { "id": "10", "updated_at": "2025-06-01T12:00:00Z", "active": true },
                    null,
                    { "id": "11", "updated_at": "2025-06-01 08:00:00 -0400", "active": false },
                    { "id": "12", "updated_at": null, "active": true }
                ]
            } } }),
        )])
        .await;
        let page = client(&fake, "")
            .fetch_user_page(
                Some("MTA=".into()),
                500,
                Some(ActiveStatus::Archived),
                UserOrder::CreatedAtAsc,
            )
            .await
            .unwrap();
        let noon = "2025-06-01T12:00:00Z".parse::<DateTime<Utc>>().unwrap();
        assert_eq!(
            page,
            UserPage {
                users: vec![
                    UserSummary {
                        id: "10".into(),
                        updated_at: Some(noon),
                        active: true
                    },
                    UserSummary {
                        id: "11".into(),
                        updated_at: Some(noon),
                        active: false
                    },
                    UserSummary {
                        id: "12".into(),
                        updated_at: None,
                        active: true
                    },
                ],
                end_cursor: Some("MjA=".into()),
                has_next_page: true,
                total_count: 3,
            }
        );
        assert_eq!(
            fake.requests()[0].body["variables"],
            json!({ "first": 100, "after": "MTA=", "order_by": "CREATED_AT_ASC",
                    "active_status": "archived" })
        );
    }

    fn raw(status: u16, body: Value) -> RawResponse {
        RawResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn a_rate_limit_error_honours_retry_after_when_sent() {
        let limited = graphql_error("Too many requests.", Some("TOO_MANY_REQUESTS"));
        let mut response = raw(200, limited);
        match check_response(&response) {
            Err(FetchError::RateLimited { retry_after, .. }) => assert_eq!(retry_after, None),
            other => panic!("{other:?}"),
        }
        response
            .headers
            .insert("retry-after", HeaderValue::from_static("3"));
        match check_response(&response) {
            Err(FetchError::RateLimited { retry_after, .. }) => {
                assert_eq!(retry_after, Some(std::time::Duration::from_secs(3)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn graphql_errors_are_classified_by_code_and_shape() {
        let cases = [
            (
                graphql_error(
                    "Too many requests. Please try again later.",
                    Some("TOO_MANY_REQUESTS"),
                ),
                "rate_limited",
            ),
            (
                graphql_error(
                    "Version 2023-01-01 is not supported",
                    Some("UNSUPPORTED_API_VERSION"),
                ),
                "unsupported_api_version",
            ),
            (
                graphql_error(
                    "Query has complexity of 2274, which exceeds max complexity of 2000",
                    None,
                ),
                "graphql_complexity",
            ),
            (
                graphql_error("Query has depth of 26, which exceeds max depth of 25", None),
                "graphql_depth",
            ),
            (
                graphql_error("Record not found", Some("NOT_FOUND")),
                "graphql_error",
            ),
            (json!({ "errors": [{ "message": 12 }] }), "graphql_error"),
            (json!({ "errors": "nope" }), "decode"),
        ];
        for (body, kind) in cases {
            let e = check_response(&raw(200, body.clone())).unwrap_err();
            assert_eq!(e.kind(), kind, "{body}");
        }
        assert!(check_response(&raw(200, json!({ "data": {}, "errors": [] }))).is_ok());
        assert!(check_response(&raw(200, json!({ "data": { "user": null } }))).is_ok());
    }

    #[test]
    fn error_messages_never_carry_values_from_the_payload() {
        let bodies = [
            graphql_error(
                "Email ada.lovelace@example.org is invalid for Lovelace",
                None,
            ),
            graphql_error("Too many requests for Lovelace", Some("TOO_MANY_REQUESTS")),
            graphql_error("complexity Lovelace", None),
            json!({ "errors": [{ "message": "Lovelace", "extensions": { "code": "Lovelace" } }] }),
            json!("Lovelace"),
        ];
        for body in bodies {
            let e = check_response(&raw(200, body)).unwrap_err();
            let shown = format!("{e} {e:?} {}", e.kind());
            assert!(
                !shown.contains("Lovelace") && !shown.contains("ada."),
                "{shown}"
            );
        }
    }

    #[test]
    fn debug_output_redacts_the_api_key() {
        let upstream = Upstream::new(
            SourceKind::Healthie,
            UpstreamPolicy::per_second(1, 1, Duration::from_secs(1)),
            Arc::new(Metrics::new()),
        );
        let client = HealthieClient::new(
            Arc::new(upstream),
            &settings("http://127.0.0.1:1/graphql", ""),
        );
        let shown = format!("{client:?}");
        assert!(!shown.contains("hk_test_123"), "{shown}");
        assert!(client.headers().unwrap()[AUTHORIZATION].is_sensitive());
    }
}
