//! Embeddings of a dataset's images: the encoder's pooled features of every live record,
//! written as `.npy` (float32 `N×D`) beside a `.jsonl` of what each row is, or as one
//! `.csv` in lightly's layout (`filenames,embedding_0,…,embedding_{D-1},labels`).
//!
//! Rows follow the dataset's live records in shard order, each record once (a record
//! found under two labels takes its first, as [`Dataset::label`]); a record that cannot
//! be read or decoded is left out and logged, as [`super::extract`] does. The
//! preprocessing is [`Preprocess`] (the evaluation's), done in parallel over a batch;
//! the files are written under temporary names and renamed when complete.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use byol_augment::crop::CropResizer;
use byol_ingest::{Dataset, Progress, RecordRef, RecordScratch};
use candle_core::Tensor;
use rayon::prelude::*;
use serde::Serialize;

use super::{Encoder, EvalError, Preprocess};

/// What `--out` asks for, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbedFormat {
    /// `.npy` (float32 `N×D`, C order) and a `.jsonl` beside it, one line per row.
    Npy,
    /// `.csv` as lightly writes `embeddings.csv`.
    Csv,
}

impl EmbedFormat {
    /// The format `path`'s extension names (`.npy` or `.csv`, any case).
    ///
    /// Errors: another extension ([`EvalError::Input`]).
    pub fn for_path(path: &Path) -> Result<Self, EvalError> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("npy") => Ok(EmbedFormat::Npy),
            Some("csv") => Ok(EmbedFormat::Csv),
            _ => Err(EvalError::Input(format!(
                "{}: the output's extension says its format: .npy (with a .jsonl beside it) or .csv",
                path.display()
            ))),
        }
    }
}

/// What one row of the embeddings is (a line of the `.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RowInfo {
    /// Row number in the `.npy` (0-based).
    pub row: usize,
    /// The record's shard (its id in the manifest).
    pub shard: u32,
    /// The record's index in the shard.
    pub index: u32,
    /// The source file the record was ingested from (the first that refers to it).
    pub source: String,
    /// The image's position in its source, for sources of several images (IDX files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<u32>,
    /// The class name; `null` for an unlabelled record.
    pub label: Option<String>,
}

/// What [`embed`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedReport {
    /// Rows written (one per embedded record).
    pub rows: usize,
    /// Values per row.
    pub dim: usize,
    /// Records left out because they could not be read or decoded (each is logged).
    pub skipped: usize,
    /// The files written (`.npy` and `.jsonl`, or the `.csv`).
    pub files: Vec<PathBuf>,
}

/// `(shard position, index)` → (source number, position in the source), the first
/// source referring to each record.
fn record_sources(dataset: &Dataset) -> HashMap<(usize, u32), (usize, u32)> {
    let m = dataset.manifest();
    let position: HashMap<u32, usize> = m
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id, i))
        .collect();
    let mut out = HashMap::new();
    for (s, src) in m.sources.iter().enumerate() {
        let mut item = 0u32;
        for span in &src.records {
            for index in span.first..span.first + span.count {
                if let Some(&shard) = position.get(&span.shard) {
                    out.entry((shard, index)).or_insert((s, item));
                }
                item += 1;
            }
        }
    }
    out
}

/// The NPY (version 1.0) header of a float32 C-order `(rows, dim)` array, padded to 128
/// bytes whatever the shape, so it can be written first and rewritten once `rows` is
/// known. Format: numpy's `numpy.lib.format` (magic, version, header length, dict).
pub fn npy_header(rows: usize, dim: usize) -> [u8; 128] {
    let mut out = [b' '; 128];
    out[..6].copy_from_slice(b"\x93NUMPY");
    out[6] = 1;
    out[7] = 0;
    out[8..10].copy_from_slice(&118u16.to_le_bytes());
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    out[10..10 + dict.len()].copy_from_slice(dict.as_bytes());
    out[127] = b'\n';
    out
}

/// A CSV field: quoted (with doubled quotes) when it holds a comma, a quote or a line
/// break (RFC 4180).
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

/// The open output files, under temporary names until [`Sink::finish`].
struct Sink {
    format: EmbedFormat,
    /// (temporary, final) path and writer of each file: the `.npy` then the `.jsonl`, or
    /// the `.csv`.
    files: Vec<(PathBuf, PathBuf, BufWriter<File>)>,
    dim: usize,
    rows: usize,
}

