//! patient-sync keeps one canonical patient table in step with Healthie, IntakeQ and Hint
//! Health. See `ARCHITECTURE.md` for the map of modules.

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

/// Memory allocator for every program built on this crate (the service, tests, benchmarks):
/// matching and page writes allocate many small, short-lived values, and glibc's allocator
/// spent about a quarter of a resync's CPU time in `malloc` and `free`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
