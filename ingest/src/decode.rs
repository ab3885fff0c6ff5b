//! Decoding any supported image file to RGB8, safely, and the ingest resize.

use std::io::Cursor;

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{
    DynamicImage, ImageDecoder, ImageEncoder, ImageFormat, ImageReader, RgbImage,
    metadata::Orientation,
};

/// Limits that protect a run from decompression bombs and absurd files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted `width * height`.
    pub max_pixels: u64,
    /// Largest accepted width or height.
    pub max_dimension: u32,
    /// Largest memory a decoder may allocate, in bytes.
    pub max_alloc: u64,
    /// Largest accepted source file, in bytes.
    pub max_file_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 128 * 1024 * 1024,
            max_dimension: 65_535,
            max_alloc: 1 << 30,
            max_file_bytes: 1 << 30,
        }
    }
}

/// Why an image could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The content is not a format we decode.
    #[error("not an image (unrecognised content)")]
    NotAnImage,
    /// Dimensions or memory exceed the limits.
    #[error("too large: {0}")]
    TooLarge(String),
    /// Truncated or corrupt data.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// A valid file of a format, or a variant of one, that we do not decode (HEIC,
    /// JPEG XL, float or signed-integer TIFF, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// A decoded image and how it was stored in its file.
pub struct Decoded {
    /// The pixels, EXIF orientation applied, converted to RGB8 (reduced in the IDCT
    /// when [`Decoded::scaled`]).
    pub image: RgbImage,
    /// The container format found by content.
    pub format: ImageFormat,
    /// True when the file's pixels needed an orientation transform.
    pub reoriented: bool,
    /// Width and height of the full image, orientation applied (the image's own size
    /// unless it was decoded at a reduced scale).
    pub full_size: (u32, u32),
    /// True when a JPEG was decoded at 1/2, 1/4 or 1/8 of its size.
    pub scaled: bool,
}

/// Decodes `bytes` by content (never by file name) into RGB8, applying EXIF orientation.
///
/// Grayscale, RGBA, 16-bit, palette and CMYK inputs are converted to RGB8 (alpha is
/// dropped). Dimensions are checked against `limits` before any pixel is decoded.
pub fn decode_rgb8(bytes: &[u8], limits: &DecodeLimits) -> Result<Decoded, DecodeError> {
    let repaired = gray_jpeg_without_adobe(bytes);
    let bytes = repaired.as_deref().unwrap_or(bytes);
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let Some(format) = reader.format() else {
        return Err(match unsupported_format(bytes) {
            Some(name) => DecodeError::Unsupported(format!("{name} is not a format we decode")),
            None => DecodeError::NotAnImage,
        });
    };
    if format == ImageFormat::Jpeg {
        check_jpeg_end(bytes)?;
    }
    let mut reader = reader;
    let mut lim = image::Limits::default();
    lim.max_image_width = Some(limits.max_dimension);
    lim.max_image_height = Some(limits.max_dimension);
    lim.max_alloc = Some(limits.max_alloc);
    reader.limits(lim);
    let mut decoder = reader.into_decoder().map_err(classify)?;
    let (w, h) = decoder.dimensions();
    check_dimensions(w, h, limits)?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(classify)?;
    img.apply_orientation(orientation);
    let image = img.into_rgb8();
    Ok(Decoded {
        full_size: image.dimensions(),
        image,
        format,
        reoriented: orientation != Orientation::NoTransforms,
        scaled: false,
    })
}

/// Decodes `bytes` for an ingest that resizes to a short side of `max_side`: like
/// [`decode_rgb8`], except that a JPEG whose short side is at least twice `max_side` is
/// decoded at the largest IDCT reduction (1/2, 1/4, 1/8) that keeps its short side at
/// least `max_side` (libjpeg's scaled IDCT, as Pillow's `draft`), so the final Lanczos
/// resize still does the antialiasing. Orientation, grayscale, progressive and
/// restart-marker files take this path too; CMYK/YCCK, 12-bit and anything the scaled
/// decoder refuses fall back to the full decode. The truncation and size checks run
/// before any pixel is decoded.
pub fn decode_for_ingest(
    bytes: &[u8],
    limits: &DecodeLimits,
    max_side: Option<u32>,
) -> Result<Decoded, DecodeError> {
    let repaired = gray_jpeg_without_adobe(bytes);
    let bytes = repaired.as_deref().unwrap_or(bytes);
    if let Some(side) = max_side
        && side > 0
        && bytes.starts_with(&[0xFF, 0xD8, 0xFF])
        && let Some(d) = decode_jpeg_scaled(bytes, limits, side)?
    {
        return Ok(d);
    }
    decode_rgb8(bytes, limits)
}

