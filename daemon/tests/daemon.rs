//! `byol daemon` end to end through the real binary: an empty watched folder, images
//! in waves (written in place, slowly, renamed into place; deleted, replaced, moved to
//! another class; a folder made with its files at once; bad files), SIGTERM, a restart
//! that resumes the same step; bad configs at start and at SIGHUP; one daemon per run.

mod common;

use std::fs::File;
use std::io::Write;
use std::time::Duration;

use common::{
    Daemon, byol, complete_images, daemon_config, dataset_sources, distinct_png, live_records, text,
};

/// The last step named in a "checkpoint step N" line.
fn last_checkpoint(out: &str) -> u64 {
    out.lines()
        .filter_map(|l| l.strip_prefix("checkpoint step "))
        .filter_map(|l| l.split(':').next()?.parse().ok())
        .max()
        .expect("a checkpoint line")
}

fn steps_logged(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("step "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn waves_of_files_end_as_the_dataset_and_a_restart_resumes_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    std::fs::create_dir_all(&watch).unwrap();
    let cfg = root.join("daemon.toml");
    std::fs::write(&cfg, daemon_config(root, &[])).unwrap();
    let mut d = Daemon::start(&cfg, root.join("out1.txt"), &[]);
    d.wait_for("the watch", |o| o.contains("watching"));

    // `mkdir -p` and files at once: created before the folders' watches exist.
    for (class, first) in [("cat", 0), ("dog", 100)] {
        std::fs::create_dir_all(watch.join(class)).unwrap();
        for i in 0..6 {
            std::fs::write(
                watch.join(class).join(format!("{i}.png")),
                distinct_png(first + i),
            )
            .unwrap();
        }
    }
    d.wait_for("training", |o| steps_logged(o).len() >= 2);

    // A slow write: three chunks over a second; only the complete file is stored.
    let slow = watch.join("cat/slow.png");
    let bytes = distinct_png(7);
    let mut f = File::create(&slow).unwrap();
    for chunk in bytes.chunks(bytes.len().div_ceil(3)) {
        f.write_all(chunk).unwrap();
        f.sync_all().unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(f);
    // Renamed into place from a partial-download name (which is ignored).
    std::fs::write(watch.join("dog/new.png.part"), distinct_png(8)).unwrap();
    std::fs::rename(watch.join("dog/new.png.part"), watch.join("dog/new.png")).unwrap();
    // Deleted, replaced, moved to another class.
    std::fs::remove_file(watch.join("cat/0.png")).unwrap();
    std::fs::write(watch.join("cat/1.png"), distinct_png(9)).unwrap();
    std::fs::rename(watch.join("cat/2.png"), watch.join("dog/2.png")).unwrap();
    // Bad files: rejected with a reason, training goes on.
    std::fs::write(watch.join("dog/empty.png"), b"").unwrap();
    std::fs::write(watch.join("dog/truncated.png"), &distinct_png(10)[..60]).unwrap();
    std::fs::write(watch.join("dog/notes.jpg"), b"not an image at all").unwrap();
    d.wait_for("the rejects", |o| {
        o.contains("empty") && o.contains("not-an-image") && o.contains("corrupt")
    });
    d.wait_for("the relabel", |o| o.contains("relabelled 1"));
    let steps_before = steps_logged(&d.output()).len();
    d.wait_for("more steps", |o| steps_logged(o).len() >= steps_before + 2);

    // A second daemon on the same run folder is refused.
    let o = byol()
        .args(["daemon", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("another byol daemon"), "{}", text(&o));

    // SIGHUP with a bad config: refused, the daemon trains on.
    std::fs::write(
        &cfg,
        daemon_config(root, &[]).replace("settle_secs = 0.4", "settle_secs = -1"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    d.wait_for("the refused reload", |o| o.contains("reload refused"));
    assert!(d.output().contains("settle_secs"), "{}", d.output());
    let steps_before = steps_logged(&d.output()).len();
    d.wait_for("steps after the bad reload", |o| {
        steps_logged(o).len() >= steps_before + 2
    });
    // A good one applies.
    std::fs::write(
        &cfg,
        daemon_config(root, &[("log_every = 5", "log_every = 3")]),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    d.wait_for("the reload", |o| o.contains("config reloaded"));

    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
    let stopped_at = last_checkpoint(&out);

    // The dataset is what the folders hold: every complete file once, with its final
    // content and label; nothing deleted or replaced is live.
    let want = complete_images(&watch);
    let (sources, live) = (
        dataset_sources(&root.join("data")),
        live_records(&root.join("data")),
    );
    assert_eq!(sources, want, "{out}");
    let distinct: std::collections::BTreeSet<&String> = want.values().map(|(h, _)| h).collect();
    assert_eq!(live, distinct.len() as u64, "live records");

    // A restart resumes the step it stopped at.
    let mut d = Daemon::start(&cfg, root.join("out2.txt"), &[]);
    d.wait_for("the resume", |o| o.contains("training from step"));
    let out = d.output();
    assert!(
        out.contains(&format!("(step {stopped_at})"))
            && out.contains(&format!("training from step {stopped_at}")),
        "{out}"
    );
    let (status, out) = d.stop();
    assert!(status.success(), "{out}");
}

#[test]
fn a_bad_config_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("in")).unwrap();
    let cfg = root.join("bad.toml");
    for (bad, named) in [
        (
            daemon_config(root, &[]).replace("schedule = \"constant\"", "schedule = \"cosine\""),
            "constant",
        ),
        (
            daemon_config(root, &[]).replace("settle_secs", "settle_sec"),
            "settle_sec",
        ),
        (
            daemon_config(root, &[])
                .replace(&root.join("in").display().to_string(), "/no/such/folder"),
            "/no/such/folder",
        ),
        (
            daemon_config(root, &[]).replace("127.0.0.1:0", "0.0.0.0:9464"),
            "allow_remote_metrics",
        ),
    ] {
        std::fs::write(&cfg, bad).unwrap();
        for cmd in ["validate", "daemon"] {
            let o = byol()
                .args([cmd, "--config", cfg.to_str().unwrap()])
                .output()
                .unwrap();
            assert_eq!(o.status.code(), Some(1), "{cmd}: {}", text(&o));
            assert!(text(&o).contains(named), "{cmd}: {}", text(&o));
        }
    }
    assert!(!root.join("run").exists(), "nothing was started");
    std::fs::write(&cfg, daemon_config(root, &[])).unwrap();
    let o = byol()
        .args(["validate", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_non_finite_loss_is_rolled_back_and_an_idle_daemon_pauses_until_new_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    for (class, first) in [("a", 200), ("b", 220)] {
        std::fs::create_dir_all(watch.join(class)).unwrap();
        for i in 0..8 {
            std::fs::write(
                watch.join(class).join(format!("{i}.png")),
                distinct_png(first + i),
            )
            .unwrap();
        }
    }
    let cfg = root.join("daemon.toml");
    let text_cfg = daemon_config(root, &[])
        .replace("idle_after_epochs = 0", "idle_after_epochs = 20")
        .replace("checkpoint_every_steps = 25", "checkpoint_every_steps = 10");
    std::fs::write(&cfg, text_cfg).unwrap();
    let mut d = Daemon::start(
        &cfg,
        root.join("out.txt"),
        &[("BYOL_TEST_NAN_AT_STEP", "13".to_owned())],
    );
    // Step 13 diverges: back to the checkpoint of step 10, and training goes on.
    d.wait_for("the rollback", |o| o.contains("non-finite loss at step 13"));
    assert!(d.output().contains("(step 10)"), "{}", d.output());
    // 16 records, batches of 8: 20 epochs of nothing new is 40 steps.
    d.wait_for("the pause", |o| o.contains("paused: nothing new"));
    let paused_at = *steps_logged(&d.output()).last().unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        *steps_logged(&d.output()).last().unwrap(),
        paused_at,
        "no step while paused"
    );
    std::fs::write(watch.join("a/new.png"), distinct_png(240)).unwrap();
    d.wait_for("training again", |o| {
        o.matches("training from step").count() >= 2
    });
    d.wait_for("a step after the pause", |o| {
        steps_logged(o).last().is_some_and(|&s| s > paused_at)
    });
    let (status, out) = d.stop();
    assert!(status.success(), "{out}");
    // No metrics line holds the diverged step's loss; steps past the rollback are
    // logged once each.
    let metrics = std::fs::read_to_string(root.join("run/metrics.jsonl")).unwrap();
    assert!(
        !metrics.contains("NaN") && !metrics.contains("null"),
        "{metrics}"
    );
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
}

/// `GET /metrics` on the address a daemon printed: the exposition (0.0.4 text).
fn scrape(out: &str) -> String {
    use std::io::Read;
    let addr = out
        .lines()
        .find_map(|l| l.strip_prefix("metrics on http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in:\n{out}"));
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

/// The value of the sample named `name` (with its labels) in an exposition.
fn sample(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{exposition}"))
}

/// An export that fails after a good save (a folder squats on
/// `encoder-latest.safetensors`) is an export failure: the checkpoint event fires, the
/// last-checkpoint gauge moves, no "checkpoint failed". After a restart the gauge holds
/// the resumed checkpoint's time, before any new checkpoint.
#[test]
fn a_failed_export_is_not_a_failed_checkpoint_and_a_restart_keeps_the_checkpoint_time() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("in/a")).unwrap();
    for i in 0..8 {
        std::fs::write(root.join(format!("in/a/{i}.png")), distinct_png(i)).unwrap();
    }
    let squatter = root.join("run/encoder-latest.safetensors");
    std::fs::create_dir_all(&squatter).unwrap();
    std::fs::write(squatter.join("keep"), b"x").unwrap();
    let cfg = root.join("d.toml");
    let edits = [("checkpoint_every_steps = 25", "checkpoint_every_steps = 4")];
    std::fs::write(&cfg, daemon_config(root, &edits)).unwrap();
    let mut d = Daemon::start(&cfg, root.join("out1.txt"), &[]);
    d.wait_for("the failed export", |o| o.contains("export failed ("));
    let out = d.output();
    assert!(out.contains("checkpoint step 4:"), "{out}");
    assert!(!out.contains("checkpoint failed"), "{out}");
    let metrics = scrape(&out);
    assert!(
        sample(
            &metrics,
            "byol_failures_total{operation=\"export\",kind=\"other\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "byol_failures_total{operation=\"checkpoint\",kind=\"other\"}"
        ),
        0.0
    );
    assert!(sample(&metrics, "byol_last_checkpoint_timestamp_seconds") > 1.7e9);
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");

    // Restarted, with checkpoints far apart: the gauge is the resumed checkpoint's time.
    let edits = [(
        "checkpoint_every_steps = 25",
        "checkpoint_every_steps = 100000",
    )];
    std::fs::write(&cfg, daemon_config(root, &edits)).unwrap();
    let newest = byol_trainer_meta(&root.join("run/checkpoints"));
    let mut d = Daemon::start(&cfg, root.join("out2.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    let metrics = scrape(&d.output());
    assert_eq!(
        sample(&metrics, "byol_last_checkpoint_timestamp_seconds"),
        newest,
        "{metrics}"
    );
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}

/// `created_unix` of the newest checkpoint in `dir`.
fn byol_trainer_meta(dir: &std::path::Path) -> f64 {
    let newest = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("meta.json").is_file())
        .max()
        .unwrap();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(newest.join("meta.json")).unwrap()).unwrap();
    meta["created_unix"].as_f64().unwrap()
}

/// A 16 x 16 BMP: always the same size in bytes, whatever the pixels.
fn bmp(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(16, 16, |x, y| {
        image::Rgb([(x * 13) as u8 ^ seed, (y * 7) as u8, seed.wrapping_mul(31)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Bmp).unwrap();
    out.into_inner()
}

/// Rewrites `path` with `bytes` (the same size) and puts its old mtime back, as
/// `exiftool -P` or `touch -r` leave a file.
fn edit_keeping_mtime(path: &std::path::Path, bytes: &[u8]) {
    let before = std::fs::metadata(path).unwrap();
    assert_eq!(bytes.len() as u64, before.len());
    std::fs::write(path, bytes).unwrap();
    File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(before.modified().unwrap())
        .unwrap();
}

/// An image edited in place with its size and mtime kept is seen, while the daemon runs
/// and across a restart: the dataset holds the new pixels.
#[test]
fn an_edit_that_keeps_size_and_mtime_reaches_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("in/a")).unwrap();
    for i in 0..8 {
        std::fs::write(root.join(format!("in/a/{i}.bmp")), bmp(i)).unwrap();
    }
    let cfg = root.join("d.toml");
    std::fs::write(&cfg, daemon_config(root, &[])).unwrap();
    let file = root.join("in/a/0.bmp");
    let key = std::fs::canonicalize(&file).unwrap().display().to_string();
    let hash_of = |bytes: &[u8]| blake3::hash(bytes).to_hex().to_string();
    let stored = || {
        dataset_sources(&root.join("data"))
            .get(&key)
            .map(|(h, _)| h.clone())
    };
    let mut d = Daemon::start(&cfg, root.join("out1.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    let live_edit = bmp(100);
    edit_keeping_mtime(&file, &live_edit);
    d.wait_for("the live edit", |_| stored() == Some(hash_of(&live_edit)));
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");

    let stopped_edit = bmp(200);
    edit_keeping_mtime(&file, &stopped_edit);
    let mut d = Daemon::start(&cfg, root.join("out2.txt"), &[]);
    d.wait_for("the edit made while stopped", |_| {
        stored() == Some(hash_of(&stopped_edit))
    });
    assert_eq!(live_records(&root.join("data")), 8);
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}

/// Files named in Latin-1 (not UTF-8), present at start-up and added while the daemon
/// runs, are kept: one source each, none retired, through a restart.
#[test]
fn names_that_are_not_utf8_are_kept() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let class = root.join("in/a");
    std::fs::create_dir_all(&class).unwrap();
    let name = |i: u32, byte: u8| {
        let mut n = format!("f{i}-").into_bytes();
        n.push(byte);
        n.extend_from_slice(b".png");
        class.join(std::ffi::OsStr::from_bytes(&n))
    };
    for i in 0..8 {
        std::fs::write(name(i, 0xE9), distinct_png(i)).unwrap();
    }
    let cfg = root.join("d.toml");
    std::fs::write(&cfg, daemon_config(root, &[])).unwrap();
    let data = root.join("data");
    let mut d = Daemon::start(&cfg, root.join("out1.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    // Two names that differ only in their undecodable byte.
    std::fs::write(name(100, 0xFE), distinct_png(100)).unwrap();
    std::fs::write(name(100, 0xFF), distinct_png(101)).unwrap();
    d.wait_for("the new files", |_| live_records(&data) == 10);
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
    let retiring = |o: &str| {
        o.lines()
            .filter(|l| l.starts_with("ingest:") || l.starts_with("start-up scan:"))
            .any(|l| l.contains("retired"))
    };
    assert!(!retiring(&out), "{out}");
    let mut d = Daemon::start(&cfg, root.join("out2.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
    assert!(!retiring(&out), "{out}");
    assert_eq!(live_records(&data), 10, "{out}");
    assert_eq!(common::dataset_sources(&data).len(), 10);
}
