//! Identity resolution and the golden record: pure functions from stored source records to
//! match decisions and canonical rows. No IO, no async, no clock, no logging; the same input
//! gives the same output.
//!
//! - [`normalize`]: matching-grade forms of names, emails, phones, addresses, sex, and the
//!   placeholder values that carry no weight.

pub mod normalize;

pub use normalize::{normalize_email, phone_e164};
