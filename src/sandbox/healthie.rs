//! The fake Healthie GraphQL endpoint (`POST /graphql`), API version 2026-01-01: `user(id:)` and
//! `users(...)` answered by projecting the request's selection out of the population's stored
//! `User` objects, behind Healthie's headers, version check, rate limit, complexity and depth
//! limits, with the error shapes of reference §1 and §3. Counters record what clients did.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Map, Value};

use super::graphql::{self, Field, GraphqlError, Out, Schema};
use super::SharedPopulation;
use crate::model::SourceKind;

/// The subset of the 2026-01-01 schema this endpoint serves.
pub const SCHEMA_SDL: &str = include_str!("healthie_schema.graphql");

/// Release dates accepted in `Healthie-GraphQL-API-Version` (reference §1). Every version is
/// served with the 2026-01-01 shapes: the older `users: [User!]` list is not modelled.
pub const API_VERSIONS: &[&str] = &[
    "2024-06-01",
    "2024-07-01",
    "2024-10-20",
    "2025-01-01",
    "2025-04-01",
    "2025-07-31",
    "2025-10-15",
    "2026-01-01",
    "2026-07-01",
];

/// The exact rate-limit answer of reference §3.
pub const TOO_MANY_REQUESTS_BODY: &str = r#"{"errors":[{"message":"Too many requests. Please try again later.","extensions":{"code":"TOO_MANY_REQUESTS"}}]}"#;

/// A token bucket: `requests_per_second` refill, up to `burst` requests at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

/// What `users` returns when `active_status` is absent. The reference (§2.2, resync recipe
/// step 4) says this is undocumented; the sandbox defaults to active patients only, the stricter
/// guess, so a client that forgets to sweep `"archived"` misses archived patients here too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DefaultActiveStatus {
    Active,
    All,
}

use super::faults::FaultInjector;
/// Fault injection, off by default (shared by the three fakes).
pub use super::faults::Faults;

#[derive(Debug, Clone, PartialEq)]
pub struct HealthieConfig {
    /// Expected in `Authorization: Basic <api_key>` (the raw key, not base64 user:pass).
    pub api_key: String,
    /// `None`: unlimited. The old docs said 250 requests/s per key; now it is "dynamic".
    pub rate_limit: Option<RateLimit>,
    /// HTTP status of the rate-limit answer. Undocumented (§3); 200 by default because Healthie
    /// reports it as a GraphQL error. Set 429 to exercise a client's other path.
    pub rate_limited_status: u16,
    pub max_complexity: u64,
    pub max_depth: usize,
    /// Cap on `first`/`last`, and the page size when neither is given (baseline "Max 100").
    pub max_page_size: u64,
    pub users_default_status: DefaultActiveStatus,
    /// Reject requests without `Healthie-GraphQL-API-Version` (mandatory from 2027-01-31).
    /// When false they are served, with a `MISSING_API_VERSION_HEADER` warning from 2026-07-01.
    pub require_version_header: bool,
    /// The API key's own user, returned by `user` without an id or with `or_current_user: true`.
    pub api_user: Value,
    pub faults: Faults,
}

impl Default for HealthieConfig {
    fn default() -> Self {
        Self {
            api_key: "sandbox-healthie-key".into(),
            rate_limit: Some(RateLimit {
                requests_per_second: 250.0,
                burst: 250,
            }),
            rate_limited_status: 200,
            max_complexity: 2000,
            max_depth: 25,
            max_page_size: 100,
            users_default_status: DefaultActiveStatus::Active,
            require_version_header: true,
            api_user: json!({
                "id": "100400",
                "shard_aware_id": "100400",
                "first_name": "Sync",
                "last_name": "Service",
                "full_name": "Sync Service",
                "name": "Sync Service",
                "email": "sync-service@clinic.example",
                "active": true,
                "is_patient": false,
                "auto_charge_enabled": false,
                "organization_id": "100400",
                "timezone": "America/New_York",
                "locations": [],
                "policies": [],
                "active_tags": [],
            }),
            faults: Faults::default(),
        }
    }
}

