//! `byol plot`: training curves from a run's `metrics.jsonl` as a PNG (plotters'
//! bitmap backend; text drawn with the embedded DejaVu Sans, no system font library).

use std::io::Cursor;
use std::ops::Range;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::cli::PlotArgs;
use byol_run::RunDir;

/// DejaVu Sans (Debian's fonts-dejavu-core; licence in `assets/fonts/`).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
/// Height of one chart in pixels.
const PANEL_HEIGHT: u32 = 300;

/// The curves of a run, one `(step, value)` list per metric.
#[derive(Debug, Default, PartialEq)]
struct Curves {
    loss: Vec<(f64, f64)>,
    collapse: Vec<(f64, f64)>,
    effective_rank: Vec<(f64, f64)>,
    knn: Vec<(f64, f64)>,
}

/// Reads `metrics.jsonl`; a torn last line (a run killed mid-write) is skipped, any
/// other bad line is an error naming the file and line. A step logged twice (a file
/// from a run resumed by an older build) counts once, as its last line says.
fn read_curves(path: &Path) -> anyhow::Result<Curves> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} (is {} the folder of a `byol train` run?)",
            path.display(),
            path.parent().unwrap_or(path).display()
        )
    })?;
    let mut by_step = std::collections::BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    let torn_tail = !text.ends_with('\n');
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if torn_tail && i + 1 == lines.len() => {
                tracing::warn!(path = %path.display(), line = i + 1, "skipping a torn last line");
                continue;
            }
            Err(e) => bail!(
                "{} line {}: not a JSON metrics line: {e}",
                path.display(),
                i + 1
            ),
        };
        let step = value["step"]
            .as_u64()
            .ok_or_else(|| anyhow!("{} line {}: no \"step\"", path.display(), i + 1))?;
        by_step.insert(step, value);
    }
    let mut curves = Curves::default();
    for (step, value) in by_step {
        // Non-finite values (a diverged run logs NaN as null) leave a gap.
        let push = |curve: &mut Vec<(f64, f64)>, key: &str| {
            if let Some(v) = value[key].as_f64().filter(|v| v.is_finite()) {
                curve.push((step as f64, v));
            }
        };
        push(&mut curves.loss, "loss");
        push(&mut curves.collapse, "collapse");
        push(&mut curves.effective_rank, "effective_rank");
        push(&mut curves.knn, "knn_accuracy");
    }
    if curves.loss.is_empty() && curves.collapse.is_empty() {
        bail!(
            "{}: no metrics yet (no line with a step and a loss)",
            path.display()
        );
    }
    Ok(curves)
}

fn range(values: impl Iterator<Item = f64>, include: &[f64]) -> Range<f64> {
    let (lo, hi) = values
        .chain(include.iter().copied())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        lo.abs().max(1.0) * 0.1
    };
    (lo - pad)..(hi + pad)
}

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    points: &[(f64, f64)],
    colour: RGBColor,
    include: &[f64],
    steps: Range<f64>,
) -> anyhow::Result<()> {
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(steps, range(points.iter().map(|p| p.1), include))
        .map_err(|e| anyhow!("drawing {title}: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FAMILY, 13))
        .draw()
        .map_err(|e| anyhow!("drawing {title}: {e}"))?;
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            colour.stroke_width(2),
        ))
        .map_err(|e| anyhow!("drawing {title}: {e}"))?;
    Ok(())
}

/// Renders `curves` into an RGB8 buffer of `width` x (panels x 300) pixels: loss and
/// collapse indicator always, effective rank and kNN accuracy when the run logged them.
fn render(curves: &Curves, width: u32) -> anyhow::Result<(Vec<u8>, u32)> {
    // Registering twice replaces the same font: harmless.
    plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("the embedded font is unreadable"))?;
    type Panel<'a> = (&'a str, &'a [(f64, f64)], RGBColor, &'a [f64]);
    let mut panels: Vec<Panel> = vec![
        ("loss", &curves.loss, BLUE, &[]),
        (
            "collapse indicator (about 1 healthy, 0 collapsed)",
            &curves.collapse,
            RED,
            &[0.0],
        ),
    ];
    if !curves.effective_rank.is_empty() {
        panels.push((
            "effective rank of the embeddings (1 collapsed)",
            &curves.effective_rank,
            MAGENTA,
            &[1.0],
        ));
    }
    if !curves.knn.is_empty() {
        panels.push(("monitor kNN top-1", &curves.knn, GREEN, &[0.0, 1.0]));
    }
    let height = PANEL_HEIGHT * panels.len() as u32;
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    let all = panels.iter().flat_map(|p| p.1.iter());
    let mut steps = range(all.map(|p| p.0), &[]);
    steps.start = steps.start.max(0.0);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("drawing: {e}"))?;
        let areas = root.split_evenly((panels.len(), 1));
        for (area, (title, points, colour, include)) in areas.iter().zip(&panels) {
            panel(area, title, points, *colour, include, steps.clone())?;
        }
        root.present().map_err(|e| anyhow!("drawing: {e}"))?;
    }
    Ok((buf, height))
}

