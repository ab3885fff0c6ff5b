//! `metrics.jsonl`: one JSON object per logged step, appended.
//!
//! A write that fails (a full disk) loses nothing: the torn tail is cut back to the
//! last whole line, the lines wait in memory (up to [`MAX_PENDING_LINES`]), and the
//! next line after the retry interval writes them all, in order.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{RunError, io};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsLine {
    /// Steps done.
    pub step: u64,
    /// Loader epoch of the step's batch.
    pub epoch: u64,
    /// The objective's loss (BYOL: the symmetric loss of Grill et al. 2020, eq. 2, both
    /// directions, in [0, 8]).
    pub loss: f32,
    /// Learning rate of the step.
    pub lr: f64,
    /// EMA coefficient τ of the step (objectives with an EMA target).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// Std of the l2-normalised online projections × √d (≈ 1 healthy, → 0 collapsed);
    /// data-parallel, over rank 0's share of the batch.
    pub collapse: f32,
    /// Effective rank of the online projections of the step's first view (RankMe,
    /// Garrido et al. 2023): 1 collapsed, up to `min(batch, projection_dim)`;
    /// data-parallel, over rank 0's share of the batch.
    pub effective_rank: f32,
    /// Images per second since the last logged step (the global batch's, data-parallel).
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

/// Lines kept in memory while `metrics.jsonl` cannot be written; past it the oldest
/// are dropped (and counted). About 300 bytes each.
pub const MAX_PENDING_LINES: usize = 100_000;

/// The open metrics file of a run.
pub struct MetricsSink {
    path: PathBuf,
    file: File,
    /// Bytes of whole lines in the file: a failed write is cut back to it.
    len: u64,
    /// Lines not written yet (a write failed), with their steps, oldest first.
    pending: VecDeque<(u64, String)>,
    /// Pending lines dropped because [`MAX_PENDING_LINES`] were waiting.
    overflowed: u64,
    /// How long after a failed write the next one is tried.
    retry: Duration,
    retry_at: Option<Instant>,
}

impl MetricsSink {
    /// Opens `path` for appending after dropping its lines past `step` (written by a run
    /// that stopped before checkpointing them, or rolled back) and a torn last line.
    /// A failed write is tried again `retry` later. Returns the sink and how many lines
    /// were dropped.
    pub fn open(path: &Path, step: u64, retry: Duration) -> Result<(Self, usize), RunError> {
        let dropped = truncate(path, step)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io(path))?;
        let len = file.metadata().map_err(io(path))?.len();
        Ok((
            MetricsSink {
                path: path.to_owned(),
                file,
                len,
                pending: VecDeque::new(),
                overflowed: 0,
                retry,
                retry_at: None,
            },
            dropped,
        ))
    }

    /// Appends one line, with the lines a failed write left waiting, in one write; while
    /// the retry interval runs, the line only joins them.
    ///
    /// Errors: the write failed ([`RunError::Io`]; a full disk is
    /// [`FailureKind::DiskFull`](byol_ingest::fsutil::FailureKind)). Nothing is lost: the
    /// file keeps its whole lines and the new ones wait for the next try.
    pub fn append(&mut self, line: &MetricsLine) -> Result<(), RunError> {
        if self.pending.len() >= MAX_PENDING_LINES {
            self.pending.pop_front();
            self.overflowed += 1;
        }
        let json = serde_json::to_string(line).expect("metrics serialise");
        self.pending.push_back((line.step, json));
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        self.flush()
    }

    /// Writes the waiting lines now, whatever the retry interval says (before a run
    /// ends). Errors as [`MetricsSink::append`].
    pub fn flush(&mut self) -> Result<(), RunError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut buf = String::new();
        for (_, json) in &self.pending {
            buf.push_str(json);
            buf.push('\n');
        }
        match self.file.write_all(buf.as_bytes()) {
            Ok(()) => {
                if self.retry_at.take().is_some() {
                    tracing::info!(
                        event = "metrics_written",
                        lines = self.pending.len(),
                        overflowed = self.overflowed,
                        path = %self.path.display(),
                        "metrics written again after a failed write"
                    );
                }
                self.len += buf.len() as u64;
                self.pending.clear();
                Ok(())
            }
            Err(e) => {
                // Appends go to the end, so cutting the torn tail is enough for the next try.
                let _ = self.file.set_len(self.len);
                self.retry_at = Some(Instant::now() + self.retry);
                Err(io(&self.path)(e))
            }
        }
    }

    /// True when lines wait and their retry interval has passed at `now`.
    pub fn retry_due(&self, now: Instant) -> bool {
        !self.pending.is_empty() && self.retry_at.is_none_or(|t| now >= t)
    }

    /// Lines waiting to be written after a failed write.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Drops the lines past `step` (after a rollback to it), in the file and waiting;
    /// returns how many.
    pub fn truncate_to(&mut self, step: u64) -> Result<usize, RunError> {
        let mut pending = std::mem::take(&mut self.pending);
        let waiting = pending.len();
        pending.retain(|(s, _)| *s <= step);
        let dropped_waiting = waiting - pending.len();
        let (mut sink, dropped) = MetricsSink::open(&self.path, step, self.retry)?;
        sink.pending = pending;
        sink.overflowed = self.overflowed;
        sink.retry_at = self.retry_at;
        *self = sink;
        Ok(dropped + dropped_waiting)
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
        let (_, dropped) = MetricsSink::open(&path, 2, Duration::ZERO).unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n"
        );
    }

    fn line(step: u64) -> MetricsLine {
        MetricsLine {
            step,
            epoch: 0,
            loss: 1.0,
            lr: 0.1,
            tau: Some(0.99),
            collapse: 1.0,
            effective_rank: 20.0,
            images_per_sec: 10.0,
            data_wait_secs: 0.0,
            elapsed_secs: 1.0,
            skipped_records: 0,
            knn_accuracy: None,
            knn_skipped_records: None,
        }
    }

    fn steps(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    /// A full disk (`/dev/full` answers every write with ENOSPC) fails the write with a
    /// disk-full error; the lines wait, and the next try after the interval writes them
    /// all, in order, with no torn line.
    #[test]
    fn a_failed_write_keeps_its_lines_and_the_retry_writes_them_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let (mut sink, _) = MetricsSink::open(&path, 0, Duration::from_secs(3600)).unwrap();
        sink.append(&line(1)).unwrap();
        let good = std::mem::replace(
            &mut sink.file,
            OpenOptions::new().append(true).open("/dev/full").unwrap(),
        );
        let err = sink.append(&line(2)).unwrap_err();
        assert_eq!(
            err.kind(),
            byol_ingest::fsutil::FailureKind::DiskFull,
            "{err}"
        );
        // Within the retry interval a line only waits.
        sink.append(&line(3)).unwrap();
        assert_eq!(sink.pending(), 2);
        sink.file = good;
        sink.retry = Duration::ZERO;
        sink.retry_at = Some(Instant::now());
        sink.append(&line(4)).unwrap();
        assert_eq!(sink.pending(), 0);
        assert_eq!(steps(&path), vec![1, 2, 3, 4]);
        // A rollback drops waiting lines past its step as well as written ones.
        sink.pending.push_back((5, "{\"step\":5}".into()));
        assert_eq!(sink.truncate_to(2).unwrap(), 3);
        assert_eq!(steps(&path), vec![1, 2]);
    }
}