/// What clients did, for tests and benchmarks.
#[derive(Debug, Default)]
pub struct HealthieCounters {
    pub requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub version_rejected: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Parse and validation errors (the request never ran).
    pub invalid_queries: AtomicU64,
    pub complexity_refused: AtomicU64,
    pub depth_refused: AtomicU64,
    /// `user(...)` root fields executed, and how many passed `clear_notifs: false`.
    pub user_fields: AtomicU64,
    pub user_fields_clear_notifs_false: AtomicU64,
    /// `user(id:)` with an id that matched no user.
    pub user_not_found: AtomicU64,
    pub users_fields: AtomicU64,
    /// `User` objects sent back, through `user` and through `users` pages.
    pub users_returned: AtomicU64,
    pub faults_injected: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthieCountersSnapshot {
    pub requests: u64,
    pub unauthorized: u64,
    pub version_rejected: u64,
    pub rate_limited: u64,
    pub invalid_queries: u64,
    pub complexity_refused: u64,
    pub depth_refused: u64,
    pub user_fields: u64,
    pub user_fields_clear_notifs_false: u64,
    pub user_not_found: u64,
    pub users_fields: u64,
    pub users_returned: u64,
    pub faults_injected: u64,
}

impl HealthieCounters {
    pub fn snapshot(&self) -> HealthieCountersSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HealthieCountersSnapshot {
            requests: r(&self.requests),
            unauthorized: r(&self.unauthorized),
            version_rejected: r(&self.version_rejected),
            rate_limited: r(&self.rate_limited),
            invalid_queries: r(&self.invalid_queries),
            complexity_refused: r(&self.complexity_refused),
            depth_refused: r(&self.depth_refused),
            user_fields: r(&self.user_fields),
            user_fields_clear_notifs_false: r(&self.user_fields_clear_notifs_false),
            user_not_found: r(&self.user_not_found),
            users_fields: r(&self.users_fields),
            users_returned: r(&self.users_returned),
            faults_injected: r(&self.faults_injected),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SortField {
    Email,
    FirstName,
    LastName,
    CreatedAt,
    UpdatedAt,
    GroupName,
    ProviderName,
    NextApptDate,
}

type OrderKey = (SortField, bool);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum StatusFilter {
    Active,
    Archived,
    All,
}

/// Sorted positions (into the Healthie table) for one order and status, valid for one version.
type SortCache = HashMap<(OrderKey, StatusFilter), (u64, Arc<Vec<usize>>)>;

/// The fake endpoint's state, shared by its handlers.
pub struct HealthieServer {
    config: HealthieConfig,
    schema: Schema,
    population: SharedPopulation,
    counters: Arc<HealthieCounters>,
    bucket: Mutex<Bucket>,
    sorted: Mutex<SortCache>,
    faults: FaultInjector,
}

/// An answer: HTTP status and JSON body.
pub struct Answer {
    pub status: StatusCode,
    pub body: String,
}

impl Answer {
    fn json(status: StatusCode, body: &Value) -> Self {
        Self {
            status,
            body: body.to_string(),
        }
    }

    fn error(status: StatusCode, message: &str, code: Option<&str>) -> Self {
        let mut e = json!({"message": message});
        if let Some(code) = code {
            e["extensions"] = json!({"code": code});
        }
        Self::json(status, &json!({"errors": [e]}))
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            self.body,
        )
            .into_response()
    }
}

/// The router serving `POST /graphql`, and its counters.
pub fn router(
    population: SharedPopulation,
    config: HealthieConfig,
) -> (Router, Arc<HealthieCounters>) {
    let server = Arc::new(HealthieServer::new(population, config));
    let counters = server.counters.clone();
    let router = Router::new()
        .route("/graphql", post(handle))
        .with_state(server);
    (router, counters)
}

async fn handle(
    State(server): State<Arc<HealthieServer>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    bump(&server.counters.requests);
    if let Some(fault) = server.faults.draw() {
        bump(&server.counters.faults_injected);
        let rate_limited = || {
            let status =
                StatusCode::from_u16(server.config.rate_limited_status).unwrap_or(StatusCode::OK);
            Answer {
                status,
                body: TOO_MANY_REQUESTS_BODY.to_string(),
            }
            .into_response()
        };
        if let Some(answer) = server.faults.act(fault, rate_limited).await {
            return answer;
        }
    }
    server.answer(&headers, &body).into_response()
}

impl HealthieServer {
    pub fn new(population: SharedPopulation, config: HealthieConfig) -> Self {
        let schema = Schema::parse(SCHEMA_SDL).expect("the bundled Healthie schema parses");
        let burst = config.rate_limit.map_or(0.0, |r| f64::from(r.burst));
        let faults = FaultInjector::new(config.faults.clone());
        Self {
            config,
            schema,
            population,
            counters: Arc::new(HealthieCounters::default()),
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
            sorted: Mutex::new(HashMap::new()),
            faults,
        }
    }

    pub fn counters(&self) -> &Arc<HealthieCounters> {
        &self.counters
    }

