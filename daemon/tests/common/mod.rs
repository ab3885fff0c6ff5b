//! Helpers shared by the CLI test files: run the real `byol` binary, read its output.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The `byol` binary under test, with logging left at its default.
pub fn byol() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_byol"));
    c.env_remove("BYOL_LOG");
    c
}

/// Runs `byol ARGS...` to completion.
pub fn run(args: &[&str]) -> Output {
    byol().args(args).output().expect("byol runs")
}

/// Stdout then stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `byol ingest SRC --out OUT`, which must succeed.
pub fn ingest(src: &Path, out: &Path) {
    let o = run(&[
        "ingest",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test leaves
/// no daemon behind.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

/// A distinct 32 x 32 PNG for each `n` below 256 (`n` and `n + 256` coincide).
pub fn distinct_png(n: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([
            (x * 7 + n * 13) as u8,
            (y * 5 + n * 29) as u8,
            ((x ^ y) + n * 3) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A small `byol daemon` config watching `dir/in` (image-folder layout) into `dir/data`
/// and `dir/run`, with each `(from, to)` replaced.
pub fn daemon_config(dir: &Path, edits: &[(&str, &str)]) -> String {
    let base = format!(
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
warmup_steps = 5
schedule = "constant"
[train]
device = "cpu"
log_every = 5
checkpoint_every_steps = 25
[ingest]
max_side = 0
[daemon]
watch = [{{ path = "{watch}", layout = "imagefolder" }}]
data = "{data}"
run = "{run}"
listen = "127.0.0.1:0"
settle_secs = 0.4
idle_after_epochs = 0
new_data_within_steps = 4
stop_timeout_secs = 60
"#,
        watch = dir.join("in").display(),
        data = dir.join("data").display(),
        run = dir.join("run").display(),
    );
    edits.iter().fold(base, |t, (from, to)| {
        assert!(t.contains(from), "no {from:?} in the daemon config");
        t.replace(from, to)
    })
}

/// A running `byol daemon`, its stdout and stderr going to a file; killed when dropped.
pub struct Daemon {
    /// The process.
    pub child: Reaped,
    out: std::path::PathBuf,
}

impl Daemon {
    /// Starts `byol daemon --config CFG` with `env` set, output to `out`.
    pub fn start(cfg: &Path, out: std::path::PathBuf, env: &[(&str, String)]) -> Daemon {
        let mut command = byol();
        command
            .args(["daemon", "--config", cfg.to_str().unwrap()])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        Daemon::spawn(command, out)
    }

    /// Starts `command` (`byol daemon`, or a wrapper such as `unshare` that execs it),
    /// output to `out`.
    pub fn spawn(mut command: Command, out: std::path::PathBuf) -> Daemon {
        let log = std::fs::File::create(&out).unwrap();
        let child = command
            .env_remove("BYOL_LOG")
            .stdout(std::process::Stdio::from(log.try_clone().unwrap()))
            .stderr(std::process::Stdio::from(log))
            .spawn()
            .unwrap();
        Daemon {
            child: Reaped(child),
            out,
        }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits (up to two minutes) until `done` holds for the output; false when the
    /// daemon exited first.
    pub fn wait_until(&mut self, what: &str, done: impl Fn(&str) -> bool) -> bool {
        let start = std::time::Instant::now();
        while !done(&self.output()) {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(120),
                "timed out waiting for {what}:\n{}",
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        true
    }

    /// [`Daemon::wait_until`], failing when the daemon exits first.
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&str) -> bool) {
        if !self.wait_until(what, done) {
            panic!("daemon exited waiting for {what}:\n{}", self.output());
        }
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: i32) {
        // SAFETY: a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// SIGTERM, then the exit status and the output.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        self.signal(libc::SIGTERM);
        let status = self.child.wait().unwrap();
        (status, self.output())
    }
}

/// Path → (blake3 of the content, label).
pub type Contents = std::collections::BTreeMap<String, (String, Option<String>)>;

/// Every complete image file in the class folders under `root` (regular files that
/// decode, not `.part`), by canonical path, labelled by their folder.
pub fn complete_images(root: &Path) -> Contents {
    let mut out = Contents::new();
    for class in std::fs::read_dir(root).unwrap() {
        let class = class.unwrap().path();
        for f in std::fs::read_dir(&class).unwrap() {
            let f = f.unwrap().path();
            let regular = std::fs::symlink_metadata(&f).is_ok_and(|m| m.is_file());
            if !regular || f.extension().is_some_and(|e| e == "part") {
                continue;
            }
            let bytes = std::fs::read(&f).unwrap();
            if image::load_from_memory(&bytes).is_err() {
                continue; // the bad files
            }
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

/// A dataset's manifest as JSON.
fn manifest(data: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(data.join("manifest.json")).unwrap()).unwrap()
}

/// The sources of the dataset at `data`, as [`complete_images`] describes files.
pub fn dataset_sources(data: &Path) -> Contents {
    manifest(data)["sources"]
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

/// Live (not retired) records of the dataset at `data`.
pub fn live_records(data: &Path) -> u64 {
    manifest(data)["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["records"].as_u64().unwrap() - s["retired"].as_array().map_or(0, |r| r.len() as u64)
        })
        .sum()
}

/// True when `probe` succeeds on this machine (a mount namespace, a user namespace);
/// otherwise says why the test is skipped, or fails under `BYOL_REQUIRE_REAL_DATA=1`
/// (CI), where the machine must allow it.
pub fn machine_allows(probe: &mut Command, what: &str) -> bool {
    let why = match probe.output() {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
        Err(e) => e.to_string(),
    };
    let msg = format!("cannot {what}: {why}");
    if std::env::var("BYOL_REQUIRE_REAL_DATA").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("skipped: {msg}");
    false
}
