//! Phone parsing benchmark: N distinct random North American numbers (default 100,000), each
//! turned into E.164 by `identity::phone_e164`, on one thread, then on two threads sharing the
//! `phonenumber` crate's built-in metadata database, then on two threads where the second parses
//! with a database of its own (`identity::PhoneDatabase`, as a rebuild's loading threads do).
//! Prints the wall time of each, the count of valid numbers (the same in every run) and the
//! machine.
//!
//! `cargo run --release --example phone_bench -- [numbers]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use patient_sync::identity::{phone_e164, PhoneDatabase};

fn numbers(seed: u64, n: usize) -> Vec<String> {
    let mut x = seed;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let (area, exchange, line) = (
            200 + (x >> 33) % 800,
            200 + (x >> 20) % 800,
            (x >> 5) % 10_000,
        );
        if seen.insert((area, exchange, line)) {
            out.push(format!("({area}) {exchange}-{line:04}"));
        }
    }
    out
}

fn parse_all(numbers: &[String], database: Option<&Arc<PhoneDatabase>>) -> usize {
    let _installed = database.map(|d| d.install());
    numbers
        .iter()
        .filter(|n| phone_e164(n, "US").is_some())
        .count()
}

fn timed(what: &str, run: impl FnOnce() -> usize) -> Duration {
    let started = Instant::now();
    let valid = run();
    let took = started.elapsed();
    println!("{what:<42} {:>8.2} s  ({valid} valid)", took.as_secs_f64());
    took
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a count of numbers"))
        .unwrap_or(100_000);
    // Two halves, so that the two-thread runs parse each number once; a third set warms up.
    let all = numbers(1, n + 2_000);
    let (warm, rest) = all.split_at(2_000);
    let (first, second) = rest.split_at(n / 2);
    let started = Instant::now();
    let own = PhoneDatabase::new();
    println!(
        "reading a database of its own: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    parse_all(warm, None);
    parse_all(warm, Some(&own));

    println!("{n} distinct numbers:");
    timed("one thread, built-in database", || {
        parse_all(first, None) + parse_all(second, None)
    });
    timed("two threads, both on the built-in database", || {
        std::thread::scope(|s| {
            let a = s.spawn(|| parse_all(first, None));
            let b = s.spawn(|| parse_all(second, None));
            a.join().expect("thread") + b.join().expect("thread")
        })
    });
    timed("two threads, the second on its own", || {
        std::thread::scope(|s| {
            let a = s.spawn(|| parse_all(first, None));
            let b = s.spawn(|| parse_all(second, Some(&own)));
            a.join().expect("thread") + b.join().expect("thread")
        })
    });
    println!("machine: {}", patient_sync::machine::describe());
}
