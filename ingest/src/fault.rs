//! Deterministic fault points for crash tests: a process aborts (as `kill -9` would
//! stop it, without unwinding or flushing) at a chosen point when an environment
//! variable names it. Unset in normal use, where each point costs one lookup.

/// Aborts the process when the environment variable `key` holds `at`.
///
/// The points: `BYOL_TEST_ABORT_IN_SHARD` (the Nth shard of this process, its records
/// written, before its footer and rename), `BYOL_TEST_ABORT_IN_CHECKPOINT` (the
/// checkpoint of step N, one tensor file written, before its meta and rename),
/// `BYOL_TEST_ABORT_IN_COMPACTION` (= 1: the merged shards written, before the manifest
/// that lists them).
pub fn abort_if(key: &str, at: u64) {
    if std::env::var(key).ok().and_then(|v| v.parse::<u64>().ok()) == Some(at) {
        eprintln!("{key}={at}: aborting (test fault point)");
        std::process::abort();
    }
}
