//! A fake IntakeQ client API (reference Part A), backed by an in-memory list of client
//! profiles in IntakeQ's own shape (`ClientId`, epoch-millisecond dates, …).
//!
//! The router is path-relative (`/clients`, `/clients/profile/{id}`); mount it under
//! `/intakeq/api/v1` and point `sources.intakeq.base_url` there. It serves:
//! - `X-Auth-Key` auth (401 otherwise);
//! - 10 requests a minute and 500 a day per key by default, answered with a bare 429 and no
//!   `Retry-After` (none is documented);
//! - `GET /clients`: `page` (1-based, 100 per page, no total), `search` (a number matches that
//!   `ClientId`, and, like any text, names and emails containing it), `includeProfile`
//!   (thin rows with `ClientNumber` without it), `dateCreatedStart/End`,
//!   `dateUpdatedStart/End` (`yyyy-MM-dd`, UTC days, on `LastUpdateDate`), `externalClientId`,
//!   `deletedOnly` (clients deleted within the last 10 days);
//! - `GET /clients/profile/{id}` (the official client's endpoint);
//! - anything else: the HTML "page not found" IntakeQ serves instead of JSON.
//!
//! Query parameter names match case-insensitively (ASP.NET binding) unless
//! [`IntakeqSandbox::with_profile_param`] says which `includeProfile` spelling works.
//! Also: builders of intake and appointment webhook payloads and a sender for them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{json, Value};

/// Clients per page.
pub const PAGE_SIZE: usize = 100;
/// How long deleted clients stay visible to `deletedOnly=true`.
pub const DELETED_RETENTION_DAYS: i64 = 10;

/// Which spelling of `includeProfile` the fake honours (reference A2 ⚠).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileParam {
    /// Any casing (the default).
    AnyCase,
    /// Only the documented `IncludeProfile`: the lowercase one is ignored.
    CapitalizedOnly,
}

/// Request counts since the fake started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IntakeqCounters {
    pub requests: u64,
    pub rate_limited: u64,
    pub unauthorized: u64,
}

/// The fake IntakeQ. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct IntakeqSandbox {
    inner: Arc<Inner>,
}

struct Inner {
    api_key: String,
    state: Mutex<Data>,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    unauthorized: AtomicU64,
}

struct Data {
    clients: Vec<Value>,
    deleted: Vec<(Value, DateTime<Utc>)>,
    per_minute: u32,
    per_day: u32,
    profile_param: ProfileParam,
    minute: VecDeque<Instant>,
    day: Option<(NaiveDate, u32)>,
    now: Option<DateTime<Utc>>,
}

