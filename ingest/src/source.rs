//! Finding the files to ingest: ImageFolder trees, flat folders, IDX files and
//! WebDataset shards.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::idx;
use crate::manifest::FileStamp;
use crate::reject::{Reject, RejectReason};

/// How a source folder is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// ImageFolder when a first-level subfolder holds files (images at the root stay
    /// unlabelled; non-image root files never count), flat otherwise.
    #[default]
    Auto,
    /// Label = name of the first-level subfolder.
    #[serde(alias = "imagefolder")]
    ImageFolder,
    /// Every image in the tree, unlabelled.
    Flat,
}

impl Layout {
    /// The kebab-case name used in configs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Layout::Auto => "auto",
            Layout::ImageFolder => "image-folder",
            Layout::Flat => "flat",
        }
    }
}

impl std::str::FromStr for Layout {
    type Err = String;

    /// `auto`, `imagefolder` (or `image-folder`), `flat`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Layout::Auto),
            "imagefolder" | "image-folder" => Ok(Layout::ImageFolder),
            "flat" => Ok(Layout::Flat),
            _ => Err(format!(
                "unknown layout {s:?} (expected auto, imagefolder or flat)"
            )),
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a candidate file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CandidateKind {
    /// One image file, decoded by content.
    Image,
    /// An IDX image file, with its labels file if one was found.
    Idx {
        /// The paired labels file.
        labels: Option<PathBuf>,
    },
    /// A WebDataset shard (`.tar`, `.tar.gz`, `.tgz`): one source, many samples.
    Tar,
}

/// The kind of the file at `path`: a WebDataset shard by its name, an IDX image file
/// by its content (when `idx_name` allows: its name says `idx3`), else an image.
fn kind_of(path: &Path, idx_name: bool) -> (CandidateKind, Option<PathBuf>) {
    if crate::webdataset::is_tar_name(path) {
        (CandidateKind::Tar, None)
    } else if idx_name && idx::is_idx_images(path) {
        let labels = idx::labels_path_for(path);
        (
            CandidateKind::Idx {
                labels: labels.clone(),
            },
            labels,
        )
    } else {
        (CandidateKind::Image, None)
    }
}

/// A file found in a source, not yet read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Absolute path as found (symlinks not resolved).
    pub path: PathBuf,
    /// Class name from the folder layout.
    pub label: Option<String>,
    /// Image file or IDX file.
    pub kind: CandidateKind,
    /// Size and modification time.
    pub stamp: FileStamp,
}

impl Candidate {
    /// The candidate for one file at `path` (absolute, as the dataset should record it)
    /// with `label`: what a watcher hands to [`crate::Ingester::add`] for a single file.
    ///
    /// Errors when the file cannot be stat'ed or is not a regular file.
    pub fn for_file(path: &Path, label: Option<String>) -> io::Result<Candidate> {
        let meta = fs::metadata(path)?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let (kind, _) = kind_of(path, true);
        Ok(Candidate {
            path: path.to_owned(),
            label,
            kind,
            stamp: FileStamp::of(&meta),
        })
    }
}

/// Candidates and early rejects of one source path.
#[derive(Debug, Default)]
pub struct Scan {
    /// The source path, canonical (symlinks resolved).
    pub root: PathBuf,
    /// The layout used for the labels ([`Layout::Flat`] for a single file).
    pub layout: Layout,
    /// Why [`Layout::Auto`] chose `layout`; `None` when the layout was given.
    pub layout_reason: Option<String>,
    /// Files to read, in a deterministic order (sorted by path).
    pub candidates: Vec<Candidate>,
    /// Entries rejected without reading them.
    pub rejects: Vec<Reject>,
    /// Files skipped: for their names (backups, temporary, partial downloads), or,
    /// in an image-folder tree, non-image files at its root.
    pub ignored: u64,
    /// Images at the root of an image-folder tree (kept, unlabelled).
    pub root_images: usize,
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|s| s.starts_with('.'))
}

