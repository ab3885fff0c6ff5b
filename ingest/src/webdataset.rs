//! WebDataset shards: `.tar` (or `.tar.gz`, `.tgz`) files whose members are grouped
//! into samples by key, read as a stream (never unpacked to disk), and the brace
//! patterns (`data-{000000..000099}.tar`) that name them.
//!
//! The conventions are the `webdataset` package's: a member's key is its path up to the
//! first dot of its base name (folder + base name before the first dot), its extension
//! the rest, lower-cased; consecutive members with one key are one sample; base names
//! starting with `__` (`__key__`, `__index__`) are metadata and skipped, as are members
//! that are not regular files and names with no key (no dot, or a base name starting
//! with a dot). A sample's image is its first member of [`IMAGE_EXTENSIONS`] in that
//! order; its label is `cls` (a decimal integer, stored as its decimal text) or the
//! configured field of `json` (a string, or an integer as decimal text), else none.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::reject::RejectReason;

/// Member extensions that are a sample's image, in order of preference.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "webp", "ppm"];

/// The `json` field read as a sample's label when none is configured.
pub const DEFAULT_JSON_LABEL: &str = "label";

/// Most brace-pattern expansions accepted (guards against a typo like `{0..99999999}`).
const MAX_EXPANSION: usize = 1_000_000;

/// True for a file name that is a WebDataset shard: `.tar`, `.tar.gz` or `.tgz`
/// (case-insensitive).
pub fn is_tar_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let lower = name.to_ascii_lowercase();
    [".tar", ".tar.gz", ".tgz"]
        .iter()
        .any(|ext| lower.len() > ext.len() && lower.ends_with(ext))
}

/// Expands the brace patterns of the `webdataset` package (and of the shell):
/// `{a,b,c}` alternatives, `{000..099}` numeric ranges (zero padding kept: the width of
/// a bound written with a leading zero), `{1..9..2}` with a step, `{a..e}` letter
/// ranges; several braces expand as a product, in order; braces nest. A pattern with no
/// brace is itself. `\{` is a literal brace, and so is a `}` that closes nothing.
///
/// Errors: a `{` never closed, or more than a million names.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, String> {
    let out = expand(pattern)?;
    if out.len() > MAX_EXPANSION {
        return Err(format!(
            "{pattern}: expands to {} names (more than {MAX_EXPANSION})",
            out.len()
        ));
    }
    Ok(out)
}

/// True when `s` holds an unescaped `{`.
pub fn has_braces(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).any(|i| b[i] == b'{' && (i == 0 || b[i - 1] != b'\\'))
}

fn expand(pattern: &str) -> Result<Vec<String>, String> {
    let b = pattern.as_bytes();
    // The first top-level brace group.
    let mut open = None;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'{' => {
                open = Some(i);
                break;
            }
            _ => {}
        }
        i += 1;
    }
    let Some(open) = open else {
        return Ok(vec![pattern.replace("\\{", "{").replace("\\}", "}")]);
    };
    let (mut depth, mut close, mut commas) = (0usize, None, Vec::new());
    let mut j = open;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 1,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(j);
                    break;
                }
            }
            b',' if depth == 1 => commas.push(j),
            _ => {}
        }
        j += 1;
    }
    let close = close.ok_or_else(|| format!("{pattern}: unbalanced '{{'"))?;
    let (head, body, tail) = (
        &pattern[..open],
        &pattern[open + 1..close],
        &pattern[close + 1..],
    );
    let alternatives: Vec<String> = if commas.is_empty() {
        match range(body) {
            Some(r) => r?,
            // `{x}`: not a pattern, kept as written (as the shell does).
            None => vec![format!("{{{body}}}")],
        }
    } else {
        let mut parts = Vec::new();
        let mut start = open + 1;
        for &c in commas.iter().chain(std::iter::once(&close)) {
            parts.extend(expand(&pattern[start..c])?);
            start = c + 1;
        }
        parts
    };
    let head = head.replace("\\{", "{").replace("\\}", "}");
    let tails = expand(tail)?;
    let mut out = Vec::with_capacity(alternatives.len() * tails.len());
    for a in &alternatives {
        for t in &tails {
            out.push(format!("{head}{a}{t}"));
            if out.len() > MAX_EXPANSION {
                return Err(format!(
                    "{pattern}: expands to more than {MAX_EXPANSION} names"
                ));
            }
        }
    }
    Ok(out)
}

