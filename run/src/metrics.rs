//! `metrics.jsonl`: one JSON object per logged step, appended.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::{RunError, io};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsLine {
    /// Steps done.
    pub step: u64,
    /// Loader epoch of the step's batch.
    pub epoch: u64,
    /// The symmetric BYOL loss (Grill et al. 2020, eq. 2, both directions), in [0, 8].
    pub loss: f32,
    /// Learning rate of the step.
    pub lr: f64,
    /// EMA coefficient τ of the step.
    pub tau: f64,
    /// Std of the l2-normalised online projections × √d (≈ 1 healthy, → 0 collapsed).
    pub collapse: f32,
    /// Images per second since the last logged step.
    pub images_per_sec: f64,
    /// Seconds spent waiting for batches since the last logged step.
    pub data_wait_secs: f64,
    /// Seconds since the run (this process) started.
    pub elapsed_secs: f64,
    /// Records the loader skipped so far because they are corrupt (each counted once).
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped_records: u64,
    /// kNN top-1 of the `[monitor]` datasets, on the steps it measures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_accuracy: Option<f64>,
    /// Monitor records skipped on that measurement because they are corrupt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub knn_skipped_records: Option<u64>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The open metrics file of a run.
pub struct MetricsSink {
    path: PathBuf,
    file: File,
}

impl MetricsSink {
    /// Opens `path` for appending after dropping its lines past `step` (written by a run
    /// that stopped before checkpointing them, or rolled back) and a torn last line.
    /// Returns the sink and how many lines were dropped.
    pub fn open(path: &Path, step: u64) -> Result<(Self, usize), RunError> {
        let dropped = truncate(path, step)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        Ok((
            MetricsSink {
                path: path.to_owned(),
                file,
            },
            dropped,
        ))
    }

    /// Appends one line.
    pub fn append(&mut self, line: &MetricsLine) -> Result<(), RunError> {
        let json = serde_json::to_string(line).expect("metrics serialise");
        writeln!(self.file, "{json}").map_err(io(&self.path))
    }

    /// Drops the lines past `step` (after a rollback to it); returns how many.
    pub fn truncate_to(&mut self, step: u64) -> Result<usize, RunError> {
        let (sink, dropped) = MetricsSink::open(&self.path, step)?;
        *self = sink;
        Ok(dropped)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Rewrites `path` without the lines past `step` (and a torn last line), atomically;
/// returns how many lines were dropped. A missing file is fine.
fn truncate(path: &Path, step: u64) -> Result<usize, RunError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(path)(e)),
    };
    let mut kept = Vec::new();
    let mut dropped = 0;
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io(path))?;
        let line_step = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["step"].as_u64());
        match line_step {
            Some(s) if s <= step => {
                kept.extend_from_slice(line.as_bytes());
                kept.push(b'\n');
            }
            _ => dropped += 1,
        }
    }
    if dropped > 0 {
        byol_ingest::fsutil::write_atomic(path, &kept).map_err(io(path))?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_drops_lines_past_the_step_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"st").unwrap();
        let (_, dropped) = MetricsSink::open(&path, 2).unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n"
        );
    }
}
