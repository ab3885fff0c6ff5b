//! Drives the real `byol` binary: exit codes, reports, verification, kills mid-run.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn byol() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_byol"));
    c.env_remove("BYOL_LOG");
    c
}

fn run(args: &[&str]) -> Output {
    byol().args(args).output().expect("byol runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn photo(w: u32, h: u32, seed: u32) -> Vec<u8> {
    // Seeded noise over a gradient: distinct for every seed, compressible like a photo.
    let mut state = seed.wrapping_mul(2_654_435_761) ^ 0x9E37_79B9;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let noise = (state >> 28) as u8;
        image::Rgb([
            (x * 3) as u8 ^ noise,
            ((y * 5) as u8).wrapping_add(noise),
            (seed >> 8) as u8 ^ seed as u8,
        ])
    });
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

fn folder(dir: &Path, n: u32, size: u32) -> PathBuf {
    let src = dir.join("src");
    for i in 0..n {
        let class = if i % 2 == 0 { "even" } else { "odd" };
        std::fs::create_dir_all(src.join(class)).unwrap();
        std::fs::write(
            src.join(class).join(format!("{i:04}.png")),
            photo(size, size * 3 / 4, i),
        )
        .unwrap();
    }
    src
}

/// A generated folder of `n` images, ingested into `dir/ds`.
fn packed(dir: &Path, n: u32, size: u32) -> (PathBuf, PathBuf) {
    let src = folder(dir, n, size);
    let ds = dir.join("ds");
    let o = run(&[
        "ingest",
        src.to_str().unwrap(),
        "--out",
        ds.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    (src, ds)
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

#[test]
fn ingest_then_inspect_reports_classes_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let src = folder(dir.path(), 12, 40);
    std::fs::write(src.join("even/broken.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    let ds = dir.path().join("ds");
    let o = run(&[
        "ingest",
        src.to_str().unwrap(),
        "--out",
        ds.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = json(&o);
    assert_eq!(s["ingested"], 12);
    assert_eq!(
        s["rejected"]["corrupt"], 1,
        "one bad image does not stop the run"
    );

    let o = run(&["inspect", ds.to_str().unwrap(), "--verify", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&o);
    assert_eq!(r["stats"]["records"], 12);
    assert_eq!(
        r["stats"]["per_class"],
        serde_json::json!([["even", 6], ["odd", 6]])
    );
    assert_eq!(r["corrupt"], serde_json::json!([]));

    let o = run(&["inspect", ds.to_str().unwrap()]);
    let out = text(&o);
    assert!(
        out.contains("even") && out.contains("codec raw-rgb8"),
        "{out}"
    );
}

#[test]
fn verify_names_the_shard_and_record_of_a_flipped_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 6, 32);
    let shard = ds.join("shards/000000.shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    // Header is 64 bytes and records follow in order: byte 70 lies in record 0.
    bytes[70] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();
    let o = run(&["inspect", ds.to_str().unwrap(), "--verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("shard 000000.shard record 0: "), "{out}");
    assert!(out.contains("1 of 6 records CORRUPT"), "{out}");
}

#[test]
fn exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let src = folder(dir.path(), 3, 16);
    let ds = dir.path().join("ds");
    let ds_s = ds.to_str().unwrap();
    let src_s = src.to_str().unwrap();
    let status = |extra: &[&str]| {
        run(&[&["ingest", src_s, "--out", ds_s], extra].concat())
            .status
            .code()
    };
    assert_eq!(status(&["--fail-if-empty"]), Some(0));
    // Nothing new: success, unless asked to fail.
    assert_eq!(status(&[]), Some(0));
    assert_eq!(status(&["--fail-if-empty"]), Some(3));
    // Usage errors.
    assert_eq!(run(&["ingest", "--out", ds_s]).status.code(), Some(2));
    assert_eq!(
        run(&["ingest", src.to_str().unwrap()]).status.code(),
        Some(2)
    );
    // Unwritable output and a missing source: a clear error, non-zero.
    let file = dir.path().join("plainfile");
    std::fs::write(&file, b"x").unwrap();
    let o = run(&[
        "ingest",
        src.to_str().unwrap(),
        "--out",
        file.join("ds").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("cannot write to the dataset folder"),
        "{}",
        text(&o)
    );
    let o = run(&[
        "ingest",
        dir.path().join("missing").to_str().unwrap(),
        "--out",
        ds_s,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("missing"), "{}", text(&o));
    // Not a dataset.
    let o = run(&["inspect", src.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("not a byol dataset"), "{}", text(&o));
}

#[test]
fn killed_runs_leave_a_readable_dataset_and_the_next_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let src = folder(dir.path(), 400, 160);
    let ds = dir.path().join("ds");
    let ds_s = ds.to_str().unwrap();
    // Small shards and a save after each: many commit points to be killed between.
    let args = [
        "ingest",
        src.to_str().unwrap(),
        "--out",
        ds_s,
        "--shard-size-mib",
        "1",
        "--commit-interval-secs",
        "0",
        "-j",
        "2",
    ];
    for delay_ms in [20u64, 50, 90, 140, 200] {
        let mut child = byol()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL: no cleanup runs
        child.wait().unwrap();
        if ds.join("manifest.json").exists() {
            let o = run(&["inspect", ds_s, "--verify"]);
            assert!(
                o.status.success(),
                "after a kill at {delay_ms} ms: {}",
                text(&o)
            );
            eprintln!(
                "killed at {delay_ms} ms: {}",
                text(&run(&["inspect", ds_s])).lines().nth(4).unwrap_or("")
            );
        }
    }
    let o = run(&[&args[..], &["--json"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["inspect", ds_s, "--verify", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&o);
    assert_eq!(r["stats"]["records"], 400, "every image exactly once");
    assert_eq!(r["stats"]["sources"], 400);
    let leftovers: Vec<_> = std::fs::read_dir(ds.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn no_arguments_runs_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let o = byol().current_dir(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("all 16 records OK"), "{}", text(&o));
    let grid = image::open(dir.path().join("byol-demo/preview.png")).unwrap();
    assert_eq!(
        (grid.width(), grid.height()),
        (3 * 96 + 4 * 4, 6 * 96 + 7 * 4)
    );
    let o = run(&[
        "inspect",
        dir.path().join("byol-demo/dataset").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(json(&o)["stats"]["records"], 16);
}

#[test]
fn preview_draws_one_row_per_image_from_a_dataset_or_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (src, ds) = packed(dir.path(), 6, 48);
    for (input, n) in [(ds.clone(), "4"), (src.join("even"), "2")] {
        let png = dir.path().join(format!("grid{n}.png"));
        let o = run(&[
            "preview",
            input.to_str().unwrap(),
            "--out",
            png.to_str().unwrap(),
            "--n",
            n,
            "--size",
            "32",
            "--seed",
            "3",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let img = image::open(&png).unwrap();
        let rows: u32 = n.parse().unwrap();
        assert_eq!(
            (img.width(), img.height()),
            (3 * 32 + 4 * 4, rows * 32 + (rows + 1) * 4)
        );
    }
    // Same seed, same picture.
    let again = dir.path().join("again.png");
    let o = run(&[
        "preview",
        ds.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--n",
        "4",
        "--size",
        "32",
        "--seed",
        "3",
    ]);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(dir.path().join("grid4.png")).unwrap()
    );
    // Bad settings name the key.
    let o = run(&[
        "preview",
        ds.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--size",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("size"), "{}", text(&o));
}

const TINY_TRAIN: &str = r#"
[augment]
preset = "small"
size = 16
[loader]
batch_size = 8
threads = 2
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
[train]
device = "cpu"
total_steps = 20
log_every = 2
checkpoint_every_steps = 3
keep_last = 2
"#;

#[test]
fn train_logs_metrics_checkpoints_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(&cfg, TINY_TRAIN).unwrap();
    let run_dir = dir.path().join("run");
    let train = |extra: &[&str]| {
        let base = [
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--data",
            ds.to_str().unwrap(),
            "--run",
            run_dir.to_str().unwrap(),
        ];
        run(&[&base[..], extra].concat())
    };
    let o = train(&["--steps", "4"]);
    assert!(o.status.success(), "{}", text(&o));
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![2, 4]
    );
    for key in [
        "loss",
        "lr",
        "tau",
        "collapse",
        "images_per_sec",
        "data_wait_secs",
        "epoch",
    ] {
        assert!(lines[0].get(key).is_some(), "{key} missing: {}", lines[0]);
    }
    assert!(
        run_dir
            .join("checkpoints/step-0000000004/meta.json")
            .exists()
    );
    // An existing run is not overwritten by accident.
    let o = train(&["--steps", "6"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("--resume"), "{}", text(&o));
    let o = train(&["--steps", "6", "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    assert!(run_dir.join("checkpoints/step-0000000006").exists());
    // A config with an unknown key: one clear error, nothing written.
    std::fs::write(&cfg, format!("{TINY_TRAIN}\nbogus = 1\n")).unwrap();
    let o = train(&["--steps", "8", "--resume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("bogus"), "{}", text(&o));
    assert!(!run_dir.join("checkpoints/step-0000000008").exists());
}