/// `a..b` or `a..b..step` (numbers or single letters); `None` when `body` is no range.
fn range(body: &str) -> Option<Result<Vec<String>, String>> {
    let parts: Vec<&str> = body.split("..").collect();
    if !(2..=3).contains(&parts.len()) {
        return None;
    }
    let step: i64 = match parts.get(2) {
        Some(s) => s.parse::<i64>().ok()?.checked_abs()?.max(1),
        None => 1,
    };
    let (a, b) = (parts[0], parts[1]);
    if let (Ok(x), Ok(y)) = (a.parse::<i64>(), b.parse::<i64>()) {
        let padded = |s: &str| {
            s.trim_start_matches('-').len() > 1 && s.trim_start_matches('-').starts_with('0')
        };
        let width = if padded(a) || padded(b) {
            a.len().max(b.len())
        } else {
            0
        };
        let count = (x.abs_diff(y) / step as u64) as usize + 1;
        if count > MAX_EXPANSION {
            return Some(Err(format!(
                "{{{body}}}: expands to {count} names (more than {MAX_EXPANSION})"
            )));
        }
        let dir = if y >= x { step } else { -step };
        return Some(Ok((0..count as i64)
            .map(|k| {
                let v = x + k * dir;
                if v < 0 {
                    format!("-{:0w$}", -v, w = width.saturating_sub(1))
                } else {
                    format!("{v:0width$}")
                }
            })
            .collect()));
    }
    let (mut ca, mut cb) = (a.chars(), b.chars());
    match (ca.next(), ca.next(), cb.next(), cb.next()) {
        (Some(x), None, Some(y), None) if x.is_ascii_alphabetic() && y.is_ascii_alphabetic() => {
            let (x, y) = (x as i64, y as i64);
            let dir = if y >= x { step } else { -step };
            let count = (x.abs_diff(y) / step as u64) as i64 + 1;
            Some(Ok((0..count)
                .map(|k| char::from((x + k * dir) as u8).to_string())
                .collect()))
        }
        _ => None,
    }
}

/// The paths a source given on the command line names: itself when it exists (or has no
/// brace), else its brace expansion ([`expand_braces`]), every one of which must exist.
///
/// Errors: a malformed pattern, or names of the pattern that do not exist (listed).
pub fn expand_source(source: &Path) -> Result<Vec<PathBuf>, String> {
    let Some(text) = source.to_str() else {
        return Ok(vec![source.to_owned()]);
    };
    if !has_braces(text) || source.exists() {
        return Ok(vec![source.to_owned()]);
    }
    let names = expand_braces(text)?;
    let missing: Vec<&String> = names.iter().filter(|n| !Path::new(n).exists()).collect();
    if missing.is_empty() {
        return Ok(names.into_iter().map(PathBuf::from).collect());
    }
    const SHOWN: usize = 5;
    let list: Vec<&str> = missing.iter().take(SHOWN).map(|s| s.as_str()).collect();
    let more = if missing.len() > SHOWN {
        format!(" and {} more", missing.len() - SHOWN)
    } else {
        String::new()
    };
    Err(format!(
        "{} of the {} files of the pattern do not exist: {}{more}",
        missing.len(),
        names.len(),
        list.join(", ")
    ))
}

/// One sample of a shard: the members sharing a key, read into memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSample {
    /// Position of the sample in its shard (0, 1, ...), counting every sample.
    pub index: u64,
    /// The key (folder in the tar + base name before the first dot).
    pub key: String,
    /// `(extension, bytes)` in tar order; extensions lower-cased.
    pub members: Vec<(String, Vec<u8>)>,
    /// Why the sample cannot be used even before it is decoded (a member over the size
    /// limit, an extension twice, a key met before).
    pub problem: Option<(RejectReason, String)>,
}