impl IntakeqSandbox {
    /// A fake answering to `api_key`, holding `clients` (full profiles with `ClientId`).
    pub fn new(api_key: impl Into<String>, clients: Vec<Value>) -> Self {
        Self {
            inner: Arc::new(Inner {
                api_key: api_key.into(),
                state: Mutex::new(Data {
                    clients,
                    deleted: Vec::new(),
                    per_minute: 10,
                    per_day: 500,
                    profile_param: ProfileParam::AnyCase,
                    minute: VecDeque::new(),
                    day: None,
                    now: None,
                }),
                requests: AtomicU64::new(0),
                rate_limited: AtomicU64::new(0),
                unauthorized: AtomicU64::new(0),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Data> {
        self.inner.state.lock().expect("sandbox lock")
    }

    /// Replaces the limits (defaults: 10 a minute, 500 a day).
    pub fn with_limits(self, per_minute: u32, per_day: u32) -> Self {
        {
            let mut s = self.state();
            s.per_minute = per_minute;
            s.per_day = per_day;
        }
        self
    }

    pub fn with_profile_param(self, param: ProfileParam) -> Self {
        self.state().profile_param = param;
        self
    }

    /// Adds clients deleted at the given times.
    pub fn with_deleted(self, deleted: Vec<(Value, DateTime<Utc>)>) -> Self {
        self.state().deleted.extend(deleted);
        self
    }

    /// Fixes "now" for the deletion window (default: the wall clock).
    pub fn set_now(&self, now: DateTime<Utc>) {
        self.state().now = Some(now);
    }

    /// Adds a client or replaces the one with the same `ClientId`.
    pub fn upsert_client(&self, client: Value) {
        let mut s = self.state();
        let id = client.get("ClientId").cloned();
        match s
            .clients
            .iter_mut()
            .find(|c| c.get("ClientId") == id.as_ref())
        {
            Some(existing) => *existing = client,
            None => s.clients.push(client),
        }
    }

    /// Deletes a client (visible to `deletedOnly` for 10 days). False when unknown.
    pub fn delete_client(&self, client_id: u64, at: DateTime<Utc>) -> bool {
        let mut s = self.state();
        match s
            .clients
            .iter()
            .position(|c| client_id_of(c) == Some(client_id))
        {
            Some(i) => {
                let client = s.clients.remove(i);
                s.deleted.push((client, at));
                true
            }
            None => false,
        }
    }

    /// The live clients.
    pub fn clients(&self) -> Vec<Value> {
        self.state().clients.clone()
    }

    pub fn counters(&self) -> IntakeqCounters {
        IntakeqCounters {
            requests: self.inner.requests.load(Ordering::Relaxed),
            rate_limited: self.inner.rate_limited.load(Ordering::Relaxed),
            unauthorized: self.inner.unauthorized.load(Ordering::Relaxed),
        }
    }

    /// The router, with paths relative to the API root (`/clients`).
    /// Serves this fake under `/intakeq/api/v1` on a loopback port for a unit test; returns its base url.
    #[cfg(test)]
    pub(crate) async fn serve_for_test(&self) -> String {
        let base =
            super::serve_for_test(Router::new().nest("/intakeq/api/v1", self.router())).await;
        format!("{base}/intakeq/api/v1")
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/clients", get(list_clients))
            .route("/clients/profile/{id}", get(client_profile))
            .fallback(not_found_page)
            .with_state(self.clone())
    }

    /// Counts the request and checks the key and the limits.
    fn admit(&self, headers: &HeaderMap) -> Result<(), Reject> {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let key = headers.get("x-auth-key").and_then(|v| v.to_str().ok());
        if key != Some(self.inner.api_key.as_str()) {
            self.inner.unauthorized.fetch_add(1, Ordering::Relaxed);
            return Err(Reject(StatusCode::UNAUTHORIZED, "Unauthorized".into()));
        }
        let mut s = self.state();
        let now = Instant::now();
        while s
            .minute
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            s.minute.pop_front();
        }
        let today = Utc::now().date_naive();
        let used_today = match s.day {
            Some((day, n)) if day == today => n,
            _ => 0,
        };
        if s.minute.len() >= s.per_minute as usize || used_today >= s.per_day {
            self.inner.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(Reject(
                StatusCode::TOO_MANY_REQUESTS,
                "Too Many Requests".into(),
            ));
        }
        s.minute.push_back(now);
        s.day = Some((today, used_today + 1));
        Ok(())
    }
}

fn client_id_of(client: &Value) -> Option<u64> {
    match client.get("ClientId")? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// IntakeQ's thin list row: note `ClientNumber`.
pub fn thin_row(profile: &Value) -> Value {
    json!({
        "ClientNumber": profile.get("ClientId").cloned().unwrap_or(Value::Null),
        "Name": profile.get("Name").cloned().unwrap_or(Value::Null),
        "Email": profile.get("Email").cloned().unwrap_or(Value::Null),
        "Phone": profile.get("Phone").cloned().unwrap_or(Value::Null),
    })
}

/// A refusal: the status and a plain-text body.
struct Reject(StatusCode, String);

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn bad_request(what: &str) -> Reject {
    Reject(
        StatusCode::BAD_REQUEST,
        format!("Invalid parameter: {what}"),
    )
}

fn day_start_ms(day: NaiveDate) -> i64 {
    day.and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
        .timestamp_millis()
}

/// Parsed `GET /clients` parameters.
#[derive(Default)]
struct ListQuery {
    page: usize,
    search: Option<String>,
    profile: bool,
    created: (Option<i64>, Option<i64>),
    updated: (Option<i64>, Option<i64>),
    external: Option<String>,
    deleted_only: bool,
}

fn parse_query(
    params: &[(String, String)],
    profile_param: ProfileParam,
) -> Result<ListQuery, Reject> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let day = |name: &str| -> Result<Option<NaiveDate>, Reject> {
        match get(name) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => NaiveDate::parse_from_str(&v, "%Y-%m-%d")
                .map(Some)
                .map_err(|_| bad_request(name)),
        }
    };
    let truthy = |v: Option<String>| v.is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let profile = match profile_param {
        ProfileParam::AnyCase => truthy(get("includeProfile")),
        ProfileParam::CapitalizedOnly => truthy(
            params
                .iter()
                .find(|(k, _)| k == "IncludeProfile")
                .map(|(_, v)| v.clone()),
        ),
    };
    let page = match get("page") {
        None => 1,
        Some(p) => p
            .parse::<usize>()
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| bad_request("page"))?,
    };
    let start = |d: Option<NaiveDate>| d.map(day_start_ms);
    let end = |d: Option<NaiveDate>| d.and_then(|d| d.succ_opt()).map(day_start_ms);
    Ok(ListQuery {
        page,
        search: get("search").filter(|s| !s.is_empty()),
        profile,
        created: (start(day("dateCreatedStart")?), end(day("dateCreatedEnd")?)),
        updated: (start(day("dateUpdatedStart")?), end(day("dateUpdatedEnd")?)),
        external: get("externalClientId").filter(|s| !s.is_empty()),
        deleted_only: truthy(get("deletedOnly")),
    })
}

fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    }
}

