//! Generated test images of every kind ingest must handle.
#![allow(dead_code, missing_docs)]

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat, RgbImage};

/// A deterministic, textured RGB image (gradients plus seeded noise).
pub fn pattern(w: u32, h: u32, seed: u32) -> RgbImage {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    RgbImage::from_fn(w, h, |x, y| {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = (state >> 24) as u8 / 8;
        image::Rgb([
            ((x * 255 / w.max(1)) as u8).wrapping_add(n),
            ((y * 255 / h.max(1)) as u8).wrapping_add(seed as u8),
            (((x + y) * 7) as u8) ^ n,
        ])
    })
}

pub fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

pub fn jpeg(w: u32, h: u32, seed: u32) -> Vec<u8> {
    encode(
        &DynamicImage::ImageRgb8(pattern(w, h, seed)),
        ImageFormat::Jpeg,
    )
}

pub fn png(w: u32, h: u32, seed: u32) -> Vec<u8> {
    encode(
        &DynamicImage::ImageRgb8(pattern(w, h, seed)),
        ImageFormat::Png,
    )
}

/// CMYK JPEG (as print workflows produce).
pub fn cmyk_jpeg(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let rgb = pattern(w, h, seed);
    let cmyk: Vec<u8> = rgb
        .pixels()
        .flat_map(|p| {
            let [r, g, b] = p.0;
            let k = 255 - r.max(g).max(b);
            [
                255 - r - k.min(255 - r),
                255 - g - k.min(255 - g),
                255 - b - k.min(255 - b),
                k,
            ]
        })
        .collect();
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 90)
        .encode(&cmyk, w as u16, h as u16, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    out
}

/// 8-bit palette PNG.
pub fn palette_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![255, 0, 0, 0, 255, 0, 0, 0, 255, 250, 250, 250]);
        let mut wr = enc.write_header().unwrap();
        let data: Vec<u8> = (0..w * h).map(|i| ((i / 3 + i / w) % 4) as u8).collect();
        wr.write_image_data(&data).unwrap();
    }
    out
}

/// Every colour layout ingest must convert to RGB8, as (file name, bytes).
pub fn every_kind(seed: u32) -> Vec<(String, Vec<u8>)> {
    let rgb = pattern(40, 30, seed);
    let dynimg = DynamicImage::ImageRgb8(rgb.clone());
    vec![
        (
            format!("rgb_{seed}.jpg"),
            encode(&dynimg, ImageFormat::Jpeg),
        ),
        (format!("rgb_{seed}.png"), encode(&dynimg, ImageFormat::Png)),
        (
            format!("gray_{seed}.png"),
            encode(
                &DynamicImage::ImageLuma8(dynimg.to_luma8()),
                ImageFormat::Png,
            ),
        ),
        (
            format!("gray_{seed}.jpg"),
            encode(
                &DynamicImage::ImageLuma8(dynimg.to_luma8()),
                ImageFormat::Jpeg,
            ),
        ),
        (
            format!("rgba_{seed}.png"),
            encode(
                &DynamicImage::ImageRgba8(dynimg.to_rgba8()),
                ImageFormat::Png,
            ),
        ),
        (
            format!("rgb16_{seed}.png"),
            encode(
                &DynamicImage::ImageRgb16(dynimg.to_rgb16()),
                ImageFormat::Png,
            ),
        ),
        (format!("palette_{seed}.png"), palette_png(33, 17)),
        (format!("cmyk_{seed}.jpg"), cmyk_jpeg(24, 20, seed)),
        (
            format!("lossless_{seed}.webp"),
            encode(
                &DynamicImage::ImageRgba8(dynimg.to_rgba8()),
                ImageFormat::WebP,
            ),
        ),
        (
            format!("anim_{seed}.gif"),
            encode(
                &DynamicImage::ImageRgba8(dynimg.to_rgba8()),
                ImageFormat::Gif,
            ),
        ),
        (format!("rgb_{seed}.bmp"), encode(&dynimg, ImageFormat::Bmp)),
        (
            format!("rgb_{seed}.tiff"),
            encode(&dynimg, ImageFormat::Tiff),
        ),
        // Wrong extension on purpose: decoding goes by content.
        (
            format!("really_a_png_{seed}.jpg"),
            encode(&dynimg.fliph(), ImageFormat::Png),
        ),
        (format!("big_{seed}.jpg"), jpeg(300, 200, seed)),
    ]
}

