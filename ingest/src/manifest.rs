//! The dataset manifest: the single source of truth about what a dataset holds.
//!
//! A shard not listed here does not exist. The manifest is replaced atomically
//! (see [`crate::fsutil::write_atomic`]); its layout is specified in `ingest/FORMAT.md`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::shard::{Codec, Compression};
use crate::source::Layout;

/// File name of the manifest inside a dataset folder.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Folder of the shards inside a dataset folder.
pub const SHARDS_DIR: &str = "shards";
/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "byol-dataset";
/// A path as the manifest stores it: losslessly. A name that is valid UTF-8 is stored
/// as is; each byte that is not (a Latin-1 `grün.png`, say) is stored as NUL followed by
/// its two hex digits (`gr\u0000fcn.png` in JSON). NUL never occurs in a path, so every
/// name on disk has one stored form and [`stored_path`] gives the name back.
pub fn path_key(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push('\0');
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// The path a stored form of [`path_key`] names (older manifests' paths, which hold no
/// NUL, are themselves). Borrows unless the name has escaped bytes.
pub fn stored_path(key: &str) -> std::borrow::Cow<'_, Path> {
    use std::os::unix::ffi::OsStringExt;
    if !key.contains('\0') {
        return std::borrow::Cow::Borrowed(Path::new(key));
    }
    let bytes = key.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == 0)
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    std::borrow::Cow::Owned(PathBuf::from(std::ffi::OsString::from_vec(out)))
}

/// Serde for a path field in its stored form ([`path_key`] / [`stored_path`]): the
/// JSON Lines reports keep names that are not UTF-8 as the manifest does.
pub mod path_serde {
    use std::path::{Path, PathBuf};

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `path` as [`super::path_key`] gives it.
    pub fn serialize<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::path_key(path))
    }

    /// Reads a stored path back.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(super::stored_path(&String::deserialize(d)?).into_owned())
    }
}

/// The manifest version this build writes. Version 4 added a source's `dev` (device
/// number) to its stamp: with the inode it says which recorded sources are one file
/// (hard links, a folder seen through two watched folders). Version 3 stores paths losslessly
/// ([`path_key`]) and added a source's `ctime_ns` and `inode` to its stamp (an edit that
/// keeps size and mtime is seen); version 2 made a
/// record's label the label of the source(s) that refer to it (see `FORMAT.md`). This
/// build also reads versions 1 to 3, whose manifests mean the same under these rules
/// (a stamp without ctime or inode is compared on size and mtime; one without `dev`
/// gets it when its file is next looked at).
pub const MANIFEST_VERSION: u32 = 4;
/// Manifest versions this build reads (version 2's paths were made UTF-8, see
/// `FORMAT.md`).
pub const READABLE_VERSIONS: [u32; 4] = [1, 2, 3, 4];

/// Errors loading or saving a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The manifest file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a valid manifest.
    #[error("{path}: not a valid dataset manifest: {reason}")]
    Invalid {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ManifestError {
    /// What kind of failure this is: the IO error's, or damage for an invalid file.
    pub fn kind(&self) -> crate::fsutil::FailureKind {
        match self {
            ManifestError::Io { source, .. } => crate::fsutil::FailureKind::of_io(source),
            ManifestError::Invalid { .. } => crate::fsutil::FailureKind::Damaged,
        }
    }
}

/// Settings fixed when a dataset is created; every later ingest uses the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSettings {
    /// Payload codec of every shard.
    pub codec: Codec,
    /// Images are resized so their short side is at most this (None: kept as decoded).
    pub max_side: Option<u32>,
    /// How records are stored (zstd frames or as is); each shard records its own.
    #[serde(default)]
    pub compression: Compression,
    /// zstd compression level of each record.
    pub zstd_level: i32,
    /// JPEG quality used when the `encoded` codec must re-encode an image.
    pub jpeg_quality: u8,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            codec: Codec::RawRgb8,
            max_side: Some(256),
            compression: Compression::Zstd,
            zstd_level: 3,
            jpeg_quality: 95,
        }
    }
}

