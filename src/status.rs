//! `status [--json]`: what an operator asks first. Inbox counts by source and state, the oldest
//! pending item, dead letters, the review queue, per-source last successful poll and resync,
//! rate budgets left, and patient counts. Read-only; it calls no upstream.
//!
//! `sync_state` streams are read by convention: `daily_budget` holds a source's saved daily
//! request budget, streams starting with `resync` belong to resync (the `resync` row's
//! `last_success_at` is the last completed resync), every other stream is a poll stream.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::app::BUDGET_STREAM;
use crate::config::Settings;
use crate::model::SourceKind;
use crate::sources::http::BudgetSnapshot;
use crate::sources::shared_limit::daily_key;
use crate::store::{now_ms, InboxCount, InboxState, ReviewState, Store, SyncState};

/// The `sync_state` stream whose `last_success_at` is the last completed resync of a source.
pub const RESYNC_STREAM: &str = "resync";

/// What `status` reports.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Inbox items by source and state (only non-zero counts).
    pub inbox: Vec<InboxCount>,
    /// Inbox items by state, over every source (every state listed).
    pub inbox_by_state: BTreeMap<&'static str, i64>,
    /// Age of the oldest pending or leased item; null when there is none.
    pub oldest_pending_age_secs: Option<f64>,
    pub dead_letters: i64,
    /// Open reviews: uncertain pairs waiting for an admin.
    pub review_queue: i64,
    /// Reviews by state (every state listed).
    pub reviews: BTreeMap<&'static str, i64>,
    /// Patients by status, as `[status, count]` pairs.
    pub patients: Vec<(String, i64)>,
    pub patients_total: i64,
    /// Daily request budgets (IntakeQ): as last saved by a process using the key or, with
    /// shared rate limits, as counted for every process when that count is higher.
    pub budgets: Vec<(SourceKind, BudgetSnapshot)>,
    /// One entry per source, enabled or not.
    pub sources: Vec<SourceStatus>,
}

/// One source's sync progress and rate budget.
#[derive(Debug, Serialize)]
pub struct SourceStatus {
    pub source: SourceKind,
    pub enabled: bool,
    /// When every poll stream of the source had completed a pass (the earliest of their last
    /// completions); null until each has completed once.
    pub last_poll_at: Option<DateTime<Utc>>,
    pub poll_streams: Vec<StreamStatus>,
    /// When the last full resync completed; null if none has.
    pub last_resync_at: Option<DateTime<Utc>>,
    pub rate: RateStatus,
}

#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub stream: String,
    pub last_success_at: Option<DateTime<Utc>>,
    /// Last time the stream's cursor moved.
    pub updated_at: DateTime<Utc>,
}

/// The configured client-side quotas, and the daily budget left where the source has one.
#[derive(Debug, Default, Serialize)]
pub struct RateStatus {
    pub requests_per_second: Option<u32>,
    pub burst: Option<u32>,
    pub requests_per_minute: Option<u32>,
    pub max_concurrent_requests: Option<u32>,
    pub requests_per_day: Option<u32>,
    /// Requests left today: the saved budget, or the whole day's when its window has reset
    /// (or nothing was saved yet). Null for sources without a daily budget.
    pub daily_left: Option<u32>,
    pub daily_resets_at: Option<DateTime<Utc>>,
}

fn rate_of(settings: &Settings, source: SourceKind, budget: Option<&BudgetSnapshot>) -> RateStatus {
    let s = &settings.sources;
    match source {
        SourceKind::Healthie => RateStatus {
            requests_per_second: Some(s.healthie.requests_per_second),
            burst: Some(s.healthie.burst),
            ..Default::default()
        },
        SourceKind::Hint => RateStatus {
            requests_per_second: Some(s.hint.requests_per_second),
            max_concurrent_requests: Some(s.hint.max_concurrent_requests),
            ..Default::default()
        },
        SourceKind::Intakeq => {
            let (left, resets) = match budget {
                Some(b) if b.resets_at > Utc::now() => (b.remaining, Some(b.resets_at)),
                _ => (s.intakeq.requests_per_day, None),
            };
            RateStatus {
                requests_per_minute: Some(s.intakeq.requests_per_minute),
                requests_per_day: Some(s.intakeq.requests_per_day),
                daily_left: Some(left),
                daily_resets_at: resets,
                ..Default::default()
            }
        }
    }
}

/// With shared rate limits every process's requests count in `rate_budgets`, while a saved
/// snapshot is one process's view: the fuller count of the current window is what is left.
async fn shared_daily_budget(
    store: &dyn Store,
    settings: &Settings,
    budgets: &mut Vec<(SourceKind, BudgetSnapshot)>,
) -> anyhow::Result<()> {
    let source = SourceKind::Intakeq;
    let Some((end_us, used)) = store.read_rate_budget(&daily_key(source)).await? else {
        return Ok(());
    };
    let Some(resets_at) = DateTime::from_timestamp_micros(end_us).filter(|t| *t > Utc::now())
    else {
        return Ok(());
    };
    let limit = settings.sources.intakeq.requests_per_day;
    let used = u32::try_from(used).unwrap_or(u32::MAX).min(limit);
    let shared = BudgetSnapshot {
        used,
        limit,
        remaining: limit - used,
        resets_at,
    };
    match budgets.iter_mut().find(|(k, _)| *k == source) {
        Some((_, saved)) if saved.resets_at > Utc::now() && saved.used >= shared.used => {}
        Some((_, saved)) => *saved = shared,
        None => budgets.push((source, shared)),
    }
    Ok(())
}

fn enabled(settings: &Settings, source: SourceKind) -> bool {
    match source {
        SourceKind::Healthie => settings.sources.healthie.enabled,
        SourceKind::Intakeq => settings.sources.intakeq.enabled,
        SourceKind::Hint => settings.sources.hint.enabled,
    }
}