/// Runs `byol plot`.
pub fn run(args: PlotArgs) -> anyhow::Result<ExitCode> {
    if !(200..=8000).contains(&args.width) {
        bail!("--width {} is outside 200..=8000 pixels", args.width);
    }
    let path = RunDir::new(&args.run).metrics();
    let curves = read_curves(&path)?;
    let (buf, height) = render(&curves, args.width)?;
    let img = image::RgbImage::from_raw(args.width, height, buf).expect("buffer size");
    let mut png = Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .context("encoding the PNG")?;
    byol_ingest::fsutil::write_atomic(&args.out, png.get_ref())
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    println!(
        "plotted {} steps ({} with kNN accuracy) from {} to {}",
        curves.loss.len().max(curves.collapse.len()),
        curves.knn.len(),
        path.display(),
        args.out.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_lines_are_skipped_other_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = RunDir::new(dir.path()).metrics();
        std::fs::write(
            &p,
            "{\"step\":10,\"loss\":3.5,\"collapse\":0.9,\"effective_rank\":12.5}\n{\"step\":20,\"loss\":null,\"collapse\":0.8,\"knn_accuracy\":0.4}\n{\"step\":30,\"lo",
        )
        .unwrap();
        let c = read_curves(&p).unwrap();
        assert_eq!(c.loss, [(10.0, 3.5)]);
        assert_eq!(c.collapse, [(10.0, 0.9), (20.0, 0.8)]);
        assert_eq!(c.knn, [(20.0, 0.4)]);
        assert_eq!(c.effective_rank, [(10.0, 12.5)]);
        std::fs::write(&p, "{\"step\":10,\"loss\":3.5}\nnot json\n").unwrap();
        let err = format!("{:#}", read_curves(&p).unwrap_err());
        assert!(err.contains("line 2"), "{err}");
        std::fs::write(&p, "").unwrap();
        let err = format!("{:#}", read_curves(&p).unwrap_err());
        assert!(err.contains("no metrics yet"), "{err}");
    }

    #[test]
    fn a_step_logged_twice_counts_once_as_its_last_line_says() {
        let dir = tempfile::tempdir().unwrap();
        let p = RunDir::new(dir.path()).metrics();
        let line = |step: u64, loss: f64| format!("{{\"step\":{step},\"loss\":{loss}}}\n");
        let text: String = [(1, 4.0), (2, 3.0), (3, 2.0), (2, 3.5), (3, 2.5), (4, 1.0)]
            .iter()
            .map(|&(s, l)| line(s, l))
            .collect();
        std::fs::write(&p, text).unwrap();
        let c = read_curves(&p).unwrap();
        assert_eq!(c.loss, [(1.0, 4.0), (2.0, 3.5), (3.0, 2.5), (4.0, 1.0)]);
    }

    #[test]
    fn renders_a_panel_per_logged_metric() {
        let mut c = Curves {
            loss: vec![(1.0, 2.0), (2.0, 1.5)],
            collapse: vec![(1.0, 1.0), (2.0, 0.9)],
            ..Curves::default()
        };
        let (buf, h) = render(&c, 400).unwrap();
        assert_eq!(h, 600);
        // Something besides the white background was drawn.
        assert!(buf.iter().any(|&b| b != 255));
        c.knn.push((2.0, 0.5));
        assert_eq!(render(&c, 400).unwrap().1, 900);
        c.effective_rank = vec![(1.0, 30.0), (2.0, 25.0)];
        assert_eq!(render(&c, 400).unwrap().1, 1200);
    }
}
