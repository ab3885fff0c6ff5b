//! Sources that vanished or were replaced, at commit: removed, relabelled (the content
//! moved to another class), or their records retired when no source holds them.

use super::*;

/// A live source holding some content: its path, its label, and whether it was added
/// by this ingester.
type Holder<'a> = (&'a str, Option<&'a str>, bool);

impl Ingester<'_> {
    /// Takes vanished sources out of the manifest, saying for each what became of its
    /// content: held by a source added since this ingester opened, under another label
    /// (relabelled: the file moved to another class); held by another source (removed:
    /// a copy or a rename, or a copy in another class that was there before); or held
    /// by no source (retired).
    pub(super) fn drop_removed(&mut self) {
        if self.removed.is_empty() {
            return;
        }
        let mut removed = std::mem::take(&mut self.removed);
        removed.sort_unstable();
        let hashes: HashSet<&str> = removed
            .iter()
            .map(|&i| self.work.sources[i].hash.as_str())
            .collect();
        // Live holders of each affected content: (path, label, added by this ingester).
        let mut holders: HashMap<&str, Vec<Holder>> = HashMap::new();
        for s in self.by_path.values().map(|&i| &self.work.sources[i]) {
            if hashes.contains(s.hash.as_str()) {
                holders.entry(s.hash.as_str()).or_default().push((
                    s.path.as_str(),
                    s.label.as_deref(),
                    s.id >= self.first_new_id,
                ));
            }
        }
        let mut gone = Vec::new();
        let mut changes = Vec::new();
        for &i in &removed {
            let old = &self.work.sources[i];
            let mut held = holders.get(old.hash.as_str()).cloned().unwrap_or_default();
            held.sort_unstable();
            let same_name =
                |p: &str| stored_path(p).file_name() == stored_path(&old.path).file_name();
            let same_label = held.iter().find(|(_, l, _)| *l == old.label.as_deref());
            let moved_to = held
                .iter()
                .filter(|(_, _, new)| *new)
                .min_by_key(|(p, _, _)| !same_name(p));
            match (same_label, moved_to, held.first()) {
                (None, Some(&(now, to, _)), _) => changes.push(SourceChange::Relabelled {
                    path: old.path.clone(),
                    now: now.to_owned(),
                    from: old.label.clone(),
                    to: to.map(str::to_owned),
                }),
                (Some(&(kept_by, _, _)), _, _) | (None, None, Some(&(kept_by, _, _))) => changes
                    .push(SourceChange::Removed {
                        path: old.path.clone(),
                        kept_by: kept_by.to_owned(),
                    }),
                (None, None, None) => gone.push(old.clone()),
            }
        }
        for c in &changes {
            match c {
                SourceChange::Relabelled { .. } => self.summary.relabelled += 1,
                SourceChange::Removed { .. } => self.summary.sources_removed += 1,
                SourceChange::Retired { .. } => {}
            }
        }
        self.changes.extend(changes);
        // Compact the source list and re-index the paths.
        let mut k = 0;
        self.work.sources.retain(|_| {
            k += 1;
            removed.binary_search(&(k - 1)).is_err()
        });
        self.by_path = self
            .work
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.path.clone(), i))
            .collect();
        self.by_identity = identities(&self.work.sources);
        for old in gone {
            self.retire_records(&old, false);
        }
        self.dirty = true;
    }

    /// Retires the records of replaced entries that no source refers to any more.
    pub(super) fn retire_replaced(&mut self) {
        for old in std::mem::take(&mut self.replaced) {
            if self.hash_refs.get(&old.hash).copied().unwrap_or(0) == 0 {
                self.retire_records(&old, true);
            }
        }
    }

    pub(super) fn retire_records(&mut self, old: &SourceEntry, replaced: bool) {
        self.by_hash.remove(&old.hash);
        self.hash_refs.remove(&old.hash);
        let mut records = 0;
        for span in &old.records {
            if let Some(shard) = self.work.shards.iter_mut().find(|s| s.id == span.shard) {
                shard.retired.extend(span.first..span.first + span.count);
                shard.retired.sort_unstable();
                shard.retired.dedup();
                records += u64::from(span.count);
            }
        }
        self.summary.retired += records;
        self.summary.sources_retired += 1;
        self.changes.push(SourceChange::Retired {
            path: old.path.clone(),
            records,
            replaced,
        });
        self.dirty = true;
    }
}