impl Sink {
    fn create(out: &Path, format: EmbedFormat, dim: usize) -> Result<Self, EvalError> {
        let finals = match format {
            EmbedFormat::Npy => vec![out.to_owned(), out.with_extension("jsonl")],
            EmbedFormat::Csv => vec![out.to_owned()],
        };
        let mut files = Vec::new();
        for path in finals {
            let tmp = byol_ingest::fsutil::tmp_path(&path);
            let file = File::create(&tmp).map_err(|source| EvalError::Io {
                path: tmp.clone(),
                source,
            })?;
            files.push((tmp, path, BufWriter::new(file)));
        }
        let mut sink = Sink {
            format,
            files,
            dim,
            rows: 0,
        };
        match format {
            EmbedFormat::Npy => sink.write(0, &npy_header(0, dim))?,
            EmbedFormat::Csv => {
                let mut head = String::from("filenames");
                for d in 0..dim {
                    head.push_str(&format!(",embedding_{d}"));
                }
                head.push_str(",labels\n");
                sink.write(0, head.as_bytes())?;
            }
        }
        Ok(sink)
    }

    fn write(&mut self, file: usize, bytes: &[u8]) -> Result<(), EvalError> {
        let (tmp, _, w) = &mut self.files[file];
        w.write_all(bytes).map_err(|source| EvalError::Io {
            path: tmp.clone(),
            source,
        })
    }