impl RawSample {
    /// The sample's image: its first member of [`IMAGE_EXTENSIONS`], in that order.
    pub fn image(&self) -> Option<(&str, &[u8])> {
        IMAGE_EXTENSIONS.iter().find_map(|ext| {
            self.members
                .iter()
                .find(|(e, _)| e == ext)
                .map(|(e, b)| (e.as_str(), b.as_slice()))
        })
    }

    fn member(&self, ext: &str) -> Option<&[u8]> {
        self.members
            .iter()
            .find(|(e, _)| e == ext)
            .map(|(_, b)| b.as_slice())
    }

    /// The sample's class name: `cls` (a decimal integer, as its decimal text: `"007"`
    /// is class `"7"`), else the field `json_field` of `json` (a string, or an integer as
    /// decimal text; a missing or null field is no label), else `None`.
    ///
    /// Errors: `cls` is not an integer, `json` is not a JSON object, or its field is
    /// neither a string nor an integer, or an empty string.
    pub fn label(&self, json_field: &str) -> Result<Option<String>, String> {
        if let Some(cls) = self.member("cls") {
            let text = std::str::from_utf8(cls)
                .map_err(|_| "cls is not text".to_owned())?
                .trim();
            return text
                .parse::<i64>()
                .map(|v| Some(v.to_string()))
                .map_err(|_| format!("cls {text:?} is not an integer"));
        }
        let Some(json) = self.member("json") else {
            return Ok(None);
        };
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| format!("json: {e}"))?;
        let serde_json::Value::Object(map) = value else {
            return Err("json is not an object".into());
        };
        match map.get(json_field) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) if s.is_empty() => {
                Err(format!("json field {json_field:?} is an empty string"))
            }
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(serde_json::Value::Number(n)) if n.as_i64().is_some() || n.as_u64().is_some() => {
                Ok(Some(n.to_string()))
            }
            Some(other) => Err(format!(
                "json field {json_field:?} is {other}, not a string or an integer"
            )),
        }
    }

    /// Total bytes of the members.
    pub fn bytes(&self) -> usize {
        self.members.iter().map(|(_, b)| b.len()).sum()
    }
}

/// What reading a shard yields: samples, then possibly where it was found damaged.
#[derive(Debug)]
pub enum TarItem {
    /// A complete sample (its members all read, the next key or the end reached).
    Sample(RawSample),
    /// The shard is damaged (truncated, a bad header checksum, a broken gzip stream):
    /// nothing after this point is read. The samples before it were complete.
    Damaged {
        /// What is wrong, and where.
        reason: String,
        /// The key of the sample being read when the damage was met (left out: it may
        /// be incomplete).
        cut: Option<String>,
        /// Samples yielded before the damage.
        samples_before: u64,
    },
}

/// Opens `path` as a tar stream, gunzipped when it starts with the gzip magic.
pub fn open_stream(path: &Path) -> io::Result<Box<dyn Read + Send>> {
    let mut file = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut magic = [0u8; 2];
    let mut n = 0;
    while n < 2 {
        match file.read(&mut magic[n..])? {
            0 => break,
            k => n += k,
        }
    }
    let head = io::Cursor::new(magic[..n].to_vec()).chain(file);
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(MultiGzDecoder::new(head))
    } else {
        Box::new(head)
    })
}

/// Damage met while reading a member: what, and the key of the member (unknown when
/// its header was the damage).
struct Damage {
    reason: String,
    key: Option<String>,
}

/// One member read from the tar.
struct Member {
    key: String,
    ext: String,
    data: Result<Vec<u8>, String>,
}

/// The samples of a tar stream, one at a time (see the module docs); stops at the end
/// or at the first damage ([`TarItem::Damaged`]).
pub struct Samples<'a, R: Read + 'a> {
    entries: tar::Entries<'a, R>,
    pending: Option<Member>,
    /// Damage met past the end of the sample just yielded: yielded next.
    pending_damage: Option<TarItem>,
    done: bool,
    seen: HashSet<String>,
    count: u64,
    max_member_bytes: u64,
}