/// A JPEG with an EXIF APP1 segment carrying `orientation` (1..=8).
pub fn jpeg_with_orientation(w: u32, h: u32, seed: u32, orientation: u16) -> Vec<u8> {
    let jpeg = jpeg(w, h, seed);
    let tiff = exif_orientation(orientation);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A valid PNG whose header claims `w` x `h` (a decompression bomb's header).
pub fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut b = png(8, 8, 1);
    // IHDR data starts at byte 16 (8 signature + 4 length + 4 type).
    b[16..20].copy_from_slice(&w.to_be_bytes());
    b[20..24].copy_from_slice(&h.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&b[12..29]);
    b[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    b
}

/// A baseline JPEG whose SOF0 claims `w` x `h`.
pub fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut b = jpeg(16, 16, 2);
    let sof = b
        .windows(2)
        .position(|x| x == [0xFF, 0xC0])
        .expect("baseline JPEG");
    b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    b
}

/// An IDX file (optionally gzip-compressed).
pub fn idx(dims: &[u32], data: &[u8], gz: bool) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend_from_slice(data);
    if !gz {
        return b;
    }
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(&b).unwrap();
    e.finish().unwrap()
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Reference decode of a source file: the image crate by content, EXIF orientation,
/// RGB8, then the ingest resize.
pub fn reference(path: &Path, max_side: Option<u32>) -> RgbImage {
    use image::ImageDecoder;
    let reader = image::ImageReader::open(path)
        .unwrap()
        .with_guessed_format()
        .unwrap();
    let mut dec = reader.into_decoder().unwrap();
    let o = dec.orientation().unwrap();
    let mut img = DynamicImage::from_decoder(dec).unwrap();
    img.apply_orientation(o);
    byol_ingest::decode::resize_short_side(img.to_rgb8(), max_side)
}

/// A little-endian TIFF (EXIF) block holding one Orientation tag.
fn exif_orientation(orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II*\0");
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one IFD entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    tiff
}

/// A lossless (VP8L) WebP in an extended container with an EXIF chunk carrying
/// `orientation`.
pub fn lossless_webp_with_orientation(w: u32, h: u32, seed: u32, orientation: u16) -> Vec<u8> {
    let mut simple = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut simple)
        .encode(
            pattern(w, h, seed).as_raw(),
            w,
            h,
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    assert_eq!(&simple[12..16], b"VP8L");
    let chunk = |fourcc: &[u8], data: &[u8]| {
        let mut c = fourcc.to_vec();
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(data);
        if data.len() % 2 == 1 {
            c.push(0);
        }
        c
    };
    let mut vp8x = vec![0x08, 0, 0, 0]; // flags: EXIF present
    vp8x.extend_from_slice(&(w - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(h - 1).to_le_bytes()[..3]);
    let mut body = b"WEBP".to_vec();
    body.extend(chunk(b"VP8X", &vp8x));
    body.extend_from_slice(&simple[12..]); // the VP8L chunk as encoded
    body.extend(chunk(b"EXIF", &exif_orientation(orientation)));
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend(body);
    out
}

/// A valid one-strip grayscale TIFF with `bits` per sample of `sample_format`
/// (1 unsigned, 2 signed integer, 3 IEEE float), all zero.
pub fn gray_tiff(w: u32, h: u32, bits: u16, sample_format: u16) -> Vec<u8> {
    let data_len = w * h * u32::from(bits / 8);
    let entries: [(u16, u16, u32); 9] = [
        (256, 4, w),                        // ImageWidth
        (257, 4, h),                        // ImageLength
        (258, 3, u32::from(bits)),          // BitsPerSample
        (259, 3, 1),                        // Compression: none
        (262, 3, 1),                        // Photometric: black is zero
        (273, 4, 8),                        // StripOffsets: right after the header
        (277, 3, 1),                        // SamplesPerPixel
        (279, 4, data_len),                 // StripByteCounts
        (339, 3, u32::from(sample_format)), // SampleFormat
    ];
    let ifd = 8 + data_len;
    let mut b = b"II*\0".to_vec();
    b.extend_from_slice(&ifd.to_le_bytes());
    b.resize(8 + data_len as usize, 0);
    b.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, kind, value) in entries {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&kind.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        if kind == 3 {
            b.extend_from_slice(&(value as u16).to_le_bytes());
            b.extend_from_slice(&[0, 0]);
        } else {
            b.extend_from_slice(&value.to_le_bytes());
        }
    }
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

/// Reject reasons by file name.
pub fn reasons_by_name(
    rejects: &[byol_ingest::Reject],
) -> std::collections::BTreeMap<String, byol_ingest::RejectReason> {
    rejects
        .iter()
        .map(|r| {
            (
                r.path.file_name().unwrap().to_string_lossy().into_owned(),
                r.reason,
            )
        })
        .collect()
}
