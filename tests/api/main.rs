//! Integration tests: one binary. Every test gets its own database (SQLite file or a fresh
//! Postgres database on a throwaway server), its own port and its own fake upstreams.

mod app;
mod apply_pages;
mod bulk_write;
mod cli;
mod crash;
mod export;
mod faults;
mod healthie_flow;
mod helpers;
mod history;
mod identity_cli;
mod identity_flow;
mod logs;
mod metrics;
mod ops;
mod pg;
mod phi;
mod queue;
mod resync;
mod scale;
mod shared_limit;
mod sources_flow;
mod store;
