//! Fault drills through the real binary: `kill -9` at seeded moments and at
//! deterministic fault points (mid-shard, mid-checkpoint) while files keep arriving,
//! restarting each time; and watched folders that misbehave (polling forced, a symlink
//! loop, the whole content moved away as an unmount would). `scripts/drill.sh` runs the
//! long versions (20 kills, a full disk, 10,000 files at once).

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{byol, distinct_png, text};

fn config(dir: &Path, extra: &str) -> String {
    format!(
        r#"
[augment]
preset = "small"
size = 16
[loader]
batch_size = 8
threads = 1
[model]
arch = "resnet18"
width = 4
small_stem = true
projector_hidden = 32
projection_dim = 16
predictor_hidden = 32
[optim]
optimizer = "adamw"
base_lr = 1e-3
schedule = "constant"
[train]
device = "cpu"
log_every = 2
checkpoint_every_steps = 4
keep_last = 2
[ingest]
max_side = 0
shard_size_mib = 1
[daemon]
watch = [{{ path = "{watch}", layout = "imagefolder" }}]
data = "{data}"
run = "{run}"
listen = "127.0.0.1:0"
settle_secs = 0.2
idle_after_epochs = 0
new_data_within_steps = 4
{extra}
"#,
        watch = dir.join("in").display(),
        data = dir.join("data").display(),
        run = dir.join("run").display(),
    )
}

struct Daemon {
    child: common::Reaped,
    out: PathBuf,
}

impl Daemon {
    fn start(cfg: &Path, out: PathBuf, env: &[(&str, String)]) -> Daemon {
        let log = File::create(&out).unwrap();
        let child = byol()
            .args(["daemon", "--config", cfg.to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        Daemon {
            child: common::Reaped(child),
            out,
        }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until `done`; false when the daemon exited first.
    fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) -> bool {
        let start = Instant::now();
        while !done(&self.output()) {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "timed out waiting for {what}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Complete image files under `root`: canonical path → (blake3, class).
fn expected(root: &Path) -> BTreeMap<String, (String, Option<String>)> {
    let mut out = BTreeMap::new();
    for class in std::fs::read_dir(root).unwrap() {
        let class = class.unwrap().path();
        for f in std::fs::read_dir(&class).unwrap() {
            let f = f.unwrap().path();
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let is_file = std::fs::symlink_metadata(&f).is_ok_and(|m| m.is_file());
            if name.ends_with(".part") || !is_file {
                continue;
            }
            let bytes = std::fs::read(&f).unwrap();
            out.insert(
                std::fs::canonicalize(&f).unwrap().display().to_string(),
                (
                    blake3::hash(&bytes).to_hex().to_string(),
                    Some(class.file_name().unwrap().to_string_lossy().into_owned()),
                ),
            );
        }
    }
    out
}

fn sources(data: &Path) -> BTreeMap<String, (String, Option<String>)> {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap();
    m["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["path"].as_str().unwrap().to_owned(),
                (
                    s["hash"].as_str().unwrap().to_owned(),
                    s["label"].as_str().map(str::to_owned),
                ),
            )
        })
        .collect()
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
        let alive = d.wait_for("the start", |o| {
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
        d.kill9();
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
    let want = expected(&watch);
    d.wait_for("training", |o| training_from(o).is_some());
    assert!(
        training_from(&d.output()).unwrap() >= floor,
        "{}",
        d.output()
    );
    let start = Instant::now();
    while sources(&root.join("data")) != want {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "dataset never matched the folders:\n{:?}\n{:?}",
            sources(&root.join("data")),
            want
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(d.child.id() as i32, libc::SIGTERM);
    }
    assert!(d.child.wait().unwrap().success(), "{}", d.output());
    assert_eq!(sources(&root.join("data")), want);
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
        d.wait_for("training", |o| training_from(o).is_some()),
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
    let want = expected(&watch);
    let start = Instant::now();
    while sources(&root.join("data")) != want {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", d.output());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Everything gone at once, the folder left empty: what an unmount leaves behind
    // (an empty mount point). Nothing is retired.
    std::fs::rename(&watch, root.join("away")).unwrap();
    std::fs::create_dir(&watch).unwrap();
    assert!(d.wait_for("the warning", |o| o.contains("nothing retired")));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sources(&root.join("data")), want, "{}", d.output());
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(d.child.id() as i32, libc::SIGTERM);
    }
    assert!(d.child.wait().unwrap().success(), "{}", d.output());
}