/// Extensions (lower case) of files that are not meant as data: backups, temporary
/// files and partial downloads, and what byol itself writes (checkpoints and exports
/// `.safetensors`, shards `.shard`, metrics and reports `.jsonl`, manifests and
/// checkpoint metas `.json`), wherever it lies.
pub const IGNORED_EXTENSIONS: [&str; 13] = [
    "bak",
    "tmp",
    "temp",
    "part",
    "partial",
    "crdownload",
    "download",
    "swp",
    "old",
    "safetensors",
    "shard",
    "jsonl",
    "json",
];

/// True for a file name that is skipped whatever its content: hidden (`.name`), editor
/// backups (`name~`, `#name#`) and the [`IGNORED_EXTENSIONS`]. What a file *is* is
/// decided by its content; whether it is *meant* as data, by these names.
pub fn is_ignored_name(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    if name.starts_with('.')
        || name.ends_with('~')
        || (name.starts_with('#') && name.ends_with('#'))
    {
        return true;
    }
    name.rsplit_once('.').is_some_and(|(stem, ext)| {
        !stem.is_empty()
            && IGNORED_EXTENSIONS
                .iter()
                .any(|i| ext.eq_ignore_ascii_case(i))
    })
}

fn looks_like_idx(path: &Path, kind: &str) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains(kind))
}

/// True when the first bytes of the file at `path` are those of an image format (or an
/// IDX image file), or it is a WebDataset shard by its name: a README or a stray text
/// file is not.
pub(crate) fn sniffs_as_image(path: &Path) -> bool {
    if crate::webdataset::is_tar_name(path) {
        return true;
    }
    use std::io::Read;
    let mut head = [0u8; 64];
    let n = fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    n > 0 && (image::guess_format(&head[..n]).is_ok() || idx::is_idx_images(path))
}

/// The layout [`Layout::Auto`] chose for a folder, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutChoice {
    /// [`Layout::ImageFolder`] or [`Layout::Flat`].
    pub layout: Layout,
    /// One line for the summary.
    pub reason: String,
}

/// Decides the layout of a folder from what its tree holds (the rule of `--layout auto`):
///
/// - no first-level subfolder holds a file: **flat**;
/// - otherwise **image-folder** (each first-level subfolder is a class). Images at the
///   root are kept, unlabelled, and reported; files at the root that are not images
///   (README, notes) never change the choice.
fn choose_layout(class_folders: usize, root_images: usize, root_other: usize) -> LayoutChoice {
    let other = if root_other > 0 {
        format!("; {root_other} non-image file(s) at the root ignored for this choice")
    } else {
        String::new()
    };
    if class_folders == 0 {
        return LayoutChoice {
            layout: Layout::Flat,
            reason: format!("no subfolder holds files{other}"),
        };
    }
    let root = if root_images > 0 {
        format!("; {root_images} image(s) at the root are kept unlabelled")
    } else {
        String::new()
    };
    LayoutChoice {
        layout: Layout::ImageFolder,
        reason: format!("{class_folders} class folder(s){root}{other}"),
    }
}

/// Lists what `src` (a folder, an image file or an IDX file) holds.
///
/// `exclude` (folders byol writes: the dataset, the daemon's run folder) is never
/// descended into, wherever it is found (through a symlink too). Hidden files and folders,
/// backups, temporary files and partial downloads ([`is_ignored_name`]) are skipped and
/// counted. With [`Layout::Auto`] the layout is chosen from the tree: flat when no
/// first-level subfolder holds a file, image-folder otherwise (images at the root then
/// stay unlabelled; non-image files at the root never change the choice). Fails only
/// when `src` itself cannot be read.
pub fn scan(src: &Path, layout: Layout, exclude: &[PathBuf]) -> io::Result<Scan> {
    scan_at(fs::canonicalize(src)?, layout, exclude)
}

