//! Adding WebDataset shards: one source per `.tar` file (as an IDX file is one source),
//! its samples its records, read as a stream in batches (never unpacked to disk),
//! decoded in parallel and labelled one by one; damage keeps the samples before it.

use super::*;
use crate::manifest::WebDatasetSource;
use crate::shard::NO_LABEL;
use crate::webdataset::{self, RawSample, Samples};

/// Samples decoded together (the reader holds at most one batch in memory)...
const BATCH_SAMPLES: usize = 256;
/// ... or fewer when they hold this many bytes.
const BATCH_BYTES: usize = 64 << 20;

/// What a worker made of one sample: the record and its class name, or a reject.
type SampleOutcome = Result<(StoredRecord, Option<String>), (RejectReason, String)>;

impl Ingester<'_> {
    pub(super) fn add_tar(&mut self, c: Candidate) -> Result<(), IngestError> {
        let path = path_key(&c.path);
        let info = WebDatasetSource {
            json_label: self.opts.json_label.clone(),
        };
        if let Some(e) = self.existing(&path)
            && e.stamp.unchanged(&c.stamp)
            && e.webdataset.as_ref() == Some(&info)
        {
            self.summary.already_present += 1;
            self.relabel(&c.path, c.label.as_deref())?;
            return Ok(());
        }
        let reject = |reason, detail: String| Reject::new(&c.path, reason, detail);
        if c.stamp.size == 0 {
            self.rejects
                .push(reject(RejectReason::Empty, "zero-byte file".into()));
            return Ok(());
        }
        // The labels read from `json` depend on the field: it is part of the content.
        let hash = match hash_tar(&c.path, &info.json_label) {
            Ok(h) => h,
            Err(e) => {
                self.rejects
                    .push(reject(RejectReason::Unreadable, e.to_string()));
                return Ok(());
            }
        };
        let entry = |id, duplicate_of, records| SourceEntry {
            id,
            path: path.clone(),
            stamp: c.stamp,
            hash: hash.clone(),
            label: c.label.clone(),
            labels_file: None,
            webdataset: Some(info.clone()),
            duplicate_of,
            records,
        };
        if let Some(l) = &c.label {
            self.work.class_index(l);
        }
        // Same content as before at this path: only the stamps (and the label) change.
        if let Some(e) = self.existing(&path).filter(|e| e.hash == hash).cloned() {
            self.summary.already_present += 1;
            if e.label != c.label {
                self.note_relabelled_in_place(path.clone(), e.label.clone(), c.label.clone());
            }
            self.pending.push(entry(e.id, e.duplicate_of, e.records));
            return self.maybe_commit();
        }
        if let Some(spans) = self.by_hash.get(&hash).cloned() {
            self.summary.duplicates += 1;
            let id = self.new_source_id();
            let orig = self.source_id_of(&hash);
            self.pending.push(entry(id, orig, spans));
            return self.maybe_commit();
        }
        let stream = match webdataset::open_stream(&c.path) {
            Ok(s) => s,
            Err(e) => {
                self.rejects
                    .push(reject(RejectReason::Unreadable, e.to_string()));
                return Ok(());
            }
        };
        let id = self.new_source_id();
        let mut spans: Vec<Span> = Vec::new();
        let (mut samples_seen, mut damaged) = (0u64, false);
        let max_member = self.opts.limits.max_file_bytes;
        self.in_source = true;
        // A reader thread reads the next batch while the workers decode this one.
        std::thread::scope(|scope| -> Result<(), IngestError> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Chunk>(2);
            scope.spawn(move || read_batches(stream, max_member, tx));
            for item in rx {
                match item {
                    Chunk::Batch(batch) => {
                        samples_seen += batch.len() as u64;
                        self.store_samples(&c.path, id, batch, &mut spans)?;
                    }
                    Chunk::Damaged {
                        reason,
                        cut,
                        samples_before,
                    } => {
                        damaged = true;
                        let detail = match &cut {
                            Some(key) => format!(
                                "{reason}; the sample being read ({key}) and everything after \
                                 it left out, the {samples_before} sample(s) before kept"
                            ),
                            None => format!(
                                "{reason}; everything after it left out, the {samples_before} \
                                 sample(s) before kept"
                            ),
                        };
                        self.rejects.push(match cut {
                            Some(key) => {
                                Reject::sample(&c.path, key, RejectReason::DamagedTar, detail)
                            }
                            None => reject(RejectReason::DamagedTar, detail),
                        });
                    }
                }
            }
            Ok(())
        })?;
        self.in_source = false;
        if samples_seen == 0 && !damaged {
            self.rejects.push(reject(
                RejectReason::DamagedTar,
                "no sample in the file (an empty tar, or not a tar)".into(),
            ));
        }
        if spans.is_empty() {
            // Nothing usable: no source (the rejects say why; the file is read again by
            // the next run, as a rejected image file is).
            return Ok(());
        }
        self.summary.sources_added += 1;
        self.by_hash.insert(hash.clone(), spans.clone());
        self.pending.push(entry(id, None, spans));
        self.maybe_commit()
    }

    /// Decodes `batch` in parallel and appends its records in order (rejects noted):
    /// new class names are added in sorted order (numbers by value), as IDX labels are.
    fn store_samples(
        &mut self,
        path: &Path,
        id: u64,
        batch: Vec<RawSample>,
        spans: &mut Vec<Span>,
    ) -> Result<(), IngestError> {
        if batch.is_empty() {
            return Ok(());
        }
        let settings = self.work.settings;
        let limits = self.opts.limits;
        let json_label = self.opts.json_label.as_str();
        let progress = self.progress;
        progress.add_total(batch.len() as u64);
        let mut outcomes: Vec<SampleOutcome> = Vec::with_capacity(batch.len());
        let pool = self.pool.clone();
        ordered_map(
            &pool,
            batch.len(),
            |i| {
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    encode_sample(&batch[i], &settings, &limits, json_label)
                }))
                .unwrap_or_else(|_| {
                    Err((RejectReason::DecoderPanic, "the decoder panicked".into()))
                });
                progress.advance(1);
                outcome
            },
            |_, o| {
                outcomes.push(o);
                Ok::<(), IngestError>(())
            },
        )?;
        let mut new_names: Vec<&str> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok()?.1.as_deref())
            .filter(|n| !self.work.classes.iter().any(|c| c == n))
            .collect();
        new_names.sort_by(|a, b| class_order(a).cmp(&class_order(b)));
        new_names.dedup();
        let new_names: Vec<String> = new_names.into_iter().map(str::to_owned).collect();
        for n in &new_names {
            self.work.class_index(n);
        }
        let mut class_of: HashMap<String, u32> = HashMap::new();
        for (sample, outcome) in batch.iter().zip(outcomes) {
            match outcome {
                Ok((mut record, name)) => {
                    record.meta.label = match name {
                        Some(n) => match class_of.get(&n) {
                            Some(&k) => k,
                            None => {
                                let k = self.work.class_index(&n);
                                class_of.insert(n, k);
                                k
                            }
                        },
                        None => NO_LABEL,
                    };
                    record.meta.source_id = id;
                    let span = self.append(&record)?;
                    push_span(spans, span);
                    self.summary.ingested += 1;
                }
                Err((reason, detail)) => {
                    self.rejects
                        .push(Reject::sample(path, sample.key.clone(), reason, detail));
                }
            }
        }
        Ok(())
    }
}

