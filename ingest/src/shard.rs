//! The shard file: writer and reader in one place.
//!
//! The byte layout is specified in `ingest/FORMAT.md`; this module is its only
//! implementation. A shard is immutable once renamed to its final name.

use std::fs::{self, File};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::fsutil;

/// First eight bytes of every shard.
pub const MAGIC: [u8; 8] = *b"BYOLSHRD";
/// The shard format version this build writes. It also reads version 1, which is
/// version 2 with every record compressed (its header bytes 40..44 are zero).
pub const VERSION: u32 = 2;
/// The oldest shard format version this build reads.
pub const MIN_VERSION: u32 = 1;
/// Size of the fixed header at the start of the file.
pub const HEADER_LEN: usize = 64;
/// Size of one index entry.
pub const INDEX_ENTRY_LEN: usize = 48;
/// `label` value of a record without a label.
pub const NO_LABEL: u32 = u32::MAX;

/// How the payload of every record in a shard is encoded (before zstd).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Codec {
    /// Raw RGB8 pixels, row-major, `width * height * 3` bytes.
    #[serde(alias = "raw")]
    RawRgb8,
    /// An encoded image file (JPEG, PNG or WebP), decoded by content.
    Encoded,
}

impl std::str::FromStr for Codec {
    type Err = String;

    /// `raw` (or `raw-rgb8`), `encoded`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" | "raw-rgb8" => Ok(Codec::RawRgb8),
            "encoded" => Ok(Codec::Encoded),
            _ => Err(format!("unknown codec {s:?} (expected raw or encoded)")),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    /// `zstd`, `none`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            "none" => Ok(Compression::None),
            _ => Err(format!("unknown compression {s:?} (expected zstd or none)")),
        }
    }
}

impl Codec {
    fn to_u32(self) -> u32 {
        match self {
            Codec::RawRgb8 => 0,
            Codec::Encoded => 1,
        }
    }

    fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Codec::RawRgb8),
            1 => Some(Codec::Encoded),
            _ => None,
        }
    }
}

/// How every record's stored bytes relate to its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// One zstd frame per record: smaller shards; readers pay the decompression.
    #[default]
    Zstd,
    /// The payload as is: about twice the disk for raw pixels, read with one copy.
    None,
}

impl Compression {
    fn to_u32(self) -> u32 {
        match self {
            Compression::Zstd => 0,
            Compression::None => 1,
        }
    }

    fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Compression::Zstd),
            1 => Some(Compression::None),
            _ => None,
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Zstd => "zstd",
            Compression::None => "none",
        })
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Codec::RawRgb8 => "raw-rgb8",
            Codec::Encoded => "encoded",
        })
    }
}

/// What the index says about one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta {
    /// Byte offset of the stored (compressed) bytes from the start of the file.
    pub offset: u64,
    /// Length of the stored bytes.
    pub stored_len: u32,
    /// Length of the payload after decompression.
    pub raw_len: u32,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Class index into the manifest's class list, or [`NO_LABEL`].
    pub label: u32,
    /// Position of this image inside its source (0 for image files, n for IDX).
    pub item: u32,
    /// Id of the source entry in the manifest.
    pub source_id: u64,
    /// xxh3-64 of the stored bytes.
    pub checksum: u64,
}

impl RecordMeta {
    /// The label, if the record has one.
    pub fn label(&self) -> Option<u32> {
        (self.label != NO_LABEL).then_some(self.label)
    }

    fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.offset.to_le_bytes());
        out[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.raw_len.to_le_bytes());
        out[16..20].copy_from_slice(&self.width.to_le_bytes());
        out[20..24].copy_from_slice(&self.height.to_le_bytes());
        out[24..28].copy_from_slice(&self.label.to_le_bytes());
        out[28..32].copy_from_slice(&self.item.to_le_bytes());
        out[32..40].copy_from_slice(&self.source_id.to_le_bytes());
        out[40..48].copy_from_slice(&self.checksum.to_le_bytes());
    }

    fn decode(b: &[u8]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        RecordMeta {
            offset: u64_at(0),
            stored_len: u32_at(8),
            raw_len: u32_at(12),
            width: u32_at(16),
            height: u32_at(20),
            label: u32_at(24),
            item: u32_at(28),
            source_id: u64_at(32),
            checksum: u64_at(40),
        }
    }
}

