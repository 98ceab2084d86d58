//! A one-line description of this machine (cores, CPU model, memory) for benchmark output, so
//! every figure is printed with the machine it was measured on.

/// `"<cores> cores, <CPU model>, <memory> GiB"`, from `/proc` where it exists.
pub fn describe() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cores} cores, {cpu}, {mem_gib:.1} GiB")
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_core_count() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert!(super::describe().starts_with(&format!("{cores} cores, ")));
    }
}
