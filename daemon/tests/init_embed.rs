//! `byol train --init` (pretrained weights, refusals, a resume ignoring init) and
//! `byol embed` (.npy + .jsonl and lightly's .csv, equal to evaluation's features),
//! through the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{ingest, run, text};

const TINY: &str = r#"
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
log_every = 1
checkpoint_every_steps = 100
[augment.view1]
mean = [0.3, 0.3, 0.3]
std = [0.35, 0.35, 0.35]
[augment.view2]
mean = [0.3, 0.3, 0.3]
std = [0.35, 0.35, 0.35]
"#;

/// An ImageFolder of two classes (dark, bright) of 20 x 16 PNGs, ingested to `dir/name`.
fn two_tone(dir: &Path, name: &str, per_class: u32) -> PathBuf {
    let src = dir.join(format!("{name}-src"));
    for (class, base) in [("dark", 40u8), ("bright", 200u8)] {
        std::fs::create_dir_all(src.join(class)).unwrap();
        for i in 0..per_class {
            let mut state = (1000 + i).wrapping_mul(2_654_435_761) | 1;
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

fn config(dir: &Path, text: &str) -> PathBuf {
    let cfg = dir.join("tiny.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn train(cfg: &Path, data: &Path, run_dir: &Path, extra: &[&str]) -> Output {
    let base = [
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--run",
        run_dir.to_str().unwrap(),
    ];
    run(&[&base[..], extra].concat())
}

fn meta(ck: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(ck.join("meta.json")).unwrap()).unwrap()
}

/// `name → values` of a safetensors file's tensors of `dtype`.
fn counters(file: &Path) -> Vec<(String, i64)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, i64)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.ends_with("num_batches_tracked"))
        .map(|(n, t)| (n, i64::from_le_bytes(t.data().try_into().unwrap())))
        .collect();
    out.sort();
    out
}

