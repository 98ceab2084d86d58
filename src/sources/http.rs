//! The shared HTTP layer: one rate limiter per upstream credential, timeouts, and retries with
//! backoff for transient failures.