    fn take_token(&self) -> bool {
        let Some(limit) = self.config.rate_limit else {
            return true;
        };
        let mut b = self.bucket.lock().expect("bucket");
        let now = Instant::now();
        let refill = now.duration_since(b.last).as_secs_f64() * limit.requests_per_second;
        b.tokens = (b.tokens + refill).min(f64::from(limit.burst));
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Checks headers, limits and the query, then executes it. Everything but fault injection.
    pub fn answer(&self, headers: &HeaderMap, body: &[u8]) -> Answer {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        // Healthie documents no answer for a bad or missing key; the sandbox's is HTTP 401 with a
        // GraphQL error coded UNAUTHENTICATED, so a misconfigured client fails loudly.
        let key_ok = header("authorization")
            .and_then(|v| v.strip_prefix("Basic "))
            .is_some_and(|k| k.trim() == self.config.api_key);
        if !key_ok {
            bump(&self.counters.unauthorized);
            return Answer::error(
                StatusCode::UNAUTHORIZED,
                "API key is missing or invalid. Send Authorization: Basic <API key>.",
                Some("UNAUTHENTICATED"),
            );
        }
        if header("authorizationsource") != Some("API") {
            bump(&self.counters.unauthorized);
            return Answer::error(
                StatusCode::UNAUTHORIZED,
                "AuthorizationSource header must be API.",
                Some("UNAUTHENTICATED"),
            );
        }
        let now = self.population.read().expect("population").now();
        let warning = match self.check_version(header("healthie-graphql-api-version"), now) {
            Ok(w) => w,
            Err(a) => {
                bump(&self.counters.version_rejected);
                return a;
            }
        };
        if !self.take_token() {
            bump(&self.counters.rate_limited);
            let status =
                StatusCode::from_u16(self.config.rate_limited_status).unwrap_or(StatusCode::OK);
            return Answer {
                status,
                body: TOO_MANY_REQUESTS_BODY.to_string(),
            };
        }
        let request: Value = match serde_json::from_slice(body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                bump(&self.counters.invalid_queries);
                return Answer::error(
                    StatusCode::BAD_REQUEST,
                    "Request body must be a JSON object with a query string",
                    None,
                );
            }
        };
        let query = request["query"].as_str().unwrap_or_default();
        let variables = match &request["variables"] {
            Value::Object(m) => m.clone(),
            Value::String(s) if !s.trim().is_empty() => {
                serde_json::from_str::<Map<String, Value>>(s).unwrap_or_default()
            }
            _ => Map::new(),
        };
        let op = request["operationName"].as_str().filter(|s| !s.is_empty());
        let fields = match graphql::prepare(&self.schema, query, &variables, op) {
            Ok(f) => f,
            Err(errors) => {
                bump(&self.counters.invalid_queries);
                return errors_answer(&errors, warning);
            }
        };
        let depth = graphql::depth(&fields);
        if depth > self.config.max_depth {
            bump(&self.counters.depth_refused);
            let e = GraphqlError::new(format!(
                "Query has depth of {depth}, which exceeds max depth of {}",
                self.config.max_depth
            ));
            return errors_answer(&[e], warning);
        }
        let complexity = graphql::complexity(&fields, self.config.max_page_size);
        if complexity > self.config.max_complexity {
            bump(&self.counters.complexity_refused);
            let e = GraphqlError::new(format!(
                "Query has complexity of {complexity}, which exceeds max complexity of {}",
                self.config.max_complexity
            ));
            return errors_answer(&[e], warning);
        }
        self.execute(&fields, warning)
    }