/// [`scan`] of a folder or file found under a watched folder (itself canonical), by the
/// path it was found at, symlinks in it not resolved: a symlinked class folder keeps its
/// place under the watched folder, and so its class, as the walk from the watched folder
/// at start-up gives it.
pub fn scan_found(path: &Path, layout: Layout, exclude: &[PathBuf]) -> io::Result<Scan> {
    scan_at(path.to_owned(), layout, exclude)
}

fn scan_at(root: PathBuf, layout: Layout, exclude: &[PathBuf]) -> io::Result<Scan> {
    let meta = fs::metadata(&root)?;
    let mut scan = Scan {
        root: root.clone(),
        layout: Layout::Flat,
        layout_reason: None,
        ..Scan::default()
    };
    if meta.is_file() {
        let (kind, _) = kind_of(&root, true);
        scan.candidates.push(Candidate {
            path: root,
            label: None,
            kind,
            stamp: FileStamp::of(&meta),
        });
        return Ok(scan);
    }
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file or a folder",
        ));
    }
    // The root itself must be listable: an unreadable root is an error, not an empty tree.
    fs::read_dir(&root)?;
    let exclude: Vec<PathBuf> = exclude
        .iter()
        .filter_map(|p| fs::canonicalize(p).ok())
        .collect();
    let walker = walkdir::WalkDir::new(&root)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let excluded = || {
                e.file_type().is_dir()
                    && !exclude.is_empty()
                    && fs::canonicalize(e.path()).is_ok_and(|p| exclude.contains(&p))
            };
            e.depth() == 0 || !(is_hidden(e.file_name()) || excluded())
        });
    let mut paired_labels = Vec::new();
    for entry in walker {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                scan.rejects.push(walk_reject(&root, e));
                continue;
            }
        };
        let ft = entry.file_type();
        if ft.is_dir() {
            continue;
        }
        let path = entry.path().to_owned();
        if is_ignored_name(entry.file_name()) {
            scan.ignored += 1;
            continue;
        }
        if !ft.is_file() {
            scan.rejects.push(Reject::new(
                &path,
                RejectReason::NotRegularFile,
                "not a regular file (fifo, socket or device)",
            ));
            continue;
        }
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) => {
                scan.rejects
                    .push(Reject::new(&path, RejectReason::Unreadable, e.to_string()));
                continue;
            }
        };
        let (kind, labels) = kind_of(&path, looks_like_idx(&path, "idx3"));
        paired_labels.extend(labels);
        scan.candidates.push(Candidate {
            path,
            label: None,
            kind,
            stamp: FileStamp::of(&meta),
        });
    }
    // Labels files travel with their image file; they are not images themselves.
    scan.candidates.retain(|c| !paired_labels.contains(&c.path));
    // Files at the root that are not images by content (a README): they never decide
    // the layout, and in a tree of class folders they are not data.
    let (mut root_files, mut not_images) = (0, std::collections::HashSet::new());
    if layout != Layout::Flat {
        for c in &scan.candidates {
            if class_of(&root, &c.path).is_none() {
                root_files += 1;
                if !sniffs_as_image(&c.path) {
                    not_images.insert(c.path.clone());
                }
            }
        }
    }
    scan.layout = match layout {
        Layout::Auto => {
            let folders: std::collections::BTreeSet<String> = scan
                .candidates
                .iter()
                .filter_map(|c| class_of(&root, &c.path))
                .collect();
            let choice = choose_layout(
                folders.len(),
                root_files - not_images.len(),
                not_images.len(),
            );
            scan.layout_reason = Some(choice.reason);
            choice.layout
        }
        l => l,
    };
    if scan.layout == Layout::ImageFolder {
        scan.candidates.retain(|c| !not_images.contains(&c.path));
        scan.ignored += not_images.len() as u64;
        scan.root_images = root_files - not_images.len();
        label_from(&root, &mut scan.candidates);
    }
    Ok(scan)
}

