//! IntakeQ REST calls (reference A1-A3), all through the shared [`Upstream`]: `X-Auth-Key`
//! auth, `GET /clients` listing (100 per page, 1-based pages, no total), and one client by
//! `GET /clients?search=<ClientId>&includeProfile=true` keeping the exact `ClientId` match.
//!
//! `search` with a numeric id is the documented way to read one client (\[V\] article 251);
//! `/clients/profile/{id}` comes only from the stale official client and is an open question,
//! and `/clients/{id}` does not exist, so neither is used.

use std::sync::atomic::{AtomicBool, Ordering};

use chrono::NaiveDate;
use reqwest::header::ACCEPT;
use serde_json::Value;

use super::wire;
use crate::config::Secret;
use crate::sources::http::{FetchError, RawResponse, Upstream};

/// One `GET /clients` request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientQuery {
    /// 1-based page.
    pub page: u32,
    pub search: Option<String>,
    /// `dateUpdatedStart=yyyy-MM-dd` (day granularity).
    pub date_updated_start: Option<NaiveDate>,
    pub deleted_only: bool,
    /// Ask for full profiles (`includeProfile=true`).
    pub profile: bool,
}

/// IntakeQ's HTTP client for one API key.
pub struct IntakeqClient {
    upstream: Upstream,
    clients_url: String,
    api_key: Secret,
    /// Set once the lowercase `includeProfile` came back without profiles: from then on the
    /// documented capitalised `IncludeProfile` is sent.
    capitalized_profile_param: AtomicBool,
}

impl IntakeqClient {
    pub fn new(base_url: &str, api_key: Secret, upstream: Upstream) -> Self {
        Self {
            upstream,
            clients_url: format!("{}/clients", base_url.trim_end_matches('/')),
            api_key,
            capitalized_profile_param: AtomicBool::new(false),
        }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// One page of `GET /clients`. When profiles were asked for but rows come back thin
    /// (`ClientNumber`, no `ClientId`), the page is asked again with the other spelling of
    /// `includeProfile` (reference A2 ⚠), which is then kept. Rows may still be thin when
    /// neither spelling works; callers check [`wire::has_profile`].
    pub async fn fetch_clients(&self, query: &ClientQuery) -> Result<Vec<Value>, FetchError> {
        let capitalized = self.capitalized_profile_param.load(Ordering::Relaxed);
        let rows = self.send(query, capitalized).await?;
        if query.profile && rows.iter().any(|r| !wire::has_profile(r)) {
            tracing::warn!(
                source = "intakeq",
                capitalized,
                "client list came back without profiles; retrying with the other includeProfile spelling"
            );
            let retried = self.send(query, !capitalized).await?;
            if retried.iter().all(wire::has_profile) {
                self.capitalized_profile_param
                    .store(!capitalized, Ordering::Relaxed);
                return Ok(retried);
            }
            return Ok(rows);
        }
        Ok(rows)
    }

    /// The full profile of one client, or `None` when IntakeQ does not show it (unknown or
    /// deleted). `id` must be a numeric `ClientId`.
    pub async fn fetch_client(&self, id: &str) -> Result<Option<Value>, FetchError> {
        let rows = self
            .fetch_clients(&ClientQuery {
                page: 1,
                search: Some(id.to_string()),
                profile: true,
                ..ClientQuery::default()
            })
            .await?;
        match rows
            .into_iter()
            .find(|row| wire::client_id(row).as_deref() == Some(id))
        {
            Some(row) if wire::has_profile(&row) => Ok(Some(row)),
            Some(_) => Err(FetchError::Decode {
                what: "intakeq client without profile fields",
            }),
            None => Ok(None),
        }
    }

    async fn send(&self, query: &ClientQuery, capitalized: bool) -> Result<Vec<Value>, FetchError> {
        let mut params: Vec<(&str, String)> = Vec::new();
        if let Some(search) = &query.search {
            params.push(("search", search.clone()));
        }
        if query.profile {
            let name = if capitalized {
                "IncludeProfile"
            } else {
                "includeProfile"
            };
            params.push((name, "true".into()));
        }
        if let Some(day) = query.date_updated_start {
            params.push(("dateUpdatedStart", day.format("%Y-%m-%d").to_string()));
        }
        if query.deleted_only {
            params.push(("deletedOnly", "true".into()));
        }
        params.push(("page", query.page.max(1).to_string()));
        let url = &self.clients_url;
        let key = self.api_key.expose();
        let response = self
            .upstream
            .execute(
                |http| {
                    http.get(url)
                        .query(&params)
                        .header("X-Auth-Key", key)
                        .header(ACCEPT, "application/json")
                },
                |_| Ok(()),
            )
            .await?;
        decode_list(&response)
    }
}

/// A list answer: a JSON array. A 404 here is an error (the HTML "page not found" IntakeQ
/// serves for wrong paths), not an empty list.
fn decode_list(response: &RawResponse) -> Result<Vec<Value>, FetchError> {
    if response.status == reqwest::StatusCode::NOT_FOUND {
        return Err(FetchError::Rejected {
            kind: "not_found",
            status: Some(404),
        });
    }
    match serde_json::from_slice::<Value>(&response.body) {
        Ok(Value::Array(rows)) => Ok(rows),
        Ok(Value::Null) => Ok(Vec::new()),
        _ => Err(FetchError::Decode {
            what: "intakeq client list",
        }),
    }
}