/// The scaled path of [`decode_for_ingest`]; `None` when the full decode should run
/// (no reduction possible, or a format variant this decoder does not take).
fn decode_jpeg_scaled(
    bytes: &[u8],
    limits: &DecodeLimits,
    side: u32,
) -> Result<Option<Decoded>, DecodeError> {
    check_jpeg_end(bytes)?;
    let mut decoder = jpeg_decoder::Decoder::new(bytes);
    if decoder.read_info().is_err() {
        return Ok(None); // the general decoder reports what is wrong
    }
    let Some(info) = decoder.info() else {
        return Ok(None);
    };
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    if w.max(h) > limits.max_dimension {
        return Err(DecodeError::TooLarge(format!(
            "{w}x{h} exceeds the limit of {} pixels a side",
            limits.max_dimension
        )));
    }
    check_dimensions(w, h, limits)?;
    let short = w.min(h);
    if short < 2 * side
        || !matches!(
            info.pixel_format,
            jpeg_decoder::PixelFormat::RGB24 | jpeg_decoder::PixelFormat::L8
        )
    {
        return Ok(None);
    }
    // The decoder picks the smallest reduction that reaches the request on either axis:
    // ask on the short axis only.
    let request = |len: u32| u16::try_from(len).unwrap_or(u16::MAX);
    let (sw, sh) = if w <= h {
        decoder.scale(request(side), u16::MAX)
    } else {
        decoder.scale(u16::MAX, request(side))
    }
    .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
    let (sw, sh) = (u32::from(sw), u32::from(sh));
    if sw.min(sh) < side || (sw, sh) == (w, h) {
        return Ok(None);
    }
    // At 1/8 each 8x8 block becomes one pixel: its DC coefficient alone. A progressive
    // file stores every DC coefficient in its first scans, so the AC scans (most of the
    // file) need not be decoded at all; the pixels are the same.
    let dc_only = ((w.div_ceil(8), h.div_ceil(8)) == (sw, sh))
        .then(|| progressive_dc_scans(bytes))
        .flatten();
    let decoded = match &dc_only {
        Some(pruned) => {
            let mut d = jpeg_decoder::Decoder::new(pruned.as_slice());
            d.read_info()
                .and_then(|_| d.scale(sw as u16, sh as u16))
                .and_then(|_| d.decode())
                .map(|p| (p, d.exif_data().map(<[u8]>::to_vec)))
        }
        None => decoder
            .decode()
            .map(|p| (p, decoder.exif_data().map(<[u8]>::to_vec))),
    };
    let (pixels, exif) = match decoded {
        Ok(p) => p,
        Err(_) => return Ok(None), // the general decoder reports what is wrong
    };
    let orientation = exif
        .as_deref()
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms);
    let img = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => {
            RgbImage::from_raw(sw, sh, pixels).map(DynamicImage::ImageRgb8)
        }
        _ => image::GrayImage::from_raw(sw, sh, pixels).map(DynamicImage::ImageLuma8),
    };
    let Some(mut img) = img else {
        return Ok(None);
    };
    img.apply_orientation(orientation);
    let swaps = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    Ok(Some(Decoded {
        image: img.into_rgb8(),
        format: ImageFormat::Jpeg,
        reoriented: orientation != Orientation::NoTransforms,
        full_size: if swaps { (h, w) } else { (w, h) },
        scaled: true,
    }))
}

/// Decodes `bytes` like [`decode_rgb8`], into `out` (resized to `width * height * 3`),
/// and returns `(width, height)`. Colour JPEGs without an orientation transform (most
/// photos) are decoded straight into `out`: one header parse, no intermediate image, and
/// no allocation once `out` has grown. Everything else takes [`decode_rgb8`].
pub fn decode_rgb8_into(
    bytes: &[u8],
    limits: &DecodeLimits,
    out: &mut Vec<u8>,
) -> Result<(u32, u32), DecodeError> {
    let repaired = gray_jpeg_without_adobe(bytes);
    let bytes = repaired.as_deref().unwrap_or(bytes);
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF])
        && let Some(dims) = decode_jpeg_into(bytes, limits, out)?
    {
        return Ok(dims);
    }
    let img = decode_rgb8(bytes, limits)?.image;
    out.clear();
    out.extend_from_slice(img.as_raw());
    Ok(img.dimensions())
}

