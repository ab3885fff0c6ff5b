//! The no-argument demo: the daemon on an embedded default, on CPU, in a few minutes.
//!
//! Generates a small labelled image set (`textures`), starts `byol daemon` on an empty
//! watched folder, feeds it images in waves (written in place and renamed into place),
//! lets it train, stops it with SIGTERM, and prints the kNN accuracy of the trained
//! encoder beside the same encoder at random init.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use byol_ingest::{IngestOptions, NoProgress};

use crate::textures::{CLASSES, Draws, texture, write_image_folder};

/// Folder the demo works in, relative to the current directory.
pub const DEMO_DIR: &str = "byol-demo";
/// Training images per class, arriving in [`WAVES`] waves.
const TRAIN_PER_CLASS: u32 = 128;
/// Test images per class (the kNN queries).
const TEST_PER_CLASS: u32 = 64;
/// Waves of images dropped into the watched folder.
const WAVES: u32 = 4;
/// Steps trained before the demo stops the daemon (`BYOL_DEMO_STEPS` overrides it).
const STEPS: u64 = 3000;

/// The daemon's config: a width-8 ResNet-18 on 16-px views, AdamW at a constant
/// learning rate after warm-up (continuous training has no end to decay to).
fn config(dir: &Path, steps: u64) -> String {
    let p = |name: &str| dir.join(name).display().to_string();
    format!(
        r#"# Written by the byol demo.
[augment]
preset = "small"
size = 16
[loader]
batch_size = 32
threads = 2
seed = 1
newest_share = 0.25
newest_records = 128
[model]
arch = "resnet18"
width = 8
small_stem = true
projector_hidden = 128
projection_dim = 32
predictor_hidden = 128
[optim]
optimizer = "adamw"
base_lr = 3e-3
warmup_steps = 10
schedule = "constant"
[byol]
tau_base = 0.99
[train]
device = "cpu"
seed = 1
log_every = {log_every}
checkpoint_every_steps = {checkpoint_every}
keep_last = 2
[ingest]
max_side = 0
[daemon]
watch = [{{ path = "{incoming}", layout = "imagefolder" }}]
data = "{data}"
run = "{run}"
listen = "127.0.0.1:0"
settle_secs = 0.5
idle_after_epochs = 0
new_data_within_steps = 20
"#,
        incoming = p("incoming"),
        data = p("dataset"),
        run = p("run"),
        log_every = (steps / 12).clamp(1, 250),
        checkpoint_every = (steps / 3).max(1),
    )
}

