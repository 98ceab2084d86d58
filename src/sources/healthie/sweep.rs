//! Healthie's safety sweep: Healthie has no "changed since" filter and can disable webhooks
//! after days of failed deliveries, so the poller walks `users` newest-updated first and queues a
//! refetch of every patient changed since the last complete pass. Active and archived patients
//! are separate streams (whether `users` returns archived patients without `active_status` is
//! undocumented).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::sources::healthie::client::{ActiveStatus, UserOrder, UserPage};
use crate::sources::{PollItem, PollPage};

/// Users per sweep page (ids and `updated_at` only: complexity 5 + 4 × 100).
pub const SWEEP_PAGE_SIZE: u32 = 100;

/// Sweep progress, stored as the stream's cursor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SweepCursor {
    /// Changes at or before this time were seen by a complete pass.
    pub watermark: Option<DateTime<Utc>>,
    /// Page cursor within the current pass.
    pub after: Option<String>,
    /// Newest `updated_at` seen in the current pass: the next watermark.
    pub pass_newest: Option<DateTime<Utc>>,
}

pub fn stream_status(stream: &str) -> Option<ActiveStatus> {
    match stream {
        "active" => Some(ActiveStatus::Active),
        "archived" => Some(ActiveStatus::Archived),
        _ => None,
    }
}

pub fn order() -> UserOrder {
    UserOrder::UpdatedAtDesc
}

/// Reads a stored cursor; an unreadable one starts a fresh pass.
pub fn parse_cursor(cursor: Option<&str>) -> SweepCursor {
    cursor
        .and_then(|c| serde_json::from_str(c).ok())
        .unwrap_or_default()
}

/// Turns one page into poll items and the next cursor. The pass ends at the first user not newer
/// than the watermark (pages are newest first) or at the last page.
pub fn next_page(mut cursor: SweepCursor, page: UserPage) -> PollPage {
    let mut items = Vec::new();
    let mut reached_watermark = false;
    for user in page.users {
        let newer = match (user.updated_at, cursor.watermark) {
            (Some(updated), Some(watermark)) => updated > watermark,
            _ => true,
        };
        if !newer {
            reached_watermark = true;
            break;
        }
        if let Some(updated) = user.updated_at {
            cursor.pass_newest = cursor.pass_newest.max(Some(updated));
        }
        items.push(PollItem::Changed(user.id));
    }
    let complete = reached_watermark || !page.has_next_page || page.end_cursor.is_none();
    if complete {
        cursor.watermark = cursor.pass_newest.take().max(cursor.watermark);
        cursor.after = None;
    } else {
        cursor.after = page.end_cursor;
    }
    PollPage {
        items,
        next_cursor: serde_json::to_string(&cursor).ok(),
        complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SourceId;
    use crate::sources::healthie::client::UserSummary;
    use chrono::TimeZone;

    fn user(id: &str, secs: i64) -> UserSummary {
        UserSummary {
            id: SourceId::from(id),
            updated_at: Some(Utc.timestamp_opt(secs, 0).unwrap()),
            active: true,
        }
    }

    fn page(users: Vec<UserSummary>, next: Option<&str>) -> UserPage {
        UserPage {
            users,
            end_cursor: next.map(str::to_string),
            has_next_page: next.is_some(),
            total_count: 0,
        }
    }

    #[test]
    fn a_first_pass_queues_everyone_and_sets_the_watermark() {
        let p1 = next_page(
            SweepCursor::default(),
            page(vec![user("3", 30), user("2", 20)], Some("c1")),
        );
        assert!(!p1.complete);
        assert_eq!(p1.items.len(), 2);
        let c1 = parse_cursor(p1.next_cursor.as_deref());
        assert_eq!(c1.after.as_deref(), Some("c1"));
        let p2 = next_page(c1, page(vec![user("1", 10)], None));
        assert!(p2.complete);
        let c2 = parse_cursor(p2.next_cursor.as_deref());
        assert_eq!(c2.watermark, Some(Utc.timestamp_opt(30, 0).unwrap()));
        assert_eq!(c2.after, None);
    }

    #[test]
    fn a_later_pass_stops_at_the_watermark() {
        let cursor = SweepCursor {
            watermark: Some(Utc.timestamp_opt(30, 0).unwrap()),
            ..Default::default()
        };
        let p = next_page(
            cursor,
            page(vec![user("4", 40), user("3", 30), user("2", 20)], Some("c")),
        );
        assert!(p.complete);
        assert_eq!(p.items, vec![PollItem::Changed(SourceId::from("4"))]);
        let c = parse_cursor(p.next_cursor.as_deref());
        assert_eq!(c.watermark, Some(Utc.timestamp_opt(40, 0).unwrap()));
    }

    #[test]
    fn an_unchanged_source_keeps_its_watermark() {
        let cursor = SweepCursor {
            watermark: Some(Utc.timestamp_opt(30, 0).unwrap()),
            ..Default::default()
        };
        let p = next_page(cursor.clone(), page(vec![user("3", 30)], None));
        assert!(p.items.is_empty());
        assert_eq!(
            parse_cursor(p.next_cursor.as_deref()).watermark,
            cursor.watermark
        );
    }
}
