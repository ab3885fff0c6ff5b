//! `byol preview`: a PNG grid, one row per image: the stored image, view 1, view 2.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use byol_augment::rng::mix64;
use byol_augment::{AugmentConfig, Augmenter, Preset, SampleKey, Scratch, ViewOut};
use byol_ingest::IngestSettings;
use byol_ingest::decode::{DecodeLimits, decode_for_ingest, resize_to, target_size};
use byol_ingest::manifest::MANIFEST_FILE;
use byol_ingest::{Dataset, Layout, RecordScratch};
use image::{Rgb, RgbImage};

use crate::cli::{PresetArg, PreviewArgs};
use crate::config::Config;

/// Gap between cells, in pixels.
const GAP: u32 = 4;
const BACKGROUND: Rgb<u8> = Rgb([40, 40, 40]);

/// Runs `byol preview`.
pub fn run(args: PreviewArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path)?.augment.unwrap_or_default(),
        None => AugmentConfig::default(),
    };
    if let Some(p) = args.preset {
        let size = cfg.size;
        cfg = AugmentConfig::from_preset(match p {
            PresetArg::Byol => Preset::Byol,
            PresetArg::Small => Preset::Small,
            PresetArg::Msf => Preset::Msf,
        });
        cfg.size = size;
    }
    if let Some(size) = args.size {
        cfg.size = size;
    }
    let aug = Augmenter::new(cfg).context("invalid augmentation settings")?;
    anyhow::ensure!(args.n > 0, "--n must be at least 1");
    let rows = write_grid(&aug, &args.dataset, &args.out, args.n, args.seed)?;
    println!(
        "wrote {} ({rows} rows: stored, view 1, view 2)",
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Draws `n` images of `dataset` (a dataset or an image folder), chosen by `seed`, with
/// their two views into the PNG `out`; returns the number of rows.
pub fn write_grid(
    aug: &Augmenter,
    dataset: &Path,
    out: &Path,
    n: usize,
    seed: u64,
) -> anyhow::Result<usize> {
    let images = pick_images(dataset, n, seed)?;
    if images.is_empty() {
        bail!("{}: no images to preview", dataset.display());
    }
    save_png(&render(aug, &images, seed)?, out)?;
    Ok(images.len())
}

/// An image to preview: RGB8 pixels, size, and the index its augmentation is keyed by.
struct Picked {
    rgb: Vec<u8>,
    width: u32,
    height: u32,
    index: u64,
}

/// `n` images chosen by `seed`, from a dataset or from a folder of image files.
fn pick_images(path: &Path, n: usize, seed: u64) -> anyhow::Result<Vec<Picked>> {
    let order = |len: usize| {
        let mut idx: Vec<usize> = (0..len).collect();
        idx.sort_by_key(|&i| mix64(seed ^ mix64(i as u64)));
        idx.truncate(n);
        idx
    };
    if path.join(MANIFEST_FILE).exists() {
        let ds = Dataset::open(path)?;
        let records: Vec<_> = ds.live_records().collect();
        let mut scratch = RecordScratch::default();
        let mut out = Vec::new();
        for i in order(records.len()) {
            let mut rgb = Vec::new();
            match ds.read_rgb(records[i], &mut scratch, &mut rgb) {
                Ok(m) => out.push(Picked {
                    rgb,
                    width: m.width,
                    height: m.height,
                    index: i as u64,
                }),
                Err(e) => eprintln!("skipped: {e}"),
            }
        }
        return Ok(out);
    }
    let scan = byol_ingest::source::scan(path, Layout::Flat, &[]).with_context(|| {
        format!(
            "{}: neither a dataset nor a readable folder",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for i in order(scan.candidates.len()) {
        let file = &scan.candidates[i].path;
        // What `byol ingest` would store with its default settings (short side 256; a
        // large JPEG decoded at a reduced scale): no full decode of a 20-megapixel photo
        // for a 224-pixel view.
        let max_side = IngestSettings::default().max_side;
        let decoded = std::fs::read(file)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                decode_for_ingest(&b, &DecodeLimits::default(), max_side).map_err(|e| e.to_string())
            });
        match decoded {
            Ok(d) => {
                let (w, h) = d.full_size;
                let img = resize_to(d.image, target_size(w, h, max_side));
                out.push(Picked {
                    width: img.width(),
                    height: img.height(),
                    rgb: img.into_raw(),
                    index: i as u64,
                })
            }
            Err(e) => eprintln!("skipped {}: {e}", file.display()),
        }
    }
    Ok(out)
}

fn render(aug: &Augmenter, images: &[Picked], seed: u64) -> anyhow::Result<RgbImage> {
    let s = aug.size();
    let rows = images.len() as u32;
    let mut grid = RgbImage::from_pixel(3 * s + 4 * GAP, rows * s + (rows + 1) * GAP, BACKGROUND);
    let mut scratch = Scratch::new();
    let (mut v1, mut v2) = (vec![0u8; aug.view_len()], vec![0u8; aug.view_len()]);
    for (row, p) in images.iter().enumerate() {
        let y = GAP + row as u32 * (s + GAP);
        let stored = RgbImage::from_raw(p.width, p.height, p.rgb.clone()).expect("decoded size");
        let fit = fit_into(&stored, s);
        let (ox, oy) = ((s - fit.width()) / 2, (s - fit.height()) / 2);
        image::imageops::replace(&mut grid, &fit, i64::from(GAP + ox), i64::from(y + oy));
        aug.two_views(
            &p.rgb,
            p.width,
            p.height,
            SampleKey::new(seed, 0, p.index),
            &mut scratch,
            [ViewOut::u8(&mut v1), ViewOut::u8(&mut v2)],
        )?;
        for (col, view) in [(1, &v1), (2, &v2)] {
            let img = RgbImage::from_raw(s, s, view.clone()).expect("view size");
            image::imageops::replace(
                &mut grid,
                &img,
                i64::from(GAP + col * (s + GAP)),
                i64::from(y),
            );
        }
    }
    Ok(grid)
}

/// `img` scaled (aspect kept) to fit an `s` x `s` cell.
fn fit_into(img: &RgbImage, s: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let scale = f64::from(s) / f64::from(w.max(h));
    let (nw, nh) = (
        ((f64::from(w) * scale).round() as u32).clamp(1, s),
        ((f64::from(h) * scale).round() as u32).clamp(1, s),
    );
    image::imageops::resize(img, nw, nh, image::imageops::FilterType::Lanczos3)
}

fn save_png(img: &RgbImage, out: &Path) -> anyhow::Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)?;
    byol_ingest::fsutil::write_atomic(out, bytes.get_ref())
        .with_context(|| format!("cannot write {}", out.display()))
}