/// Runs the demo.
pub fn run() -> anyhow::Result<ExitCode> {
    let root = std::path::absolute(DEMO_DIR)?;
    let steps: u64 = match std::env::var("BYOL_DEMO_STEPS") {
        Ok(v) => v.parse().context("BYOL_DEMO_STEPS must be a step count")?,
        Err(_) => STEPS,
    };
    // A fresh start each time: the demo's own folders only.
    for sub in ["incoming", "dataset", "run", "test", "test-src"] {
        let p = root.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot clear {}", p.display()))?;
        }
    }
    let incoming = root.join("incoming");
    std::fs::create_dir_all(&incoming)?;
    println!(
        "byol demo: continuous BYOL pretraining on {} generated textures ({} classes) \
         arriving in {WAVES} waves, {steps} steps on CPU; work folder {}",
        TRAIN_PER_CLASS * CLASSES.len() as u32,
        CLASSES.len(),
        root.display()
    );
    let test = test_set(&root)?;
    let config_path = root.join("daemon.toml");
    std::fs::write(&config_path, config(&root, steps))?;
    let exe = std::env::current_exe()?;
    // The daemon's progress lines on the terminal; its log events only when asked for.
    let log = std::env::var("BYOL_LOG").unwrap_or_else(|_| "warn".into());
    let mut daemon = Command::new(&exe)
        .args(["daemon", "--config"])
        .arg(&config_path)
        .env("BYOL_LOG", log)
        .spawn()
        .context("cannot start byol daemon")?;
    let outcome = feed_and_wait(&root, &incoming, steps, &mut daemon);
    // SIGTERM: the daemon finishes its step, checkpoints and exits 0.
    // SAFETY: sends a signal to our own child process, whose id we hold.
    unsafe {
        libc::kill(daemon.id() as i32, libc::SIGTERM);
    }
    let status = daemon.wait()?;
    outcome?;
    if !status.success() {
        bail!("byol daemon exited with {status}");
    }
    println!(
        "\nkNN (k = 20) on {} held-out textures:",
        TEST_PER_CLASS * CLASSES.len() as u32
    );
    let eval = Command::new(&exe)
        .args([
            "eval",
            "--protocol",
            "knn",
            "--k",
            "20",
            "--size",
            "32",
            "--random-init",
        ])
        .arg("--checkpoint")
        .arg(root.join("run"))
        .arg("--train")
        .arg(root.join("dataset"))
        .arg("--test")
        .arg(&test)
        .status()?;
    if !eval.success() {
        bail!("byol eval failed");
    }
    println!(
        "\nNext: point configs/daemon.toml at your folders and run `byol daemon --config \
         configs/daemon.toml`; `byol plot --run {}` draws the curves.",
        root.join("run").display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The held-out test set, ingested into `root/test`.
fn test_set(root: &Path) -> anyhow::Result<PathBuf> {
    let src = root.join("test-src");
    write_image_folder(&src, TEST_PER_CLASS, 2)?;
    let out = root.join("test");
    let mut opts = IngestOptions::new(vec![src], out.clone());
    opts.settings.max_side = Some(0);
    byol_ingest::ingest(&opts, &NoProgress)?;
    Ok(out)
}

/// Drops the waves while the daemon trains, then waits for `steps` steps.
fn feed_and_wait(
    root: &Path,
    incoming: &Path,
    steps: u64,
    daemon: &mut Child,
) -> anyhow::Result<()> {
    let per_wave = TRAIN_PER_CLASS / WAVES;
    let mut d = Draws(1);
    let metrics = root.join("run").join("metrics.jsonl");
    let started = Instant::now();
    for wave in 0..WAVES {
        // Each wave lands when training has taken its share of the steps.
        wait_for(daemon, || {
            Ok(last_step(&metrics) >= wave as u64 * steps / (2 * WAVES as u64))
        })?;
        println!(
            "demo: wave {} of {WAVES}: {} images",
            wave + 1,
            per_wave * CLASSES.len() as u32
        );
        for (c, class) in CLASSES.iter().enumerate() {
            let dir = incoming.join(class);
            std::fs::create_dir_all(&dir)?;
            for i in wave * per_wave..(wave + 1) * per_wave {
                let img = texture(c, &mut d);
                let name = format!("{i:03}.png");
                if i % 2 == 0 {
                    img.save(dir.join(&name))?;
                } else {
                    // Written under a partial name, then renamed into place.
                    let part = dir.join(format!("{name}.part"));
                    img.save_with_format(&part, image::ImageFormat::Png)?;
                    std::fs::rename(&part, dir.join(&name))?;
                }
            }
        }
    }
    wait_for(daemon, || Ok(last_step(&metrics) >= steps))?;
    // Every file of every wave in the dataset before the stop.
    let manifest = root.join("dataset").join("manifest.json");
    let files = (per_wave * WAVES) as usize * CLASSES.len();
    wait_for(daemon, || Ok(sources(&manifest) >= files))?;
    println!(
        "demo: {steps} steps in {:.0} s; stopping the daemon (SIGTERM)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits until `done`, failing if the daemon exits first.
fn wait_for(
    daemon: &mut Child,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    while !done()? {
        if let Some(status) = daemon.try_wait()? {
            bail!("byol daemon exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Sources recorded in the dataset's manifest (0 before it exists).
fn sources(manifest: &Path) -> usize {
    std::fs::read(manifest)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m["sources"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// The last step logged in `metrics.jsonl` (0 before the first line).
fn last_step(metrics: &Path) -> u64 {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}
