//! IDX files as shipped with MNIST and Fashion-MNIST (gzip-compressed or not).
//!
//! Layout: two zero bytes, a type byte (`0x08` = unsigned byte), a dimension count,
//! then each dimension as a big-endian u32, then the data in row-major order.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

const TYPE_U8: u8 = 0x08;
/// Largest IDX payload accepted (guards against absurd headers).
const MAX_PAYLOAD: u64 = 8 << 30;

/// Errors reading an IDX file.
#[derive(Debug, thiserror::Error)]
pub enum IdxError {
    /// Reading the file failed (also: gzip stream truncated).
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The content is not a valid IDX file of the expected kind.
    #[error("{path}: not a valid IDX file: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A stack of grayscale images from an IDX3 file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Rows (height) of each image.
    pub rows: u32,
    /// Columns (width) of each image.
    pub cols: u32,
    /// `count * rows * cols` bytes, image after image.
    pub pixels: Vec<u8>,
}

impl IdxImages {
    /// Pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows as usize * self.cols as usize;
        &self.pixels[i * n..(i + 1) * n]
    }
}

fn open_stream(path: &Path) -> io::Result<Box<dyn Read>> {
    let mut file = BufReader::new(File::open(path)?);
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut file, &mut magic)?;
    let head = io::Cursor::new(magic[..n].to_vec()).chain(file);
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(GzDecoder::new(head))
    } else {
        Box::new(head)
    })
}

fn read_up_to<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads the header of `path`; `Ok(None)` if the file is not an unsigned-byte IDX file.
fn read_header(path: &Path, stream: &mut dyn Read) -> Result<Option<Vec<u32>>, IdxError> {
    let io_err = |source| IdxError::Io {
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 4];
    // A gzip stream that is not valid gzip fails here: that is "not IDX", not an error.
    match read_up_to(stream, &mut head) {
        Ok(4) => {}
        Ok(_) => return Ok(None),
        Err(e)
            if e.kind() == io::ErrorKind::InvalidInput
                || e.kind() == io::ErrorKind::InvalidData =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io_err(e)),
    }
    if head[0] != 0 || head[1] != 0 || head[2] != TYPE_U8 || head[3] == 0 || head[3] > 4 {
        return Ok(None);
    }
    let mut dims = Vec::with_capacity(head[3] as usize);
    for _ in 0..head[3] {
        let mut d = [0u8; 4];
        stream.read_exact(&mut d).map_err(io_err)?;
        dims.push(u32::from_be_bytes(d));
    }
    Ok(Some(dims))
}

fn read_payload(path: &Path, stream: &mut dyn Read, dims: &[u32]) -> Result<Vec<u8>, IdxError> {
    let invalid = |reason: String| IdxError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let len = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
        .filter(|&n| n <= MAX_PAYLOAD)
        .ok_or_else(|| invalid(format!("dimensions {dims:?} are too large")))?;
    let mut data = Vec::new();
    stream
        .take(len + 1)
        .read_to_end(&mut data)
        .map_err(|source| IdxError::Io {
            path: path.to_owned(),
            source,
        })?;
    if data.len() as u64 != len {
        return Err(invalid(format!(
            "dimensions {dims:?} need {len} data bytes, found {}{}",
            data.len().min(len as usize),
            if data.len() as u64 > len {
                " and more"
            } else {
                ""
            }
        )));
    }
    Ok(data)
}

/// True if `path` is an IDX file of unsigned-byte images (3 dimensions).
pub fn is_idx_images(path: &Path) -> bool {
    let Ok(mut s) = open_stream(path) else {
        return false;
    };
    matches!(read_header(path, &mut s), Ok(Some(d)) if d.len() == 3)
}

