//! Getting data in and through: the worker loop, pollers, resync, rebuild and import.

pub mod poll;

pub mod apply;
pub mod worker;
