//! Drives the real `byol` binary: exit codes, reports, verification, kills mid-run.

mod common;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::{byol, ingest, run, text};

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
    ingest(&src, &ds);
    (src, ds)
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

#[test]
fn a_closed_stdout_ends_the_command_without_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 4, 16);
    let mut child = byol()
        .args(["inspect", ds.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before anything is written
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
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

/// A WebDataset shard of `n` samples `{prefix}{i}`: a PNG and a json `{"y": i % 2}`.
fn wds_shard(prefix: &str, n: u32) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..n {
        let members = [
            (format!("{prefix}{i:03}.png"), photo(20, 16, 1000 + i)),
            (
                format!("{prefix}{i:03}.json"),
                format!("{{\"y\":{}}}", i % 2).into_bytes(),
            ),
        ];
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, data.as_slice()).unwrap();
        }
    }
    b.into_inner().unwrap()
}

#[test]
fn ingest_of_webdataset_shards_by_brace_pattern_and_folder() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("wds");
    std::fs::create_dir_all(&src).unwrap();
    for s in 0..2 {
        std::fs::write(
            src.join(format!("data-{s:03}.tar")),
            wds_shard(&format!("s{s}-"), 4),
        )
        .unwrap();
    }
    // The third shard is cut in the middle of its third sample's image.
    let cut = wds_shard("s2-", 4);
    let two_samples = wds_shard("s2-", 2).len() - 1024; // less the end-of-archive blocks
    std::fs::write(src.join("data-002.tar"), &cut[..two_samples + 512 + 100]).unwrap();
    let ds = dir.path().join("ds");
    let pattern = src.join("data-{000..002}.tar");
    let o = run(&[
        "ingest",
        pattern.to_str().unwrap(),
        "--out",
        ds.to_str().unwrap(),
        "--json-label",
        "y",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = json(&o);
    assert_eq!(s["ingested"], 10, "{s}");
    assert_eq!(s["rejected"]["damaged-tar"], 1, "{s}");
    assert_eq!(s["rejects"][0]["member"], "s2-002", "{s}");
    let o = run(&["inspect", ds.to_str().unwrap(), "--verify", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        json(&o)["stats"]["per_class"],
        serde_json::json!([["0", 5], ["1", 5]])
    );

    // A pattern naming files that are not there: an error naming them.
    let missing = src.join("data-{000..004}.tar");
    let o = run(&[
        "ingest",
        missing.to_str().unwrap(),
        "--out",
        ds.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("data-003.tar, "), "{}", text(&o));

    // The folder, with a shard gone and the cut one completed.
    std::fs::remove_file(src.join("data-000.tar")).unwrap();
    std::fs::write(src.join("data-002.tar"), &cut).unwrap();
    let o = run(&[
        "ingest",
        src.to_str().unwrap(),
        "--out",
        ds.to_str().unwrap(),
        "--json-label",
        "y",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let s = json(&o);
    assert_eq!(
        (s["ingested"].as_u64(), s["retired"].as_u64()),
        (Some(4), Some(6)),
        "{s}"
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
    // The demo's flow at a few steps (its full length is for people, not CI).
    let o = byol()
        .current_dir(dir.path())
        .env("BYOL_DEMO_STEPS", "40")
        .output()
        .unwrap();
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for expected in [
        "wave 4 of 4",
        "ingest: ",
        "training from step 0",
        "stopped by signal 15",
        "trained ",
        "random-init ",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }
    let o = run(&[
        "inspect",
        dir.path().join("byol-demo/dataset").to_str().unwrap(),
        "--json",
    ]);
    let records = json(&o)["stats"]["records"].as_u64().unwrap();
    assert!(
        (400..=512).contains(&records),
        "{records} of 512 textures (a few coincide)"
    );
    assert!(
        dir.path()
            .join("byol-demo/run/encoder-latest.safetensors")
            .is_file()
    );
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

/// `byol train --config CFG --data DATA --run RUN EXTRA...`.
fn train_run(cfg: &Path, data: &Path, run_dir: &Path, extra: &[&str]) -> Output {
    train_run_env(cfg, data, run_dir, extra, &[])
}

/// [`train_run`] with environment variables set (the test fault points).
fn train_run_env(
    cfg: &Path,
    data: &Path,
    run_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let base = [
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--run",
        run_dir.to_str().unwrap(),
    ];
    byol()
        .args([&base[..], extra].concat())
        .envs(env.iter().copied())
        .output()
        .expect("byol runs")
}

/// TINY_TRAIN with each `(from, to)` replaced, written to `dir/tiny.toml`.
fn tiny_config(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let cfg = dir.join("tiny.toml");
    let text = edits
        .iter()
        .fold(TINY_TRAIN.to_owned(), |t, (from, to)| t.replace(from, to));
    std::fs::write(&cfg, text).unwrap();
    cfg
}

#[test]
fn train_logs_metrics_checkpoints_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(&cfg, TINY_TRAIN).unwrap();
    let run_dir = dir.path().join("run");
    let train = |extra: &[&str]| train_run(&cfg, &ds, &run_dir, extra);
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
        "effective_rank",
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

#[test]
fn the_method_is_chosen_by_flag_and_a_resume_of_another_method_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(&cfg, TINY_TRAIN).unwrap();
    let run_dir = dir.path().join("run");
    let train = |extra: &[&str]| train_run(&cfg, &ds, &run_dir, extra);
    // An unknown method: a clear error naming the choices, nothing written.
    let o = train(&["--steps", "2", "--method", "moco"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("moco") && text(&o).contains("byol"),
        "{}",
        text(&o)
    );
    assert!(!run_dir.join("checkpoints").exists());
    let o = train(&["--steps", "2", "--method", "byol"]);
    assert!(o.status.success(), "{}", text(&o));
    let ck = run_dir.join("checkpoints/step-0000000002");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["method"], "byol");
    assert_eq!(meta["format_version"], 2);
    // A checkpoint another method wrote (here: its meta says so) is refused on resume,
    // naming the method, and nothing in the run folder changes.
    let edited = std::fs::read_to_string(ck.join("meta.json"))
        .unwrap()
        .replace("\"method\": \"byol\"", "\"method\": \"simclr\"");
    std::fs::write(ck.join("meta.json"), &edited).unwrap();
    let before = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let o = train(&["--steps", "4", "--resume"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("method simclr"), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(ck.join("meta.json")).unwrap(),
        edited
    );
    assert_eq!(
        std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap(),
        before
    );
    assert!(!run_dir.join("checkpoints/step-0000000004").exists());
}

#[test]
fn every_objective_trains_resumes_and_exports_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    // A bank larger than the dataset's 24 records: refused by name, nothing written.
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("{TINY_TRAIN}[msf]\nbank_size = 100\n")).unwrap();
    let refused = dir.path().join("refused");
    let o = train_run(&big, &ds, &refused, &["--steps", "2", "--method", "msf"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("msf.bank_size"), "{}", text(&o));
    assert!(!refused.exists(), "the run folder is not created");
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(
        &cfg,
        format!("{TINY_TRAIN}[msf]\nbank_size = 16\nk = 2\n[mocov2]\nqueue_size = 16\n"),
    )
    .unwrap();
    for method in ["msf", "simsiam", "simclr", "barlow_twins", "mocov2"] {
        let run_dir = dir.path().join(method);
        let o = train_run(&cfg, &ds, &run_dir, &["--steps", "2", "--method", method]);
        assert!(o.status.success(), "{method}: {}", text(&o));
        let o = train_run(
            &cfg,
            &ds,
            &run_dir,
            &["--steps", "4", "--method", method, "--resume"],
        );
        assert!(o.status.success(), "{method}: {}", text(&o));
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(run_dir.join("checkpoints/step-0000000004/meta.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(meta["method"], method);
        let out = dir.path().join(format!("{method}.safetensors"));
        let o = run(&[
            "export",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{method}: {}", text(&o));
        assert_eq!(
            safetensors_header(&out).len(),
            120,
            "{method}: the encoder alone"
        );
    }
}

/// Two classes any classifier tells apart: dark and bright noisy images (PNG, 20x16).
fn two_tone(dir: &Path, name: &str, per_class: u32, seed: u32) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    for (class, base) in [("dark", 40u8), ("bright", 200u8)] {
        std::fs::create_dir_all(src.join(class)).unwrap();
        for i in 0..per_class {
            let mut state = (seed * 1000 + i).wrapping_mul(2_654_435_761) | 1;
            let img = image::RgbImage::from_fn(20, 16, |_, _| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let v = base.wrapping_add((state >> 27) as u8);
                image::Rgb([v, v / 2 + 20, 255 - v])
            });
            img.save(src.join(class).join(format!("{i:03}.png")))
                .unwrap();
        }
    }
    let ds = dir.join(name);
    ingest(&src, &ds);
    ds
}

/// A 2-step run of TINY_TRAIN on `ds`; returns the run folder.
fn tiny_run(dir: &Path, ds: &Path) -> PathBuf {
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, TINY_TRAIN).unwrap();
    let run_dir = dir.join("run");
    let o = train_run(&cfg, ds, &run_dir, &["--steps", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    run_dir
}

#[test]
fn train_monitor_logs_knn_accuracy_on_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let train = two_tone(dir.path(), "train", 12, 1);
    let test = two_tone(dir.path(), "test", 6, 2);
    let cfg = dir.path().join("monitor.toml");
    let monitor = format!(
        "{TINY_TRAIN}\n[monitor]\ntrain = {:?}\ntest = {:?}\nevery_steps = 3\nk = 5\n",
        train.to_str().unwrap(),
        test.to_str().unwrap()
    );
    std::fs::write(&cfg, monitor).unwrap();
    let run_dir = dir.path().join("run");
    let args = |cfg: &Path| train_run(cfg, &train, &run_dir, &["--steps", "6"]);
    let o = args(&cfg);
    assert!(o.status.success(), "{}", text(&o));
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let knn: Vec<(u64, f64)> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|l| Some((l["step"].as_u64()?, l.get("knn_accuracy")?.as_f64()?)))
        .collect();
    assert_eq!(
        knn.iter().map(|k| k.0).collect::<Vec<_>>(),
        vec![3, 6],
        "{metrics}"
    );
    assert!(knn.iter().all(|k| (0.0..=1.0).contains(&k.1)), "{knn:?}");
    // A monitor dataset that does not exist: a clear error before training.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "{TINY_TRAIN}\n[monitor]\ntrain = \"/nonexistent/ds\"\ntest = \"/nonexistent/ds\"\n"
        ),
    )
    .unwrap();
    std::fs::remove_dir_all(&run_dir).unwrap();
    let o = args(&bad);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("/nonexistent/ds"), "{}", text(&o));
}

#[test]
fn eval_reports_trained_random_and_pixel_baselines() {
    let dir = tempfile::tempdir().unwrap();
    let train = two_tone(dir.path(), "train", 12, 1);
    let test = two_tone(dir.path(), "test", 6, 2);
    let run_dir = tiny_run(dir.path(), &train);
    let json_path = dir.path().join("eval.json");
    let o = run(&[
        "eval",
        "--checkpoint",
        run_dir.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--test",
        test.to_str().unwrap(),
        "--random-init",
        "--pixels",
        "--size",
        "16",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("random-init") && out.contains("raw-pixels"),
        "{out}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(r["step"], 2);
    assert_eq!(r["train_images"], 24);
    assert_eq!(r["test_images"], 12);
    assert_eq!(r["classes"], 2);
    let rows = r["results"].as_array().unwrap();
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|x| {
            (
                x["encoder"].as_str().unwrap().to_owned(),
                x["protocol"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("trained", "linear"),
        ("trained", "knn"),
        ("random-init", "linear"),
        ("random-init", "knn"),
        ("raw-pixels", "linear"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec()
    );
    for x in rows {
        let acc = x["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{x}");
        assert!(x["seconds"].as_f64().unwrap() >= 0.0);
    }
    // ResNet-18 at width 4: 32 features; pixels: 3 x 16 x 16.
    assert_eq!(rows[0]["feature_dim"], 32);
    assert_eq!(rows[1]["k"], 24, "k is clamped to the training size");
    assert_eq!(rows[4]["feature_dim"], 768);
    // Dark against bright is linear in the pixels.
    assert_eq!(rows[4]["accuracy"], 1.0);

    // --protocol knn runs kNN only; without --size the input is the side of the views
    // the checkpoint was trained on (16 here, not the small stem's usual 32).
    let knn_json = dir.path().join("knn.json");
    let o = run(&[
        "eval",
        "--checkpoint",
        run_dir
            .join("checkpoints/step-0000000002")
            .to_str()
            .unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--test",
        test.to_str().unwrap(),
        "--protocol",
        "knn",
        "--json",
        knn_json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("linear"), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&knn_json).unwrap()).unwrap();
    assert_eq!(r["image_size"], 16);
}

/// Accuracies (linear, kNN) of the checkpoint's encoder computed here, through the
/// library, with the normalisation given: the reference `byol eval` must equal.
fn reference_accuracies(
    ck: &Path,
    train: &Path,
    test: &Path,
    mean: [f32; 3],
    std: [f32; 3],
) -> (f64, f64) {
    use byol_trainer::eval::{
        Encoder, KnnConfig, Preprocess, ProbeConfig, extract, knn_accuracy, linear_probe,
    };
    let cpu = byol_trainer::device::open_device(byol_trainer::device::DeviceSpec::Cpu).unwrap();
    let (encoder, _) = Encoder::from_checkpoint(ck, byol_trainer::Kernels::Auto, &cpu).unwrap();
    let pre = Preprocess {
        mean,
        std,
        ..Preprocess::new(16)
    };
    let features = |ds: &Path| {
        let ds = byol_ingest::Dataset::open(ds).unwrap();
        extract(&encoder, &ds, &pre, 256, &byol_ingest::NoProgress).unwrap()
    };
    let (train, mut test) = (features(train), features(test));
    test.align_to(&train.classes).unwrap();
    let knn = KnnConfig {
        k: 200,
        ..KnnConfig::default()
    };
    (
        linear_probe(&train, &test, &ProbeConfig::default())
            .unwrap()
            .accuracy,
        knn_accuracy(&train, &test, knn).unwrap(),
    )
}

#[test]
fn eval_feeds_the_encoder_the_normalisation_it_was_trained_with() {
    let dir = tempfile::tempdir().unwrap();
    let train = two_tone(dir.path(), "train", 12, 1);
    let test = two_tone(dir.path(), "test", 6, 2);
    // Trained on views normalised with the dataset's own statistics, not ImageNet's.
    let cfg = dir.path().join("stats.toml");
    let stats = "mean = [0.3, 0.3, 0.3]\nstd = [0.35, 0.35, 0.35]\n";
    std::fs::write(
        &cfg,
        format!("{TINY_TRAIN}[augment.view1]\n{stats}[augment.view2]\n{stats}"),
    )
    .unwrap();
    let run_dir = dir.path().join("run");
    let o = train_run(&cfg, &train, &run_dir, &["--steps", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let ck = run_dir.join("checkpoints/step-0000000002");
    let eval = |extra: &[&str], name: &str| {
        let json = dir.path().join(format!("{name}.json"));
        let base = [
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--test",
            test.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ];
        let o = run(&[&base[..], extra].concat());
        assert!(o.status.success(), "{}", text(&o));
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let acc = |i: usize| r["results"][i]["accuracy"].as_f64().unwrap();
        (r.clone(), (acc(0), acc(1)), text(&o))
    };
    // The checkpoint's record is used by default, and equals the reference computed
    // with the training statistics.
    let (r, recorded, out) = eval(&[], "recorded");
    assert_eq!(r["input_source"], "checkpoint");
    assert_eq!(
        r["input"],
        serde_json::json!({"size": 16, "mean": [0.3, 0.3, 0.3], "std": [0.35, 0.35, 0.35],
                           "interpolation": "bicubic"})
    );
    assert!(out.contains("mean (0.3, 0.3, 0.3)"), "{out}");
    assert!(!out.contains("warning"), "{out}");
    assert_eq!(
        recorded,
        reference_accuracies(&ck, &train, &test, [0.3; 3], [0.35; 3])
    );
    // Flags override the record (one value for all three channels).
    let (r, flagged, _) = eval(&["--mean", "0.5", "--std", "0.25"], "flags");
    assert_eq!(r["input"]["mean"], serde_json::json!([0.5, 0.5, 0.5]));
    assert_eq!(
        flagged,
        reference_accuracies(&ck, &train, &test, [0.5; 3], [0.25; 3])
    );
    // The export writes the record into the file's metadata.
    let out = dir.path().join("encoder.safetensors");
    let o = run(&[
        "export",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("mean=[0.3, 0.3, 0.3]"), "{}", text(&o));
    let bytes = std::fs::read(&out).unwrap();
    let (_, st) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let input: serde_json::Value =
        serde_json::from_str(&st.metadata().as_ref().unwrap()["byol.input"]).unwrap();
    assert_eq!(input["std"], serde_json::json!([0.35, 0.35, 0.35]));
    // A checkpoint written before the record existed: ImageNet's statistics, with a
    // warning naming the flags; `--mean`/`--std` given in full silence it.
    let meta_path = ck.join("meta.json");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta.as_object_mut().unwrap().remove("input");
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();
    let (r, old, out) = eval(&[], "old");
    assert_eq!(r["input_source"], "imagenet-assumed");
    assert_eq!(r["input"]["mean"], serde_json::json!([0.485, 0.456, 0.406]));
    assert_eq!(r["image_size"], 16, "the recorded view size is still used");
    assert!(out.contains("warning") && out.contains("--mean"), "{out}");
    let (_, _, out) = eval(&["--mean", "0.3", "--std", "0.35"], "old-flags");
    assert!(!out.contains("warning"), "{out}");
    let imagenet = reference_accuracies(
        &ck,
        &train,
        &test,
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
    );
    assert_eq!(old, imagenet);
}

#[test]
fn eval_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let train = two_tone(dir.path(), "train", 4, 1);
    let run_dir = tiny_run(dir.path(), &train);
    let eval = |ck: &Path, test: &Path| {
        run(&[
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--test",
            test.to_str().unwrap(),
        ])
    };
    let o = eval(&dir.path().join("nowhere"), &train);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("nowhere"), "{}", text(&o));
    // A folder that is no run.
    let o = eval(dir.path(), &train);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("neither a checkpoint"), "{}", text(&o));
    // An unlabelled dataset.
    let flat = dir.path().join("flat-src");
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::write(flat.join("a.png"), photo(20, 16, 1)).unwrap();
    let flat_ds = dir.path().join("flat");
    ingest(&flat, &flat_ds);
    let o = eval(&run_dir, &flat_ds);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no labelled images"), "{}", text(&o));
    // A test class the training split lacks.
    let other = dir.path().join("other-src/zebra");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("z.png"), photo(20, 16, 2)).unwrap();
    let other_ds = dir.path().join("other");
    ingest(&dir.path().join("other-src"), &other_ds);
    let o = eval(&run_dir, &other_ds);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("\"zebra\" does not occur"),
        "{}",
        text(&o)
    );
}

/// The names, dtypes and shapes in a safetensors header.
fn safetensors_header(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    h.remove("__metadata__");
    h
}

#[test]
fn export_writes_the_online_encoder_under_torchvision_names() {
    let dir = tempfile::tempdir().unwrap();
    let train = two_tone(dir.path(), "train", 4, 1);
    let run_dir = tiny_run(dir.path(), &train);
    let out = dir.path().join("encoder.safetensors");
    let o = run(&[
        "export",
        "--checkpoint",
        run_dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let h = safetensors_header(&out);
    // torchvision's resnet18 state_dict has 122 entries; fc.weight and fc.bias are not
    // part of an encoder.
    assert_eq!(h.len(), 120, "{:?}", h.keys().collect::<Vec<_>>());
    assert!(
        h.keys()
            .all(|k| !k.starts_with("encoder.") && !k.starts_with("fc."))
    );
    assert!(
        h.keys()
            .all(|k| !k.contains("projector") && !k.contains("predictor"))
    );
    assert_eq!(h["conv1.weight"]["shape"], serde_json::json!([4, 3, 3, 3]));
    assert_eq!(
        h["layer4.1.bn2.running_var"]["shape"],
        serde_json::json!([32])
    );
    let nbt = &h["layer2.0.downsample.1.num_batches_tracked"];
    assert_eq!(nbt["dtype"], "I64");
    assert_eq!(nbt["shape"], serde_json::json!([]));
    // Two training-mode BatchNorm updates per step, 2 steps.
    let bytes = std::fs::read(&out).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let start = nbt["data_offsets"][0].as_u64().unwrap() as usize;
    let value = i64::from_le_bytes(bytes[8 + n + start..8 + n + start + 8].try_into().unwrap());
    assert_eq!(value, 4);

    let o = run(&[
        "export",
        "--checkpoint",
        dir.path().join("none").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

#[test]
fn plot_draws_a_png_of_the_curves_and_refuses_a_run_without_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let train = two_tone(dir.path(), "train", 4, 1);
    let run_dir = tiny_run(dir.path(), &train);
    let png = dir.path().join("curves.png");
    let o = run(&[
        "plot",
        run_dir.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--width",
        "500",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let img = image::open(&png).unwrap();
    // Loss, collapse indicator and effective rank.
    assert_eq!((img.width(), img.height()), (500, 900));
    // With a kNN column the plot gets a fourth chart.
    let metrics = run_dir.join("metrics.jsonl");
    let mut lines = std::fs::read_to_string(&metrics).unwrap();
    lines.push_str(
        "{\"step\":2,\"loss\":1.0,\"collapse\":0.5,\"effective_rank\":3.0,\"knn_accuracy\":0.5}\n",
    );
    std::fs::write(&metrics, lines).unwrap();
    let o = run(&[
        "plot",
        run_dir.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(image::open(&png).unwrap().height(), 1200);

    let empty = dir.path().join("empty-run");
    std::fs::create_dir_all(&empty).unwrap();
    let o = run(&[
        "plot",
        empty.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("metrics.jsonl"), "{}", text(&o));
    std::fs::write(empty.join("metrics.jsonl"), "").unwrap();
    let o = run(&[
        "plot",
        empty.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no metrics yet"), "{}", text(&o));
}

/// An ImageFolder dataset with `per_class` noisy 20x16 images of each `(class, rgb)`.
fn coloured(dir: &Path, name: &str, classes: &[(&str, [u8; 3])], per_class: u32) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    for (c, (class, rgb)) in classes.iter().enumerate() {
        std::fs::create_dir_all(src.join(class)).unwrap();
        for i in 0..per_class {
            let mut state = (c as u32 * 1000 + i + 1).wrapping_mul(2_654_435_761) | 1;
            let img = image::RgbImage::from_fn(20, 16, |_, _| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let n = (state >> 28) as u8;
                image::Rgb(rgb.map(|v| v.saturating_add(n)))
            });
            img.save(src.join(class).join(format!("{i:03}.png")))
                .unwrap();
        }
    }
    let ds = dir.join(name);
    ingest(&src, &ds);
    ds
}

/// `base` (a TINY_TRAIN variant) with a `[monitor]` of `train` and `test`, written to
/// `dir/monitor.toml`.
fn monitor_config(
    dir: &Path,
    base: &str,
    train: &Path,
    test: &Path,
    every: u64,
    k: usize,
) -> PathBuf {
    let cfg = dir.join("monitor.toml");
    let text = format!(
        "{base}\n[monitor]\ntrain = {:?}\ntest = {:?}\nevery_steps = {every}\nk = {k}\n",
        train.to_str().unwrap(),
        test.to_str().unwrap()
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// Steps of the metrics lines of a run, in file order.
fn logged_steps(run_dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn a_monitor_that_cannot_work_fails_before_the_first_step() {
    let dir = tempfile::tempdir().unwrap();
    let (red, blue, green) = (
        ("red", [200, 30, 30]),
        ("blue", [30, 30, 200]),
        ("green", [30, 200, 30]),
    );
    let train = coloured(dir.path(), "train", &[red, blue], 4);
    let test = coloured(dir.path(), "test", &[red, green], 3);
    let tiny = TINY_TRAIN.replace("checkpoint_every_steps = 3", "checkpoint_every_steps = 100");
    let cfg = monitor_config(dir.path(), &tiny, &train, &test, 3, 3);
    let run_dir = dir.path().join("run");
    let o = train_run(&cfg, &train, &run_dir, &["--steps", "6"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = text(&o);
    assert!(
        out.contains("[monitor]") && out.contains("\"green\""),
        "{out}"
    );
    assert_eq!(
        logged_steps(&run_dir),
        Vec::<u64>::new(),
        "nothing was trained"
    );
}

#[test]
fn an_error_after_the_first_step_checkpoints_the_last_completed_step() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    let cfg = tiny_config(
        dir.path(),
        &[("checkpoint_every_steps = 3", "checkpoint_every_steps = 100")],
    );
    let run_dir = dir.path().join("run");
    let fail_at_3 = [("BYOL_TEST_FAIL_AT_STEP", "3")];
    let o = train_run_env(&cfg, &ds, &run_dir, &["--steps", "6"], &fail_at_3);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("checkpoint written"), "{}", text(&o));
    assert!(
        run_dir
            .join("checkpoints/step-0000000003/meta.json")
            .exists()
    );
    // The run goes on from there.
    let o = train_run(&cfg, &ds, &run_dir, &["--steps", "6", "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("resumed from") && text(&o).contains("(step 3)"),
        "{}",
        text(&o)
    );
}

#[test]
fn corrupt_monitor_records_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let train = two_tone(dir.path(), "train", 6, 1);
    let test = two_tone(dir.path(), "test", 4, 2);
    let shard = test.join("shards/000000.shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[70] ^= 0x01; // inside record 0 (the header is 64 bytes)
    std::fs::write(&shard, &bytes).unwrap();
    let cfg = monitor_config(dir.path(), TINY_TRAIN, &train, &test, 2, 3);
    let run_dir = dir.path().join("run");
    let o = train_run(&cfg, &train, &run_dir, &["--steps", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let metrics = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["knn_skipped_records"], 1, "{metrics}");
    assert!(last["knn_accuracy"].as_f64().is_some(), "{metrics}");
}

#[test]
fn a_resumed_run_logs_each_step_once() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    let cfg = tiny_config(
        dir.path(),
        &[
            ("checkpoint_every_steps = 3", "checkpoint_every_steps = 5"),
            ("log_every = 2", "log_every = 1"),
        ],
    );
    let run_dir = dir.path().join("run");
    // Killed (SIGABRT, no clean-up, as kill -9) right after step 8 is logged.
    let abort_at_8 = [("BYOL_TEST_ABORT_AT_STEP", "8")];
    let o = train_run_env(&cfg, &ds, &run_dir, &["--steps", "12"], &abort_at_8);
    assert!(!o.status.success());
    assert_eq!(logged_steps(&run_dir), (1..=8).collect::<Vec<_>>());
    let o = train_run(&cfg, &ds, &run_dir, &["--steps", "12", "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(step 5)"), "{}", text(&o));
    assert_eq!(logged_steps(&run_dir), (1..=12).collect::<Vec<_>>());
    let png = dir.path().join("curves.png");
    let o = run(&[
        "plot",
        run_dir.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("plotted 12 steps"), "{}", text(&o));
}

#[test]
fn steps_past_the_schedule_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    let cfg = tiny_config(dir.path(), &[("total_steps = 20", "total_steps = 2")]);
    let o = train_run(&cfg, &ds, &dir.path().join("run"), &["--steps", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning:") && err.contains("total_steps = 2"),
        "{err}"
    );
    // Within the schedule: no warning.
    let o = train_run(&cfg, &ds, &dir.path().join("run2"), &["--steps", "2"]);
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("warning:"),
        "{}",
        text(&o)
    );
}

/// A resume with another `train.total_steps` moves the cosine schedules: warned, with
/// the old and new values and the learning rate and τ at the resumed step; not when
/// `--minutes` refits them on purpose, nor under a constant schedule.
#[test]
fn a_resume_with_another_total_steps_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    let run = dir.path().join("run");
    let cfg = tiny_config(dir.path(), &[]);
    let o = train_run(&cfg, &ds, &run, &["--steps", "3"]);
    assert!(o.status.success(), "{}", text(&o));
    let cfg = tiny_config(dir.path(), &[("total_steps = 20", "total_steps = 40")]);
    let o = train_run(&cfg, &ds, &run, &["--resume", "--steps", "4"]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "warning: resuming at step 3 with train.total_steps = 40 (the checkpoint had 20)"
        ) && err.contains("learning rate")
            && err.contains("tau"),
        "{err}"
    );
    let changed = "the checkpoint had";
    let cfg = tiny_config(dir.path(), &[("total_steps = 20", "total_steps = 60")]);
    let o = train_run(&cfg, &ds, &run, &["--resume", "--minutes", "0.01"]);
    assert!(!text(&o).contains(changed), "{}", text(&o));
    let constant = "base_lr = 1e-3\nschedule = \"constant\"";
    let cfg = tiny_config(
        dir.path(),
        &[
            ("total_steps = 20", "total_steps = 80"),
            ("base_lr = 1e-3", constant),
        ],
    );
    let o = train_run(&cfg, &ds, &run, &["--resume", "--steps", "100"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains(changed), "{}", text(&o));
}

#[test]
fn sigterm_checkpoints_the_last_step_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    let cfg = tiny_config(
        dir.path(),
        &[
            (
                "checkpoint_every_steps = 3",
                "checkpoint_every_steps = 1000",
            ),
            ("total_steps = 20", "total_steps = 100000"),
            ("log_every = 2", "log_every = 1"),
        ],
    );
    let run_dir = dir.path().join("run");
    let child = byol()
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--data",
            ds.to_str().unwrap(),
        ])
        .args(["--run", run_dir.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while logged_steps(&run_dir).len() < 2 {
        assert!(std::time::Instant::now() < deadline, "no step logged");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(128 + 15), "{}", text(&o));
    let steps = logged_steps(&run_dir);
    let last = *steps.last().unwrap();
    assert!(
        run_dir
            .join(format!("checkpoints/step-{last:010}/meta.json"))
            .exists(),
        "{}",
        text(&o)
    );
}

#[test]
fn views_larger_than_the_stored_images_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let src = folder(dir.path(), 24, 24);
    let ds = dir.path().join("ds");
    let o = run(&[
        "ingest",
        src.to_str().unwrap(),
        "--out",
        ds.to_str().unwrap(),
        "--max-side",
        "6",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let cfg = dir.path().join("tiny.toml");
    std::fs::write(&cfg, TINY_TRAIN).unwrap();
    let o = train_run(&cfg, &ds, &dir.path().join("run"), &["--steps", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("short side of 6 px") && err.contains("16 px views"),
        "{err}"
    );
}

#[test]
fn minutes_fit_the_schedule_to_the_time_and_stop_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 24, 24);
    let cfg = tiny_config(
        dir.path(),
        &[("checkpoint_every_steps = 3", "checkpoint_every_steps = 0")],
    );
    let run_dir = dir.path().join("run");
    let started = std::time::Instant::now();
    let o = train_run(&cfg, &ds, &run_dir, &["--minutes", "0.15"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "ran past its budget"
    );
    assert!(text(&o).contains("schedules fitted to"), "{}", text(&o));
    // The checkpoint's schedule length is the step the run stopped at (or the fitted
    // one, when the deadline came first).
    let ckpt = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("meta.json")).unwrap()).unwrap();
    let (step, total) = (
        meta["step"].as_u64().unwrap(),
        meta["config"]["train"]["total_steps"].as_u64().unwrap(),
    );
    assert!(
        step >= 11 && total >= step && total != 20,
        "step {step}, total_steps {total}"
    );
    let o = train_run(&cfg, &ds, &run_dir, &["--minutes", "0", "--resume"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
}

#[test]
fn a_damaged_newest_checkpoint_is_passed_over_for_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ds) = packed(dir.path(), 16, 24);
    let cfg = tiny_config(dir.path(), &[("keep_last = 2", "keep_last = 3")]);
    let run_dir = dir.path().join("run");
    let o = train_run(&cfg, &ds, &run_dir, &["--steps", "6"]);
    assert!(o.status.success(), "{}", text(&o));
    let newest = run_dir.join("checkpoints/step-0000000006/online.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&newest, bytes).unwrap();
    let o = train_run(&cfg, &ds, &run_dir, &["--steps", "8", "--resume"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("passed over") && out.contains("checksum"),
        "{out}"
    );
    assert!(
        out.contains("resumed from") && out.contains("(step 3)"),
        "{out}"
    );
}

#[test]
fn compact_merges_shards_and_a_killed_compaction_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let ds = dir.path().join("ds");
    // Three ingest runs: three small shards; one file deleted: a retired record.
    for wave in 0..3u32 {
        std::fs::create_dir_all(src.join("a")).unwrap();
        for i in 0..4u32 {
            let img = image::RgbImage::from_fn(20, 20, |x, y| {
                image::Rgb([
                    (x * 9 + wave * 40 + i) as u8,
                    (y * 7 + i * 30) as u8,
                    (wave * 80) as u8,
                ])
            });
            img.save(src.join(format!("a/{wave}-{i}.png"))).unwrap();
        }
        ingest(&src, &ds);
    }
    std::fs::remove_file(src.join("a/0-0.png")).unwrap();
    ingest(&src, &ds);
    let records = |o: &Output| json(o)["stats"]["records"].as_u64().unwrap();
    let before = run(&["inspect", ds.to_str().unwrap(), "--json"]);
    // Killed after writing the merged shard, before the manifest that lists it.
    let o = byol()
        .args(["compact", ds.to_str().unwrap(), "--min-run", "2"])
        .env("BYOL_TEST_ABORT_IN_COMPACTION", "1")
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    let o = run(&["inspect", ds.to_str().unwrap(), "--verify", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(records(&o), records(&before));
    // Done: one shard, the retired record's bytes gone, the same live records.
    let o = run(&["compact", ds.to_str().unwrap(), "--min-run", "2", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r = json(&o);
    assert_eq!(r["before"]["shards"], 3, "{r}");
    assert_eq!(r["after"]["shards"], 1, "{r}");
    assert_eq!(r["report"]["reclaimed_records"], 1, "{r}");
    assert!(
        r["after"]["bytes"].as_u64() < r["before"]["bytes"].as_u64(),
        "{r}"
    );
    assert_eq!(r["after"]["live"], r["before"]["live"]);
    let o = run(&["inspect", ds.to_str().unwrap(), "--verify", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(records(&o), records(&before));
    let text_out = run(&["compact", ds.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&text_out.stdout).contains("nothing to compact"));
}