/// Opens `path` and reads its header, which must have `ndims` dimensions.
fn open_checked(
    path: &Path,
    ndims: usize,
    what: &str,
) -> Result<(Box<dyn Read>, Vec<u32>), IdxError> {
    let invalid = |reason: String| IdxError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let mut s = open_stream(path).map_err(|source| IdxError::Io {
        path: path.to_owned(),
        source,
    })?;
    let dims = read_header(path, &mut s)?
        .ok_or_else(|| invalid(format!("bad magic (expected 00 00 08 {ndims:02})")))?;
    if dims.len() != ndims {
        return Err(invalid(format!(
            "{what} files have {ndims} dimensions, found {dims:?}"
        )));
    }
    Ok((s, dims))
}

/// Reads an IDX3 image file.
pub fn read_images(path: &Path) -> Result<IdxImages, IdxError> {
    let (mut s, dims) = open_checked(path, 3, "image")?;
    if dims[1] == 0 || dims[2] == 0 {
        return Err(IdxError::Invalid {
            path: path.to_owned(),
            reason: format!("images of {}x{} pixels", dims[2], dims[1]),
        });
    }
    let pixels = read_payload(path, &mut s, &dims)?;
    Ok(IdxImages {
        count: dims[0] as usize,
        rows: dims[1],
        cols: dims[2],
        pixels,
    })
}

/// Reads an IDX1 label file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>, IdxError> {
    let (mut s, dims) = open_checked(path, 1, "label")?;
    read_payload(path, &mut s, &dims)
}

/// The labels file that belongs to an image file by the MNIST naming convention
/// (`X-images-idx3-ubyte[.gz]` → `X-labels-idx1-ubyte[.gz]`), if it exists.
pub fn labels_path_for(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    let candidate = name
        .replace("images-idx3", "labels-idx1")
        .replace("images.idx3", "labels.idx1");
    if candidate == name {
        return None;
    }
    [
        candidate.clone(),
        candidate.trim_end_matches(".gz").to_owned(),
        format!("{candidate}.gz"),
    ]
    .into_iter()
    .map(|n| images.with_file_name(n))
    .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, TYPE_U8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn parses_plain_and_gzip_images_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 3 * 4).map(|i| i as u8 * 10).collect();
        let img = idx_bytes(&[2, 3, 4], &pixels);
        let lab = idx_bytes(&[2], &[7, 3]);
        std::fs::write(dir.path().join("a-images-idx3-ubyte"), &img).unwrap();
        std::fs::write(dir.path().join("b-images-idx3-ubyte.gz"), gzip(&img)).unwrap();
        std::fs::write(dir.path().join("b-labels-idx1-ubyte.gz"), gzip(&lab)).unwrap();
        for name in ["a-images-idx3-ubyte", "b-images-idx3-ubyte.gz"] {
            let p = dir.path().join(name);
            assert!(is_idx_images(&p));
            let r = read_images(&p).unwrap();
            assert_eq!((r.count, r.rows, r.cols), (2, 3, 4));
            assert_eq!(r.image(1), &pixels[12..24]);
        }
        let lp = labels_path_for(&dir.path().join("b-images-idx3-ubyte.gz")).unwrap();
        assert_eq!(read_labels(&lp).unwrap(), vec![7, 3]);
        assert!(labels_path_for(&dir.path().join("a-images-idx3-ubyte")).is_none());
        assert!(!is_idx_images(&lp), "a label file is not an image file");
    }

    #[test]
    fn truncated_or_foreign_files_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let img = idx_bytes(&[2, 3, 4], &[1; 24]);
        let p = dir.path().join("t-images-idx3-ubyte");
        std::fs::write(&p, &img[..img.len() - 5]).unwrap();
        assert!(matches!(read_images(&p), Err(IdxError::Invalid { .. })));
        std::fs::write(&p, &gzip(&img)[..20]).unwrap();
        assert!(read_images(&p).is_err());
        std::fs::write(&p, b"\x1f\x8bnot gzip at all").unwrap();
        assert!(!is_idx_images(&p));
        std::fs::write(&p, idx_bytes(&[u32::MAX, u32::MAX, u32::MAX], &[])).unwrap();
        assert!(matches!(read_images(&p), Err(IdxError::Invalid { .. })));
    }
}
