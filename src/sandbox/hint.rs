//! A fake Hint provider API (reference Part B), backed by an in-memory list of patients in
//! Hint's own shape (`pat-…` ids, ISO timestamps with offsets, `phones[]`, `merged_into`).
//!
//! The router is path-relative (`/api/provider/patients`); mount it under `/hint` and point
//! `sources.hint.base_url` there. It serves:
//! - `Authorization: Bearer <practice key>` (401 `{"status":401,…}` otherwise; the partner key,
//!   when configured, gets 428 "This action requires a Practice");
//! - 20 requests a second by default, then 429 `{"status":429,"message":"Enhance your calm"}`
//!   without `Retry-After`;
//! - `GET /api/provider/patients`: a bare JSON array with `x-count` and `x-total-count`;
//!   `limit` (default 10, at most 100), `offset`, `filter` (archived patients only with
//!   `archived`, both with `all`, otherwise excluded), `sort` (one field, `-` for descending),
//!   `updated_at`/`created_at` ranges in the bracket form (`updated_at[gt]=…`, `gte`, `lt`,
//!   `lte`) and the JSON form (`updated_at={"gt":"…"}`), exact case-insensitive `first_name`,
//!   `last_name`, `email`;
//! - `GET /api/provider/patients/{id}` by `pat-…` id or `integration_record_id`, 404 otherwise.
//!
//! Switches reproduce the open questions: the `updated_at` filter or the sort ignored, a cap
//! on concurrent detail fetches (with an artificial latency so overlaps can happen), forced
//! 429s. Also: webhook envelopes and a sender signing them with `X-Hint-Signature`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// Request counts since the fake started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HintCounters {
    pub requests: u64,
    pub rate_limited: u64,
    pub unauthorized: u64,
    /// The most detail fetches seen in flight at once.
    pub max_detail_in_flight: u64,
}

/// The fake Hint. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct HintSandbox {
    inner: Arc<Inner>,
}

struct Inner {
    api_key: String,
    state: Mutex<Data>,
    requests: AtomicU64,
    rate_limited: AtomicU64,
    unauthorized: AtomicU64,
    max_detail_in_flight: AtomicU64,
    detail_in_flight: AtomicU64,
}

struct Data {
    patients: Vec<Value>,
    partner_key: Option<String>,
    per_second: u32,
    window: VecDeque<Instant>,
    forced_429s: u32,
    ignore_updated_filter: bool,
    ignore_sort: bool,
    detail_limit: Option<u64>,
    detail_latency: Duration,
    /// Bumped on every change to `patients`.
    generation: u64,
    /// The last listing's filtered and sorted positions, for the next page of the same query.
    listing: Option<Listing>,
}

/// A listing's rows (positions in `patients`) for one query (without `limit` and `offset`) at
/// one generation, so paging through 20,000 patients does not filter and sort on every page.
struct Listing {
    generation: u64,
    query: Vec<(String, String)>,
    rows: Arc<Vec<usize>>,
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        Json(json!({"status": status.as_u16(), "message": message})),
    )
        .into_response()
}