    fn check_version(
        &self,
        version: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<Value>, Answer> {
        let today = now.date_naive();
        let date = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("known date");
        let warnings_start = date("2026-07-01");
        let mandatory = date("2027-01-31");
        let Some(version) = version.map(str::trim) else {
            if self.config.require_version_header || today >= mandatory {
                return Err(Answer::error(
                    StatusCode::BAD_REQUEST,
                    "The Healthie-GraphQL-API-Version header is required.",
                    Some("MISSING_API_VERSION_HEADER"),
                ));
            }
            return Ok((today >= warnings_start).then(|| {
                json!({"code": "MISSING_API_VERSION_HEADER", "message": "No Healthie-GraphQL-API-Version header was sent; the 2024-06-01 baseline is deprecated."})
            }));
        };
        let Some(index) = API_VERSIONS.iter().position(|v| *v == version) else {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                &format!("Unsupported API version: {version}"),
                Some("UNSUPPORTED_API_VERSION"),
            ));
        };
        if today >= mandatory && version < "2026-07-01" {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                &format!("Unsupported API version: {version}"),
                Some("UNSUPPORTED_API_VERSION"),
            ));
        }
        // A version is deprecated six months after its successor ships.
        let deprecated = API_VERSIONS
            .get(index + 1)
            .and_then(|next| date(next).checked_add_months(chrono::Months::new(6)))
            .is_some_and(|d| today >= d);
        Ok((today >= warnings_start && deprecated).then(|| {
            json!({"code": "API_VERSION_SUNSET_WARNING", "message": format!("API version {version} is deprecated.")})
        }))
    }

    fn execute(&self, fields: &[Field], warning: Option<Value>) -> Answer {
        let pop = self.population.read().expect("population");
        let mut data = Vec::new();
        let mut errors = Vec::new();
        let mut null_data = false;
        for f in fields {
            let out = match f.name.as_str() {
                "__typename" => Out::Leaf(json!("Query")),
                "user" => self.resolve_user(&pop, f),
                "users" => match self.resolve_users(&pop, f) {
                    Ok(out) => out,
                    Err(e) => {
                        errors.push(e.with_path(vec![json!(f.key)]));
                        null_data = true; // users is non-null: the error nulls `data`.
                        Out::Null
                    }
                },
                _ => Out::Null,
            };
            data.push((f.key.clone(), out));
        }
        let mut body = Vec::new();
        if !errors.is_empty() {
            body.push((
                "errors".to_string(),
                Out::Leaf(Value::Array(
                    errors.iter().map(GraphqlError::to_json).collect(),
                )),
            ));
        }
        let data = if null_data {
            Out::Null
        } else {
            Out::Object(data)
        };
        body.push(("data".to_string(), data));
        if let Some(w) = warning {
            body.push((
                "extensions".to_string(),
                Out::Leaf(json!({"warnings": [w]})),
            ));
        }
        Answer {
            status: StatusCode::OK,
            body: serde_json::to_string(&Out::Object(body)).expect("serializable"),
        }
    }

    fn resolve_user(&self, pop: &super::Population, f: &Field) -> Out {
        bump(&self.counters.user_fields);
        if f.arg("clear_notifs") == Some(&json!(false)) {
            bump(&self.counters.user_fields_clear_notifs_false);
        }
        let id = f.arg("id").and_then(Value::as_str);
        let or_current = f.arg("or_current_user") == Some(&json!(true));
        let found = id.and_then(|id| pop.healthie_user(id));
        let user = match (found, id) {
            (Some(u), _) => Some(u),
            // Without an id, and with or_current_user for an unknown id, Healthie answers with
            // the key's own user (reference §2.2 warns never to set or_current_user).
            (None, None) => Some(&self.config.api_user),
            (None, Some(_)) if or_current => Some(&self.config.api_user),
            (None, Some(_)) => {
                bump(&self.counters.user_not_found);
                None
            }
        };
        match user {
            Some(u) => {
                bump(&self.counters.users_returned);
                graphql::project(u, "User", &f.selection)
            }
            None => Out::Null,
        }
    }

    fn resolve_users(&self, pop: &super::Population, f: &Field) -> Result<Out, GraphqlError> {
        bump(&self.counters.users_fields);
        let status = match f.arg("active_status").and_then(Value::as_str) {
            Some("active") => StatusFilter::Active,
            Some("archived") => StatusFilter::Archived,
            _ => match self.config.users_default_status {
                DefaultActiveStatus::Active => StatusFilter::Active,
                DefaultActiveStatus::All => StatusFilter::All,
            },
        };
        let order = order_key(f);
        let sorted = self.sorted_positions(pop, order, status);
        let table = pop.table(SourceKind::Healthie).all();
        let ids: Option<Vec<String>> = f.arg("ids").and_then(Value::as_array).map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        });
        let single_id = f.arg("id").and_then(Value::as_str);
        let email = f
            .arg("email")
            .and_then(Value::as_str)
            .map(str::to_lowercase);
        let group = f.arg("group_id").and_then(Value::as_str);
        let tags: Option<Vec<&str>> = f
            .arg("tag_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect());
        let keywords: Vec<String> = f
            .arg("keywords")
            .and_then(Value::as_str)
            .map(|k| k.split_whitespace().map(str::to_lowercase).collect())
            .unwrap_or_default();
        let show_all = f.arg("show_all_by_default") != Some(&json!(false));
        let matched: Vec<&Value> = if !show_all && keywords.is_empty() {
            Vec::new()
        } else {
            sorted
                .iter()
                .map(|&i| &table[i].json)
                .filter(|u| {
                    let id = u["id"].as_str().unwrap_or_default();
                    ids.as_ref().is_none_or(|ids| ids.iter().any(|x| x == id))
                        && single_id.is_none_or(|x| x == id)
                        && email.as_ref().is_none_or(|e| {
                            u["email"].as_str().is_some_and(|x| x.to_lowercase() == *e)
                        })
                        && group.is_none_or(|g| u["user_group_id"].as_str() == Some(g))
                        && tags.as_ref().is_none_or(|t| {
                            u["active_tags"].as_array().is_some_and(|a| {
                                a.iter()
                                    .any(|tag| t.contains(&tag["id"].as_str().unwrap_or("")))
                            })
                        })
                        && keywords.iter().all(|k| keyword_match(u, k))
                })
                .collect()
        };
        let total = matched.len();
        let decode = |name: &str| -> Result<Option<usize>, GraphqlError> {
            match f.arg(name).and_then(Value::as_str) {
                None => Ok(None),
                Some(c) => decode_cursor(c).map(Some).ok_or_else(|| {
                    GraphqlError::new(format!("Invalid cursor: {c:?}"))
                        .with_path(vec![json!(f.key)])
                }),
            }
        };
        // graphql-ruby cursors are 1-based offsets: `after` starts after it, `before` ends before.
        let start = decode("after")?.unwrap_or(0).min(total);
        let end = decode("before")?
            .map(|b| b.saturating_sub(1))
            .unwrap_or(total)
            .clamp(start, total);
        let cap = self.config.max_page_size as usize;
        let first = f
            .arg("first")
            .and_then(Value::as_u64)
            .map(|n| (n as usize).min(cap));
        let last = f
            .arg("last")
            .and_then(Value::as_u64)
            .map(|n| (n as usize).min(cap));
        let (from, to) = match (first, last) {
            (Some(n), _) => (start, (start + n).min(end)),
            (None, Some(n)) => (end.saturating_sub(n).max(start), end),
            (None, None) => (start, (start + cap).min(end)),
        };
        let (from, to) = match (first, last) {
            (Some(_), Some(n)) => (to.saturating_sub(n).max(from), to),
            _ => (from, to),
        };
        let has_next_page = if first.is_some() || last.is_none() {
            to < end
        } else {
            end < total
        };
        let has_previous_page = if last.is_some() && first.is_none() {
            from > start
        } else {
            start > 0
        };
        let page = &matched[from..to];
        let wants = |name: &str| f.selection.iter().any(|c| c.name == name);
        let edges: Vec<Value> = if wants("edges") {
            page.iter()
                .enumerate()
                .map(|(i, u)| json!({"cursor": encode_cursor(from + i + 1), "node": u}))
                .collect()
        } else {
            Vec::new()
        };
        let nodes: Vec<&Value> = if wants("nodes") {
            page.to_vec()
        } else {
            Vec::new()
        };
        if wants("edges") || wants("nodes") {
            self.counters
                .users_returned
                .fetch_add(page.len() as u64, Ordering::Relaxed);
        }
        let connection = json!({
            "edges": edges,
            "nodes": nodes,
            "page_info": {
                "has_next_page": has_next_page,
                "has_previous_page": has_previous_page,
                "start_cursor": (from < to).then(|| encode_cursor(from + 1)),
                "end_cursor": (from < to).then(|| encode_cursor(to)),
            },
            "total_count": total,
        });
        Ok(graphql::project(
            &connection,
            "UserConnection",
            &f.selection,
        ))
    }

    fn sorted_positions(
        &self,
        pop: &super::Population,
        order: OrderKey,
        status: StatusFilter,
    ) -> Arc<Vec<usize>> {
        let version = pop.version();
        if let Some((v, list)) = self
            .sorted
            .lock()
            .expect("sort cache")
            .get(&(order, status))
        {
            if *v == version {
                return list.clone();
            }
        }
        let table = pop.table(SourceKind::Healthie).all();
        let mut keyed: Vec<(SortValue, u64, usize)> = table
            .iter()
            .enumerate()
            .filter(|(_, r)| r.deleted_at.is_none())
            .filter(|(_, r)| {
                let active = r.json["active"].as_bool().unwrap_or(true);
                match status {
                    StatusFilter::Active => active,
                    StatusFilter::Archived => !active,
                    StatusFilter::All => true,
                }
            })
            .map(|(i, r)| {
                let id = r.json["id"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                (sort_value(&r.json, order.0), id, i)
            })
            .collect();
        let descending = order.1;
        // Nulls last ascending and first descending, as PostgreSQL sorts; ties by id.
        keyed.sort_by(|a, b| {
            let primary = match (&a.0, &b.0) {
                (SortValue::Null, SortValue::Null) => std::cmp::Ordering::Equal,
                (SortValue::Null, _) => std::cmp::Ordering::Greater,
                (_, SortValue::Null) => std::cmp::Ordering::Less,
                (x, y) => x.cmp(y),
            };
            let primary = if descending {
                primary.reverse()
            } else {
                primary
            };
            primary.then(a.1.cmp(&b.1))
        });
        let list = Arc::new(keyed.into_iter().map(|(_, _, i)| i).collect::<Vec<_>>());
        self.sorted
            .lock()
            .expect("sort cache")
            .insert((order, status), (version, list.clone()));
        list
    }
}

