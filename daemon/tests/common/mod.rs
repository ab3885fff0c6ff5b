//! Helpers shared by the CLI test files: run the real `byol` binary, read its output.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The `byol` binary under test, with logging left at its default.
pub fn byol() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_byol"));
    c.env_remove("BYOL_LOG");
    c
}

/// Runs `byol ARGS...` to completion.
pub fn run(args: &[&str]) -> Output {
    byol().args(args).output().expect("byol runs")
}

/// Stdout then stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `byol ingest SRC --out OUT`, which must succeed.
pub fn ingest(src: &Path, out: &Path) {
    let o = run(&[
        "ingest",
        src.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failing test leaves
/// no daemon behind.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

/// A distinct 32 x 32 PNG for each `n` below 256 (`n` and `n + 256` coincide).
pub fn distinct_png(n: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([
            (x * 7 + n * 13) as u8,
            (y * 5 + n * 29) as u8,
            ((x ^ y) + n * 3) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}
