//! When a file that a watcher saw change is complete: its size and modification time
//! unchanged for a settle time, or renamed into place.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// Files seen changing, waiting to be complete.
#[derive(Debug)]
pub struct Settler {
    settle: Duration,
    pending: HashMap<PathBuf, Pending>,
}

#[derive(Debug)]
struct Pending {
    /// Size and modification time at the last look (`None`: not a file then).
    stamp: Option<(u64, Option<SystemTime>)>,
    /// Since when the stamp has not changed.
    since: Instant,
    /// Renamed into place: complete now.
    complete: bool,
}

fn stamp(path: &PathBuf) -> Option<(u64, Option<SystemTime>)> {
    let m = fs::metadata(path).ok()?;
    m.is_file().then(|| (m.len(), m.modified().ok()))
}

impl Settler {
    /// A settler that takes a file once unchanged for `settle`.
    pub fn new(settle: Duration) -> Self {
        Settler {
            settle,
            pending: HashMap::new(),
        }
    }

    /// Replaces the settle time (a reloaded config).
    pub fn set_settle(&mut self, settle: Duration) {
        self.settle = settle;
    }

    /// `path` changed (created, written, removed, renamed away): its settle time
    /// starts again.
    pub fn note(&mut self, path: PathBuf, now: Instant) {
        let stamp = stamp(&path);
        let p = self.pending.entry(path).or_insert(Pending {
            stamp,
            since: now,
            complete: false,
        });
        p.stamp = stamp;
        p.since = now;
    }

    /// `path` was renamed into place (the writer finished under another name): it is
    /// complete, and taken at the next [`Settler::take_ready`].
    pub fn note_complete(&mut self, path: PathBuf, now: Instant) {
        self.note(path.clone(), now);
        if let Some(p) = self.pending.get_mut(&path) {
            p.complete = true;
        }
    }

    /// The paths ready now: files complete (renamed into place, or unchanged for the
    /// settle time at two looks), and paths that are not files (gone: to retire;
    /// folders: to scan). A file that changed since the last look waits again.
    pub fn take_ready(&mut self, now: Instant) -> Vec<PathBuf> {
        let mut ready = Vec::new();
        let settle = self.settle;
        self.pending.retain(|path, p| {
            let current = stamp(path);
            let done = match current {
                None => true,
                Some(_) if p.complete => true,
                Some(_) if current != p.stamp => {
                    p.stamp = current;
                    p.since = now;
                    false
                }
                Some(_) => now.duration_since(p.since) >= settle,
            };
            if done {
                ready.push(path.clone());
            }
            !done
        });
        ready.sort();
        ready
    }

    /// Files waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_taken_once_unchanged_for_the_settle_time() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.png");
        std::fs::write(&f, b"12").unwrap();
        let t0 = Instant::now();
        let mut s = Settler::new(Duration::from_secs(2));
        s.note(f.clone(), t0);
        assert!(s.take_ready(t0 + Duration::from_secs(1)).is_empty());
        // Still being written: the wait starts again.
        std::fs::write(&f, b"12345").unwrap();
        assert!(s.take_ready(t0 + Duration::from_millis(2500)).is_empty());
        assert!(s.take_ready(t0 + Duration::from_millis(4000)).is_empty());
        assert_eq!(
            s.take_ready(t0 + Duration::from_millis(4600)),
            vec![f.clone()]
        );
        assert!(s.is_empty());
        // Renamed into place: taken at once; a vanished path too (to retire).
        s.note_complete(f.clone(), t0);
        let gone = dir.path().join("gone.png");
        s.note(gone.clone(), t0);
        assert_eq!(s.take_ready(t0), vec![f, gone]);
    }
}
