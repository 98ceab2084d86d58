//! Healthie: GraphQL client, wire types, conversion into source records, webhook envelope and
//! signature.
pub mod convert;
pub mod operations;
pub mod signature;