/// The direct JPEG path of [`decode_rgb8_into`]; `None` when the file needs the general
/// path (gray or CMYK data, or an EXIF orientation to apply).
fn decode_jpeg_into(
    bytes: &[u8],
    limits: &DecodeLimits,
    out: &mut Vec<u8>,
) -> Result<Option<(u32, u32)>, DecodeError> {
    use zune_core::colorspace::ColorSpace;
    check_jpeg_end(bytes)?;
    let side = limits.max_dimension as usize;
    let options = zune_core::options::DecoderOptions::default()
        .set_strict_mode(false)
        .set_max_width(side)
        .set_max_height(side)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let corrupt = |e: zune_jpeg::errors::DecodeErrors| DecodeError::Corrupt(e.to_string());
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
        zune_core::bytestream::ZCursor::new(bytes),
        options,
    );
    decoder.decode_headers().map_err(corrupt)?;
    let (Some(info), Some(space)) = (decoder.info(), decoder.input_colorspace()) else {
        return Ok(None);
    };
    if !matches!(space, ColorSpace::YCbCr | ColorSpace::RGB) {
        return Ok(None);
    }
    let orientation = decoder
        .exif()
        .and_then(|exif| Orientation::from_exif_chunk(exif))
        .unwrap_or(Orientation::NoTransforms);
    if orientation != Orientation::NoTransforms {
        return Ok(None);
    }
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    check_dimensions(w, h, limits)?;
    out.resize(w as usize * h as usize * 3, 0);
    decoder.decode_into(out).map_err(corrupt)?;
    Ok(Some((w, h)))
}

/// For a one-component (gray) JPEG that carries an Adobe APP14 segment, the same file
/// without that segment; `None` for anything else (the usual case: nothing is copied).
///
/// The segment's colour transform applies to three- and four-component frames only;
/// libjpeg decides the colour space after reading every marker up to SOS and takes one
/// component as gray whatever APP14 says. Our decoders read APP14 as it comes and refuse
/// a gray frame after it (the standard lets APP14 follow the SOF), so the segment goes.
fn gray_jpeg_without_adobe(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let (mut at, mut adobe, mut components) = (2, None, None);
    // Marker segments up to the first scan.
    while let [0xFF, marker, hi, lo, ..] = *bytes.get(at..)? {
        if marker == 0xFF {
            at += 1; // a fill byte
            continue;
        }
        let end = at + 2 + usize::from(u16::from_be_bytes([hi, lo]));
        let segment = bytes.get(at..end)?;
        match marker {
            0xDA | 0xD9 => break,
            0xEE if segment.get(4..9) == Some(b"Adobe") => adobe = Some(at..end),
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                components = segment.get(9).copied();
            }
            _ => {}
        }
        at = end;
    }
    let adobe = adobe.filter(|_| components == Some(1))?;
    Some([&bytes[..adobe.start], &bytes[adobe.end..]].concat())
}

/// For a progressive JPEG, the same file without its AC scans (spectral selection
/// starting above 0): every marker segment is kept, and of the scans only those that
/// carry DC coefficients (`Ss = 0`), with their entropy-coded data. `None` for a
/// sequential file, or one whose markers do not parse.
///
/// Decoded at 1/8 scale (one pixel per block, from its DC coefficient alone) it gives
/// the same pixels as the whole file, for a fraction of the entropy decoding.
fn progressive_dc_scans(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(bytes.len() / 4);
    out.extend_from_slice(bytes.get(..2)?); // SOI
    let mut at = 2;
    let mut progressive = false;
    loop {
        // Fill bytes may precede a marker.
        while bytes.get(at) == Some(&0xFF) && bytes.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        if *bytes.get(at)? != 0xFF {
            return None;
        }
        let marker = *bytes.get(at + 1)?;
        if marker == 0xD9 {
            out.extend_from_slice(&bytes[at..at + 2]);
            return progressive.then_some(out);
        }
        let len = usize::from(u16::from_be_bytes([
            *bytes.get(at + 2)?,
            *bytes.get(at + 3)?,
        ]));
        let end = at + 2 + len;
        let segment = bytes.get(at..end)?;
        match marker {
            0xC2 => progressive = true,
            0xC0 | 0xC1 | 0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => return None,
            _ => {}
        }
        if marker != 0xDA {
            out.extend_from_slice(segment);
            at = end;
            continue;
        }
        // SOS: header, then entropy-coded data up to the next marker that is neither a
        // stuffed 0xFF00 nor a restart marker.
        let components = usize::from(*segment.get(4)?);
        let spectral_start = *segment.get(5 + 2 * components)?;
        let mut data_end = end;
        while data_end + 1 < bytes.len() {
            if bytes[data_end] == 0xFF {
                let next = bytes[data_end + 1];
                if next != 0x00 && !(0xD0..=0xD7).contains(&next) {
                    break;
                }
            }
            data_end += 1;
        }
        if spectral_start == 0 {
            out.extend_from_slice(&bytes[at..data_end]);
        }
        at = data_end;
    }
}

