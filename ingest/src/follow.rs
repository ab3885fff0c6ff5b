//! Following watched folders with one long-lived [`Ingester`]: the start-up scan
//! reconciles what changed while nobody watched; after it, each changed path is
//! handled on its own (a file added, replaced, moved or deleted; a folder created or
//! removed), with no rescan of the trees.

use std::collections::HashMap;
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
    /// Folders byol writes (the dataset first, then [`Follower::exclude`]'s), canonical:
    /// never ingested, wherever they lie.
    own: Vec<PathBuf>,
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
            own: vec![data.clone()],
            data,
        })
    }

    /// Never ingests anything under `folders` (besides the dataset): the folders the
    /// daemon writes, its run folder (checkpoints, their `.tmp` folders, metrics,
    /// exports). A folder that does not exist yet is taken as given.
    pub fn exclude(&mut self, folders: impl IntoIterator<Item = PathBuf>) {
        for f in folders {
            let f = std::fs::canonicalize(&f).unwrap_or(f);
            if !self.own.contains(&f) {
                self.own.push(f);
            }
        }
    }

    /// The folders never ingested: the dataset and [`Follower::exclude`]'s, canonical.
    pub fn excluded(&self) -> &[PathBuf] {
        &self.own
    }

    /// True when `path` lies in a folder byol writes ([`Follower::exclude`], the
    /// dataset), by its path or through a symlink: its folder resolved (once per
    /// folder in `resolved`), and the path itself when it is a symlink.
    fn is_own(&self, path: &Path, resolved: &mut HashMap<PathBuf, bool>) -> bool {
        let inside = |p: &Path| self.own.iter().any(|o| p.starts_with(o));
        if inside(path) {
            return true;
        }
        let parent = path.parent().unwrap_or(path);
        let in_own_folder = *resolved
            .entry(parent.to_owned())
            .or_insert_with(|| std::fs::canonicalize(parent).is_ok_and(|p| inside(&p)));
        in_own_folder
            || (std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
                && std::fs::canonicalize(path).is_ok_and(|p| inside(&p)))
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
        let scanned = scan_roots(&mut self.ing, &roots, &self.own)?;
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
    /// Every other name the dataset records for a file found here (same device and
    /// inode: a hard link, the same folder seen through another watched folder) is
    /// handled as changed too when its recorded stamp differs: its new content is stored
    /// and the old retired where no file holds it any more, or it is retired when gone.
    ///
    /// Errors only when the dataset cannot be written; bad files become rejects.
    pub fn apply(&mut self, paths: &[PathBuf]) -> Result<IngestReport, IngestError> {
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut rejects = Vec::new();
        // Whether each watched folder still holds images, and whether each folder is
        // one byol writes (each looked at once per call).
        let mut holds_images: HashMap<PathBuf, bool> = Default::default();
        let mut resolved: HashMap<PathBuf, bool> = Default::default();
        let mut queue: Vec<PathBuf> = paths.to_vec();
        let mut seen: std::collections::HashSet<PathBuf> = paths.iter().cloned().collect();
        let mut checked = 0;
        while !queue.is_empty() {
            for path in &std::mem::take(&mut queue) {
                let seen_by = (&mut holds_images, &mut resolved);
                self.apply_one(path, &mut candidates, &mut rejects, seen_by)?;
            }
            // The other names of each file found, where their stamp is not this one.
            seen.extend(candidates[checked..].iter().map(|c| c.path.clone()));
            for c in &candidates[checked..] {
                let Some(id) = c.stamp.identity() else {
                    continue;
                };
                for other in self.ing.stale_names(id, &c.stamp) {
                    if seen.insert(other.clone()) {
                        queue.push(other);
                    }
                }
            }
            checked = candidates.len();
        }
        self.ing.note_rejects(rejects);
        self.ing.add(candidates)?;
        self.ing.flush()
    }

    /// [`Follower::apply`] for one changed path: candidates and rejects collected, a
    /// path that is gone retired.
    fn apply_one(
        &mut self,
        path: &Path,
        candidates: &mut Vec<Candidate>,
        rejects: &mut Vec<Reject>,
        (holds_images, resolved): (&mut HashMap<PathBuf, bool>, &mut HashMap<PathBuf, bool>),
    ) -> Result<(), IngestError> {
        {
            let Some(root) = self.root_of(path) else {
                return Ok(());
            };
            if skipped_name(&root.path, path) || self.is_own(path, resolved) {
                return Ok(());
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
                        return Ok(());
                    }
                    let layout = self.layout_of(&root);
                    // By the path found (a symlinked folder keeps its class).
                    let mut scan = match source::scan_found(path, Layout::Flat, &self.own) {
                        Ok(scan) => scan,
                        Err(e) => {
                            rejects.push(unreadable(path, &e));
                            return Ok(());
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
        Ok(())
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
        match source::scan(&root.path, Layout::Auto, &self.own) {
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