fn matches(client: &Value, q: &ListQuery) -> bool {
    let ms = |field: &str| client.get(field).and_then(Value::as_i64);
    let within = |t: Option<i64>, (from, to): (Option<i64>, Option<i64>)| match t {
        None => from.is_none() && to.is_none(),
        Some(t) => from.is_none_or(|f| t >= f) && to.is_none_or(|e| t < e),
    };
    if !within(ms("DateCreated"), q.created) {
        return false;
    }
    if !within(ms("LastUpdateDate").or(ms("DateCreated")), q.updated) {
        return false;
    }
    if let Some(ext) = &q.external {
        if client.get("ExternalClientId").map(text_of).as_deref() != Some(ext.as_str()) {
            return false;
        }
    }
    if let Some(search) = &q.search {
        let needle = search.to_lowercase();
        let exact_id =
            search.parse::<u64>().ok() == client_id_of(client) && client_id_of(client).is_some();
        let partial = ["Name", "Email", "FirstName", "LastName"].iter().any(|f| {
            client
                .get(*f)
                .map(text_of)
                .is_some_and(|t| t.to_lowercase().contains(&needle))
        });
        if !exact_id && !partial {
            return false;
        }
    }
    true
}

async fn list_clients(
    State(sb): State<IntakeqSandbox>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    if let Err(e) = sb.admit(&headers) {
        return e.into_response();
    }
    let s = sb.state();
    let q = match parse_query(&params, s.profile_param) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let mut rows: Vec<&Value> = if q.deleted_only {
        let now = s.now.unwrap_or_else(Utc::now);
        let horizon = now - chrono::Duration::days(DELETED_RETENTION_DAYS);
        s.deleted
            .iter()
            .filter(|(_, at)| *at > horizon)
            .map(|(c, _)| c)
            .collect()
    } else {
        s.clients.iter().collect()
    };
    rows.retain(|c| matches(c, &q));
    // Each row's id is read once, not once per comparison: a listing sorts every client.
    rows.sort_by_cached_key(|c| client_id_of(c).unwrap_or(u64::MAX));
    let page: Vec<Value> = rows
        .into_iter()
        .skip((q.page - 1) * PAGE_SIZE)
        .take(PAGE_SIZE)
        .map(|c| if q.profile { c.clone() } else { thin_row(c) })
        .collect();
    Json(page).into_response()
}

async fn client_profile(
    State(sb): State<IntakeqSandbox>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = sb.admit(&headers) {
        return e.into_response();
    }
    let wanted = id.parse::<u64>().ok();
    let found = sb
        .state()
        .clients
        .iter()
        .find(|c| wanted.is_some() && client_id_of(c) == wanted)
        .cloned();
    match found {
        Some(c) => Json(c).into_response(),
        None => not_found_page().await,
    }
}

async fn not_found_page() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        "<!DOCTYPE html><html><head><title>Page not found</title></head><body><h1>Page not found</h1></body></html>",
    )
        .into_response()
}

fn random_hex_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..24].to_string()
}

/// An "Intake Submitted" webhook payload for a client (reference A4).
pub fn intake_submitted(client: &Value) -> Value {
    json!({
        "IntakeId": random_hex_id(),
        "Type": "Intake Submitted",
        "ClientId": client.get("ClientId").cloned().unwrap_or(Value::Null),
        "PracticeId": "5a1b2c3d4e5f6a7b8c9d0e1f",
        "ExternalClientId": client.get("ExternalClientId").cloned().unwrap_or(Value::Null),
        "ExternalPracticeId": null,
    })
}