    /// One row: its features and what it is (`label_index`: the class's index, for the
    /// CSV's integer labels).
    fn push(
        &mut self,
        info: &RowInfo,
        label_index: Option<u32>,
        values: &[f32],
    ) -> Result<(), EvalError> {
        match self.format {
            EmbedFormat::Npy => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.write(0, &bytes)?;
                let mut line = serde_json::to_vec(info).expect("a row serialises");
                line.push(b'\n');
                self.write(1, &line)?;
            }
            EmbedFormat::Csv => {
                let name = match info.item {
                    Some(item) => format!("{}#{item}", info.source),
                    None => info.source.clone(),
                };
                let mut line = csv_field(&name).into_owned();
                for v in values {
                    line.push(',');
                    line.push_str(&v.to_string());
                }
                // lightly's labels are integers; -1 marks an unlabelled record.
                let label = label_index.map_or(-1, i64::from);
                line.push_str(&format!(",{label}\n"));
                self.write(0, line.as_bytes())?;
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Completes the files: the `.npy` header gets the row count; every file is flushed,
    /// fsynced and renamed to its final name.
    fn finish(mut self) -> Result<Vec<PathBuf>, EvalError> {
        let header = npy_header(self.rows, self.dim);
        let mut done = Vec::new();
        for (i, (tmp, path, w)) in self.files.drain(..).enumerate() {
            let io = |source| EvalError::Io {
                path: tmp.clone(),
                source,
            };
            let mut file = w.into_inner().map_err(|e| io(e.into_error()))?;
            if i == 0 && self.format == EmbedFormat::Npy {
                file.seek(SeekFrom::Start(0)).map_err(io)?;
                file.write_all(&header).map_err(io)?;
            }
            file.sync_all().map_err(io)?;
            byol_ingest::fsutil::rename_durable(&tmp, &path).map_err(|source| EvalError::Io {
                path: path.clone(),
                source,
            })?;
            done.push(path);
        }
        Ok(done)
    }

    /// Removes the temporary files (after an error).
    fn abandon(self) {
        for (tmp, _, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Writes the embeddings of every live record of `dataset` to `out` (format by its
/// extension, [`EmbedFormat`]): `encoder`'s pooled features of the images preprocessed
/// by `pre`, in batches of `batch`; `progress` counts records.
///
/// Errors: an unknown extension, an empty dataset, a failed forward, a file that cannot
/// be written (the temporary files are removed; an earlier output is left as it was).
pub fn embed(
    encoder: &Encoder,
    dataset: &Dataset,
    pre: &Preprocess,
    batch: usize,
    out: &Path,
    progress: &dyn Progress,
) -> Result<EmbedReport, EvalError> {
    let format = EmbedFormat::for_path(out)?;
    if pre.is_empty() || batch == 0 {
        return Err(EvalError::Input(
            "image size and batch size must be at least 1".into(),
        ));
    }
    let records: Vec<RecordRef> = dataset.live_records().collect();
    if records.is_empty() {
        return Err(EvalError::Data {
            path: dataset.dir().to_owned(),
            reason: "no live images to embed".into(),
        });
    }
    let mut sink = Sink::create(out, format, encoder.feature_dim())?;
    match write_rows(encoder, dataset, pre, batch, &records, &mut sink, progress) {
        Ok(skipped) => {
            let rows = sink.rows;
            let dim = sink.dim;
            let files = sink.finish()?;
            Ok(EmbedReport {
                rows,
                dim,
                skipped,
                files,
            })
        }
        Err(e) => {
            sink.abandon();
            Err(e)
        }
    }
}

/// The batches: preprocess in parallel, forward, write. Returns the records skipped.
fn write_rows(
    encoder: &Encoder,
    dataset: &Dataset,
    pre: &Preprocess,
    batch: usize,
    records: &[RecordRef],
    sink: &mut Sink,
    progress: &dyn Progress,
) -> Result<usize, EvalError> {
    progress.add_total(records.len() as u64);
    let sources = record_sources(dataset);
    let m = dataset.manifest();
    let (len, size, dim) = (pre.len(), pre.size as usize, encoder.feature_dim());
    let mut input = vec![0f32; batch.min(records.len()) * len];
    let mut skipped = 0;
    for chunk in records.chunks(batch) {
        let results: Vec<Result<(), String>> = input[..chunk.len() * len]
            .par_chunks_mut(len)
            .zip(chunk.par_iter())
            .map_init(
                || (RecordScratch::default(), Vec::new(), CropResizer::new()),
                |(scratch, rgb, resizer), (slot, &r)| {
                    let meta = dataset
                        .read_rgb(r, scratch, rgb)
                        .map_err(|e| e.to_string())?;
                    pre.apply(rgb, meta.width, meta.height, resizer, slot)
                        .map_err(|e| e.to_string())
                },
            )
            .collect();
        // A corrupt record is skipped (and logged); the good ones close up.
        let mut kept = Vec::with_capacity(chunk.len());
        for (i, (result, &r)) in results.into_iter().zip(chunk).enumerate() {
            match result {
                Ok(()) => {
                    if kept.len() != i {
                        input.copy_within(i * len..(i + 1) * len, kept.len() * len);
                    }
                    kept.push(r);
                }
                Err(reason) => {
                    skipped += 1;
                    super::features::warn_corrupt(dataset, &r, &reason);
                }
            }
        }
        if !kept.is_empty() {
            let n = kept.len();
            let x = Tensor::from_slice(&input[..n * len], (n, 3, size, size), encoder.device())?;
            let y = encoder.forward(&x)?;
            let values = crate::host::vec1::<f32>(&y.flatten_all()?)?;
            for (j, r) in kept.into_iter().enumerate() {
                let (source, item) = match sources.get(&(r.shard, r.index)) {
                    Some(&(s, item)) => {
                        let src = &m.sources[s];
                        let many = src.records.iter().map(|s| s.count).sum::<u32>() > 1;
                        (src.path.clone(), many.then_some(item))
                    }
                    None => (String::new(), None),
                };
                let label = dataset.label(r);
                let info = RowInfo {
                    row: sink.rows,
                    shard: m.shards[r.shard].id,
                    index: r.index,
                    source,
                    item,
                    label: label.map(|l| m.classes[l as usize].clone()),
                };
                sink.push(&info, label, &values[j * dim..(j + 1) * dim])?;
            }
        }
        progress.advance(chunk.len() as u64);
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_npy_header_is_numpys_and_aligned() {
        let h = npy_header(70_000, 512);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize + 10, 128);
        let dict = std::str::from_utf8(&h[10..]).unwrap();
        assert!(
            dict.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (70000, 512), }")
        );
        assert!(dict.ends_with(" \n"));
        // The largest shape still fits.
        let h = npy_header(usize::MAX, usize::MAX);
        assert_eq!(h[127], b'\n');
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("a/b.png"), "a/b.png");
        assert_eq!(csv_field("a,b.png"), "\"a,b.png\"");
        assert_eq!(csv_field("say \"hi\".png"), "\"say \"\"hi\"\".png\"");
    }

    #[test]
    fn the_format_follows_the_extension() {
        assert_eq!(
            EmbedFormat::for_path(Path::new("e.npy")).unwrap(),
            EmbedFormat::Npy
        );
        assert_eq!(
            EmbedFormat::for_path(Path::new("E.CSV")).unwrap(),
            EmbedFormat::Csv
        );
        let err = EmbedFormat::for_path(Path::new("e.parquet")).unwrap_err();
        assert!(err.to_string().contains("e.parquet"), "{err}");
    }
}