impl<'a, R: Read + 'a> Samples<'a, R> {
    /// The samples of `archive`; a member larger than `max_member_bytes` is not read
    /// (its sample is rejected as too large).
    ///
    /// Errors: the archive was already read from.
    pub fn new(archive: &'a mut tar::Archive<R>, max_member_bytes: u64) -> io::Result<Self> {
        Ok(Samples {
            entries: archive.entries()?,
            pending: None,
            pending_damage: None,
            done: false,
            seen: HashSet::new(),
            count: 0,
            max_member_bytes,
        })
    }

    /// The next member that belongs to a sample; `Err` on damage.
    fn read_member(&mut self) -> Result<Option<Member>, Damage> {
        let header_damage = |e: io::Error| Damage {
            reason: format!("damaged tar: {e}"),
            key: None,
        };
        for entry in self.entries.by_ref() {
            let mut entry = entry.map_err(header_damage)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = entry
                .path()
                .map_err(header_damage)?
                .to_string_lossy()
                .into_owned();
            let (dir, base) = match path.rfind('/') {
                Some(i) => path.split_at(i + 1),
                None => ("", path.as_str()),
            };
            if base.starts_with("__") {
                continue;
            }
            let Some((stem, ext)) = base.split_once('.') else {
                continue;
            };
            if stem.is_empty() || ext.is_empty() {
                continue;
            }
            let key = format!("{dir}{stem}");
            let size = entry.size();
            let data = if size > self.max_member_bytes {
                Err(format!(
                    "{path}: {size} bytes exceeds the file size limit of {}",
                    self.max_member_bytes
                ))
            } else {
                let mut buf = Vec::with_capacity(size.min(64 << 20) as usize);
                entry
                    .by_ref()
                    .take(size)
                    .read_to_end(&mut buf)
                    .map_err(|e| Damage {
                        reason: format!("damaged tar in {path}: {e}"),
                        key: Some(key.clone()),
                    })?;
                if (buf.len() as u64) < size {
                    return Err(Damage {
                        reason: format!(
                            "truncated tar: {path} ends after {} of its {size} bytes",
                            buf.len()
                        ),
                        key: Some(key),
                    });
                }
                Ok(buf)
            };
            return Ok(Some(Member {
                key,
                ext: ext.to_ascii_lowercase(),
                data,
            }));
        }
        Ok(None)
    }

    fn start(&mut self, m: Member) -> RawSample {
        let mut s = RawSample {
            index: self.count,
            key: m.key,
            members: Vec::new(),
            problem: None,
        };
        self.count += 1;
        if !self.seen.insert(s.key.clone()) {
            s.problem = Some((
                RejectReason::InvalidSample,
                format!("key {:?} met again after other samples", s.key),
            ));
        }
        Self::add(&mut s, m.ext, m.data);
        s
    }

    fn add(s: &mut RawSample, ext: String, data: Result<Vec<u8>, String>) {
        if s.members.iter().any(|(e, _)| *e == ext) && s.problem.is_none() {
            s.problem = Some((
                RejectReason::InvalidSample,
                format!("two members {}.{ext}", s.key),
            ));
        }
        match data {
            Ok(bytes) => s.members.push((ext, bytes)),
            Err(msg) => {
                if s.problem.is_none() {
                    s.problem = Some((RejectReason::TooLarge, msg));
                }
            }
        }
    }
}