fn source_status(
    settings: &Settings,
    source: SourceKind,
    states: &[SyncState],
    budget: Option<&BudgetSnapshot>,
) -> SourceStatus {
    let mine = states.iter().filter(|s| s.source == source);
    let poll_streams: Vec<StreamStatus> = mine
        .clone()
        .filter(|s| s.stream != BUDGET_STREAM && !s.stream.starts_with(RESYNC_STREAM))
        .map(|s| StreamStatus {
            stream: s.stream.clone(),
            last_success_at: s.last_success_at,
            updated_at: s.updated_at,
        })
        .collect();
    let last_poll_at = if poll_streams.is_empty() {
        None
    } else {
        poll_streams
            .iter()
            .map(|s| s.last_success_at)
            .collect::<Option<Vec<_>>>()
            .and_then(|times| times.into_iter().min())
    };
    let last_resync_at = mine
        .clone()
        .find(|s| s.stream == RESYNC_STREAM)
        .and_then(|s| s.last_success_at);
    SourceStatus {
        source,
        enabled: enabled(settings, source),
        last_poll_at,
        poll_streams,
        last_resync_at,
        rate: rate_of(settings, source, budget),
    }
}

/// Reads everything `status` shows from the store and the settings.
pub async fn load_status(store: &dyn Store, settings: &Settings) -> anyhow::Result<Status> {
    let inbox = store.inbox_counts().await?;
    let mut inbox_by_state: BTreeMap<&'static str, i64> =
        InboxState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for c in &inbox {
        *inbox_by_state.entry(c.state.as_str()).or_default() += c.count;
    }
    let dead_letters = inbox_by_state[InboxState::Dead.as_str()];
    let oldest = store.oldest_pending_ms().await?;
    let mut reviews: BTreeMap<&'static str, i64> =
        ReviewState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for (state, n) in store.count_reviews().await? {
        *reviews.entry(state.as_str()).or_default() += n;
    }
    let states = store.list_sync_states().await?;
    let mut budgets = Vec::new();
    for s in states.iter().filter(|s| s.stream == BUDGET_STREAM) {
        if let Some(b) = s
            .cursor
            .as_deref()
            .and_then(|c| serde_json::from_str(c).ok())
        {
            budgets.push((s.source, b));
        }
    }
    if settings.rate_limit.shared {
        shared_daily_budget(store, settings, &mut budgets).await?;
    }
    let sources = SourceKind::ALL
        .into_iter()
        .map(|source| {
            let budget = budgets.iter().find(|(k, _)| *k == source).map(|(_, b)| b);
            source_status(settings, source, &states, budget)
        })
        .collect();
    let patients = store.count_patients().await?;
    Ok(Status {
        inbox,
        inbox_by_state,
        oldest_pending_age_secs: oldest.map(|t| (now_ms() - t).max(0) as f64 / 1000.0),
        dead_letters,
        review_queue: reviews[ReviewState::Open.as_str()],
        reviews,
        patients_total: patients.iter().map(|(_, n)| n).sum(),
        patients,
        budgets,
        sources,
    })
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "never".into())
}

impl Status {
    /// The human-readable form.
    pub fn render_text(&self) -> String {
        let mut out = String::from("inbox:\n");
        if self.inbox.is_empty() {
            out.push_str("  (empty)\n");
        }
        for c in &self.inbox {
            out.push_str(&format!(
                "  {:<9} {:<8} {}\n",
                c.source.as_str(),
                c.state.as_str(),
                c.count
            ));
        }
        match self.oldest_pending_age_secs {
            Some(age) => out.push_str(&format!("oldest pending: {age:.1}s\n")),
            None => out.push_str("oldest pending: none\n"),
        }
        out.push_str(&format!("dead letters: {}\n", self.dead_letters));
        out.push_str(&format!(
            "review queue: {} open ({} accepted, {} rejected)\n",
            self.review_queue,
            self.reviews.get("accepted").unwrap_or(&0),
            self.reviews.get("rejected").unwrap_or(&0)
        ));
        out.push_str("sources:\n");
        for s in &self.sources {
            if !s.enabled && s.poll_streams.is_empty() && s.last_resync_at.is_none() {
                out.push_str(&format!("  {:<9} disabled\n", s.source.as_str()));
                continue;
            }
            out.push_str(&format!(
                "  {:<9} {}last poll {}, last resync {}\n",
                s.source.as_str(),
                if s.enabled { "" } else { "(disabled) " },
                time(s.last_poll_at),
                time(s.last_resync_at)
            ));
            let r = &s.rate;
            let mut quota = Vec::new();
            if let Some(n) = r.requests_per_second {
                quota.push(format!("{n}/s"));
            }
            if let Some(n) = r.burst {
                quota.push(format!("burst {n}"));
            }
            if let Some(n) = r.requests_per_minute {
                quota.push(format!("{n}/min"));
            }
            if let Some(n) = r.max_concurrent_requests {
                quota.push(format!("{n} concurrent"));
            }
            if let (Some(left), Some(day)) = (r.daily_left, r.requests_per_day) {
                let spent = if left == 0 {
                    " (spent: work waits for the reset)"
                } else {
                    ""
                };
                quota.push(format!(
                    "{left} of {day} left today{}{spent}",
                    r.daily_resets_at
                        .map(|t| format!(", resets {}", time(Some(t))))
                        .unwrap_or_default()
                ));
            }
            out.push_str(&format!("            rate: {}\n", quota.join(", ")));
        }
        out.push_str(&format!("patients: {}\n", self.patients_total));
        for (status, n) in &self.patients {
            out.push_str(&format!("  {status:<9} {n}\n"));
        }
        out
    }
}
