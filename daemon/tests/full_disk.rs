//! A full disk under the run folder: a tmpfs mounted inside `unshare -m` (a private
//! mount namespace, so a crashed test leaves no mount behind), filled while the daemon
//! trains. A failed metrics write or checkpoint is an error event and is retried;
//! training goes on; once there is room, every metrics line is in `metrics.jsonl`, in
//! order, with no torn line.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Reaped, daemon_config, distinct_png};

/// True when this machine lets the test mount a tmpfs in a private mount namespace;
/// otherwise says why it skips (a failure under `BYOL_REQUIRE_REAL_DATA=1`, as in CI).
fn can_mount() -> bool {
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"])
        .output();
    let why = match o {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
        Err(e) => e.to_string(),
    };
    let msg = format!("cannot mount a tmpfs inside `unshare -m` (needs root): {why}");
    if std::env::var("BYOL_REQUIRE_REAL_DATA").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    false
}

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
    if !can_mount() {
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
    let out_path = root.join("out.txt");
    let log = std::fs::File::create(&out_path).unwrap();
    // `sh` execs the daemon, so the child's pid is the daemon's, and
    // /proc/PID/root shows its mount namespace (the tmpfs) to this test.
    let script = format!(
        "mount -t tmpfs -o size=8m tmpfs '{}' && exec \"$0\" daemon --config '{}'",
        run.display(),
        cfg.display()
    );
    let mut child = Reaped(
        Command::new("unshare")
            .args(["-m", "sh", "-c", &script, env!("CARGO_BIN_EXE_byol")])
            .env_remove("BYOL_LOG")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    let wait_for = |child: &mut Reaped, what: &str, done: &dyn Fn(&str) -> bool| {
        let start = Instant::now();
        while !done(&output()) {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the daemon exited waiting for {what}:\n{}",
                output()
            );
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}:\n{}",
                output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(&mut child, "a checkpoint", &|o| {
        o.contains("checkpoint step ")
    });
    let inside: PathBuf = format!("/proc/{}/root{}", child.id(), run.display()).into();
    // Fill the run folder's disk.
    let filler = inside.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    drop(f);
    let full_at = last_step(&output());
    wait_for(&mut child, "the failed metrics write", &|o| {
        o.contains("metrics failed (disk_full")
    });
    wait_for(&mut child, "the failed checkpoint", &|o| {
        o.contains("checkpoint failed (disk_full")
    });
    // Training goes on on a full disk.
    wait_for(&mut child, "steps on a full disk", &|o| {
        last_step(o) >= full_at + 10
    });
    std::fs::remove_file(&filler).unwrap();
    wait_for(&mut child, "the retried metrics write", &|o| {
        o.contains("metrics written again")
    });
    let resumed_at = last_step(&output());
    wait_for(&mut child, "a checkpoint after the outage", &|o| {
        o.lines()
            .filter_map(|l| l.strip_prefix("checkpoint step "))
            .filter_map(|l| l.split(':').next()?.parse::<u64>().ok())
            .any(|s| s > resumed_at)
    });
    wait_for(&mut child, "more steps", &|o| {
        last_step(o) >= resumed_at + 3
    });
    // Every line is whole, and every step up to now is there once, in order.
    let steps = metrics_steps(&inside.join("metrics.jsonl"));
    let n = steps.len() as u64;
    assert!(n > full_at + 10, "{steps:?}");
    assert_eq!(steps, (1..=n).collect::<Vec<u64>>(), "{}", output());
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}\n{}", output());
}