fn errors_answer(errors: &[GraphqlError], warning: Option<Value>) -> Answer {
    let mut body = json!({"errors": errors.iter().map(GraphqlError::to_json).collect::<Vec<_>>()});
    if let Some(w) = warning {
        body["extensions"] = json!({"warnings": [w]});
    }
    Answer::json(StatusCode::OK, &body)
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SortValue {
    Null,
    Text(String),
    Time(i64),
}

fn sort_value(u: &Value, field: SortField) -> SortValue {
    let text = |name: &str| {
        u[name]
            .as_str()
            .map_or(SortValue::Null, |s| SortValue::Text(s.to_lowercase()))
    };
    let time = |name: &str| {
        u[name]
            .as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map_or(SortValue::Null, |t| SortValue::Time(t.timestamp()))
    };
    match field {
        SortField::Email => text("email"),
        SortField::FirstName => text("first_name"),
        SortField::LastName => text("last_name"),
        SortField::CreatedAt => time("created_at"),
        SortField::UpdatedAt => time("updated_at"),
        SortField::GroupName => text("group_name"),
        SortField::ProviderName => text("dietitian_id"),
        SortField::NextApptDate => time("next_appt_date"),
    }
}

/// `order_by` wins over `sort_by` (deprecated in favour of it elsewhere in the schema); the
/// default is `last_name_desc`, the documented `sort_by` default (reference §2.2).
fn order_key(f: &Field) -> OrderKey {
    let raw = f
        .arg("order_by")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            f.arg("sort_by")
                .and_then(Value::as_str)
                .map(str::to_uppercase)
        })
        .unwrap_or_else(|| "LAST_NAME_DESC".into());
    let (name, desc) = match raw.rsplit_once('_') {
        Some((n, "DESC")) => (n, true),
        Some((n, "ASC")) => (n, false),
        _ => ("LAST_NAME", true),
    };
    let field = match name {
        "EMAIL" => SortField::Email,
        "FIRST_NAME" => SortField::FirstName,
        "CREATED_AT" => SortField::CreatedAt,
        "UPDATED_AT" => SortField::UpdatedAt,
        "GROUP_NAME" => SortField::GroupName,
        "PROVIDER_NAME" => SortField::ProviderName,
        "NEXT_APPT_DATE" => SortField::NextApptDate,
        _ => SortField::LastName,
    };
    (field, desc)
}