/// One shard of the dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    /// Shard id, unique and increasing within the dataset.
    pub id: u32,
    /// File name inside `shards/`.
    pub file: String,
    /// Number of records in the shard.
    pub records: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Sum of the records' uncompressed payload sizes.
    pub raw_bytes: u64,
    /// Records no longer live (their source file changed); readers skip them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<u32>,
}

/// A run of consecutive records in one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Span {
    /// Shard id.
    pub shard: u32,
    /// Index of the first record.
    pub first: u32,
    /// Number of records.
    pub count: u32,
}

/// What says a file is unchanged without reading it: size, modification time, and (on
/// Unix) status-change time and inode. An edit that keeps size and mtime (`exiftool
/// -P`, `touch -r`) still moves the ctime, and a file replaced by another keeps neither
/// its inode nor its ctime. See [`FileStamp::unchanged`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileStamp {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Status-change time (ctime), nanoseconds since the Unix epoch; absent in
    /// manifests before version 3 and off Unix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ctime_ns: Option<i64>,
    /// Inode number; absent in manifests before version 3 and off Unix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inode: Option<u64>,
    /// Device number (`st_dev`); absent in manifests before version 4 and off Unix. Not
    /// part of [`FileStamp::unchanged`] (a remount may renumber a device); with the
    /// inode it names the file ([`FileStamp::identity`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<u64>,
}

impl FileStamp {
    /// Reads the stamp of `meta`.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| match t.duration_since(std::time::UNIX_EPOCH) {
                Ok(d) => i64::try_from(d.as_nanos()).ok(),
                Err(e) => i64::try_from(e.duration().as_nanos()).ok().map(|n| -n),
            })
            .unwrap_or(0);
        #[cfg(unix)]
        let (ctime_ns, inode, dev) = {
            use std::os::unix::fs::MetadataExt;
            let ctime = meta
                .ctime()
                .checked_mul(1_000_000_000)
                .and_then(|s| s.checked_add(meta.ctime_nsec()));
            (ctime, Some(meta.ino()), Some(meta.dev()))
        };
        #[cfg(not(unix))]
        let (ctime_ns, inode, dev) = (None, None, None);
        FileStamp {
            size: meta.len(),
            mtime_ns,
            ctime_ns,
            inode,
            dev,
        }
    }

    /// The file itself, `(device, inode)`, where both were recorded: two paths with the
    /// same identity are two names of one file.
    pub fn identity(&self) -> Option<(u64, u64)> {
        self.dev.zip(self.inode)
    }

    /// True when a file recorded with this stamp still has it (`now`): size and mtime
    /// equal, and ctime and inode too where this stamp recorded them (older manifests
    /// did not: their files are compared on size and mtime until their next change).
    pub fn unchanged(&self, now: &FileStamp) -> bool {
        self.size == now.size
            && self.mtime_ns == now.mtime_ns
            && same_where_recorded(self.ctime_ns, now.ctime_ns)
            && same_where_recorded(self.inode, now.inode)
    }
}

/// True when `recorded` is absent (an older manifest) or equals `current`.
fn same_where_recorded<T: PartialEq>(recorded: Option<T>, current: Option<T>) -> bool {
    recorded.is_none() || recorded == current
}

/// One ingested source file (an image file, or an IDX image file with its labels file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceEntry {
    /// Id stored in every record made from this source.
    pub id: u64,
    /// Absolute path of the file as it was found.
    pub path: String,
    /// Size and modification time when ingested.
    #[serde(flatten)]
    pub stamp: FileStamp,
    /// blake3 of the file content (for IDX: of the image file and the labels file).
    pub hash: String,
    /// Class name, if the source is labelled by its folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// IDX labels file paired with this IDX image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_file: Option<LabelsFile>,
    /// Set for a WebDataset shard (`.tar`): its records are its samples, each labelled
    /// in its index entry (`label` then only labels samples that carry none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webdataset: Option<WebDatasetSource>,
    /// Id of the source whose records hold the same content, if this one was a duplicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate_of: Option<u64>,
    /// The records holding this source's images.
    pub records: Vec<Span>,
}

