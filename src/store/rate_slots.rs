//! The store as the home of shared rate limits ([`RateSlots`]): tables `rate_slots` and
//! `rate_budgets`, one short write per reservation.

use std::sync::Arc;

use async_trait::async_trait;

use super::Store;
use crate::sources::shared_limit::{RateSlots, SlotError};

/// Shared rate limits kept in `store`.
#[derive(Clone)]
pub struct StoreRateSlots(pub Arc<dyn Store>);

#[async_trait]
impl RateSlots for StoreRateSlots {
    async fn reserve(&self, key: &str, now_us: i64, interval_us: i64) -> Result<i64, SlotError> {
        Ok(self.0.reserve_rate_slot(key, now_us, interval_us).await?)
    }

    async fn defer(&self, key: &str, at_us: i64) -> Result<(), SlotError> {
        Ok(self.0.defer_rate_slots(key, at_us).await?)
    }

    async fn take_daily(
        &self,
        key: &str,
        window_end_us: i64,
        limit: u32,
        keep: u32,
    ) -> Result<Option<u32>, SlotError> {
        let used = self
            .0
            .take_rate_budget(key, window_end_us, i64::from(limit), i64::from(keep))
            .await?;
        Ok(used.map(|u| u32::try_from(u).unwrap_or(u32::MAX)))
    }
}