/// An error answer in Hint's envelope, `{"status": …, "message": …}`.
struct ApiError(StatusCode, &'static str);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

impl HintSandbox {
    /// A fake answering to the practice key `api_key`, holding `patients`.
    pub fn new(api_key: impl Into<String>, patients: Vec<Value>) -> Self {
        Self {
            inner: Arc::new(Inner {
                api_key: api_key.into(),
                state: Mutex::new(Data {
                    patients,
                    partner_key: None,
                    per_second: 20,
                    window: VecDeque::new(),
                    forced_429s: 0,
                    ignore_updated_filter: false,
                    ignore_sort: false,
                    detail_limit: None,
                    detail_latency: Duration::ZERO,
                    generation: 0,
                    listing: None,
                }),
                requests: AtomicU64::new(0),
                rate_limited: AtomicU64::new(0),
                unauthorized: AtomicU64::new(0),
                max_detail_in_flight: AtomicU64::new(0),
                detail_in_flight: AtomicU64::new(0),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Data> {
        self.inner.state.lock().expect("sandbox lock")
    }

    /// Requests allowed per second (default 20).
    pub fn with_rate_limit(self, per_second: u32) -> Self {
        self.state().per_second = per_second;
        self
    }

    /// A partner key that `/api/provider/*` refuses with 428.
    pub fn with_partner_key(self, key: impl Into<String>) -> Self {
        self.state().partner_key = Some(key.into());
        self
    }

    /// Ignore `updated_at` ranges, as a server that does not support them would.
    pub fn ignoring_updated_at_filter(self) -> Self {
        {
            let mut s = self.state();
            s.ignore_updated_filter = true;
            s.generation += 1;
        }
        self
    }

    /// Ignore `sort`, listing in insertion order.
    pub fn ignoring_sort(self) -> Self {
        {
            let mut s = self.state();
            s.ignore_sort = true;
            s.generation += 1;
        }
        self
    }

    /// Answer 429 to detail fetches beyond `limit` in flight; each takes `latency`.
    pub fn with_detail_limit(self, limit: u64, latency: Duration) -> Self {
        {
            let mut s = self.state();
            s.detail_limit = Some(limit);
            s.detail_latency = latency;
        }
        self
    }

    /// Answer the next `n` requests with 429 `Enhance your calm`.
    pub fn fail_next_with_429(&self, n: u32) {
        self.state().forced_429s = n;
    }

    /// Adds a patient or replaces the one with the same id.
    pub fn upsert_patient(&self, patient: Value) {
        let mut s = self.state();
        s.generation += 1;
        let id = patient.get("id").cloned();
        match s.patients.iter_mut().find(|p| p.get("id") == id.as_ref()) {
            Some(existing) => *existing = patient,
            None => s.patients.push(patient),
        }
    }

    /// Removes a patient (as `DELETE` would) and returns it, for a `patient.destroyed` event.
    pub fn delete_patient(&self, id: &str) -> Option<Value> {
        let mut s = self.state();
        s.generation += 1;
        let i = s.patients.iter().position(|p| p["id"] == id)?;
        Some(s.patients.remove(i))
    }

    pub fn patients(&self) -> Vec<Value> {
        self.state().patients.clone()
    }

    pub fn counters(&self) -> HintCounters {
        HintCounters {
            requests: self.inner.requests.load(Ordering::Relaxed),
            rate_limited: self.inner.rate_limited.load(Ordering::Relaxed),
            unauthorized: self.inner.unauthorized.load(Ordering::Relaxed),
            max_detail_in_flight: self.inner.max_detail_in_flight.load(Ordering::Relaxed),
        }
    }

    /// The router, with paths relative to the host (`/api/provider/patients`).
    /// Serves this fake under `/hint` on a loopback port for a unit test; returns its base url.
    #[cfg(test)]
    pub(crate) async fn serve_for_test(&self) -> String {
        let base = super::serve_for_test(Router::new().nest("/hint", self.router())).await;
        format!("{base}/hint")
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/provider/patients", get(list_patients))
            .route("/api/provider/patients/{id}", get(show_patient))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "Not Found") })
            .with_state(self.clone())
    }

    /// Counts the request and checks the key and the rate limit.
    fn admit(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let mut s = self.state();
        if token.is_some() && token == s.partner_key.as_deref() {
            return Err(ApiError(
                StatusCode::PRECONDITION_REQUIRED,
                "This action requires a Practice",
            ));
        }
        if token != Some(self.inner.api_key.as_str()) {
            self.inner.unauthorized.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError(StatusCode::UNAUTHORIZED, "Unauthorized"));
        }
        let now = Instant::now();
        while s
            .window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            s.window.pop_front();
        }
        if s.forced_429s > 0 || s.window.len() >= s.per_second as usize {
            s.forced_429s = s.forced_429s.saturating_sub(1);
            self.inner.rate_limited.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError(StatusCode::TOO_MANY_REQUESTS, "Enhance your calm"));
        }
        s.window.push_back(now);
        Ok(())
    }
}

