//! `scripts/gpu-check.sh --dry-run`: every part of the GPU check (the objectives' part
//! too) runs on CPU at tiny sizes and reports its figures, so the script is ready for a
//! GPU machine; so do `scripts/gpu-run.sh` and `scripts/gpu-dist.sh`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ingest, text};

/// A labelled ImageFolder tree of 2 classes × `n` noisy 24x20 images.
fn classes(dir: &Path, n: u32) -> std::path::PathBuf {
    let src = dir.join("src");
    for (class, base) in [("dark", 50u8), ("bright", 190u8)] {
        std::fs::create_dir_all(src.join(class)).unwrap();
        for i in 0..n {
            let mut s = (i + 1).wrapping_mul(2_654_435_761) | u32::from(base);
            let img = image::RgbImage::from_fn(24, 20, |_, _| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let v = base.wrapping_add((s >> 27) as u8);
                image::Rgb([v, v / 2, 255 - v])
            });
            img.save(src.join(class).join(format!("{i:02}.png")))
                .unwrap();
        }
    }
    src
}

/// `scripts/SCRIPT --dry-run` on a small labelled set (every dataset the script reads),
/// with `env` added and no time limit a slow CI machine could reach; returns the output
/// folder (in `dir`) and its summary.
fn dry_run(dir: &Path, script: &str, env: &[(&str, &std::ffi::OsStr)]) -> (PathBuf, String) {
    let ds = dir.join("ds");
    ingest(&classes(dir, 24), &ds);
    let out = dir.join("out");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let o = Command::new("bash")
        .arg(repo.join("scripts").join(script))
        .arg("--dry-run")
        .env("OUT", &out)
        .env("BYOL", env!("CARGO_BIN_EXE_byol"))
        .env("FMNIST_TRAIN", &ds)
        .env("FMNIST_TEST", &ds)
        .env("PHOTOS", &ds)
        .env("TOTAL_SECS", "1200")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    (out, summary)
}