/// A decodable size: no zero side, at most `limits.max_pixels` pixels.
fn check_dimensions(w: u32, h: u32, limits: &DecodeLimits) -> Result<(), DecodeError> {
    if w == 0 || h == 0 {
        return Err(DecodeError::Corrupt(format!("{w}x{h} image has no pixels")));
    }
    if u64::from(w) * u64::from(h) > limits.max_pixels {
        return Err(DecodeError::TooLarge(format!(
            "{w}x{h} exceeds the limit of {} pixels",
            limits.max_pixels
        )));
    }
    Ok(())
}

/// Refuses a truncated JPEG: decoders fill a truncated scan with gray and succeed.
fn check_jpeg_end(bytes: &[u8]) -> Result<(), DecodeError> {
    if jpeg_has_end(bytes) {
        Ok(())
    } else {
        Err(DecodeError::Corrupt(
            "truncated JPEG (no end-of-image marker after the last scan)".into(),
        ))
    }
}

/// True when an end-of-image marker follows the last start-of-scan marker.
///
/// Searches from the end: only the bytes after the last EOI are scanned for an SOS.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let is_marker = |w: &[u8], m: u8| w[0] == 0xFF && w[1] == m;
    match bytes.windows(2).rposition(|w| is_marker(w, 0xD9)) {
        Some(eoi) => !bytes[eoi..].windows(2).any(|w| is_marker(w, 0xDA)),
        // No EOI at all: truncated, unless there is no scan either (the decoder reports that).
        None => !bytes.windows(2).any(|w| is_marker(w, 0xDA)),
    }
}

fn classify(e: image::ImageError) -> DecodeError {
    use image::ImageError as E;
    match e {
        E::Limits(l) => DecodeError::TooLarge(l.to_string()),
        E::Unsupported(u) => DecodeError::Unsupported(u.to_string()),
        other => DecodeError::Corrupt(other.to_string()),
    }
}

/// Names the image format of `bytes` when it is one we recognise but do not decode
/// (the image crate's guess does not know these containers).
fn unsupported_format(bytes: &[u8]) -> Option<&'static str> {
    // ISO base media (HEIF/HEIC, AVIF): a `ftyp` box with an image brand.
    if bytes.len() >= 12 && &bytes[4..8] == b"ftyp" {
        return match &bytes[8..12] {
            b"heic" | b"heix" | b"heim" | b"heis" | b"hevc" | b"hevx" | b"mif1" | b"msf1" => {
                Some("HEIF/HEIC")
            }
            b"avif" | b"avis" => Some("AVIF"),
            _ => None,
        };
    }
    if bytes.starts_with(&[0xFF, 0x0A]) || bytes.starts_with(b"\0\0\0\x0cJXL \r\n\x87\n") {
        return Some("JPEG XL");
    }
    if bytes.starts_with(b"\0\0\0\x0cjP  \r\n\x87\n")
        || bytes.starts_with(&[0xFF, 0x4F, 0xFF, 0x51])
    {
        return Some("JPEG 2000");
    }
    None
}

/// True for a WebP file whose image is stored losslessly (`VP8L`), false for lossy
/// (`VP8 `) data or anything that is not WebP. An extended (`VP8X`) file is lossless
/// when its first image chunk is `VP8L`.
pub fn webp_is_lossless(bytes: &[u8]) -> bool {
    if bytes.len() < 16 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WEBP" {
        return false;
    }
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let fourcc = &bytes[at..at + 4];
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        match fourcc {
            b"VP8L" => return true,
            b"VP8 " => return false,
            _ => at = at.saturating_add(8).saturating_add(len + (len & 1)),
        }
    }
    false
}