/// What the reader thread sends: batches of samples, then possibly the damage.
enum Chunk {
    Batch(Vec<RawSample>),
    Damaged {
        reason: String,
        cut: Option<String>,
        samples_before: u64,
    },
}

/// Reads the samples of `stream` in batches (of [`BATCH_SAMPLES`], or fewer holding
/// [`BATCH_BYTES`]) into `tx`, then the damage if any; stops when the receiver is gone.
/// A panic in the tar reader is damage, not the end of the run.
fn read_batches(
    stream: Box<dyn io::Read + Send>,
    max_member: u64,
    tx: std::sync::mpsc::SyncSender<Chunk>,
) {
    let tx2 = tx.clone();
    let read = move || {
        let mut archive = tar::Archive::new(stream);
        let samples = match Samples::new(&mut archive, max_member) {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Chunk::Damaged {
                    reason: format!("damaged tar: {e}"),
                    cut: None,
                    samples_before: 0,
                });
                return;
            }
        };
        let (mut batch, mut bytes) = (Vec::new(), 0);
        for item in samples {
            match item {
                webdataset::TarItem::Sample(s) => {
                    bytes += s.bytes();
                    batch.push(s);
                    if batch.len() >= BATCH_SAMPLES || bytes >= BATCH_BYTES {
                        if tx.send(Chunk::Batch(std::mem::take(&mut batch))).is_err() {
                            return;
                        }
                        bytes = 0;
                    }
                }
                webdataset::TarItem::Damaged {
                    reason,
                    cut,
                    samples_before,
                } => {
                    if tx.send(Chunk::Batch(std::mem::take(&mut batch))).is_err() {
                        return;
                    }
                    let _ = tx.send(Chunk::Damaged {
                        reason,
                        cut,
                        samples_before,
                    });
                    return;
                }
            }
        }
        let _ = tx.send(Chunk::Batch(batch));
    };
    if catch_unwind(AssertUnwindSafe(read)).is_err() {
        let _ = tx2.send(Chunk::Damaged {
            reason: "the tar reader panicked".into(),
            cut: None,
            samples_before: 0,
        });
    }
}

/// Sort key of a class name: integers first, by value, then other names.
fn class_order(name: &str) -> (bool, i64, &str) {
    match name.parse::<i64>() {
        Ok(v) => (false, v, name),
        Err(_) => (true, 0, name),
    }
}

/// blake3 of the shard file, then of the `json` field its labels are read with.
fn hash_tar(path: &Path, json_label: &str) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(path)?)?;
    h.update(b"\0json-label\0");
    h.update(json_label.as_bytes());
    Ok(h.finalize().to_hex().to_string())
}

/// Label, image, decode and encode of one sample (runs on a worker thread).
fn encode_sample(
    s: &RawSample,
    settings: &crate::manifest::IngestSettings,
    limits: &DecodeLimits,
    json_label: &str,
) -> SampleOutcome {
    if let Some(problem) = &s.problem {
        return Err(problem.clone());
    }
    let label = s
        .label(json_label)
        .map_err(|e| (RejectReason::InvalidSample, e))?;
    let Some((ext, bytes)) = s.image() else {
        let have: Vec<&str> = s.members.iter().map(|(e, _)| e.as_str()).collect();
        return Err((
            RejectReason::InvalidSample,
            format!(
                "no image (members: {}; an image is one of {})",
                have.join(", "),
                webdataset::IMAGE_EXTENSIONS.join(", ")
            ),
        ));
    };
    if bytes.is_empty() {
        return Err((RejectReason::Empty, format!("{}.{ext} is empty", s.key)));
    }
    let item = u32::try_from(s.index).unwrap_or(u32::MAX);
    encode::encode_file_bytes(bytes, settings, limits, None, item)
        .map(|record| (record, label))
        .map_err(|e| {
            let (reason, detail) = encode::reject_reason(e);
            (reason, format!("{}.{ext}: {detail}", s.key))
        })
}