/// An appointment webhook payload (`AppointmentCreated`, `AppointmentCanceled`, …) for a client.
pub fn appointment_event(event_type: &str, client: &Value) -> Value {
    let field = |f: &str| client.get(f).cloned().unwrap_or(Value::Null);
    json!({
        "EventType": event_type,
        "ActionPerformedByClient": false,
        "Appointment": {
            "Id": random_hex_id(),
            "ClientId": field("ClientId"),
            "ClientName": field("Name"),
            "ClientEmail": field("Email"),
            "ClientDateOfBirth": field("DateOfBirth"),
            "ExternalClientId": field("ExternalClientId"),
            "Status": "Confirmed",
        },
    })
}

/// Posts an IntakeQ webhook payload to `url` (the receiver's `/webhooks/intakeq/{token}`),
/// unsigned, as IntakeQ does.
pub async fn send_webhook(
    http: &reqwest::Client,
    url: &str,
    payload: &Value,
) -> Result<reqwest::StatusCode, reqwest::Error> {
    let response = http
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(payload).expect("JSON values serialize"))
        .send()
        .await?;
    Ok(response.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients(n: u64) -> Vec<Value> {
        (1..=n)
            .map(|i| {
                json!({"ClientId": i, "Name": format!("Client {i}"), "Email": format!("c{i}@example.com"),
                       "DateCreated": 1_600_000_000_000i64, "LastUpdateDate": 1_700_000_000_000i64 + i as i64})
            })
            .collect()
    }

    #[tokio::test]
    async fn the_fake_checks_the_key_pages_and_thins_rows() {
        let sb = IntakeqSandbox::new("k", clients(150)).with_limits(1000, 1000);
        let base = sb.serve_for_test().await;
        let http = reqwest::Client::new();
        let r = http.get(format!("{base}/clients")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let page2: Vec<Value> = http
            .get(format!("{base}/clients?page=2"))
            .header("X-Auth-Key", "k")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(page2.len(), 50);
        assert_eq!(page2[0]["ClientNumber"], 101);
        assert!(page2[0].get("ClientId").is_none());
        let found: Vec<Value> = http
            .get(format!("{base}/clients?search=7&IncludeProfile=true"))
            .header("X-Auth-Key", "k")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(found.iter().any(|c| c["ClientId"] == 7));
        assert!(found.len() > 1, "partial matches on names come back too");
        let missing = http
            .get(format!("{base}/clients/7"))
            .header("X-Auth-Key", "k")
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), 404);
        assert!(missing.text().await.unwrap().contains("<html>"));
        assert_eq!(sb.counters().unauthorized, 1);
    }

    #[tokio::test]
    async fn the_fake_answers_429_over_its_per_minute_limit() {
        let sb = IntakeqSandbox::new("k", clients(1)).with_limits(2, 500);
        let base = sb.serve_for_test().await;
        let http = reqwest::Client::new();
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let r = http
                .get(format!("{base}/clients"))
                .header("X-Auth-Key", "k")
                .send()
                .await
                .unwrap();
            assert!(r.headers().get("retry-after").is_none());
            statuses.push(r.status().as_u16());
        }
        assert_eq!(statuses, vec![200, 200, 429]);
        assert_eq!(sb.counters().rate_limited, 1);
    }

    #[tokio::test]
    async fn the_fake_filters_on_update_day_and_deletion_window() {
        let day = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        let at = |s: &str| day(s).and_hms_opt(10, 0, 0).unwrap().and_utc();
        let mut c = clients(3);
        c[0]["LastUpdateDate"] = json!(at("2026-03-01").timestamp_millis());
        c[1]["LastUpdateDate"] = json!(at("2026-03-02").timestamp_millis());
        let sb = IntakeqSandbox::new("k", c).with_limits(1000, 1000);
        sb.set_now(at("2026-03-20"));
        sb.delete_client(3, at("2026-03-15"));
        let gone = json!({"ClientId": 99, "Name": "Old"});
        let sb = sb.with_deleted(vec![(gone, at("2026-03-01"))]);
        let base = sb.serve_for_test().await;
        let http = reqwest::Client::new();
        let get = |q: &'static str| {
            let http = http.clone();
            let base = base.clone();
            async move {
                http.get(format!("{base}/clients?{q}"))
                    .header("X-Auth-Key", "k")
                    .send()
                    .await
                    .unwrap()
                    .json::<Vec<Value>>()
                    .await
                    .unwrap()
            }
        };
        let updated = get("dateUpdatedStart=2026-03-02&includeProfile=true").await;
        assert_eq!(updated.len(), 1);
        assert_eq!(updated[0]["ClientId"], 2);
        let deleted = get("deletedOnly=true").await;
        assert_eq!(
            deleted.len(),
            1,
            "the older deletion is past the 10-day window"
        );
        assert_eq!(deleted[0]["ClientNumber"], 3);
    }
}