/// Output size when the short side is limited to `max_side` (aspect ratio kept).
///
/// Returns the input size when it is already small enough or `max_side` is `None`.
pub fn target_size(width: u32, height: u32, max_side: Option<u32>) -> (u32, u32) {
    let Some(max_side) = max_side else {
        return (width, height);
    };
    let short = width.min(height);
    if short <= max_side || max_side == 0 {
        return (width, height);
    }
    let scale = f64::from(max_side) / f64::from(short);
    let scaled = |v: u32| ((f64::from(v) * scale).round() as u32).max(1);
    if width <= height {
        (max_side, scaled(height))
    } else {
        (scaled(width), max_side)
    }
}

/// Shrink factor above which [`resize_short_side`] first reduces with a box filter.
const REDUCING_GAP: f64 = 3.0;

/// Resizes so the short side is at most `max_side`, with a Lanczos3 (antialiased)
/// filter. Images already small enough are returned unchanged.
///
/// Large shrinks (more than [`REDUCING_GAP`]x, e.g. 4K photos to 256 px) first average
/// down with a box filter to `REDUCING_GAP` times the target size, then apply Lanczos3
/// (Pillow's `reducing_gap`): the result is visually the same and several times cheaper,
/// since Lanczos3's support grows with the shrink factor.
pub fn resize_short_side(img: RgbImage, max_side: Option<u32>) -> RgbImage {
    let (w, h) = img.dimensions();
    resize_to(img, target_size(w, h, max_side))
}

/// Resizes `img` to exactly `(nw, nh)` as [`resize_short_side`] does (Lanczos3, with a
/// box pre-reduction for large shrinks); unchanged when it already has that size.
pub fn resize_to(img: RgbImage, (nw, nh): (u32, u32)) -> RgbImage {
    let (w, h) = img.dimensions();
    if (nw, nh) == (w, h) {
        return img;
    }
    let mut resizer = Resizer::new();
    let mut src = FirImage::from_vec_u8(w, h, img.into_raw(), PixelType::U8x3)
        .expect("RgbImage buffer has width*height*3 bytes");
    let factor = f64::from(w) / f64::from(nw);
    if factor > REDUCING_GAP {
        let (rw, rh) = (
            ((f64::from(nw) * REDUCING_GAP).round() as u32).max(1),
            ((f64::from(nh) * REDUCING_GAP).round() as u32).max(1),
        );
        let mut reduced = FirImage::new(rw, rh, PixelType::U8x3);
        resizer
            .resize(
                &src,
                &mut reduced,
                &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Box)),
            )
            .expect("same pixel type on both sides");
        src = reduced;
    }
    let mut dst = FirImage::new(nw, nh, PixelType::U8x3);
    resizer
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
        )
        .expect("same pixel type on both sides");
    RgbImage::from_raw(nw, nh, dst.into_vec()).expect("resizer output has nw*nh*3 bytes")
}

/// Encodes `img` as a JPEG at `quality` (the `encoded` codec's fallback when the
/// original bytes cannot be kept).
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .map_err(|e| DecodeError::Corrupt(format!("jpeg encode: {e}")))?;
    Ok(out)
}

