//! Following watched folders with one long-lived [`Ingester`]: the start-up scan
//! reconciles what changed while nobody watched; after it, each changed path is
//! handled on its own (a file added, replaced, moved or deleted; a folder created or
//! removed), with no rescan of the trees.

use std::io;
use std::path::{Path, PathBuf};

use crate::gone;
use crate::ingest::{IngestError, IngestReport, scan_roots};
use crate::ingester::{Ingester, IngesterOptions};
use crate::reject::{Reject, RejectReason};
use crate::source::{self, Candidate, Layout};

/// One watched folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchRoot {
    /// The folder, canonical.
    pub path: PathBuf,
    /// The layout asked for (`auto`: kept from earlier runs, or chosen once it holds
    /// files).
    pub layout: Layout,
}

/// A dataset kept in step with watched folders (see the module docs). Never writes,
/// moves or deletes a source file.
pub struct Follower {
    ing: Ingester<'static>,
    roots: Vec<WatchRoot>,
    data: PathBuf,
}

impl Follower {
    /// Opens the dataset at `data` for writing (its lock is held until the follower is
    /// dropped) and resolves the watched folders.
    ///
    /// Errors: a watched folder is missing or unreadable ([`IngestError::Source`]),
    /// the dataset cannot be opened for writing.
    pub fn open(
        data: &Path,
        roots: &[(PathBuf, Layout)],
        opts: IngesterOptions,
    ) -> Result<Self, IngestError> {
        let mut resolved = Vec::with_capacity(roots.len());
        for (path, layout) in roots {
            let canonical = std::fs::canonicalize(path).map_err(|source| IngestError::Source {
                path: path.clone(),
                source,
            })?;
            resolved.push(WatchRoot {
                path: canonical,
                layout: *layout,
            });
        }
        let ing = Ingester::open_quiet(data, opts)?;
        let data = std::fs::canonicalize(data).unwrap_or_else(|_| data.to_owned());
        Ok(Follower {
            ing,
            roots: resolved,
            data,
        })
    }

    /// The watched folders, canonical.
    pub fn roots(&self) -> &[WatchRoot] {
        &self.roots
    }

    /// The dataset folder.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// Compacts the dataset ([`Ingester::compact`]); `Ok(None)` when nothing qualifies.
    pub fn compact(
        &mut self,
        policy: &crate::CompactPolicy,
    ) -> Result<Option<crate::CompactReport>, IngestError> {
        self.ing.compact(policy)
    }

    /// The target shard size of this dataset's writer.
    pub fn shard_bytes(&self) -> u64 {
        self.ing.shard_bytes()
    }

    /// Live records in the dataset (as committed and about to be).
    pub fn live_records(&self) -> u64 {
        self.ing.manifest().live_records()
    }

    /// The start-up scan: every watched folder scanned and reconciled as `byol ingest`
    /// would (new and changed files added, vanished ones retired, moved ones
    /// relabelled; a folder with no image file retires nothing), then committed.
    pub fn scan_all(&mut self) -> Result<IngestReport, IngestError> {
        let roots: Vec<(PathBuf, Layout)> = self
            .roots
            .iter()
            .map(|r| (r.path.clone(), r.layout))
            .collect();
        let scanned = scan_roots(&mut self.ing, &roots, Some(&self.data))?;
        let mut report = self.ing.flush()?;
        report.summary.ignored = scanned.ignored;
        report.summary.roots = scanned.roots;
        report.summary.warnings.extend(scanned.warnings);
        Ok(report)
    }