/// The class of `path` in an image-folder tree rooted at `root`: the first folder below
/// `root`; `None` for a file right in `root` (or outside it).
pub(crate) fn class_of(root: &Path, path: &Path) -> Option<String> {
    let mut parts = path.strip_prefix(root).ok()?.components();
    let first = parts.next()?;
    parts
        .next()
        .map(|_| first.as_os_str().to_string_lossy().into_owned())
}

/// Labels `candidates` as files of an image-folder tree rooted at `root` (an ancestor
/// of their folder): the first folder below `root` is the class; files right in
/// `root` stay unlabelled.
pub fn label_from(root: &Path, candidates: &mut [Candidate]) {
    for c in candidates {
        c.label = class_of(root, &c.path);
    }
}

fn walk_reject(root: &Path, e: walkdir::Error) -> Reject {
    let path = e.path().unwrap_or(root).to_owned();
    if e.loop_ancestor().is_some() {
        return Reject::new(&path, RejectReason::SymlinkLoop, "symlink loop");
    }
    let is_link = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
    match e.io_error() {
        Some(io) if is_link && io.kind() == io::ErrorKind::NotFound => {
            Reject::new(&path, RejectReason::BrokenSymlink, "broken symlink")
        }
        // ELOOP from the OS: a symlink that points to itself, or a chain too long.
        Some(io) if is_link && io.raw_os_error() == Some(40) => {
            Reject::new(&path, RejectReason::SymlinkLoop, "symlink loop")
        }
        Some(io) => Reject::new(&path, RejectReason::Unreadable, io.to_string()),
        None => Reject::new(&path, RejectReason::Unreadable, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        write(p, b"x");
    }

    fn write(p: &Path, bytes: &[u8]) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }

    #[test]
    fn imagefolder_labels_from_first_level() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("cat/a.jpg"));
        touch(&d.path().join("cat/deep/b.jpg"));
        touch(&d.path().join("dog/c.png"));
        touch(&d.path().join(".hidden/x.jpg"));
        touch(&d.path().join("dog/.DS_Store"));
        let s = scan(d.path(), Layout::Auto, &[]).unwrap();
        let got: Vec<_> = s
            .candidates
            .iter()
            .map(|c| {
                (
                    c.path.file_name().unwrap().to_str().unwrap(),
                    c.label.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a.jpg", Some("cat")),
                ("b.jpg", Some("cat")),
                ("c.png", Some("dog"))
            ]
        );
    }

    /// A tiny valid PNG (the layout choice sniffs root files by content).
    fn png_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        image::RgbImage::new(2, 2)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn labels_of(s: &Scan) -> Vec<(&str, Option<&str>)> {
        s.candidates
            .iter()
            .map(|c| {
                (
                    c.path.file_name().unwrap().to_str().unwrap(),
                    c.label.as_deref(),
                )
            })
            .collect()
    }

    #[test]
    fn flat_when_no_subfolder_holds_files() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("a.jpg"));
        touch(&d.path().join("b.jpg"));
        fs::create_dir(d.path().join("empty")).unwrap();
        let s = scan(d.path(), Layout::Auto, &[]).unwrap();
        assert_eq!(s.layout, Layout::Flat);
        assert_eq!(s.candidates.len(), 2);
        assert!(s.candidates.iter().all(|c| c.label.is_none()));
        assert!(s.layout_reason.unwrap().contains("no subfolder"));
    }

    #[test]
    fn a_readme_at_the_root_does_not_flip_an_imagefolder_tree() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("cat/a.png"), &png_bytes());
        write(&d.path().join("dog/b.png"), &png_bytes());
        fs::write(d.path().join("README"), "class folders of pets\n").unwrap();
        let s = scan(d.path(), Layout::Auto, &[]).unwrap();
        assert_eq!(s.layout, Layout::ImageFolder);
        let reason = s.layout_reason.clone().unwrap();
        assert!(reason.contains("2 class folder(s)"), "{reason}");
        assert!(
            reason.contains("1 non-image file(s) at the root"),
            "{reason}"
        );
        assert!(labels_of(&s).contains(&("a.png", Some("cat"))));
        assert!(labels_of(&s).contains(&("b.png", Some("dog"))));
    }

    #[test]
    fn images_at_the_root_of_an_imagefolder_tree_stay_unlabelled() {
        let d = tempfile::tempdir().unwrap();
        write(&d.path().join("cat/a.png"), &png_bytes());
        write(&d.path().join("stray.png"), &png_bytes());
        let s = scan(d.path(), Layout::Auto, &[]).unwrap();
        assert_eq!(s.layout, Layout::ImageFolder);
        assert!(
            s.layout_reason
                .as_deref()
                .unwrap()
                .contains("1 image(s) at the root are kept unlabelled")
        );
        assert_eq!(
            labels_of(&s),
            vec![("a.png", Some("cat")), ("stray.png", None)]
        );
    }

    #[test]
    fn backup_temporary_and_partial_names_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        for name in [
            "a.png",
            "a.png.bak",
            "b.JPG.part",
            "c.crdownload",
            "d.png~",
            "#e.png#",
            "f.tmp",
            ".g.png",
        ] {
            write(&d.path().join(name), &png_bytes());
        }
        let s = scan(d.path(), Layout::Auto, &[]).unwrap();
        assert_eq!(labels_of(&s), vec![("a.png", None)]);
        assert_eq!(s.ignored, 6, "hidden files are skipped without counting");
        assert!(!is_ignored_name(".bak".as_ref()) || is_hidden(".bak".as_ref()));
        assert!(!is_ignored_name("photo.jpeg".as_ref()));
    }

    #[test]
    fn symlink_problems_are_rejects() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("ok.jpg"));
        std::os::unix::fs::symlink(d.path().join("missing.jpg"), d.path().join("broken.jpg"))
            .unwrap();
        std::os::unix::fs::symlink(d.path(), d.path().join("loop")).unwrap();
        std::os::unix::fs::symlink(d.path().join("self"), d.path().join("self")).unwrap();
        let s = scan(d.path(), Layout::Flat, &[]).unwrap();
        assert_eq!(s.candidates.len(), 1);
        let mut reasons: Vec<_> = s.rejects.iter().map(|r| r.reason).collect();
        reasons.sort();
        assert_eq!(
            reasons,
            vec![
                RejectReason::BrokenSymlink,
                RejectReason::SymlinkLoop,
                RejectReason::SymlinkLoop
            ]
        );
    }

    #[test]
    fn excluded_folder_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("a.jpg"));
        touch(&d.path().join("out/shards/000000.shard"));
        let s = scan(d.path(), Layout::Flat, &[d.path().join("out")]).unwrap();
        assert_eq!(s.candidates.len(), 1);
    }

    #[test]
    fn every_excluded_folder_is_skipped_also_through_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let watched = d.path().join("in");
        touch(&watched.join("a.jpg"));
        touch(&watched.join("data/shards/000000.jpg"));
        touch(&watched.join("run/checkpoints/x.jpg"));
        touch(&d.path().join("elsewhere/run2/y.jpg"));
        std::os::unix::fs::symlink(d.path().join("elsewhere/run2"), watched.join("link")).unwrap();
        let exclude = [
            watched.join("data"),
            watched.join("run"),
            d.path().join("elsewhere/run2"),
        ];
        let s = scan(&watched, Layout::Flat, &exclude).unwrap();
        let names: Vec<_> = s.candidates.iter().map(|c| c.path.clone()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn what_byol_writes_is_ignored_by_name() {
        for name in [
            "encoder.safetensors",
            "000001.shard",
            "metrics.jsonl",
            "manifest.json",
            "meta.JSON",
        ] {
            assert!(is_ignored_name(name.as_ref()), "{name}");
        }
        assert!(!is_ignored_name("photo.png".as_ref()));
    }
}
