//! Adding image files: unchanged ones cost a stat, known content a read and a hash, new
//! content is decoded, resized and appended in parallel (at most `duty` of the time).

use super::*;

impl Ingester<'_> {
    pub(super) fn add_images(&mut self, mut images: Vec<Candidate>) -> Result<(), IngestError> {
        // New classes in sorted order, as torchvision's ImageFolder numbers them.
        let new_classes: BTreeSet<&str> =
            images.iter().filter_map(|c| c.label.as_deref()).collect();
        for name in new_classes {
            self.work.class_index(name);
        }
        // Unchanged files: nothing to read; a new label is a manifest change only.
        let mut unchanged = Vec::new();
        images.retain(|c| {
            let present = self
                .existing(&path_key(&c.path))
                .is_some_and(|e| e.stamp.unchanged(&c.stamp));
            if present {
                unchanged.push((c.path.clone(), c.label.clone(), c.stamp));
            }
            !present
        });
        for (path, label, stamp) in unchanged {
            self.summary.already_present += 1;
            self.complete_stamp(&path, stamp);
            self.relabel(&path, label.as_deref())?;
        }
        let labels: Vec<Option<u32>> = images
            .iter()
            .map(|c| c.label.as_deref().map(|l| self.work.class_index(l)))
            .collect();
        let previous: Vec<Option<String>> = images
            .iter()
            .map(|c| self.existing(&path_key(&c.path)).map(|e| e.hash.clone()))
            .collect();
        let known: HashSet<String> = self.by_hash.keys().cloned().collect();
        // Content hash → the first file of this batch seen with it: later copies are
        // duplicates before they are decoded.
        let first_of: std::sync::Mutex<HashMap<String, usize>> = Default::default();
        self.progress.add_total(images.len() as u64);
        let settings = self.work.settings;
        let limits = self.opts.limits;
        let duty = self.opts.duty.clamp(0.01, 1.0);
        let progress = self.progress;
        // A second handle on the pool keeps its borrow apart from `consume`'s `self`.
        let pool = self.pool.clone();
        ordered_map(
            &pool,
            images.len(),
            |i| {
                let c = &images[i];
                let queued = |hash: &str| {
                    let mut first = first_of.lock().expect("never poisoned: no panics inside");
                    let j = first.entry(hash.to_owned()).or_insert(i);
                    *j = (*j).min(i);
                    *j < i
                };
                let started = Instant::now();
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    encode::process_image(
                        c,
                        labels[i],
                        previous[i].as_deref(),
                        &known,
                        &queued,
                        &settings,
                        &limits,
                    )
                }))
                .unwrap_or_else(|_| {
                    Outcome::Rejected(Reject::new(
                        &c.path,
                        RejectReason::DecoderPanic,
                        "the decoder panicked",
                    ))
                });
                if duty < 1.0 {
                    // Work at most `duty` of the time: rest in proportion to the work.
                    std::thread::sleep(started.elapsed().mul_f64(1.0 / duty - 1.0));
                }
                progress.advance(1);
                outcome
            },
            |i, outcome| self.consume_image(&images[i], labels[i], outcome),
        )
    }

    pub(super) fn consume_image(
        &mut self,
        c: &Candidate,
        label: Option<u32>,
        outcome: Outcome,
    ) -> Result<(), IngestError> {
        let (hash, record) = match outcome {
            Outcome::Rejected(r) => {
                self.rejects.push(r);
                return Ok(());
            }
            Outcome::Stored { hash, record } => (hash, Some(record)),
            Outcome::Unchanged { hash } | Outcome::Duplicate { hash } => (hash, None),
        };
        let path = path_key(&c.path);
        let same = self.existing(&path).filter(|e| e.hash == hash).cloned();
        let (id, duplicate_of, records) = match (same, self.by_hash.get(&hash).cloned(), record) {
            // Same content as before at this path: only the stamp (and the label) change.
            (Some(e), _, _) => {
                self.summary.already_present += 1;
                if e.label != c.label {
                    self.note_relabelled_in_place(path.clone(), e.label.clone(), c.label.clone());
                }
                (e.id, e.duplicate_of, e.records)
            }
            (None, Some(spans), _) => {
                self.summary.duplicates += 1;
                let orig = self.source_id_of(&hash);
                (self.new_source_id(), orig, spans)
            }
            (None, None, Some(mut record)) => {
                let id = self.new_source_id();
                record.meta.source_id = id;
                let span = self.append(&record)?;
                self.summary.ingested += 1;
                self.summary.sources_added += 1;
                self.by_hash.insert(hash.clone(), vec![span]);
                (id, None, vec![span])
            }
            (None, None, None) => {
                // A copy of a file earlier in this run that was rejected: the same bytes,
                // so the same verdict; decode it here to report it.
                let outcome = encode::process_image(
                    c,
                    label,
                    None,
                    &HashSet::new(),
                    &|_| false,
                    &self.work.settings,
                    &self.opts.limits,
                );
                return self.consume_image(c, label, outcome);
            }
        };
        self.pending.push(SourceEntry {
            id,
            path,
            stamp: c.stamp,
            hash,
            label: c.label.clone(),
            labels_file: None,
            webdataset: None,
            duplicate_of,
            records,
        });
        self.maybe_commit()
    }

    /// An unchanged file's stamp recorded by an older manifest (no ctime, inode or
    /// device) gets what `now` adds: a manifest change only.
    fn complete_stamp(&mut self, path: &Path, now: FileStamp) {
        let key = path_key(path);
        let Some(&i) = self.by_path.get(&key) else {
            return;
        };
        let stamp = &mut self.work.sources[i].stamp;
        if *stamp == now {
            return;
        }
        *stamp = now;
        self.dirty = true;
        if let Some(id) = now.identity() {
            let at = self.by_identity.entry(id).or_default();
            if !at.contains(&i) {
                at.push(i);
            }
        }
    }

    /// Id of a source (applied or pending) holding `hash`.
    pub(super) fn source_id_of(&self, hash: &str) -> Option<u64> {
        self.pending
            .iter()
            .chain(self.by_path.values().map(|&i| &self.work.sources[i]))
            .find(|s| s.hash == hash)
            .map(|s| s.id)
    }
}