    /// Brings the dataset in step with `paths`, each of which changed: a file is added
    /// (new or replaced content stored, a move between class folders relabelled), a
    /// path that is gone is retired with everything recorded under it, a folder is
    /// scanned (files created in it before it was watched are not missed). Names that
    /// are skipped (hidden, temporary, partial downloads) and paths outside the watched
    /// folders are ignored. Commits, and returns what was done.
    ///
    /// Errors only when the dataset cannot be written; bad files become rejects.
    pub fn apply(&mut self, paths: &[PathBuf]) -> Result<IngestReport, IngestError> {
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut rejects = Vec::new();
        // Whether each watched folder still holds images (looked at once per call).
        let mut holds_images: std::collections::HashMap<PathBuf, bool> = Default::default();
        for path in paths {
            let Some(root) = self.root_of(path) else {
                continue;
            };
            if path.starts_with(&self.data) || skipped_name(&root.path, path) {
                continue;
            }
            match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => {
                    // A symlink to the watched folder or above it: the start-up walk
                    // refuses it as a loop, and so does this.
                    if std::fs::canonicalize(path).is_ok_and(|t| root.path.starts_with(&t)) {
                        rejects.push(Reject::new(
                            path,
                            RejectReason::SymlinkLoop,
                            "symlink loop".to_owned(),
                        ));
                        continue;
                    }
                    let layout = self.layout_of(&root);
                    // By the path found (a symlinked folder keeps its class).
                    let mut scan = match source::scan_found(path, Layout::Flat, Some(&self.data)) {
                        Ok(scan) => scan,
                        Err(e) => {
                            rejects.push(unreadable(path, &e));
                            continue;
                        }
                    };
                    if layout == Layout::ImageFolder {
                        source::label_from(&root.path, &mut scan.candidates);
                    }
                    // A folder replaced by another: what it held before and lacks now.
                    let found: std::collections::HashSet<&Path> =
                        scan.candidates.iter().map(|c| c.path.as_path()).collect();
                    let unreadable_dirs: Vec<PathBuf> =
                        scan.rejects.iter().map(|r| r.path.clone()).collect();
                    let recorded = self.ing.sources_under(path);
                    for gone in gone::gone(recorded, |p| found.contains(p), &unreadable_dirs) {
                        // The walk for images runs only when something is gone.
                        if *holds_images
                            .entry(root.path.clone())
                            .or_insert_with(|| gone::holds_images(&root.path))
                        {
                            self.ing.retire(&gone)?;
                        }
                    }
                    rejects.extend(scan.rejects);
                    candidates.extend(scan.candidates);
                }
                Ok(_) => {
                    let label = match self.layout_of(&root) {
                        Layout::ImageFolder => source::class_of(&root.path, path),
                        _ => None,
                    };
                    match Candidate::for_file(path, label) {
                        Ok(c) => candidates.push(c),
                        Err(e) => rejects.push(Reject::new(
                            path,
                            RejectReason::NotRegularFile,
                            e.to_string(),
                        )),
                    }
                }
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        && !*holds_images
                            .entry(root.path.clone())
                            .or_insert_with(|| gone::holds_images(&root.path)) =>
                {
                    // The watched folder itself is gone, or holds no image any more: an
                    // unmounted disk (or its empty mount point), a removed folder.
                    // Nothing is retired; the next start-up scan reconciles.
                    tracing::warn!(
                        folder = %root.path.display(),
                        path = %path.display(),
                        "watched folder gone or empty (unmounted?); nothing retired"
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Gone: a file deleted or moved away, or a whole folder (the sources
                    // at or under the path).
                    let recorded = self.ing.sources_under(path);
                    for gone in gone::gone(recorded, |_| false, &[]) {
                        self.ing.retire(&gone)?;
                    }
                }
                Err(e) => rejects.push(unreadable(path, &e)),
            }
        }
        self.ing.note_rejects(rejects);
        self.ing.add(candidates)?;
        self.ing.flush()
    }

    /// The watched folder `path` lies in (the innermost).
    fn root_of(&self, path: &Path) -> Option<WatchRoot> {
        self.roots
            .iter()
            .filter(|r| path.starts_with(&r.path))
            .max_by_key(|r| r.path.as_os_str().len())
            .cloned()
    }

    /// The layout files under `root` follow: asked for, kept from earlier, or (auto,
    /// nothing kept) chosen now from what the folder holds and kept once it holds files.
    fn layout_of(&mut self, root: &WatchRoot) -> Layout {
        if root.layout != Layout::Auto {
            return root.layout;
        }
        if let Some(kept) = self.ing.manifest().root_layout(&root.path) {
            return kept;
        }
        match source::scan(&root.path, Layout::Auto, Some(&self.data)) {
            Ok(scan) => {
                if !scan.candidates.is_empty() {
                    self.ing.set_root_layout(&root.path, scan.layout);
                }
                scan.layout
            }
            Err(_) => Layout::Flat,
        }
    }
}

/// A path the scans skip: a hidden, temporary or partial name anywhere below `root`.
fn skipped_name(root: &Path, path: &Path) -> bool {
    path.strip_prefix(root)
        .map(|rel| rel.iter().any(source::is_ignored_name))
        .unwrap_or(true)
}

fn unreadable(path: &Path, e: &io::Error) -> Reject {
    Reject::new(path, RejectReason::Unreadable, e.to_string())
}
