//! Crash-safe file replacement: write to a temp name, fsync, rename, fsync the folder.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Suffix of every temporary file this crate writes; leftovers are removed by the next run.
pub const TMP_SUFFIX: &str = ".tmp";

/// The temporary name used while `path` is being written.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(TMP_SUFFIX);
    path.with_file_name(name)
}

/// Renames `from` to `to` and fsyncs the destination folder so the rename survives a crash.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Fsyncs a folder (its entries), where the platform allows it.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Creates (or truncates) `path`, writes `bytes` and fsyncs the file (not its folder).
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Replaces `path` with `bytes` atomically: readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let result = write_synced(&tmp, bytes).and_then(|()| rename_durable(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Takes the exclusive advisory lock of the file `path` (created if missing), held for
/// as long as the returned file lives; `Ok(None)` when another process holds it.
pub fn try_lock_exclusive(path: &Path) -> io::Result<Option<File>> {
    let f = File::create(path)?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Appends `lines` to the JSON Lines file at `path` (created if missing), one object
/// per line, in one write, then syncs the data. Nothing is written for no lines.
pub fn append_json_lines<T: serde::Serialize>(
    path: &Path,
    lines: impl IntoIterator<Item = T>,
) -> io::Result<()> {
    let mut buf = Vec::new();
    for line in lines {
        serde_json::to_writer(&mut buf, &line).map_err(io::Error::other)?;
        buf.push(b'\n');
    }
    if buf.is_empty() {
        return Ok(());
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&buf)?;
    f.sync_data()
}

/// What kind of storage failure an error is. A long-lived process decides by it: a full
/// disk is retried once there may be room, damage is passed over or reported, a
/// permission or read-only filesystem needs an operator. Exported as the `kind` label of
/// the daemon's failure counters and the `kind` field of its log events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// No space left on the device, or a quota exceeded (`ENOSPC`, `EDQUOT`).
    DiskFull,
    /// Permission denied (`EACCES`, `EPERM`).
    PermissionDenied,
    /// The filesystem is mounted read-only (`EROFS`).
    ReadOnly,
    /// What is stored is damaged or not what it claims: a checksum mismatch, an
    /// unparsable file, a truncated record.
    Damaged,
    /// Anything else.
    Other,
}

impl FailureKind {
    /// Every kind, in label order.
    pub const ALL: [FailureKind; 5] = [
        FailureKind::DiskFull,
        FailureKind::PermissionDenied,
        FailureKind::ReadOnly,
        FailureKind::Damaged,
        FailureKind::Other,
    ];

    /// The kind of an IO error, by its `ErrorKind`.
    pub fn of_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => FailureKind::DiskFull,
            io::ErrorKind::PermissionDenied => FailureKind::PermissionDenied,
            io::ErrorKind::ReadOnlyFilesystem => FailureKind::ReadOnly,
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => FailureKind::Damaged,
            _ => FailureKind::Other,
        }
    }

    /// The kind of the first IO error in `e`'s source chain (`e` included); `Other`
    /// when there is none.
    pub fn of_chain(e: &(dyn std::error::Error + 'static)) -> Self {
        let mut next = Some(e);
        while let Some(err) = next {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                return FailureKind::of_io(io);
            }
            next = err.source();
        }
        FailureKind::Other
    }

    /// The label value: `disk_full`, `permission_denied`, `read_only`, `damaged`, `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::DiskFull => "disk_full",
            FailureKind::PermissionDenied => "permission_denied",
            FailureKind::ReadOnly => "read_only",
            FailureKind::Damaged => "damaged",
            FailureKind::Other => "other",
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_follow_the_io_error_through_a_chain() {
        let full = io::Error::from(io::ErrorKind::StorageFull);
        assert_eq!(FailureKind::of_io(&full), FailureKind::DiskFull);
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(FailureKind::of_io(&denied), FailureKind::PermissionDenied);
        #[derive(Debug, thiserror::Error)]
        #[error("wrapped")]
        struct Wrapped(#[source] io::Error);
        let wrapped = Wrapped(io::Error::from_raw_os_error(28)); // ENOSPC
        assert_eq!(FailureKind::of_chain(&wrapped), FailureKind::DiskFull);
        assert_eq!(FailureKind::of_chain(&std::fmt::Error), FailureKind::Other);
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert!(!tmp_path(&p).exists());
    }
}
