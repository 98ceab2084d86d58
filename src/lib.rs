//! patient-sync keeps one canonical patient table in step with Healthie, IntakeQ and Hint
//! Health. See `ARCHITECTURE.md` for the map of modules.

pub mod alloc;
pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod export;
pub mod identity;
pub mod machine;
pub mod metrics;
pub mod model;
pub mod receiver;
pub mod sandbox;
pub mod sources;
pub mod status;
pub mod store;
pub mod sync;
pub mod telemetry;