/// `keywords` searches id, names, record identifier, email and dob (reference §2.2).
fn keyword_match(u: &Value, keyword: &str) -> bool {
    [
        "id",
        "first_name",
        "last_name",
        "legal_name",
        "record_identifier",
        "email",
        "dob",
    ]
    .iter()
    .any(|k| {
        u[*k]
            .as_str()
            .is_some_and(|v| v.to_lowercase().contains(keyword))
    })
}

/// graphql-ruby's cursor: the 1-based position, base64 without padding.
pub fn encode_cursor(position: usize) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(position.to_string())
}

fn decode_cursor(cursor: &str) -> Option<usize> {
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(cursor.trim_end_matches('='))
        .ok()?;
    std::str::from_utf8(&bytes).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::population::{Population, PopulationConfig};
    use crate::sandbox::{Sandbox, SandboxConfig};
    use std::collections::BTreeSet;

    const KEY: &str = "test-key";

    fn config() -> SandboxConfig {
        SandboxConfig {
            population: PopulationConfig {
                people: 300,
                seed: 42,
                ..PopulationConfig::default()
            },
            healthie: HealthieConfig {
                api_key: KEY.into(),
                ..HealthieConfig::default()
            },
            ..SandboxConfig::default()
        }
    }

    async fn post(
        url: &str,
        body: Value,
        version: Option<&str>,
        key: Option<&str>,
    ) -> (u16, Value) {
        let client = reqwest::Client::new();
        let mut req = client.post(url).json(&body);
        if let Some(k) = key {
            req = req
                .header("Authorization", format!("Basic {k}"))
                .header("AuthorizationSource", "API");
        }
        if let Some(v) = version {
            req = req.header("Healthie-GraphQL-API-Version", v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn gql(url: &str, query: &str, variables: Value) -> Value {
        let (status, body) = post(
            url,
            json!({"query": query, "variables": variables}),
            Some("2026-01-01"),
            Some(KEY),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    fn first_ids(p: &Population, n: usize) -> Vec<String> {
        p.healthie_users()
            .take(n)
            .map(|u| u["id"].as_str().unwrap().to_string())
            .collect()
    }

    #[tokio::test]
    async fn projection_returns_exactly_the_requested_fields_with_aliases() {
        let sb = Sandbox::start(config()).await.unwrap();
        let id = first_ids(&sb.population().read().unwrap(), 1).remove(0);
        let body = gql(
            &sb.healthie_url(),
            "query GetPatient($id: ID) { patient: user(id: $id, clear_notifs: false) {
                id given: first_name last_name __typename ...Addr } }
             fragment Addr on User { location { city } }",
            json!({"id": id}),
        )
        .await;
        let patient = body["data"]["patient"].as_object().unwrap();
        let keys: BTreeSet<&str> = patient.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from(["id", "given", "last_name", "__typename", "location"])
        );
        assert_eq!(patient["__typename"], "User");
        assert_eq!(patient["id"], json!(id));
        if let Some(loc) = patient["location"].as_object() {
            assert_eq!(loc.keys().collect::<Vec<_>>(), ["city"]);
        }
        assert!(body.get("errors").is_none());
        let c = sb.healthie_counters().snapshot();
        assert_eq!((c.user_fields, c.user_fields_clear_notifs_false), (1, 1));
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn users_pagination_walks_every_patient_once_with_right_total_count() {
        let sb = Sandbox::start(config()).await.unwrap();
        let (active, archived) = {
            let p = sb.population().read().unwrap();
            let active = p
                .healthie_users()
                .filter(|u| u["active"] == json!(true))
                .count();
            (active, p.healthie_users().count() - active)
        };
        assert!(archived > 0);
        let mut seen = BTreeSet::new();
        for (status, expected) in [("active", active), ("archived", archived)] {
            let mut after: Value = Value::Null;
            let mut pages = 0;
            loop {
                let body = gql(
                    &sb.healthie_url(),
                    "query ListPatients($after: String, $first: Int, $status: String) {
                        users(first: $first, after: $after, order_by: CREATED_AT_ASC, active_status: $status) {
                            total_count page_info { has_next_page end_cursor } nodes { id active } } }",
                    json!({"after": after, "first": 50, "status": status}),
                )
                .await;
                let users = &body["data"]["users"];
                assert_eq!(users["total_count"], json!(expected));
                for n in users["nodes"].as_array().unwrap() {
                    assert_eq!(n["active"], json!(status == "active"));
                    assert!(
                        seen.insert(n["id"].as_str().unwrap().to_string()),
                        "seen twice"
                    );
                }
                pages += 1;
                if users["page_info"]["has_next_page"] == json!(false) {
                    break;
                }
                after = users["page_info"]["end_cursor"].clone();
            }
            assert_eq!(pages, expected.div_ceil(50));
        }
        assert_eq!(seen.len(), active + archived);
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn batched_aliased_user_fields_and_users_by_ids_return_each_patient() {
        let sb = Sandbox::start(config()).await.unwrap();
        let ids = first_ids(&sb.population().read().unwrap(), 5);
        let fields: String = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                format!("u{i}: user(id: \"{id}\", clear_notifs: false) {{ id updated_at }} ")
            })
            .collect();
        let body = gql(&sb.healthie_url(), &format!("{{ {fields} }}"), json!({})).await;
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(body["data"][format!("u{i}")]["id"], json!(id));
        }
        let body = gql(
            &sb.healthie_url(),
            "query($ids: [ID]) { users(ids: $ids, active_status: \"active\", first: 10) { edges { cursor node { id } } } }
             ",
            json!({"ids": ids}),
        )
        .await;
        let edges = body["data"]["users"]["edges"].as_array().unwrap();
        assert!(!edges.is_empty() && edges.len() <= 5);
        assert!(edges[0]["cursor"].is_string());
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn unknown_id_gives_null_without_error() {
        let sb = Sandbox::start(config()).await.unwrap();
        let body = gql(
            &sb.healthie_url(),
            "{ user(id: \"999999999\", clear_notifs: false) { id } }",
            json!({}),
        )
        .await;
        assert_eq!(body, json!({"data": {"user": null}}));
        assert_eq!(sb.healthie_counters().snapshot().user_not_found, 1);
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn rate_limit_produces_the_exact_too_many_requests_shape() {
        let mut cfg = config();
        cfg.healthie.rate_limit = Some(RateLimit {
            requests_per_second: 0.001,
            burst: 2,
        });
        let sb = Sandbox::start(cfg).await.unwrap();
        for _ in 0..2 {
            gql(&sb.healthie_url(), "{ __typename }", json!({})).await;
        }
        let (status, body) = post(
            &sb.healthie_url(),
            json!({"query": "{ __typename }"}),
            Some("2026-01-01"),
            Some(KEY),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            serde_json::from_str::<Value>(TOO_MANY_REQUESTS_BODY).unwrap()
        );
        assert_eq!(
            body,
            json!({"errors":[{"message":"Too many requests. Please try again later.","extensions":{"code":"TOO_MANY_REQUESTS"}}]})
        );
        assert_eq!(sb.healthie_counters().snapshot().rate_limited, 1);
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn complexity_over_2000_is_refused_with_healthies_message() {
        let sb = Sandbox::start(config()).await.unwrap();
        // 1 + 100 * (1 + 25 fields) = 2601
        let fields = [
            "id",
            "first_name",
            "last_name",
            "legal_name",
            "dob",
            "gender",
            "gender_identity",
            "sex",
            "email",
            "phone_number",
            "additional_phone_number",
            "record_identifier",
            "active",
            "archived_at",
            "is_patient",
            "created_at",
            "updated_at",
            "timezone",
            "dietitian_id",
            "user_group_id",
            "preferred_language",
            "metadata",
            "pronouns",
            "full_name",
            "age",
        ]
        .join(" ");
        let body = gql(
            &sb.healthie_url(),
            &format!("{{ users {{ nodes {{ {fields} }} }} }}"),
            json!({}),
        )
        .await;
        assert_eq!(
            body,
            json!({"errors": [{"message": "Query has complexity of 2601, which exceeds max complexity of 2000"}]})
        );
        assert_eq!(sb.healthie_counters().snapshot().complexity_refused, 1);
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn bad_version_header_is_unsupported_api_version() {
        let sb = Sandbox::start(config()).await.unwrap();
        let (status, body) = post(
            &sb.healthie_url(),
            json!({"query": "{ __typename }"}),
            Some("2026-02-01"),
            Some(KEY),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(
            body["errors"][0]["extensions"]["code"],
            "UNSUPPORTED_API_VERSION"
        );
        let (status, _) = post(
            &sb.healthie_url(),
            json!({"query": "{ __typename }"}),
            Some("2024-06-01"),
            Some(KEY),
        )
        .await;
        assert_eq!(status, 200);
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn missing_or_wrong_auth_is_refused() {
        let sb = Sandbox::start(config()).await.unwrap();
        let q = json!({"query": "{ __typename }"});
        let (status, body) = post(&sb.healthie_url(), q.clone(), Some("2026-01-01"), None).await;
        assert_eq!(status, 401);
        assert_eq!(body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
        let (status, _) = post(&sb.healthie_url(), q, Some("2026-01-01"), Some("wrong")).await;
        assert_eq!(status, 401);
        assert_eq!(sb.healthie_counters().snapshot().unauthorized, 2);
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn parse_and_validation_errors_come_back_as_graphql_errors() {
        let sb = Sandbox::start(config()).await.unwrap();
        let body = gql(&sb.healthie_url(), "{ user(id: 1) { id ", json!({})).await;
        assert!(body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Parse error"));
        assert!(body["errors"][0]["locations"].is_array());
        let body = gql(
            &sb.healthie_url(),
            "{ user(id: 1) { id not_a_field } }",
            json!({}),
        )
        .await;
        assert_eq!(
            body["errors"][0]["message"],
            "Field 'not_a_field' doesn't exist on type 'User'"
        );
        assert!(body.get("data").is_none());
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn backward_pagination_with_last_and_before_returns_the_preceding_page() {
        let sb = Sandbox::start(config()).await.unwrap();
        let q = "query($before: String) { users(last: 3, before: $before, order_by: CREATED_AT_ASC) {
                    total_count page_info { has_next_page has_previous_page start_cursor end_cursor }
                    edges { cursor node { id } } } }";
        let body = gql(&sb.healthie_url(), q, json!({"before": null})).await;
        let users = &body["data"]["users"];
        let total = users["total_count"].as_u64().unwrap() as usize;
        let cursors: Vec<&str> = users["edges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["cursor"].as_str().unwrap())
            .collect();
        assert_eq!(
            cursors,
            (total - 2..=total)
                .map(encode_cursor)
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
        );
        assert_eq!(users["page_info"]["has_previous_page"], json!(true));
        assert_eq!(users["page_info"]["has_next_page"], json!(false));
        let start = users["page_info"]["start_cursor"].clone();
        let body = gql(&sb.healthie_url(), q, json!({"before": start})).await;
        let users = &body["data"]["users"];
        assert_eq!(
            users["page_info"]["end_cursor"],
            json!(encode_cursor(total - 3))
        );
        assert_eq!(users["page_info"]["has_next_page"], json!(true));
        let body = gql(
            &sb.healthie_url(),
            "{ users(first: 1, after: \"%%%\") { total_count } }",
            json!({}),
        )
        .await;
        assert_eq!(body["data"], Value::Null);
        assert!(body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("Invalid cursor"));
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn missing_version_header_is_refused_unless_configured_otherwise() {
        let sb = Sandbox::start(config()).await.unwrap();
        let q = json!({"query": "{ __typename }"});
        let (status, body) = post(&sb.healthie_url(), q.clone(), None, Some(KEY)).await;
        assert_eq!(status, 400);
        assert_eq!(
            body["errors"][0]["extensions"]["code"],
            "MISSING_API_VERSION_HEADER"
        );
        assert_eq!(sb.healthie_counters().snapshot().version_rejected, 1);
        sb.shutdown().await.unwrap();
        let mut cfg = config();
        cfg.healthie.require_version_header = false;
        let sb = Sandbox::start(cfg).await.unwrap();
        let (status, body) = post(&sb.healthie_url(), q, None, Some(KEY)).await;
        assert_eq!(
            (status, body),
            (200, json!({"data": {"__typename": "Query"}}))
        );
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn injected_faults_answer_500_and_are_counted() {
        let mut cfg = config();
        cfg.healthie.faults.error_500_share = 1.0;
        let sb = Sandbox::start(cfg).await.unwrap();
        let (status, _) = post(
            &sb.healthie_url(),
            json!({"query": "{ __typename }"}),
            Some("2026-01-01"),
            Some(KEY),
        )
        .await;
        assert_eq!(status, 500);
        assert_eq!(sb.healthie_counters().snapshot().faults_injected, 1);
        sb.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn the_reference_example_queries_run_unchanged() {
        let sb = Sandbox::start(config()).await.unwrap();
        let id = first_ids(&sb.population().read().unwrap(), 1).remove(0);
        let get = "query GetPatient($id: ID) {
          user(id: $id, clear_notifs: false) {
            id first_name last_name legal_name dob gender gender_identity sex pronouns email phone_number
            additional_phone_number record_identifier additional_record_identifier active archived_at is_patient
            created_at updated_at timezone dietitian_id user_group_id preferred_language metadata
            location { id line1 line2 city state zip country }
            locations { id line1 line2 city state zip country }
            policies { id name num group_num priority_type holder_relationship effective_start effective_end updated_at
                       insurance_plan { id payer_name payer_id } }
          }
        }";
        let body = gql(&sb.healthie_url(), get, json!({"id": id})).await;
        assert!(body.get("errors").is_none(), "{body}");
        assert_eq!(body["data"]["user"]["id"], json!(id));
        let list = "query ListPatients($after: String, $first: Int) {
          users(first: $first, after: $after, order_by: CREATED_AT_ASC) {
            total_count page_info { has_next_page end_cursor } nodes { id updated_at active }
          }
        }";
        let body = gql(&sb.healthie_url(), list, json!({"first": 50})).await;
        assert!(body.get("errors").is_none(), "{body}");
        assert_eq!(body["data"]["users"]["nodes"].as_array().unwrap().len(), 50);
        sb.shutdown().await.unwrap();
    }

    #[test]
    fn cursors_are_graphql_ruby_style_positions() {
        assert_eq!(encode_cursor(1), "MQ");
        assert_eq!(decode_cursor("MTA"), Some(10));
        assert_eq!(decode_cursor("not a cursor!"), None);
    }

    #[test]
    fn every_field_of_a_stored_user_exists_in_the_schema() {
        fn check(schema: &Schema, type_name: &str, value: &Value) {
            for (key, v) in value.as_object().unwrap() {
                let field = schema.field(type_name, key);
                assert!(field.is_some(), "{type_name}.{key} not in schema");
                let base = field.unwrap().ty.base().to_string();
                let items: Vec<&Value> = match v {
                    Value::Array(items) => items.iter().collect(),
                    other => vec![other],
                };
                for item in items {
                    if schema.is_object(&base) && !item.is_null() {
                        check(schema, &base, item);
                    }
                }
            }
        }
        let schema = Schema::parse(SCHEMA_SDL).unwrap();
        let mut p = Population::generate(&PopulationConfig {
            people: 50,
            ..PopulationConfig::default()
        });
        let id = p.healthie_users().next().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        p.tag_healthie(&id);
        for u in p.healthie_users() {
            check(&schema, "User", u);
        }
        check(&schema, "User", &HealthieConfig::default().api_user);
    }
}
