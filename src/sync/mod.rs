//! Getting data in and through: the worker loop, pollers, resync, rebuild and import.

pub mod poll;

pub mod admin;
pub mod apply;
pub mod apply_batch;
pub mod import;
pub mod rebuild;
pub mod resync;
pub mod worker;