/// Encodes `img` as a PNG (the `encoded` codec's lossless fallback).
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| DecodeError::Corrupt(format!("png encode: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_size_limits_the_short_side() {
        assert_eq!(target_size(4000, 3000, Some(256)), (341, 256));
        assert_eq!(target_size(3000, 4000, Some(256)), (256, 341));
        assert_eq!(target_size(200, 100, Some(256)), (200, 100));
        assert_eq!(target_size(4000, 3000, None), (4000, 3000));
        assert_eq!(target_size(10_000, 1, Some(256)), (10_000, 1));
    }

    #[test]
    fn resize_keeps_aspect_and_a_constant_image() {
        let img = RgbImage::from_pixel(600, 300, image::Rgb([10, 200, 30]));
        let out = resize_short_side(img, Some(100));
        assert_eq!(out.dimensions(), (200, 100));
        assert!(out.pixels().all(|p| p.0 == [10, 200, 30]));
    }

    #[test]
    fn reducing_first_stays_close_to_a_direct_lanczos_shrink() {
        // A smooth gradient with texture, shrunk 10x both ways.
        let img = RgbImage::from_fn(1000, 800, |x, y| {
            image::Rgb([
                (x / 4) as u8,
                (y / 4) as u8,
                ((x * y / 97) % 256) as u8 / 4 + 100,
            ])
        });
        let two_stage = resize_short_side(img.clone(), Some(80));
        let src = FirImage::from_vec_u8(1000, 800, img.into_raw(), PixelType::U8x3).unwrap();
        let mut direct = FirImage::new(100, 80, PixelType::U8x3);
        Resizer::new()
            .resize(
                &src,
                &mut direct,
                &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
            )
            .unwrap();
        assert_eq!(two_stage.dimensions(), (100, 80));
        let diff: f64 = two_stage
            .as_raw()
            .iter()
            .zip(direct.buffer())
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs())
            .sum::<f64>()
            / two_stage.as_raw().len() as f64;
        assert!(diff < 1.5, "mean absolute difference {diff}");
    }

    #[test]
    fn garbage_is_not_an_image() {
        let limits = DecodeLimits::default();
        assert_eq!(
            decode_rgb8(b"hello, this is text", &limits).err(),
            Some(DecodeError::NotAnImage)
        );
        assert_eq!(
            decode_rgb8(b"", &limits).err(),
            Some(DecodeError::NotAnImage)
        );
    }

    #[test]
    fn decoding_into_a_buffer_equals_the_general_path() {
        let limits = DecodeLimits::default();
        let img = RgbImage::from_fn(37, 23, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x + y) * 5) as u8])
        });
        let gray = image::GrayImage::from_fn(19, 13, |x, y| image::Luma([(x * y) as u8]));
        let mut gray_jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut gray_jpeg, 90)
            .encode_image(&gray)
            .unwrap();
        // A colour JPEG (the direct path), a gray JPEG and a PNG (the general path).
        let files = [
            encode_jpeg(&img, 90).unwrap(),
            gray_jpeg,
            encode_png(&img).unwrap(),
        ];
        let mut out = vec![1u8; 5]; // stale content must not leak through
        for bytes in &files {
            let want = decode_rgb8(bytes, &limits).unwrap().image;
            let dims = decode_rgb8_into(bytes, &limits, &mut out).unwrap();
            assert_eq!(dims, want.dimensions());
            assert_eq!(out, want.as_raw().as_slice());
        }
        let jpeg = &files[0];
        let cut = &jpeg[..jpeg.len() / 2];
        assert!(matches!(
            decode_rgb8_into(cut, &limits, &mut out),
            Err(DecodeError::Corrupt(_))
        ));
        let small = DecodeLimits {
            max_pixels: 100,
            ..limits
        };
        assert!(matches!(
            decode_rgb8_into(jpeg, &small, &mut out),
            Err(DecodeError::TooLarge(_))
        ));
    }
}

#[cfg(test)]
mod scaled_tests {
    use super::*;