impl<'a, R: Read + 'a> Iterator for Samples<'a, R> {
    type Item = TarItem;

    fn next(&mut self) -> Option<TarItem> {
        if let Some(d) = self.pending_damage.take() {
            return Some(d);
        }
        if self.done {
            return None;
        }
        let mut current: Option<RawSample> = None;
        loop {
            let member = match self.pending.take() {
                Some(m) => m,
                None => match self.read_member() {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        self.done = true;
                        return current.map(TarItem::Sample);
                    }
                    Err(Damage { reason, key }) => {
                        self.done = true;
                        // A member of another key than the sample being read: that
                        // sample ended before the damage, and is whole.
                        let whole = current
                            .as_ref()
                            .filter(|c| key.is_some() && key.as_ref() != Some(&c.key))
                            .is_some();
                        if whole {
                            self.pending_damage = Some(TarItem::Damaged {
                                reason,
                                cut: key,
                                samples_before: self.count,
                            });
                            return current.map(TarItem::Sample);
                        }
                        // Otherwise the sample being read (counted) is cut, or, with none,
                        // the member's own sample (not counted yet).
                        let samples_before = self.count - u64::from(current.is_some());
                        let cut = current.map(|c| c.key).or(key);
                        return Some(TarItem::Damaged {
                            reason,
                            cut,
                            samples_before,
                        });
                    }
                },
            };
            match &mut current {
                None => current = Some(self.start(member)),
                Some(c) if c.key == member.key => Self::add(c, member.ext, member.data),
                Some(_) => {
                    self.pending = Some(member);
                    return current.map(TarItem::Sample);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_like_the_webdataset_package() {
        assert_eq!(
            expand_braces("d-{000000..000002}.tar").unwrap(),
            ["d-000000.tar", "d-000001.tar", "d-000002.tar"]
        );
        assert_eq!(expand_braces("{8..11}").unwrap(), ["8", "9", "10", "11"]);
        assert_eq!(expand_braces("{08..11}").unwrap(), ["08", "09", "10", "11"]);
        assert_eq!(expand_braces("{3..1}").unwrap(), ["3", "2", "1"]);
        assert_eq!(expand_braces("{0..6..3}").unwrap(), ["0", "3", "6"]);
        assert_eq!(expand_braces("{a..c}").unwrap(), ["a", "b", "c"]);
        assert_eq!(
            expand_braces("{a,b}-{0..1}.tar").unwrap(),
            ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
        );
        assert_eq!(
            expand_braces("x{a,{1..2}}y").unwrap(),
            ["xay", "x1y", "x2y"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert_eq!(expand_braces("{x}.tar").unwrap(), ["{x}.tar"]);
        assert_eq!(expand_braces("a\\{1,2}").unwrap(), ["a{1,2}"]);
        assert!(expand_braces("d-{0..1.tar").is_err());
        assert_eq!(expand_braces("d-0..1}.tar").unwrap(), ["d-0..1}.tar"]);
        assert!(expand_braces("{0..99999999}").is_err());
    }

    #[test]
    fn a_missing_name_of_a_pattern_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        for i in [0, 2] {
            std::fs::write(dir.path().join(format!("s-{i:02}.tar")), b"x").unwrap();
        }
        let p = dir.path().join("s-{00..02}.tar");
        let e = expand_source(&p).unwrap_err();
        assert!(e.contains("1 of the 3") && e.contains("s-01.tar"), "{e}");
        let p = dir.path().join("s-{00,02}.tar");
        assert_eq!(expand_source(&p).unwrap().len(), 2);
        // A name with braces that exists is itself.
        let odd = dir.path().join("odd{1,2}.tar");
        std::fs::write(&odd, b"x").unwrap();
        assert_eq!(expand_source(&odd).unwrap(), vec![odd]);
    }

    #[test]
    fn tar_names() {
        for n in ["a.tar", "b.TAR", "c.tar.gz", "d.tgz"] {
            assert!(is_tar_name(Path::new(n)), "{n}");
        }
        for n in ["a.tar.part", "tar", "a.png", ".tar"] {
            assert!(!is_tar_name(Path::new(n)), "{n}");
        }
    }

    fn sample(members: &[(&str, &[u8])]) -> RawSample {
        RawSample {
            index: 0,
            key: "k".into(),
            members: members
                .iter()
                .map(|(e, b)| (e.to_string(), b.to_vec()))
                .collect(),
            problem: None,
        }
    }

    #[test]
    fn labels_from_cls_or_json_field() {
        assert_eq!(
            sample(&[("cls", b" 007\n")]).label("label"),
            Ok(Some("7".into()))
        );
        assert_eq!(
            sample(&[("cls", b"3"), ("json", b"{\"label\":\"cat\"}")]).label("label"),
            Ok(Some("3".into()))
        );
        assert_eq!(
            sample(&[("json", b"{\"label\":\"cat\"}")]).label("label"),
            Ok(Some("cat".into()))
        );
        assert_eq!(
            sample(&[("json", b"{\"y\":12}")]).label("y"),
            Ok(Some("12".into()))
        );
        assert_eq!(sample(&[("json", b"{\"y\":12}")]).label("label"), Ok(None));
        assert_eq!(
            sample(&[("json", b"{\"label\":null}")]).label("label"),
            Ok(None)
        );
        assert_eq!(sample(&[("jpg", b"")]).label("label"), Ok(None));
        assert!(sample(&[("cls", b"cat")]).label("label").is_err());
        assert!(sample(&[("json", b"{not json")]).label("label").is_err());
        assert!(sample(&[("json", b"[1]")]).label("label").is_err());
        assert!(
            sample(&[("json", b"{\"label\":1.5}")])
                .label("label")
                .is_err()
        );
        assert!(
            sample(&[("json", b"{\"label\":\"\"}")])
                .label("label")
                .is_err()
        );
    }

    #[test]
    fn the_image_is_the_first_of_the_image_extensions() {
        let s = sample(&[("png", b"p"), ("json", b"{}"), ("jpg", b"j")]);
        assert_eq!(s.image(), Some(("jpg", &b"j"[..])));
        assert_eq!(sample(&[("seg.png", b"p")]).image(), None);
    }

    fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn read_all(bytes: &[u8]) -> Vec<TarItem> {
        let mut a = tar::Archive::new(bytes);
        Samples::new(&mut a, 1 << 20).unwrap().collect()
    }

    #[test]
    fn members_group_by_key_and_metadata_is_skipped() {
        let t = tar_of(&[
            ("__index__", b"meta"),
            ("a/x.jpg", b"1"),
            ("a/x.cls", b"2"),
            ("a/x.y.json", b"{}"),
            ("a/y.JPG", b"3"),
            ("noext", b"?"),
            ("._z.jpg", b"?"),
            ("b/x.jpg", b"4"),
        ]);
        let items = read_all(&t);
        let keys: Vec<(String, Vec<String>)> = items
            .iter()
            .map(|i| match i {
                TarItem::Sample(s) => (
                    s.key.clone(),
                    s.members.iter().map(|(e, _)| e.clone()).collect(),
                ),
                TarItem::Damaged { reason, .. } => panic!("{reason}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                (
                    "a/x".to_owned(),
                    vec!["jpg".into(), "cls".into(), "y.json".into()]
                ),
                ("a/y".to_owned(), vec!["jpg".into()]),
                ("b/x".to_owned(), vec!["jpg".into()]),
            ]
        );
    }

    #[test]
    fn damage_keeps_what_came_before() {
        let t = tar_of(&[
            ("s0.jpg", &[1; 600]),
            ("s0.cls", b"1"),
            ("s1.jpg", &[2; 600]),
            ("s1.cls", b"2"),
        ]);
        // Cut inside s1.jpg: s0 is whole, s1 is cut.
        let items = read_all(&t[..512 * 6 + 100]);
        assert!(matches!(&items[0], TarItem::Sample(s) if s.key == "s0" && s.members.len() == 2));
        match &items[1] {
            TarItem::Damaged {
                cut,
                samples_before,
                reason,
            } => {
                assert_eq!((cut.as_deref(), *samples_before), (Some("s1"), 1));
                assert!(reason.contains("truncated"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(items.len(), 2);
        // A header whose checksum does not match.
        let mut bad = t.clone();
        bad[512 * 5] ^= 0x55; // the name in s1.jpg's header
        let items = read_all(&bad);
        // s0 was being read (its members may go on past the damage): left out.
        assert_eq!(items.len(), 1);
        assert!(
            matches!(&items[0], TarItem::Damaged { cut: Some(k), samples_before: 0, reason }
            if k == "s0" && reason.contains("checksum")),
            "{:?}",
            items[0]
        );
    }

    #[test]
    fn a_key_met_twice_or_an_extension_twice_is_a_problem() {
        let t = tar_of(&[
            ("a.jpg", b"1"),
            ("b.jpg", b"2"),
            ("b.jpg", b"3"),
            ("a.jpg", b"4"),
        ]);
        let items = read_all(&t);
        let problems: Vec<bool> = items
            .iter()
            .map(|i| matches!(i, TarItem::Sample(s) if s.problem.is_some()))
            .collect();
        assert_eq!(problems, [false, true, true]);
    }
}
