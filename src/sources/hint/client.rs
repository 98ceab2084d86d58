//! Hint REST calls (reference B1-B3), all through the shared [`Upstream`]: `Authorization:
//! Bearer <practice key>`, `GET /api/provider/patients` (bare JSON array, `limit` <= 100,
//! `offset`, `x-total-count`, `filter=all` so archived patients are listed too) and
//! `GET /api/provider/patients/{id}`. Detail fetches are capped at `max_concurrent_requests`
//! in flight (Hint's detail endpoints rate-limit aggressively beyond about 3); list calls are
//! only spaced by the per-second limiter.

use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::config::Secret;
use crate::sources::http::{FetchError, RawResponse, Upstream};

/// One `GET /api/provider/patients` request (always `filter=all`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatientQuery {
    pub offset: u32,
    pub limit: u32,
    /// `sort=<field>` (`-` in front for descending).
    pub sort: Option<&'static str>,
    /// `updated_at[gte]=<instant>`.
    pub updated_since: Option<DateTime<Utc>>,
}

/// One page of patients.
#[derive(Debug, Clone, PartialEq)]
pub struct PatientPage {
    pub rows: Vec<Value>,
    /// `x-total-count`, when Hint sent it.
    pub total: Option<u64>,
}

/// Hint's HTTP client for one practice key.
pub struct HintClient {
    upstream: Upstream,
    patients_url: String,
    api_key: Secret,
    detail_permits: Semaphore,
    max_concurrent: usize,
}

impl HintClient {
    pub fn new(base_url: &str, api_key: Secret, max_concurrent: u32, upstream: Upstream) -> Self {
        let max_concurrent = max_concurrent.max(1) as usize;
        Self {
            upstream,
            patients_url: format!("{}/api/provider/patients", base_url.trim_end_matches('/')),
            api_key,
            detail_permits: Semaphore::new(max_concurrent),
            max_concurrent,
        }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// How many detail fetches may be in flight at once.
    pub fn max_concurrent(&self) -> usize {
        self.max_concurrent
    }

    pub async fn fetch_patients(&self, query: &PatientQuery) -> Result<PatientPage, FetchError> {
        let mut params: Vec<(&str, String)> = vec![
            ("filter", "all".into()),
            (
                "limit",
                query.limit.clamp(1, super::wire::MAX_LIMIT).to_string(),
            ),
            ("offset", query.offset.to_string()),
        ];
        if let Some(sort) = query.sort {
            params.push(("sort", sort.into()));
        }
        if let Some(since) = query.updated_since {
            params.push((
                "updated_at[gte]",
                since.to_rfc3339_opts(SecondsFormat::Micros, true),
            ));
        }
        let url = &self.patients_url;
        let response = self
            .upstream
            .execute(
                |http| self.authorized(http.get(url).query(&params)),
                |_| Ok(()),
            )
            .await?;
        if response.status == reqwest::StatusCode::NOT_FOUND {
            return Err(FetchError::Rejected {
                kind: "not_found",
                status: Some(404),
            });
        }
        let rows = match serde_json::from_slice::<Value>(&response.body) {
            Ok(Value::Array(rows)) => rows,
            _ => {
                return Err(FetchError::Decode {
                    what: "hint patient list",
                })
            }
        };
        Ok(PatientPage {
            rows,
            total: total_count(&response),
        })
    }

    /// One patient by id (`pat-…`, or our `integration_record_id`); `None` on 404.
    pub async fn fetch_patient(&self, id: &str) -> Result<Option<Value>, FetchError> {
        let mut url =
            reqwest::Url::parse(&self.patients_url).map_err(|_| FetchError::Rejected {
                kind: "invalid_base_url",
                status: None,
            })?;
        url.path_segments_mut()
            .map_err(|_| FetchError::Rejected {
                kind: "invalid_base_url",
                status: None,
            })?
            .push(id);
        let _permit = self
            .detail_permits
            .acquire()
            .await
            .expect("semaphore is never closed");
        let response = self
            .upstream
            .execute(|http| self.authorized(http.get(url.clone())), |_| Ok(()))
            .await?;
        if response.status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        match serde_json::from_slice::<Value>(&response.body) {
            Ok(v @ Value::Object(_)) => Ok(Some(v)),
            _ => Err(FetchError::Decode {
                what: "hint patient",
            }),
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request
            .header(AUTHORIZATION, format!("Bearer {}", self.api_key.expose()))
            .header(ACCEPT, "application/json")
    }
}

fn total_count(response: &RawResponse) -> Option<u64> {
    response
        .headers
        .get("x-total-count")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