/// The labels half of an IDX pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelsFile {
    /// Absolute path.
    pub path: String,
    /// Size and modification time when ingested.
    #[serde(flatten)]
    pub stamp: FileStamp,
}

/// What a WebDataset shard's labels were read with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebDatasetSource {
    /// The field of each sample's `json` read as its label (when it has no `cls`).
    pub json_label: String,
}

/// A folder given to an ingest run, with the layout its labels were read with. Later
/// runs with `--layout auto` keep that layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootEntry {
    /// Canonical absolute path of the folder.
    pub path: String,
    /// [`Layout::ImageFolder`] or [`Layout::Flat`].
    pub layout: Layout,
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Always [`MANIFEST_VERSION`] for manifests this build reads.
    pub version: u32,
    /// Incremented by every ingest run that changed the dataset.
    pub generation: u64,
    /// Settings every shard was written with.
    pub settings: IngestSettings,
    /// Class names; a record's label is an index into this list. Only ever appended to.
    pub classes: Vec<String>,
    /// The shards, in id order.
    pub shards: Vec<ShardEntry>,
    /// Every ingested source file.
    pub sources: Vec<SourceEntry>,
    /// Folders ingested so far, with their layouts (absent in version 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roots: Vec<RootEntry>,
}

impl Manifest {
    /// An empty manifest for a new dataset.
    pub fn new(settings: IngestSettings) -> Self {
        Manifest {
            format: FORMAT_NAME.into(),
            version: MANIFEST_VERSION,
            generation: 0,
            settings,
            classes: Vec::new(),
            shards: Vec::new(),
            sources: Vec::new(),
            roots: Vec::new(),
        }
    }