/// Errors reading or writing a shard.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// An IO error on the shard file.
    #[error("{path}: {source}")]
    Io {
        /// The shard file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a shard or is damaged.
    #[error("{path}: not a valid shard: {reason}")]
    Invalid {
        /// The shard file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The shard was written by a format version this build does not read.
    #[error(
        "{path}: shard format version {found} is not supported (this build reads version {VERSION})"
    )]
    UnsupportedVersion {
        /// The shard file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
    },
    /// A record's stored bytes do not match its checksum or do not decompress.
    #[error("{path}: record {index} is corrupt: {reason}")]
    CorruptRecord {
        /// The shard file.
        path: PathBuf,
        /// Index of the record in the shard.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

impl ShardError {
    /// What kind of failure this is: the IO error's, or damage for an invalid shard or
    /// a corrupt record.
    pub fn kind(&self) -> crate::fsutil::FailureKind {
        use crate::fsutil::FailureKind;
        match self {
            ShardError::Io { source, .. } => FailureKind::of_io(source),
            ShardError::Invalid { .. } | ShardError::CorruptRecord { .. } => FailureKind::Damaged,
            ShardError::UnsupportedVersion { .. } => FailureKind::Other,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ShardError + '_ {
    move |source| ShardError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A record ready to be appended: payload compressed and checksummed.
///
/// Built in worker threads ([`StoredRecord::compress`]) so the writer only copies bytes.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    /// The compressed bytes as they go on disk.
    pub bytes: Vec<u8>,
    /// The index entry; `offset` is set by [`ShardWriter::append`], `source_id` by the
    /// caller before appending.
    pub meta: RecordMeta,
}

impl StoredRecord {
    /// Compresses `payload` (with zstd at `level`, or not at all) and checksums the
    /// result.
    pub fn compress(
        payload: &[u8],
        compression: Compression,
        level: i32,
        width: u32,
        height: u32,
        label: Option<u32>,
        item: u32,
    ) -> std::io::Result<Self> {
        let bytes = match compression {
            Compression::Zstd => zstd::bulk::compress(payload, level)?,
            Compression::None => payload.to_vec(),
        };
        let too_big = || std::io::Error::other("record exceeds 4 GiB");
        let meta = RecordMeta {
            offset: 0,
            stored_len: u32::try_from(bytes.len()).map_err(|_| too_big())?,
            raw_len: u32::try_from(payload.len()).map_err(|_| too_big())?,
            width,
            height,
            label: label.unwrap_or(NO_LABEL),
            item,
            source_id: 0,
            checksum: xxh3_64(&bytes),
        };
        Ok(StoredRecord { bytes, meta })
    }
}

/// Writes one shard under a temporary name; [`ShardWriter::finish`] makes it durable
/// and gives it its final name. Dropping an unfinished writer deletes the temp file.
pub struct ShardWriter {
    file: Option<BufWriter<File>>,
    tmp_path: PathBuf,
    final_path: PathBuf,
    codec: Codec,
    compression: Compression,
    index: Vec<RecordMeta>,
    offset: u64,
}

impl ShardWriter {
    /// Starts a shard that will be named `final_path` once finished; its records must be
    /// built with the same `compression`.
    pub fn create(
        final_path: &Path,
        codec: Codec,
        compression: Compression,
    ) -> Result<Self, ShardError> {
        let tmp_path = fsutil::tmp_path(final_path);
        let file = File::create(&tmp_path).map_err(io_err(&tmp_path))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        // Placeholder header, rewritten by `finish` once the index is known.
        file.write_all(&[0u8; HEADER_LEN])
            .map_err(io_err(&tmp_path))?;
        Ok(ShardWriter {
            file: Some(file),
            tmp_path,
            final_path: final_path.to_owned(),
            codec,
            compression,
            index: Vec::new(),
            offset: HEADER_LEN as u64,
        })
    }

    /// Appends a record and returns its index in this shard.
    pub fn append(&mut self, rec: &StoredRecord) -> Result<u32, ShardError> {
        let file = self.file.as_mut().expect("writer used after finish");
        file.write_all(&rec.bytes).map_err(io_err(&self.tmp_path))?;
        let index = self.index.len() as u32;
        self.index.push(RecordMeta {
            offset: self.offset,
            ..rec.meta
        });
        self.offset += rec.bytes.len() as u64;
        Ok(index)
    }

    /// Number of records appended so far.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no record was appended.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes of record data written so far (excluding header and index).
    pub fn data_bytes(&self) -> u64 {
        self.offset - HEADER_LEN as u64
    }

    /// Sum of the uncompressed payload lengths written so far.
    pub fn raw_bytes(&self) -> u64 {
        self.index.iter().map(|m| u64::from(m.raw_len)).sum()
    }

    /// Writes index and header, fsyncs, renames to the final name and fsyncs the folder.
    /// Returns the total file size.
    pub fn finish(mut self) -> Result<u64, ShardError> {
        let path = self.tmp_path.clone();
        let mut file = self.file.take().expect("finish called twice");
        let mut index_bytes = vec![0u8; self.index.len() * INDEX_ENTRY_LEN];
        for (meta, slot) in self
            .index
            .iter()
            .zip(index_bytes.chunks_exact_mut(INDEX_ENTRY_LEN))
        {
            meta.encode(slot);
        }
        file.write_all(&index_bytes).map_err(io_err(&path))?;
        let header = encode_header(
            self.codec,
            self.compression,
            self.index.len() as u64,
            self.offset,
            xxh3_64(&index_bytes),
        );
        file.seek(SeekFrom::Start(0)).map_err(io_err(&path))?;
        file.write_all(&header).map_err(io_err(&path))?;
        let file = file
            .into_inner()
            .map_err(|e| io_err(&path)(e.into_error()))?;
        file.sync_all().map_err(io_err(&path))?;
        drop(file);
        fsutil::rename_durable(&path, &self.final_path).map_err(io_err(&self.final_path))?;
        Ok(self.offset + index_bytes.len() as u64)
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

fn encode_header(
    codec: Codec,
    compression: Compression,
    count: u64,
    index_offset: u64,
    index_checksum: u64,
) -> [u8; 64] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&codec.to_u32().to_le_bytes());
    h[16..24].copy_from_slice(&count.to_le_bytes());
    h[24..32].copy_from_slice(&index_offset.to_le_bytes());
    h[32..40].copy_from_slice(&index_checksum.to_le_bytes());
    h[40..44].copy_from_slice(&compression.to_u32().to_le_bytes());
    let sum = xxh3_64(&h[0..56]);
    h[56..64].copy_from_slice(&sum.to_le_bytes());
    h
}

/// A memory-mapped shard. Record `i` is found in O(1) through the index.
pub struct ShardReader {
    map: Mmap,
    path: PathBuf,
    codec: Codec,
    compression: Compression,
    count: usize,
    index_offset: usize,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("path", &self.path)
            .field("codec", &self.codec)
            .field("count", &self.count)
            .finish()
    }
}

impl ShardReader {
    /// Maps `path` and validates header and index (not the records: see [`Self::verify`]).
    pub fn open(path: &Path) -> Result<Self, ShardError> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: shards are immutable once renamed to their final name (see FORMAT.md);
        // nothing in this project writes to a mapped shard.
        let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        let invalid = |reason: String| ShardError::Invalid {
            path: path.to_owned(),
            reason,
        };
        if map.len() < HEADER_LEN {
            return Err(invalid(format!(
                "{} bytes is shorter than the header",
                map.len()
            )));
        }
        let h = &map[..HEADER_LEN];
        if h[0..8] != MAGIC {
            return Err(invalid("bad magic".into()));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(ShardError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
            });
        }
        if u64::from_le_bytes(h[56..64].try_into().unwrap()) != xxh3_64(&h[0..56]) {
            return Err(invalid("header checksum mismatch".into()));
        }
        let codec_id = u32::from_le_bytes(h[12..16].try_into().unwrap());
        let codec = Codec::from_u32(codec_id)
            .ok_or_else(|| invalid(format!("unknown codec {codec_id}")))?;
        let compression_id = u32::from_le_bytes(h[40..44].try_into().unwrap());
        let compression = Compression::from_u32(compression_id)
            .ok_or_else(|| invalid(format!("unknown compression {compression_id}")))?;
        let count = u64::from_le_bytes(h[16..24].try_into().unwrap());
        let index_offset = u64::from_le_bytes(h[24..32].try_into().unwrap());
        let index_checksum = u64::from_le_bytes(h[32..40].try_into().unwrap());
        let expected_len = count
            .checked_mul(INDEX_ENTRY_LEN as u64)
            .and_then(|n| n.checked_add(index_offset));
        if expected_len != Some(map.len() as u64) || index_offset < HEADER_LEN as u64 {
            return Err(invalid(format!(
                "file is {} bytes but the header says {count} records with the index at {index_offset}",
                map.len()
            )));
        }
        let index_offset = index_offset as usize;
        if xxh3_64(&map[index_offset..]) != index_checksum {
            return Err(invalid("index checksum mismatch".into()));
        }
        let reader = ShardReader {
            map,
            path: path.to_owned(),
            codec,
            compression,
            count: count as usize,
            index_offset,
        };
        for i in 0..reader.count {
            let m = reader.meta(i);
            if m.offset < HEADER_LEN as u64
                || m.offset + u64::from(m.stored_len) > index_offset as u64
            {
                return Err(invalid(format!("record {i} points outside the data area")));
            }
        }
        Ok(reader)
    }

    /// The file this shard was mapped from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The payload codec of every record.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// How the records are stored.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True for a shard without records.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size of the mapped file in bytes.
    pub fn file_len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Index entry of record `i`. Panics if `i >= len()`.
    pub fn meta(&self, i: usize) -> RecordMeta {
        assert!(
            i < self.count,
            "record {i} out of range ({} records)",
            self.count
        );
        let at = self.index_offset + i * INDEX_ENTRY_LEN;
        RecordMeta::decode(&self.map[at..at + INDEX_ENTRY_LEN])
    }

    /// The stored bytes of record `i` (compressed unless the shard says otherwise),
    /// unchecked.
    pub fn stored(&self, i: usize) -> &[u8] {
        let m = self.meta(i);
        &self.map[m.offset as usize..(m.offset + u64::from(m.stored_len)) as usize]
    }

    /// Checks record `i` against its checksum.
    pub fn verify(&self, i: usize) -> Result<RecordMeta, ShardError> {
        let m = self.meta(i);
        if xxh3_64(self.stored(i)) != m.checksum {
            return Err(self.corrupt(i, "checksum mismatch".into()));
        }
        Ok(m)
    }

    /// Verifies record `i` and decompresses (or copies) its payload into `out` (resized
    /// to fit), reusing the decompression context in `scratch`.
    pub fn read_into(
        &self,
        i: usize,
        scratch: &mut ReadScratch,
        out: &mut Vec<u8>,
    ) -> Result<RecordMeta, ShardError> {
        let m = self.verify(i)?;
        out.clear();
        out.reserve(m.raw_len as usize);
        let n = match self.compression {
            Compression::Zstd => scratch
                .dctx
                .decompress_to_buffer(self.stored(i), out)
                .map_err(|e| self.corrupt(i, format!("zstd: {e}")))?,
            Compression::None => {
                out.extend_from_slice(self.stored(i));
                out.len()
            }
        };
        if n != m.raw_len as usize {
            return Err(self.corrupt(i, format!("payload is {n} bytes, index says {}", m.raw_len)));
        }
        if self.codec == Codec::RawRgb8
            && u64::from(m.width) * u64::from(m.height) * 3 != u64::from(m.raw_len)
        {
            return Err(self.corrupt(
                i,
                format!("{}x{} RGB8 is not {} bytes", m.width, m.height, m.raw_len),
            ));
        }
        Ok(m)
    }

    fn corrupt(&self, index: usize, reason: String) -> ShardError {
        ShardError::CorruptRecord {
            path: self.path.clone(),
            index,
            reason,
        }
    }
}

