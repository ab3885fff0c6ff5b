//! Adding IDX files (Fashion-MNIST, MNIST): one source per image file, its labels file
//! beside it.

use super::*;
use crate::idx;

impl Ingester<'_> {
    pub(super) fn add_idx(&mut self, c: Candidate) -> Result<(), IngestError> {
        let CandidateKind::Idx { labels } = &c.kind else {
            unreachable!("called for IDX candidates only")
        };
        let labels_stamp = match labels.as_deref().map(fs::metadata).transpose() {
            Ok(m) => m.map(|m| FileStamp::of(&m)),
            Err(e) => {
                self.rejects.push(Reject::new(
                    labels.as_deref().unwrap(),
                    RejectReason::Unreadable,
                    e.to_string(),
                ));
                return Ok(());
            }
        };
        let path = path_key(&c.path);
        let labels_file = labels
            .as_ref()
            .zip(labels_stamp)
            .map(|(p, stamp)| LabelsFile {
                path: path_key(p),
                stamp,
            });
        let labels_unchanged = |recorded: &Option<LabelsFile>| match (recorded, &labels_file) {
            (Some(a), Some(b)) => a.path == b.path && a.stamp.unchanged(&b.stamp),
            (a, b) => a.is_none() && b.is_none(),
        };
        if let Some(e) = self.existing(&path)
            && e.stamp.unchanged(&c.stamp)
            && labels_unchanged(&e.labels_file)
        {
            self.summary.already_present += 1;
            return Ok(());
        }
        let reject = |reason, detail: String| Reject::new(&c.path, reason, detail);
        let hash = match encode::hash_files(&c.path, labels.as_deref()) {
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
            label: None,
            labels_file: labels_file.clone(),
            webdataset: None,
            duplicate_of,
            records,
        };
        // Same content as before at this path: only the stamps change.
        if let Some(e) = self.existing(&path).filter(|e| e.hash == hash).cloned() {
            self.summary.already_present += 1;
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
        let images = match idx::read_images(&c.path) {
            Ok(i) => i,
            Err(e) => {
                self.rejects
                    .push(reject(RejectReason::InvalidIdx, e.to_string()));
                return Ok(());
            }
        };
        let label_values = match labels.as_deref().map(idx::read_labels).transpose() {
            Ok(l) => l,
            Err(e) => {
                self.rejects
                    .push(reject(RejectReason::InvalidIdx, e.to_string()));
                return Ok(());
            }
        };
        if let Some(l) = &label_values
            && l.len() != images.count
        {
            self.rejects.push(reject(
                RejectReason::InvalidIdx,
                format!("{} images but {} labels", images.count, l.len()),
            ));
            return Ok(());
        }
        let mut class_of = [u32::MAX; 256];
        if let Some(l) = &label_values {
            let distinct: BTreeSet<u8> = l.iter().copied().collect();
            for v in distinct {
                class_of[v as usize] = self.work.class_index(&v.to_string());
            }
        }
        let id = self.new_source_id();
        let settings = self.work.settings;
        let progress = self.progress;
        progress.add_total(images.count as u64);
        let mut spans: Vec<Span> = Vec::new();
        self.in_source = true;
        let pool = self.pool.clone();
        ordered_map(
            &pool,
            images.count,
            |i| {
                let gray = images.image(i);
                let rgb: Vec<u8> = gray.iter().flat_map(|&v| [v, v, v]).collect();
                let img =
                    image::RgbImage::from_raw(images.cols, images.rows, rgb).expect("sizes match");
                let label = label_values.as_ref().map(|l| class_of[l[i] as usize]);
                let size = img.dimensions();
                let r = encode::encode_record(
                    img,
                    size,
                    Original::default(),
                    &settings,
                    label,
                    i as u32,
                );
                progress.advance(1);
                r
            },
            |i, r| {
                let mut record = r.map_err(|e| IngestError::Output {
                    path: c.path.clone(),
                    source: io::Error::other(format!("image {i}: {e}")),
                })?;
                record.meta.source_id = id;
                let span = self.append(&record)?;
                push_span(&mut spans, span);
                self.summary.ingested += 1;
                Ok::<(), IngestError>(())
            },
        )?;
        self.in_source = false;
        self.summary.sources_added += 1;
        self.by_hash.insert(hash.clone(), spans.clone());
        self.pending.push(entry(id, None, spans));
        self.maybe_commit()
    }
}
