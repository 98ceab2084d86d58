//! Identity resolution and the golden record: pure functions from stored source records to
//! match decisions and canonical rows. No IO, no async, deterministic.
