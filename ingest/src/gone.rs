//! The two rules of what is gone, written once and used by `byol ingest`
//! (`ingest.rs`) and the daemon's follower (`follow.rs`) alike:
//!
//! - **What is gone is retired** ([`gone`]): a recorded source that a scan did not find,
//!   that lies under no folder the scan could not read, and that does not exist now.
//! - **An unmounted disk retires nothing** ([`holds_images`]): a watched or given folder
//!   that is missing, or where no file is an image (an empty mount point, a stub file),
//!   retires none of the sources recorded under it.

use std::path::{Path, PathBuf};

use crate::source;

/// Of the sources `recorded` under a folder, those that are gone: not `found` by its
/// scan, under none of the folders it could not read (`unreadable`: not gone, only not
/// seen), and not on disk now (a file that appeared after the scan is not gone).
pub(crate) fn gone(
    recorded: Vec<PathBuf>,
    found: impl Fn(&Path) -> bool,
    unreadable: &[PathBuf],
) -> Vec<PathBuf> {
    recorded
        .into_iter()
        .filter(|p| !found(p) && !unreadable.iter().any(|d| p.starts_with(d)) && !p.exists())
        .collect()
}

/// True when `folder` exists and some file under it is an image (the walk stops at the
/// first one). False is the unmounted case: nothing under `folder` may be retired.
pub(crate) fn holds_images(folder: &Path) -> bool {
    walkdir::WalkDir::new(folder)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .any(|e| source::sniffs_as_image(e.path()))
}