fn timestamp(v: &Value, field: &str) -> Option<DateTime<Utc>> {
    v.get(field)
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// A time range on one field: `(op, bound)` pairs.
type Range = Vec<(String, DateTime<Utc>)>;

fn parse_range(params: &[(String, String)], field: &str) -> Result<Range, ApiError> {
    let bad = || ApiError(StatusCode::BAD_REQUEST, "Invalid filter");
    let time = |s: &str| {
        DateTime::parse_from_rfc3339(s.trim())
            .map(|t| t.with_timezone(&Utc))
            .map_err(|_| bad())
    };
    let mut range = Range::new();
    for (k, v) in params {
        if let Some(op) = k
            .strip_prefix(field)
            .and_then(|rest| rest.strip_prefix('['))
            .and_then(|rest| rest.strip_suffix(']'))
        {
            range.push((op.to_string(), time(v)?));
        } else if k == field {
            let Ok(Value::Object(ops)) = serde_json::from_str::<Value>(v) else {
                return Err(bad());
            };
            for (op, bound) in ops {
                range.push((op, time(bound.as_str().ok_or_else(bad)?)?));
            }
        }
    }
    if range
        .iter()
        .any(|(op, _)| !matches!(op.as_str(), "gt" | "gte" | "lt" | "lte"))
    {
        return Err(bad());
    }
    Ok(range)
}

fn in_range(t: Option<DateTime<Utc>>, range: &Range) -> bool {
    range.iter().all(|(op, bound)| match t {
        None => false,
        Some(t) => match op.as_str() {
            "gt" => t > *bound,
            "gte" => t >= *bound,
            "lt" => t < *bound,
            _ => t <= *bound,
        },
    })
}

/// The positions of the patients a listing query selects, in its order.
fn listing_rows(
    s: &Data,
    get: &dyn Fn(&str) -> Option<String>,
    updated: &Range,
    created: &Range,
) -> Vec<usize> {
    let filter = get("filter");
    let mut rows: Vec<(usize, &Value)> = s
        .patients
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            let archived = p["membership_status"] == "archived";
            match filter.as_deref() {
                Some("all") => true,
                Some("archived") => archived,
                _ => !archived,
            }
        })
        .filter(|(_, p)| s.ignore_updated_filter || in_range(timestamp(p, "updated_at"), updated))
        .filter(|(_, p)| in_range(timestamp(p, "created_at"), created))
        .filter(|(_, p)| {
            ["first_name", "last_name", "email"]
                .iter()
                .all(|f| match get(f) {
                    None => true,
                    Some(want) => p[*f]
                        .as_str()
                        .is_some_and(|have| have.eq_ignore_ascii_case(&want)),
                })
        })
        .collect();
    if let (Some(sort), false) = (get("sort"), s.ignore_sort) {
        let (field, descending) = match sort.strip_prefix('-') {
            Some(f) => (f.to_string(), true),
            None => (sort.clone(), false),
        };
        let key = |p: &Value| -> (String, String) {
            let v = match timestamp(p, &field) {
                Some(t) => t.to_rfc3339_opts(SecondsFormat::Micros, true),
                None => match &p[&field[..]] {
                    Value::String(s) => s.to_lowercase(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                },
            };
            (v, p["id"].as_str().unwrap_or_default().to_string())
        };
        // Keys are built once per row, not once per comparison.
        rows.sort_by_cached_key(|(_, p)| key(p));
        if descending {
            rows.reverse();
        }
    }
    rows.into_iter().map(|(i, _)| i).collect()
}

async fn list_patients(
    State(sb): State<HintSandbox>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    if let Err(e) = sb.admit(&headers) {
        return e.into_response();
    }
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim().to_string())
    };
    let number = |name: &str, default: usize| -> Result<usize, ApiError> {
        match get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError(StatusCode::BAD_REQUEST, "Invalid pagination")),
        }
    };
    let limit = match number("limit", 10) {
        Ok(l) => l.clamp(1, 100),
        Err(e) => return e.into_response(),
    };
    let offset = match number("offset", 0) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let (updated, created) = match (
        parse_range(&params, "updated_at"),
        parse_range(&params, "created_at"),
    ) {
        (Ok(u), Ok(c)) => (u, c),
        (Err(e), _) | (_, Err(e)) => return e.into_response(),
    };
    let mut guard = sb.state();
    let mut query: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "limit" && k != "offset")
        .cloned()
        .collect();
    query.sort();
    let cached = guard
        .listing
        .as_ref()
        .filter(|l| l.generation == guard.generation && l.query == query)
        .map(|l| l.rows.clone());
    let rows = match cached {
        Some(rows) => rows,
        None => {
            let rows = Arc::new(listing_rows(&guard, &get, &updated, &created));
            guard.listing = Some(Listing {
                generation: guard.generation,
                query,
                rows: rows.clone(),
            });
            rows
        }
    };
    let s = &*guard;
    let total = rows.len();
    let page: Vec<Value> = rows
        .iter()
        .skip(offset)
        .take(limit)
        .map(|&i| s.patients[i].clone())
        .collect();
    let mut response = Json(&page).into_response();
    let h = response.headers_mut();
    h.insert("x-count", HeaderValue::from(page.len()));
    h.insert("x-total-count", HeaderValue::from(total));
    response
}

async fn show_patient(
    State(sb): State<HintSandbox>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = sb.admit(&headers) {
        return e.into_response();
    }
    let (limit, latency) = {
        let s = sb.state();
        (s.detail_limit, s.detail_latency)
    };
    let in_flight = sb.inner.detail_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    sb.inner
        .max_detail_in_flight
        .fetch_max(in_flight, Ordering::SeqCst);
    let response = if limit.is_some_and(|l| in_flight > l) {
        sb.inner.rate_limited.fetch_add(1, Ordering::Relaxed);
        error(StatusCode::TOO_MANY_REQUESTS, "Enhance your calm")
    } else {
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let s = sb.state();
        match s
            .patients
            .iter()
            .find(|p| p["id"] == id.as_str() || p["integration_record_id"] == id.as_str())
        {
            Some(p) => Json(p.clone()).into_response(),
            None => error(StatusCode::NOT_FOUND, "Not Found"),
        }
    };
    sb.inner.detail_in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

/// A webhook envelope: `{id: "evt-…", type, practice_id, created_at, object}`.
pub fn event(event_type: &str, object: Value) -> Value {
    json!({
        "id": format!("evt-{}", &uuid::Uuid::new_v4().simple().to_string()[..16]),
        "type": event_type,
        "practice_id": "pra-sandbox",
        "created_at": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true),
        "object": object,
    })
}

