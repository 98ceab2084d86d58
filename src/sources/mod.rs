//! Upstream systems: one module per source with the same shape (client, wire types, conversion,
//! webhook parsing), and the shared HTTP layer every upstream request goes through.

pub mod healthie;
pub mod http;
