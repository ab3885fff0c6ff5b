//! What a worker does with one image file: read, hash, decode, resize, encode, compress.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::path::Path;

use image::ImageFormat;

use crate::decode::{self, DecodeError, DecodeLimits};
use crate::manifest::IngestSettings;
use crate::reject::{Reject, RejectReason};
use crate::shard::{Codec, StoredRecord};
use crate::source::Candidate;

/// What a worker made of one image file.
pub(crate) enum Outcome {
    /// New content, encoded.
    Stored { hash: String, record: StoredRecord },
    /// The same content as the source at this path already holds.
    Unchanged { hash: String },
    /// Content the dataset already stores (under another path).
    Duplicate { hash: String },
    /// Not ingested.
    Rejected(Reject),
}

/// blake3 of an IDX image file, then (if any) its labels file.
pub(crate) fn hash_files(images: &Path, labels: Option<&Path>) -> io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(File::open(images)?)?;
    if let Some(l) = labels {
        h.update(b"\0labels\0");
        h.update_reader(File::open(l)?)?;
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Reads, hashes, decodes and encodes one image file (runs on a worker thread).
///
/// Content the dataset already has (`previous_hash` at this path, or any of `known`),
/// or that an earlier file of the same run holds (`queued(hash)` is true), costs a read
/// and a hash, never a decode.
pub(crate) fn process_image(
    c: &Candidate,
    label: Option<u32>,
    previous_hash: Option<&str>,
    known: &HashSet<String>,
    queued: &dyn Fn(&str) -> bool,
    settings: &IngestSettings,
    limits: &DecodeLimits,
) -> Outcome {
    let reject = |reason, detail: String| Outcome::Rejected(Reject::new(&c.path, reason, detail));
    if c.stamp.size == 0 {
        return reject(RejectReason::Empty, "zero-byte file".into());
    }
    if c.stamp.size > limits.max_file_bytes {
        return reject(
            RejectReason::TooLarge,
            format!(
                "{} bytes exceeds the file size limit of {}",
                c.stamp.size, limits.max_file_bytes
            ),
        );
    }
    let bytes = match fs::read(&c.path) {
        Ok(b) if b.is_empty() => return reject(RejectReason::Empty, "zero-byte file".into()),
        Ok(b) => b,
        Err(e) => return reject(RejectReason::Unreadable, e.to_string()),
    };
    let hash = blake3::hash(&bytes).to_hex().to_string();
    if previous_hash == Some(hash.as_str()) {
        return Outcome::Unchanged { hash };
    }
    if known.contains(&hash) || queued(&hash) {
        return Outcome::Duplicate { hash };
    }
    match encode_file_bytes(&bytes, settings, limits, label, 0) {
        Ok(record) => Outcome::Stored { hash, record },
        Err(e) => {
            let (reason, detail) = reject_reason(e);
            Outcome::Rejected(Reject::new(&c.path, reason, detail))
        }
    }
}

/// Decodes the bytes of one image file and encodes its record (`item`: its position in
/// its source): what [`process_image`] does after the hash, and what a WebDataset
/// sample's image goes through.
pub(crate) fn encode_file_bytes(
    bytes: &[u8],
    settings: &IngestSettings,
    limits: &DecodeLimits,
    label: Option<u32>,
    item: u32,
) -> Result<StoredRecord, DecodeError> {
    let decoded = decode::decode_for_ingest(bytes, limits, settings.max_side)?;
    // Readers decode stored files with the same function, EXIF orientation included, so
    // the file's own bytes give the same pixels whether or not it is rotated.
    let keep_original = !decoded.scaled
        && matches!(
            decoded.format,
            ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP
        );
    let original = Original {
        bytes: keep_original.then_some(bytes),
        lossy: decoded.format == ImageFormat::Jpeg
            || (decoded.format == ImageFormat::WebP && !decode::webp_is_lossless(bytes)),
    };
    encode_record(
        decoded.image,
        decoded.full_size,
        original,
        settings,
        label,
        item,
    )
}

/// The reject category and message of a decode failure.
pub(crate) fn reject_reason(e: DecodeError) -> (RejectReason, String) {
    match e {
        DecodeError::NotAnImage => (RejectReason::NotAnImage, "unrecognised content".into()),
        DecodeError::TooLarge(m) => (RejectReason::TooLarge, m),
        DecodeError::Corrupt(m) => (RejectReason::Corrupt, m),
        DecodeError::Unsupported(m) => (RejectReason::Unsupported, m),
    }
}

/// What the `encoded` codec may keep of the source file.
#[derive(Clone, Copy, Default)]
pub(crate) struct Original<'a> {
    /// The file's bytes, when a reader can decode them to the same pixels.
    pub bytes: Option<&'a [u8]>,
    /// The source is stored lossily (JPEG, lossy WebP): a re-encode may be lossy too.
    pub lossy: bool,
}

/// Resizes `img` per the settings and turns it into a compressed record payload.
/// `full_size` is the size of the source image (larger than `img` when it was decoded
/// at a reduced scale): the stored size is computed from it.
///
/// With the `encoded` codec, the source file's bytes are stored as they are when no
/// resize is needed; otherwise the image is re-encoded: as JPEG at the configured
/// quality when the source was lossy, as PNG (lossless) when it was not, so a lossless
/// source keeps exact pixels.
pub(crate) fn encode_record(
    img: image::RgbImage,
    full_size: (u32, u32),
    original: Original<'_>,
    settings: &IngestSettings,
    label: Option<u32>,
    item: u32,
) -> Result<StoredRecord, DecodeError> {
    let (fw, fh) = full_size;
    let target = decode::target_size(fw, fh, settings.max_side);
    let resize_needed = target != full_size;
    let img = decode::resize_to(img, target);
    let (w, h) = img.dimensions();
    let compress = |payload: &[u8]| {
        let (c, level) = (settings.compression, settings.zstd_level);
        StoredRecord::compress(payload, c, level, w, h, label, item)
            .map_err(|e| DecodeError::Corrupt(format!("zstd: {e}")))
    };
    match (settings.codec, original.bytes) {
        (Codec::RawRgb8, _) => compress(img.as_raw()),
        (Codec::Encoded, Some(bytes)) if !resize_needed => compress(bytes),
        (Codec::Encoded, _) if original.lossy => {
            compress(&decode::encode_jpeg(&img, settings.jpeg_quality)?)
        }
        (Codec::Encoded, _) => compress(&decode::encode_png(&img)?),
    }
}
