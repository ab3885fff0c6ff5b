//! Finding the files to ingest: ImageFolder trees, flat folders and IDX files.

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
    /// ImageFolder when the top level holds only folders, flat otherwise.
    #[default]
    Auto,
    /// Label = name of the first-level subfolder.
    ImageFolder,
    /// Every image in the tree, unlabelled.
    Flat,
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

/// Candidates and early rejects of one source path.
#[derive(Debug, Default)]
pub struct Scan {
    /// Files to read, in a deterministic order (sorted by path).
    pub candidates: Vec<Candidate>,
    /// Entries rejected without reading them.
    pub rejects: Vec<Reject>,
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|s| s.starts_with('.'))
}

fn looks_like_idx(path: &Path, kind: &str) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains(kind))
}

/// Decides the layout of folder `root` when `layout` is [`Layout::Auto`].
pub fn resolve_layout(root: &Path, layout: Layout) -> io::Result<Layout> {
    if layout != Layout::Auto {
        return Ok(layout);
    }
    let mut dirs = 0;
    for e in fs::read_dir(root)? {
        let e = e?;
        if is_hidden(&e.file_name()) {
            continue;
        }
        match fs::metadata(e.path()) {
            Ok(m) if m.is_dir() => dirs += 1,
            _ => return Ok(Layout::Flat),
        }
    }
    Ok(if dirs > 0 {
        Layout::ImageFolder
    } else {
        Layout::Flat
    })
}

/// Lists what `src` (a folder, an image file or an IDX file) holds.
///
/// `exclude` (the dataset folder) is never descended into. Hidden files and folders
/// are skipped. Fails only when `src` itself cannot be read.
pub fn scan(src: &Path, layout: Layout, exclude: Option<&Path>) -> io::Result<Scan> {
    let root = fs::canonicalize(src)?;
    let meta = fs::metadata(&root)?;
    let mut scan = Scan::default();
    if meta.is_file() {
        let kind = if idx::is_idx_images(&root) {
            CandidateKind::Idx {
                labels: idx::labels_path_for(&root),
            }
        } else {
            CandidateKind::Image
        };
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
    let layout = resolve_layout(&root, layout)?;
    let exclude = exclude.and_then(|p| fs::canonicalize(p).ok());
    let walker = walkdir::WalkDir::new(&root)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let excluded = || {
                e.file_type().is_dir()
                    && exclude
                        .as_deref()
                        .is_some_and(|x| fs::canonicalize(e.path()).is_ok_and(|p| p == x))
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
        let label = match layout {
            Layout::ImageFolder if entry.depth() >= 2 => path
                .strip_prefix(&root)
                .ok()
                .and_then(|rel| rel.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned()),
            _ => None,
        };
        let kind = if looks_like_idx(&path, "idx3") && idx::is_idx_images(&path) {
            let labels = idx::labels_path_for(&path);
            paired_labels.extend(labels.clone());
            CandidateKind::Idx { labels }
        } else {
            CandidateKind::Image
        };
        scan.candidates.push(Candidate {
            path,
            label,
            kind,
            stamp: FileStamp::of(&meta),
        });
    }
    // Labels files travel with their image file; they are not images themselves.
    scan.candidates.retain(|c| !paired_labels.contains(&c.path));
    Ok(scan)
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
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"x").unwrap();
    }

    #[test]
    fn imagefolder_labels_from_first_level() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("cat/a.jpg"));
        touch(&d.path().join("cat/deep/b.jpg"));
        touch(&d.path().join("dog/c.png"));
        touch(&d.path().join(".hidden/x.jpg"));
        touch(&d.path().join("dog/.DS_Store"));
        let s = scan(d.path(), Layout::Auto, None).unwrap();
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

    #[test]
    fn flat_when_files_at_top_level() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("a.jpg"));
        touch(&d.path().join("sub/b.jpg"));
        let s = scan(d.path(), Layout::Auto, None).unwrap();
        assert_eq!(s.candidates.len(), 2);
        assert!(s.candidates.iter().all(|c| c.label.is_none()));
    }

    #[test]
    fn symlink_problems_are_rejects() {
        let d = tempfile::tempdir().unwrap();
        touch(&d.path().join("ok.jpg"));
        std::os::unix::fs::symlink(d.path().join("missing.jpg"), d.path().join("broken.jpg"))
            .unwrap();
        std::os::unix::fs::symlink(d.path(), d.path().join("loop")).unwrap();
        std::os::unix::fs::symlink(d.path().join("self"), d.path().join("self")).unwrap();
        let s = scan(d.path(), Layout::Flat, None).unwrap();
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
        let s = scan(d.path(), Layout::Flat, Some(&d.path().join("out"))).unwrap();
        assert_eq!(s.candidates.len(), 1);
    }
}