/// Reusable per-thread state for [`ShardReader::read_into`].
pub struct ReadScratch {
    dctx: zstd::bulk::Decompressor<'static>,
}

impl ReadScratch {
    /// A fresh decompression context.
    pub fn new() -> Self {
        ReadScratch {
            dctx: zstd::bulk::Decompressor::new().expect("zstd context allocation"),
        }
    }
}

impl Default for ReadScratch {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &[u8], c: Compression, w: u32, h: u32, label: Option<u32>) -> StoredRecord {
        StoredRecord::compress(payload, c, 3, w, h, label, 0).unwrap()
    }

    fn write_shard(dir: &Path, payloads: &[Vec<u8>]) -> PathBuf {
        write_shard_with(dir, payloads, Compression::Zstd)
    }

    fn write_shard_with(dir: &Path, payloads: &[Vec<u8>], c: Compression) -> PathBuf {
        let path = dir.join("000000.shard");
        let mut w = ShardWriter::create(&path, Codec::RawRgb8, c).unwrap();
        for (i, p) in payloads.iter().enumerate() {
            let mut r = record(p, c, (p.len() / 3) as u32, 1, Some(i as u32));
            r.meta.source_id = 100 + i as u64;
            assert_eq!(w.append(&r).unwrap(), i as u32);
        }
        w.finish().unwrap();
        path
    }

    fn payloads() -> Vec<Vec<u8>> {
        (0..5u8)
            .map(|i| {
                (0..(3 * (i as usize + 1) * 7))
                    .map(|j| (j as u8).wrapping_mul(i + 1))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn round_trip_every_record() {
        for c in [Compression::Zstd, Compression::None] {
            let dir = tempfile::tempdir().unwrap();
            let ps = payloads();
            let path = write_shard_with(dir.path(), &ps, c);
            assert!(!fsutil::tmp_path(&path).exists());
            let r = ShardReader::open(&path).unwrap();
            assert_eq!(r.len(), ps.len());
            assert_eq!(r.compression(), c);
            let mut scratch = ReadScratch::new();
            let mut out = Vec::new();
            for (i, p) in ps.iter().enumerate() {
                let m = r.read_into(i, &mut scratch, &mut out).unwrap();
                assert_eq!(&out, p);
                assert_eq!(m.label(), Some(i as u32));
                assert_eq!(m.source_id, 100 + i as u64);
                assert_eq!(m.width as usize * 3, p.len());
                assert_eq!(
                    m.stored_len == m.raw_len,
                    c == Compression::None,
                    "record {i}"
                );
            }
        }
    }

    /// Rewrites header bytes `at` and the header checksum.
    fn patch_header(path: &Path, at: usize, value: u32) {
        let mut bytes = fs::read(path).unwrap();
        bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        let sum = xxh3_64(&bytes[0..56]);
        bytes[56..64].copy_from_slice(&sum.to_le_bytes());
        fs::write(path, &bytes).unwrap();
    }

    #[test]
    fn reads_version_1_shards_and_rejects_unknown_compression() {
        let dir = tempfile::tempdir().unwrap();
        let ps = payloads();
        // A version-1 shard is a version-2 shard with compressed records and the
        // version field at 1.
        let path = write_shard(dir.path(), &ps);
        patch_header(&path, 8, 1);
        let r = ShardReader::open(&path).unwrap();
        let mut out = Vec::new();
        r.read_into(3, &mut ReadScratch::new(), &mut out).unwrap();
        assert_eq!(out, ps[3]);
        drop(r);
        patch_header(&path, 40, 7);
        match ShardReader::open(&path) {
            Err(ShardError::Invalid { reason, .. }) => assert!(reason.contains("compression 7")),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn rejects_unknown_version_and_bad_magic() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_shard(dir.path(), &payloads());
        let mut bytes = fs::read(&path).unwrap();
        bytes[8] = 9;
        let sum = xxh3_64(&bytes[0..56]);
        bytes[56..64].copy_from_slice(&sum.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        match ShardReader::open(&path) {
            Err(ShardError::UnsupportedVersion { found: 9, .. }) => {}
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
        bytes[0] = b'X';
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            ShardReader::open(&path),
            Err(ShardError::Invalid { .. })
        ));
    }

    #[test]
    fn truncated_shard_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_shard(dir.path(), &payloads());
        let bytes = fs::read(&path).unwrap();
        for cut in [0, 10, HEADER_LEN, bytes.len() - 1] {
            fs::write(&path, &bytes[..cut]).unwrap();
            assert!(ShardReader::open(&path).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn flipped_data_byte_fails_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_shard(dir.path(), &payloads());
        let r = ShardReader::open(&path).unwrap();
        let victim = r.meta(2).offset as usize + 1;
        drop(r);
        let mut bytes = fs::read(&path).unwrap();
        bytes[victim] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let r = ShardReader::open(&path).unwrap();
        for i in 0..r.len() {
            assert_eq!(r.verify(i).is_err(), i == 2, "record {i}");
        }
    }

    #[test]
    fn dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.shard");
        let mut w = ShardWriter::create(&path, Codec::Encoded, Compression::Zstd).unwrap();
        w.append(&record(b"abc", Compression::Zstd, 1, 1, None))
            .unwrap();
        drop(w);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