/// `sha256=<hex>` HMAC-SHA256 of the raw body, the `X-Hint-Signature` header value.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts a webhook event to `url` (the receiver's `/webhooks/hint`), signed with `secret`.
pub async fn send_webhook(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    event: &Value,
) -> Result<reqwest::StatusCode, reqwest::Error> {
    let body = serde_json::to_vec(event).expect("JSON values serialize");
    let response = http
        .post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .header("X-Hint-Signature", signature(secret, &body))
        .body(body)
        .send()
        .await?;
    Ok(response.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patients() -> Vec<Value> {
        vec![
            json!({"id": "pat-a", "membership_status": "active", "updated_at": "2026-01-03T00:00:00.000000-08:00", "created_at": "2020-01-01T00:00:00Z", "integration_record_id": "emr-1"}),
            json!({"id": "pat-b", "membership_status": "archived", "updated_at": "2026-01-01T00:00:00.000000-08:00", "created_at": "2020-01-01T00:00:00Z"}),
            json!({"id": "pat-c", "membership_status": "active", "updated_at": "2026-01-02T00:00:00.000000-08:00", "created_at": "2020-01-01T00:00:00Z"}),
        ]
    }

    #[tokio::test]
    async fn the_fake_filters_sorts_pages_and_counts() {
        let sb = HintSandbox::new("k", patients()).with_rate_limit(1000);
        let base = sb.serve_for_test().await;
        let http = reqwest::Client::new();
        let get = |q: &str| {
            http.get(format!("{base}/api/provider/patients?{q}"))
                .bearer_auth("k")
                .send()
        };
        let r = get("").await.unwrap();
        assert_eq!(r.headers()["x-total-count"], "2", "archived left out");
        let r = get("filter=all&sort=updated_at&limit=2").await.unwrap();
        assert_eq!(r.headers()["x-total-count"], "3");
        assert_eq!(r.headers()["x-count"], "2");
        let ids: Vec<Value> = r.json().await.unwrap();
        assert_eq!(ids[0]["id"], "pat-b");
        assert_eq!(ids[1]["id"], "pat-c");
        let r = get("filter=all&updated_at[gt]=2026-01-02T08:00:00Z")
            .await
            .unwrap();
        let rows: Vec<Value> = r.json().await.unwrap();
        assert_eq!(rows.len(), 1);
        let r = get("filter=all&updated_at=%7B%22gte%22%3A%222026-01-02T08%3A00%3A00Z%22%7D")
            .await
            .unwrap();
        let rows: Vec<Value> = r.json().await.unwrap();
        assert_eq!(rows.len(), 2, "JSON form");
        let one = http
            .get(format!("{base}/api/provider/patients/emr-1"))
            .bearer_auth("k")
            .send()
            .await
            .unwrap();
        assert_eq!(one.json::<Value>().await.unwrap()["id"], "pat-a");
    }

    #[tokio::test]
    async fn the_fake_refuses_bad_keys_and_calms_fast_callers() {
        let sb = HintSandbox::new("k", patients())
            .with_rate_limit(2)
            .with_partner_key("partner");
        let base = sb.serve_for_test().await;
        let http = reqwest::Client::new();
        let url = format!("{base}/api/provider/patients");
        let r = http.get(&url).bearer_auth("nope").send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = http.get(&url).bearer_auth("partner").send().await.unwrap();
        assert_eq!(r.status(), 428);
        let mut last = None;
        for _ in 0..3 {
            last = Some(http.get(&url).bearer_auth("k").send().await.unwrap());
        }
        let last = last.unwrap();
        assert_eq!(last.status(), 429);
        assert!(last.headers().get("retry-after").is_none());
        assert_eq!(
            last.json::<Value>().await.unwrap(),
            json!({"status": 429, "message": "Enhance your calm"})
        );
    }

    #[test]
    fn signatures_are_hmac_sha256_hex_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let e = event("patient.updated", json!({"id": "pat-1"}));
        assert!(e["id"].as_str().unwrap().starts_with("evt-"));
        assert_eq!(e["object"]["id"], "pat-1");
    }
}