#[test]
fn the_gpu_check_dry_run_runs_every_part() {
    let dir = tempfile::tempdir().unwrap();
    // Every part, the objectives (their own call on a GPU) included.
    let (out, summary) = dry_run(
        dir.path(),
        "gpu-check.sh",
        &[("PARTS", "ops,step,check,train,objectives".as_ref())],
    );
    for part in [
        "ops-fp32: ",
        "ops-bf16: ",
        "r18-32 fp32",
        "r50-224 bf16",
        "check-fp32:",
        "check-bf16:",
        "train fmnist: step",
        "eval fmnist: trained knn",
        "loader r50 224:",
        "objective byol: trained knn",
        "random init",
        "objective msf: trained knn",
        "objective simsiam: trained knn",
        "objective simclr: trained knn",
        "objective barlow_twins: trained knn",
        "objective mocov2: trained knn",
        "all parts ran",
    ] {
        assert!(summary.contains(part), "{part} missing:\n{summary}");
    }
    // Every op passed against our CPU kernels (here: candle's CPU ops, the check's own
    // test), and the logs came back as one archive.
    assert!(!summary.contains("FAIL"), "{summary}");
    assert!(out.join("logs.tar.gz").is_file());
    // Our step ran in both precisions for both networks (the peer only with PyTorch).
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    for case in [
        "ours-r18-32-fp32",
        "ours-r18-32-bf16",
        "ours-r50-224-fp32",
        "ours-r50-224-bf16",
    ] {
        let line = results
            .lines()
            .find(|l| l.contains(&format!("\"case\": \"{case}\"")))
            .unwrap_or_else(|| panic!("{case} missing:\n{results}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["images_per_sec"].as_f64().unwrap() > 0.0, "{line}");
    }
}

#[test]
fn the_gpu_run_dry_run_measures_the_run_the_quality_run_and_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("src/bright");
    let (out, summary) = dry_run(
        dir.path(),
        "gpu-run.sh",
        &[("PHOTOS_SRC", photos.as_os_str())],
    );
    for part in [
        "daemon: ",
        "SIGTERM exit 0",
        "steady r18-32: step",
        "steady r50-224: step",
        "run_over_step",
        "ours trained linear",
        "ours random-init knn",
        "ours raw-pixels linear",
        "all parts ran",
    ] {
        assert!(summary.contains(part), "{part} missing:\n{summary}");
    }
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    for name in ["r18-32", "r50-224"] {
        let line = results
            .lines()
            .find(|l| l.contains(&format!("\"case\": \"steady-{name}\"")))
            .unwrap_or_else(|| panic!("steady-{name} missing:\n{results}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["run_over_step"].as_f64().unwrap() > 0.0, "{line}");
    }
    assert!(out.join("logs.tar.gz").is_file());
}

/// `scripts/gpu-dist.sh --dry-run`: the NCCL checks' plumbing on CPU (a world of one
/// through NCCL does not apply there, so both runs are the plain step and must agree).
#[test]
fn the_gpu_dist_dry_run_compares_the_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (out, summary) = dry_run(dir.path(), "gpu-dist.sh", &[]);
    for part in [
        "nccl-one: a world of one through NCCL against the plain step: max relative L2",
        "PASS",
        "nccl-r50: ",
        "gpu-dist: all parts ran",
    ] {
        assert!(summary.contains(part), "{part} missing:\n{summary}");
    }
    assert!(!summary.contains("FAIL"), "{summary}");
    assert!(out.join("logs.tar.gz").is_file());
}

/// `bash scripts/SCRIPT --plan` (PARTS as given) with OUT in `dir`: its stdout.
fn plan(dir: &Path, script: &str, parts: Option<&str>) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut c = Command::new("bash");
    c.arg(repo.join("scripts").join(script))
        .arg("--plan")
        .env("OUT", dir.join(script));
    if let Some(parts) = parts {
        c.env("PARTS", parts);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{script} --plan: {}", text(&o));
    String::from_utf8(o.stdout).unwrap()
}

/// Every training case of the GPU scripts, at the GPU machine's settings, has at least
/// one batch of data: each dataset `scripts/gpu-prepare.sh` packs (or a case makes
/// itself) holds at least the batch size of every case that trains on it, since the
/// loader drops the last partial batch. Checked from the scripts' own settings, without
/// training and without writing into the repository.
#[test]
fn every_packed_dataset_holds_a_batch_of_every_case_that_trains_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let packed: std::collections::HashMap<String, u64> = plan(dir.path(), "gpu-prepare.sh", None)
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("packs ")?.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.parse().ok()?))
        })
        .collect();
    if packed.get("photos") == Some(&0) {
        assert!(
            std::env::var("BYOL_REQUIRE_REAL_DATA").as_deref() != Ok("1"),
            "../shared/data/photos256 is missing"
        );
        eprintln!("skipped: ../shared/data/photos256 is missing");
        return;
    }
    let mut cases = Vec::new();
    for (script, parts) in [
        ("gpu-check.sh", Some("ops,check,step,train,objectives")),
        ("gpu-run.sh", Some("steady,daemon,quality")),
        ("gpu-dist.sh", None),
    ] {
        for line in plan(dir.path(), script, parts).lines() {
            let Some(rest) = line.strip_prefix("uses ") else {
                continue;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            let batch: u64 = f[1].parse().unwrap_or_else(|_| panic!("{script}: {line}"));
            let records = match f.get(2) {
                Some(own) => own.parse().unwrap(),
                None => *packed
                    .get(f[0])
                    .unwrap_or_else(|| panic!("{script} trains on {}, which is not packed", f[0])),
            };
            cases.push(format!("{script}: {} batch {batch} of {records}", f[0]));
            assert!(
                batch >= 1 && batch <= records,
                "{script} trains on {} with batch {batch}, but it holds {records} records",
                f[0]
            );
        }
    }
    // The training cases were all found (a script that printed none checks nothing).
    for needle in [
        "gpu-check.sh: photos batch 256",
        "gpu-check.sh: fmnist-train",
        "gpu-run.sh: photos batch 256",
        "gpu-run.sh: daemon-seed",
        "gpu-dist.sh: photos",
    ] {
        assert!(
            cases.iter().any(|c| c.starts_with(needle)),
            "{needle} missing: {cases:?}"
        );
    }
}