/// A run `dir/first` of `steps` steps on `ds`, exported to `dir/first.safetensors`: the
/// run folder and the export.
fn trained_and_exported(dir: &Path, cfg: &Path, ds: &Path, steps: u32) -> (PathBuf, PathBuf) {
    let first = dir.join("first");
    let o = train(cfg, ds, &first, &["--steps", &steps.to_string()]);
    assert!(o.status.success(), "{}", text(&o));
    let export = dir.join("first.safetensors");
    let o = run(&[
        "export",
        "--checkpoint",
        first.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    (first, export)
}

#[test]
fn train_starts_from_an_export_and_a_resume_ignores_a_changed_init() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_tone(dir.path(), "data", 8);
    let cfg = config(dir.path(), TINY);
    // The weights to start from: our own export of a 2-step run.
    let (_, export) = trained_and_exported(dir.path(), &cfg, &ds, 2);
    let exported = counters(&export);
    assert!(exported.iter().all(|(_, c)| *c == 4), "{exported:?}");

    // A run from it: its BatchNorm counters go on from the export's (4 + 2 per step).
    let second = dir.path().join("second");
    let o = train(
        &cfg,
        &ds,
        &second,
        &["--steps", "1", "--init", export.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("encoder initialised from") && text(&o).contains("safetensors"),
        "{}",
        text(&o)
    );
    let ck = second.join("checkpoints/step-0000000001");
    let online: Vec<(String, i64)> = counters(&ck.join("online.safetensors"))
        .into_iter()
        .filter(|(n, _)| n.starts_with("encoder."))
        .collect();
    assert_eq!(online.len(), exported.len());
    assert!(online.iter().all(|(_, c)| *c == 6), "{online:?}");
    // init is recorded in the checkpoint (as an absolute path).
    assert_eq!(
        meta(&ck)["config"]["train"]["init"],
        serde_json::json!(export.to_str().unwrap())
    );

    // A resume with init changed to a file that does not exist: the checkpoint wins,
    // and the run says so once.
    let o = train(
        &cfg,
        &ds,
        &second,
        &[
            "--steps",
            "2",
            "--resume",
            "--init",
            "/nonexistent/weights.pth",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o).matches("ignored").count(), 1, "{}", text(&o));
    // And with init removed from the config and the flags: no notice.
    let o = train(&cfg, &ds, &second, &["--steps", "3", "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("ignored"), "{}", text(&o));

    // A file that does not fit (another width) is refused naming the tensor, and the
    // run folder is not created.
    let wide = config(dir.path(), &TINY.replace("width = 4", "width = 8"));
    let refused = dir.path().join("refused");
    let o = train(
        &wide,
        &ds,
        &refused,
        &["--steps", "1", "--init", export.to_str().unwrap()],
    );
    assert!(!o.status.success());
    let out = text(&o);
    assert!(
        out.contains("bn1.bias has shape [4]") && out.contains("expects [8]"),
        "{out}"
    );
    assert!(!refused.exists(), "{out}");
    // A legacy PyTorch file, through [train] init in the config.
    let legacy = dir.path().join("legacy.pth");
    std::fs::write(&legacy, b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.").unwrap();
    let with_init = config(
        dir.path(),
        &TINY.replace(
            "[train]\n",
            &format!("[train]\ninit = {:?}\n", legacy.to_str().unwrap()),
        ),
    );
    let o = train(&with_init, &ds, &refused, &["--steps", "1"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("legacy") && text(&o).contains("legacy.pth"),
        "{}",
        text(&o)
    );
    assert!(!refused.exists());
}

/// kNN top-1 of `byol eval` per encoder row (`trained`, and `random-init` when asked).
fn knn(dir: &Path, ck: &Path, ds: &Path, extra: &[&str]) -> Vec<(String, f64)> {
    let json = dir.join("knn.json");
    let base = [
        "eval",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--train",
        ds.to_str().unwrap(),
        "--test",
        ds.to_str().unwrap(),
        "--protocol",
        "knn",
        "--k",
        "3",
        "--json",
        json.to_str().unwrap(),
    ];
    let o = run(&[&base[..], extra].concat());
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    r["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["encoder"].as_str().unwrap().to_owned(),
                x["accuracy"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn steps_0_checkpoints_the_start_and_a_run_from_an_export_starts_from_its_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_tone(dir.path(), "data", 6);
    let cfg = config(dir.path(), TINY);
    let (first, export) = trained_and_exported(dir.path(), &cfg, &ds, 3);

    // Step 0 of a run from the export: checkpointed by --steps 0, it embeds every image
    // as the exported checkpoint does, bit for bit, so kNN agrees too.
    let zero = dir.path().join("zero");
    let o = train(
        &cfg,
        &ds,
        &zero,
        &["--steps", "0", "--init", export.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("trained to step 0"), "{}", text(&o));
    assert!(zero.join("checkpoints/step-0000000000/meta.json").is_file());
    let embed = |ck: &Path, out: &Path| {
        let o = run(&[
            "embed",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--data",
            ds.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        std::fs::read(out).unwrap()
    };
    let exported = embed(&first, &dir.path().join("first.npy"));
    assert_eq!(exported, embed(&zero, &dir.path().join("zero.npy")));
    assert_eq!(
        knn(dir.path(), &first, &ds, &[]),
        knn(dir.path(), &zero, &ds, &[])
    );
    // Training goes on from it.
    let o = train(&cfg, &ds, &zero, &["--steps", "1", "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("(step 0)"), "{}", text(&o));
    assert!(zero.join("checkpoints/step-0000000001").is_dir());

    // Without init, step 0 is the random encoder `byol eval --random-init` rebuilds.
    let random = dir.path().join("random");
    let o = train(&cfg, &ds, &random, &["--steps", "0"]);
    assert!(o.status.success(), "{}", text(&o));
    let rows = knn(dir.path(), &random, &ds, &["--random-init"]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].1, rows[1].1, "{rows:?}");
    // A resume at step 0 writes no second checkpoint 0.
    let o = train(&cfg, &ds, &random, &["--steps", "0", "--resume"]);
    assert!(o.status.success(), "{}", text(&o));
    let saved = byol_trainer::checkpoint::list(&random.join("checkpoints"));
    assert_eq!(saved.len(), 1, "{}", text(&o));
}

/// The rows of an `.npy` float32 2-D file: `(rows, dim, values)`.
fn read_npy(path: &Path) -> (usize, usize, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape = header.split("'shape': (").nth(1).unwrap();
    let shape: Vec<usize> = shape
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let values: Vec<f32> = bytes[10 + len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values.len(), shape[0] * shape[1]);
    (shape[0], shape[1], values)
}

#[test]
fn embed_writes_npy_jsonl_and_csv_with_evals_features() {
    let dir = tempfile::tempdir().unwrap();
    let ds = two_tone(dir.path(), "data", 6);
    let cfg = config(dir.path(), TINY);
    let run_dir = dir.path().join("run");
    let o = train(&cfg, &ds, &run_dir, &["--steps", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    let embed = |out: &Path, extra: &[&str]| {
        let base = [
            "embed",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--data",
            ds.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        let o = run(&[&base[..], extra].concat());
        assert!(o.status.success(), "{}", text(&o));
        text(&o)
    };
    let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.npy"));
    let out = embed(&a, &[]);
    assert!(out.contains("embedded 12 images"), "{out}");
    assert!(out.contains("mean (0.3, 0.3, 0.3)"), "{out}");
    // Twice, in other batches: the same bytes.
    embed(&b, &["--batch-size", "5"]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(
        std::fs::read(dir.path().join("a.jsonl")).unwrap(),
        std::fs::read(dir.path().join("b.jsonl")).unwrap()
    );
    let (rows, dim, values) = read_npy(&a);
    assert_eq!((rows, dim), (12, 32));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("a.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), rows);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["row"], i);
        let source = l["source"].as_str().unwrap();
        assert!(Path::new(source).is_file(), "{l}");
        let class = Path::new(source).parent().unwrap().file_name().unwrap();
        assert_eq!(l["label"], class.to_str().unwrap(), "{l}");
    }

    // Evaluation's feature pass over the same records gives the same features.
    use byol_trainer::eval::{
        Encoder, InputOverrides, Preprocess, checkpoint_input, extract, resolve_checkpoint,
    };
    let ck = resolve_checkpoint(&run_dir).unwrap();
    let cpu = byol_trainer::device::open_device(byol_trainer::device::DeviceSpec::Cpu).unwrap();
    let (encoder, meta) = Encoder::from_checkpoint(&ck, byol_trainer::Kernels::Auto, &cpu).unwrap();
    let pre = Preprocess::for_input(&checkpoint_input(&meta, &InputOverrides::default()).input);
    let dataset = byol_ingest::Dataset::open(&ds).unwrap();
    let f = extract(&encoder, &dataset, &pre, 256, &byol_ingest::NoProgress).unwrap();
    assert_eq!((f.len(), f.dim), (rows, dim));
    for i in [0, 5, 11] {
        let ours = &values[i * dim..(i + 1) * dim];
        let theirs = f.row(i);
        let err = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err <= 1e-6, "row {i}: max difference {err}");
        assert_eq!(
            lines[i]["label"],
            f.classes[f.labels[i] as usize].as_str(),
            "row {i}"
        );
    }

    // lightly's CSV: the same values, integer labels.
    let csv = dir.path().join("e.csv");
    embed(&csv, &[]);
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut csv_lines = text.lines();
    let header: Vec<&str> = csv_lines.next().unwrap().split(',').collect();
    assert_eq!(header.len(), dim + 2);
    assert_eq!(
        (header[0], header[1], header[dim], header[dim + 1]),
        ("filenames", "embedding_0", "embedding_31", "labels")
    );
    let rows_csv: Vec<Vec<&str>> = csv_lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows_csv.len(), rows);
    for (i, r) in rows_csv.iter().enumerate() {
        assert_eq!(r[0], lines[i]["source"].as_str().unwrap());
        let parsed: Vec<f32> = r[1..=dim].iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(parsed, &values[i * dim..(i + 1) * dim], "row {i}");
        let label: usize = r[dim + 1].parse().unwrap();
        assert_eq!(f.classes[label], lines[i]["label"].as_str().unwrap());
    }
    // Another extension is refused before anything is computed.
    let o = run(&[
        "embed",
        "--checkpoint",
        run_dir.to_str().unwrap(),
        "--data",
        ds.to_str().unwrap(),
        "--out",
        dir.path().join("e.parquet").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(common::text(&o).contains(".npy"), "{}", common::text(&o));
}