    /// A smooth photo-like image: gradients, soft shapes, mild texture.
    fn photo(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
            let blob = (-((fx - 0.4).powi(2) + (fy - 0.5).powi(2)) * 12.0).exp();
            let ripple = ((fx * 40.0).sin() * (fy * 30.0).cos() * 12.0) as i32;
            let c = |v: f32| (v.clamp(0.0, 255.0)) as u8;
            image::Rgb([
                c(60.0 + 150.0 * blob + ripple as f32),
                c(40.0 + 180.0 * fy),
                c(200.0 - 120.0 * fx + (ripple / 2) as f32),
            ])
        })
    }

    fn encode(img: &RgbImage, progressive: bool, restart: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let mut e = jpeg_encoder::Encoder::new(&mut out, 90);
        e.set_progressive(progressive);
        if restart > 0 {
            e.set_restart_interval(restart);
        }
        e.encode(
            img.as_raw(),
            img.width() as u16,
            img.height() as u16,
            jpeg_encoder::ColorType::Rgb,
        )
        .unwrap();
        out
    }

    /// Mean and max absolute difference of two same-size images.
    fn diff(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
        assert_eq!(a.dimensions(), b.dimensions());
        let d: Vec<u8> = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y))
            .collect();
        (
            d.iter().map(|&v| f64::from(v)).sum::<f64>() / d.len() as f64,
            *d.iter().max().unwrap(),
        )
    }

    #[test]
    fn large_jpegs_decode_scaled_close_to_the_full_decode() {
        let limits = DecodeLimits::default();
        let img = photo(1200, 900);
        for (progressive, restart) in [(false, 0), (true, 0), (false, 8)] {
            let bytes = encode(&img, progressive, restart);
            let scaled = decode_for_ingest(&bytes, &limits, Some(128)).unwrap();
            // 900 / 128 > 4: decoded at 1/4 (300 x 225), short side still >= 128.
            assert!(scaled.scaled);
            assert_eq!(scaled.image.dimensions(), (300, 225));
            assert_eq!(scaled.full_size, (1200, 900));
            let full = decode_rgb8(&bytes, &limits).unwrap();
            let target = target_size(1200, 900, Some(128));
            let a = resize_to(scaled.image, target);
            let b = resize_to(full.image, target);
            let (mean, max) = diff(&a, &b);
            assert!(
                mean < 1.0 && max < 24,
                "progressive {progressive}, restart {restart}: mean {mean}, max {max}"
            );
        }
        // A progressive file at 1/8: decoded from its DC scans alone, the same pixels.
        let prog = encode(&img, true, 0);
        let pruned = progressive_dc_scans(&prog).expect("progressive");
        assert!(
            pruned.len() * 3 < prog.len(),
            "{} of {}",
            pruned.len(),
            prog.len()
        );
        assert!(
            progressive_dc_scans(&encode(&img, false, 0)).is_none(),
            "sequential"
        );
        let eighth = decode_for_ingest(&prog, &limits, Some(100)).unwrap();
        assert!(eighth.scaled);
        assert_eq!(eighth.image.dimensions(), (150, 113));
        let mut whole = jpeg_decoder::Decoder::new(prog.as_slice());
        whole.read_info().unwrap();
        whole.scale(150, 113).unwrap();
        assert_eq!(eighth.image.as_raw(), &whole.decode().unwrap());
        // Not reducible (short side < 2 x target): the full decode.
        let small = encode(&photo(300, 200), false, 0);
        assert!(
            !decode_for_ingest(&small, &limits, Some(128))
                .unwrap()
                .scaled
        );
        // Truncated: refused before decoding, on the scaled path too.
        let big = encode(&img, false, 0);
        assert!(matches!(
            decode_for_ingest(&big[..big.len() / 2], &limits, Some(128)),
            Err(DecodeError::Corrupt(_))
        ));
        let tight = DecodeLimits {
            max_pixels: 1000,
            ..limits
        };
        assert!(matches!(
            decode_for_ingest(&big, &tight, Some(128)),
            Err(DecodeError::TooLarge(_))
        ));
    }

    /// `jpeg` with an Adobe APP14 segment (`transform` 0: no colour transform) inserted
    /// right after its SOF0 segment, where the standard allows it and libjpeg reads it.
    fn with_adobe_after_sof0(jpeg: &[u8]) -> Vec<u8> {
        let mut at = 2;
        loop {
            assert_eq!(jpeg[at], 0xFF);
            let marker = jpeg[at + 1];
            let len = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
            at += 2 + len;
            if marker == 0xC0 {
                break;
            }
        }
        let mut app14 = vec![0xFF, 0xEE, 0x00, 0x0E];
        app14.extend_from_slice(b"Adobe");
        app14.extend_from_slice(&[0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00]);
        [&jpeg[..at], &app14, &jpeg[at..]].concat()
    }

    /// A valid gray JPEG whose Adobe APP14 marker follows SOF0 is stored (gray to RGB)
    /// on every decode path, with the pixels of the same file without the marker.
    #[test]
    fn a_gray_jpeg_with_adobe_after_sof0_decodes() {
        let limits = DecodeLimits::default();
        let gray = image::GrayImage::from_fn(64, 48, |x, y| image::Luma([(x * 3 + y) as u8]));
        let mut plain = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut plain, 90)
            .encode_image(&gray)
            .unwrap();
        let marked = with_adobe_after_sof0(&plain);
        let want = decode_rgb8(&plain, &limits).unwrap().image;
        let got = decode_rgb8(&marked, &limits).unwrap().image;
        assert_eq!(got, want);
        let mut out = Vec::new();
        decode_rgb8_into(&marked, &limits, &mut out).unwrap();
        assert_eq!(out, want.as_raw().as_slice());
        let scaled = decode_for_ingest(&marked, &limits, Some(16)).unwrap();
        let scaled_plain = decode_for_ingest(&plain, &limits, Some(16)).unwrap();
        assert_eq!(scaled.image, scaled_plain.image);
    }
}