    /// Path of the manifest of the dataset in `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(MANIFEST_FILE)
    }

    /// Loads the manifest of the dataset in `dir`; `Ok(None)` if there is none yet.
    pub fn load(dir: &Path) -> Result<Option<Self>, ManifestError> {
        let path = Self::path_in(dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ManifestError::Io { path, source }),
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| ManifestError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        m.validate()
            .map_err(|reason| ManifestError::Invalid { path, reason })?;
        Ok(Some(m))
    }

    /// Writes the manifest atomically into `dir`, as version [`MANIFEST_VERSION`].
    pub fn save(&self, dir: &Path) -> Result<(), ManifestError> {
        let path = Self::path_in(dir);
        let mut current = std::borrow::Cow::Borrowed(self);
        if self.version != MANIFEST_VERSION {
            current.to_mut().version = MANIFEST_VERSION;
        }
        let mut bytes = serde_json::to_vec_pretty(&*current).expect("manifest serialises");
        bytes.push(b'\n');
        fsutil::write_atomic(&path, &bytes).map_err(|source| ManifestError::Io { path, source })
    }

    /// Checks the invariants a reader relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT_NAME {
            return Err(format!(
                "format is {:?}, expected {FORMAT_NAME:?}",
                self.format
            ));
        }
        if !READABLE_VERSIONS.contains(&self.version) {
            return Err(format!(
                "manifest version {} is not supported (this build reads versions {READABLE_VERSIONS:?})",
                self.version
            ));
        }
        let mut ids = HashSet::new();
        for s in &self.shards {
            if !ids.insert(s.id) {
                return Err(format!("shard id {} listed twice", s.id));
            }
            if s.file.contains('/') || s.file.contains('\\') || s.file.starts_with('.') {
                return Err(format!(
                    "shard file name {:?} is not a plain file name",
                    s.file
                ));
            }
            if let Some(r) = s.retired.iter().find(|&&r| u64::from(r) >= s.records) {
                return Err(format!(
                    "shard {} retires record {r} of {}",
                    s.id, s.records
                ));
            }
        }
        for src in &self.sources {
            if let Some(label) = &src.label
                && !self.classes.contains(label)
            {
                return Err(format!(
                    "source {} has label {label:?}, which is not in the class list",
                    src.path
                ));
            }
            for span in &src.records {
                let Some(shard) = self.shards.iter().find(|s| s.id == span.shard) else {
                    return Err(format!(
                        "source {} points to unknown shard {}",
                        src.path, span.shard
                    ));
                };
                if u64::from(span.first) + u64::from(span.count) > shard.records {
                    return Err(format!(
                        "source {} points past the end of shard {}",
                        src.path, span.shard
                    ));
                }
            }
        }
        Ok(())
    }

    /// Total number of records in all shards (live and retired).
    pub fn total_records(&self) -> u64 {
        self.shards.iter().map(|s| s.records).sum()
    }

    /// Number of live (not retired) records.
    pub fn live_records(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.records - s.retired.len() as u64)
            .sum()
    }

    /// Id for the next shard.
    pub fn next_shard_id(&self) -> u32 {
        self.shards.iter().map(|s| s.id + 1).max().unwrap_or(0)
    }

    /// Id for the next source.
    pub fn next_source_id(&self) -> u64 {
        self.sources.iter().map(|s| s.id + 1).max().unwrap_or(0)
    }

    /// Index of `name` in the class list, appending it if new.
    pub fn class_index(&mut self, name: &str) -> u32 {
        match self.classes.iter().position(|c| c == name) {
            Some(i) => i as u32,
            None => {
                self.classes.push(name.to_owned());
                (self.classes.len() - 1) as u32
            }
        }
    }

    /// Sources whose path is `root` or lies under it (`root` canonical).
    pub fn sources_under<'a>(
        &'a self,
        root: &'a Path,
    ) -> impl Iterator<Item = &'a SourceEntry> + 'a {
        self.sources
            .iter()
            .filter(move |s| stored_path(&s.path).starts_with(root))
    }

    /// The layout `root`'s labels were read with: as recorded, or (for a version-1
    /// manifest, which records none) image-folder when a source under it has a label,
    /// flat when its sources have none; `None` for a folder never ingested.
    pub fn root_layout(&self, root: &Path) -> Option<Layout> {
        if let Some(r) = self.roots.iter().find(|r| Path::new(&r.path) == root) {
            return Some(r.layout);
        }
        let mut under = self.sources_under(root).peekable();
        under.peek()?;
        Some(if under.any(|s| s.label.is_some()) {
            Layout::ImageFolder
        } else {
            Layout::Flat
        })
    }

    /// The folder whose labels `root` (a folder) takes, when it lies inside one ingested
    /// before: the nearest recorded root above it; or, for a version-1 manifest that records
    /// none, its parent when every source already stored under `root` is labelled with
    /// `root`'s own name (a class folder of an image-folder tree).
    pub fn enclosing_root(&self, root: &Path) -> Option<(PathBuf, Layout)> {
        if let Some(r) = self
            .roots
            .iter()
            .filter(|r| root.starts_with(&r.path) && Path::new(&r.path) != root)
            .max_by_key(|r| r.path.len())
        {
            return Some((stored_path(&r.path).into_owned(), r.layout));
        }
        if self.roots.iter().any(|r| stored_path(&r.path) == root) {
            return None;
        }
        let name = root.file_name()?.to_string_lossy();
        let mut under = self.sources_under(root).peekable();
        under.peek()?;
        under
            .all(|s| s.label.as_deref() == Some(&*name))
            .then(|| Some((root.parent()?.to_owned(), Layout::ImageFolder)))
            .flatten()
    }

    /// Records (or updates) the layout of folder `root`; false when it was recorded
    /// already.
    pub fn set_root_layout(&mut self, root: &Path, layout: Layout) -> bool {
        let path = path_key(root);
        match self.roots.iter_mut().find(|r| r.path == path) {
            Some(r) if r.layout == layout => return false,
            Some(r) => r.layout = layout,
            None => {
                self.roots.push(RootEntry { path, layout });
                self.roots.sort_by(|a, b| a.path.cmp(&b.path));
            }
        }
        true
    }

    /// File name of shard `id`.
    pub fn shard_file_name(id: u32) -> String {
        format!("{id:06}.shard")
    }
}
