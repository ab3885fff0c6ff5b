//! A full disk under the run folder: a tmpfs mounted inside `unshare -m` (a private
//! mount namespace, so a crashed test leaves no mount behind), filled while the daemon
//! trains. A failed metrics write or checkpoint is an error event and is retried;
//! training goes on; once there is room, every metrics line is in `metrics.jsonl`, in
//! order, with no torn line.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Daemon, daemon_config, distinct_png, machine_allows};

/// Steps of the whole lines of a metrics file (every line must parse).
fn metrics_steps(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}"));
            v["step"].as_u64().unwrap()
        })
        .collect()
}

/// The step of the newest `step N` console line.
fn last_step(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn a_full_disk_fails_writes_but_not_training_and_loses_no_metrics_line() {
    let probe = ["-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"];
    if !machine_allows(
        Command::new("unshare").args(probe),
        "mount a tmpfs inside `unshare -m` (needs root)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("in/a")).unwrap();
    std::fs::create_dir_all(root.join("run")).unwrap();
    for i in 0..16 {
        std::fs::write(root.join(format!("in/a/{i}.png")), distinct_png(i)).unwrap();
    }
    let cfg = root.join("d.toml");
    let text = daemon_config(
        root,
        &[
            ("log_every = 5", "log_every = 1"),
            ("checkpoint_every_steps = 25", "checkpoint_every_steps = 5"),
            ("settle_secs = 0.4", "settle_secs = 0.2\nretry_secs = 1.0"),
        ],
    );
    std::fs::write(&cfg, text).unwrap();
    let run = root.join("run");
    // `sh` execs the daemon, so the child's pid is the daemon's, and
    // /proc/PID/root shows its mount namespace (the tmpfs) to this test.
    let script = format!(
        "mount -t tmpfs -o size=8m tmpfs '{}' && exec \"$0\" daemon --config '{}'",
        run.display(),
        cfg.display()
    );
    let mut unshare = Command::new("unshare");
    unshare.args(["-m", "sh", "-c", &script, env!("CARGO_BIN_EXE_byol")]);
    let mut d = Daemon::spawn(unshare, root.join("out.txt"));
    d.wait_for("a checkpoint", |o| o.contains("checkpoint step "));
    let inside: PathBuf = format!("/proc/{}/root{}", d.child.id(), run.display()).into();
    // Fill the run folder's disk.
    let filler = inside.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let full_at = last_step(&d.output());
    d.wait_for("the failed metrics write", |o| {
        o.contains("metrics failed (disk_full")
    });
    d.wait_for("the failed checkpoint", |o| {
        o.contains("checkpoint failed (disk_full")
    });
    // Training goes on on a full disk.
    d.wait_for("steps on a full disk", |o| last_step(o) >= full_at + 10);
    std::fs::remove_file(&filler).unwrap();
    d.wait_for("the retried metrics write", |o| {
        o.contains("metrics written again")
    });
    let resumed_at = last_step(&d.output());
    d.wait_for("a checkpoint after the outage", |o| {
        o.lines()
            .filter_map(|l| l.strip_prefix("checkpoint step "))
            .filter_map(|l| l.split(':').next()?.parse::<u64>().ok())
            .any(|s| s > resumed_at)
    });
    d.wait_for("more steps", |o| last_step(o) >= resumed_at + 3);
    // Every line is whole, and every step up to now is there once, in order.
    let steps = metrics_steps(&inside.join("metrics.jsonl"));
    let n = steps.len() as u64;
    assert!(n > full_at + 10, "{steps:?}");
    assert_eq!(steps, (1..=n).collect::<Vec<u64>>(), "{}", d.output());
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}
