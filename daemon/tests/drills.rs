//! Fault drills through the real binary: `kill -9` at seeded moments and at
//! deterministic fault points (mid-shard, mid-checkpoint) while files keep arriving,
//! restarting each time; and watched folders that misbehave (polling forced, a symlink
//! loop, the whole content moved away as an unmount would). `scripts/drill.sh` runs the
//! long versions (20 kills, a full disk, 10,000 files at once).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, byol, complete_images, daemon_config, dataset_sources, distinct_png, text};

/// The shared daemon config with small shards, frequent checkpoints and `extra`
/// `[daemon]` keys.
fn config(dir: &Path, extra: &str) -> String {
    let checkpoints = "checkpoint_every_steps = 4\nkeep_last = 2";
    let daemon = format!("stop_timeout_secs = 60\n{extra}");
    daemon_config(
        dir,
        &[
            ("log_every = 5", "log_every = 2"),
            ("checkpoint_every_steps = 25", checkpoints),
            ("max_side = 0", "max_side = 0\nshard_size_mib = 1"),
            ("settle_secs = 0.4", "settle_secs = 0.2"),
            ("stop_timeout_secs = 60", &daemon),
        ],
    )
}

/// Steps of the complete checkpoints in the run folder.
fn checkpoint_steps(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("step-")?.parse().ok()
        })
        .collect();
    steps.sort();
    steps
}

fn training_from(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.strip_prefix("training from step "))
        .and_then(|s| s.trim().parse().ok())
}

/// A seeded stream of draws (SplitMix64).
struct Draws(u64);
impl Draws {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

/// Writes four new files: two in place, two renamed into place.
fn arrive(watch: &Path, next: &mut u32) {
    for k in 0..4u32 {
        let class = if next.is_multiple_of(2) { "a" } else { "b" };
        let dir = watch.join(class);
        std::fs::create_dir_all(&dir).unwrap();
        let name = format!("{next:04}.png");
        if k.is_multiple_of(2) {
            std::fs::write(dir.join(&name), distinct_png(*next)).unwrap();
        } else {
            let part = dir.join(format!("{name}.part"));
            std::fs::write(&part, distinct_png(*next)).unwrap();
            std::fs::rename(&part, dir.join(&name)).unwrap();
        }
        *next += 1;
    }
}

#[test]
fn kill_9_at_seeded_moments_and_fault_points_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    let mut next = 0;
    for _ in 0..4 {
        arrive(&watch, &mut next);
    }
    let cfg = root.join("d.toml");
    std::fs::write(&cfg, config(root, "")).unwrap();
    let mut draws = Draws(7);
    let mut floor = 0; // the newest complete checkpoint before each restart
    // Fault points first (mid-shard, mid-checkpoint), then seeded moments.
    let kills = [
        "mid-shard",
        "mid-checkpoint",
        "random",
        "random",
        "random",
        "random",
    ];
    for (i, how) in kills.into_iter().enumerate() {
        let env = match how {
            "mid-shard" => vec![("BYOL_TEST_ABORT_IN_SHARD", "2".to_owned())],
            // The second checkpoint after the one it resumes from (every 4 steps).
            "mid-checkpoint" => vec![("BYOL_TEST_ABORT_IN_CHECKPOINT", (floor + 8).to_string())],
            _ => vec![],
        };
        let mut d = Daemon::start(&cfg, root.join(format!("out{i}.txt")), &env);
        let alive = d.wait_until("the start", |o| {
            training_from(o).is_some() || o.contains("aborting")
        });
        if let Some(from) = training_from(&d.output()) {
            assert!(
                from >= floor,
                "kill {i}: resumed at {from}, below checkpoint {floor}"
            );
        }
        // Files keep arriving while it runs.
        arrive(&watch, &mut next);
        if how == "random" {
            std::thread::sleep(Duration::from_millis(100 + draws.below(1500)));
        } else {
            // Wait for the fault point to abort the process.
            let start = Instant::now();
            while d.child.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(60) {
                    panic!("{how}: the fault point never fired:\n{}", d.output());
                }
                arrive(&watch, &mut next);
                std::thread::sleep(Duration::from_millis(200));
            }
            assert!(
                d.output().contains("aborting (test fault point)"),
                "{how} (alive {alive}):\n{}",
                d.output()
            );
        }
        drop(d); // SIGKILL
        // What a crash leaves must verify, and resume at or past the last checkpoint.
        let o = byol()
            .args(["inspect", root.join("data").to_str().unwrap(), "--verify"])
            .output()
            .unwrap();
        assert!(o.status.success(), "kill {i} ({how}): {}", text(&o));
        floor = checkpoint_steps(&root.join("run"))
            .last()
            .copied()
            .unwrap_or(0);
    }
    // A clean run takes in everything that arrived, then stops.
    let mut d = Daemon::start(&cfg, root.join("final.txt"), &[]);
    let want = complete_images(&watch);
    d.wait_for("training", |o| training_from(o).is_some());
    assert!(
        training_from(&d.output()).unwrap() >= floor,
        "{}",
        d.output()
    );
    let start = Instant::now();
    while dataset_sources(&root.join("data")) != want {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "dataset never matched the folders:\n{:?}\n{:?}",
            dataset_sources(&root.join("data")),
            want
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(d.child.id() as i32, libc::SIGTERM);
    }
    assert!(d.child.wait().unwrap().success(), "{}", d.output());
    assert_eq!(dataset_sources(&root.join("data")), want);
    let o = byol()
        .args([
            "inspect",
            root.join("data").to_str().unwrap(),
            "--verify",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn polling_a_symlink_loop_and_a_folder_emptied_as_by_an_unmount() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    let mut next = 0;
    arrive(&watch, &mut next);
    arrive(&watch, &mut next);
    // A symlink loop inside the watched tree.
    std::os::unix::fs::symlink("..", watch.join("a/loop")).unwrap();
    let cfg = root.join("d.toml");
    std::fs::write(&cfg, config(root, "poll = true\npoll_interval_secs = 0.2")).unwrap();
    let mut d = Daemon::start(&cfg, root.join("out.txt"), &[]);
    assert!(
        d.wait_until("training", |o| training_from(o).is_some()),
        "{}",
        d.output()
    );
    assert!(
        d.output().contains("by polling ([daemon] poll = true)"),
        "{}",
        d.output()
    );
    // Polling sees new files.
    arrive(&watch, &mut next);
    let want = complete_images(&watch);
    let start = Instant::now();
    while dataset_sources(&root.join("data")) != want {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", d.output());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Everything gone at once, the folder left empty: what an unmount leaves behind
    // (an empty mount point). Nothing is retired.
    std::fs::rename(&watch, root.join("away")).unwrap();
    std::fs::create_dir(&watch).unwrap();
    d.wait_for("the warning", |o| o.contains("nothing retired"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(dataset_sources(&root.join("data")), want, "{}", d.output());
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(d.child.id() as i32, libc::SIGTERM);
    }
    assert!(d.child.wait().unwrap().success(), "{}", d.output());
}
