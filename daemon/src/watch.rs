//! Watching folders for the daemon: notify's debounced events (inotify), or polling
//! for network filesystems, when asked, or when a watch cannot be registered (inotify's
//! watch limit reached, say). Events become [`Change`]s on a channel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crossbeam_channel::Sender;
use notify::event::{EventKind, ModifyKind, RenameMode};
use notify::{PollWatcher, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer_opt};

/// What a watcher reports.
#[derive(Debug)]
pub enum Change {
    /// These paths changed; `true` for one renamed into place (complete at once).
    Paths(Vec<(PathBuf, bool)>),
    /// Events were lost (a queue overflowed): everything must be scanned again.
    Rescan,
}

/// Debounce window of the event stream (the settle time comes after it).
const DEBOUNCE: Duration = Duration::from_millis(300);

/// The watchers of every folder; dropping it stops them.
pub struct Watchers {
    _native: Vec<Debouncer<RecommendedWatcher, RecommendedCache>>,
    _polling: Vec<Debouncer<PollWatcher, RecommendedCache>>,
}

/// Watches every folder of `roots` recursively, sending changes to `tx`: natively,
/// unless `poll` is set or the folder is on a network filesystem, and by polling
/// every `poll_interval` when a native watch cannot be registered. Each choice is
/// logged.
pub fn watch(
    roots: &[PathBuf],
    poll: bool,
    poll_interval: Duration,
    tx: &Sender<Change>,
) -> anyhow::Result<Watchers> {
    let mut w = Watchers {
        _native: Vec::new(),
        _polling: Vec::new(),
    };
    for root in roots {
        let why_poll = if poll {
            Some("[daemon] poll = true".to_owned())
        } else {
            network_filesystem(root).map(|fs| format!("{fs} filesystem"))
        };
        if why_poll.is_none() {
            let native = new_debouncer_opt::<_, RecommendedWatcher, _>(
                DEBOUNCE,
                None,
                handler(tx.clone()),
                RecommendedCache::new(),
                notify::Config::default(),
            )
            .and_then(|mut d| d.watch(root, RecursiveMode::Recursive).map(|()| d));
            match native {
                Ok(d) => {
                    tracing::info!(folder = %root.display(), "watching (inotify)");
                    println!("watching {} (inotify)", root.display());
                    w._native.push(d);
                    continue;
                }
                Err(e) => {
                    let why = format!("cannot watch natively: {e}");
                    tracing::warn!(folder = %root.display(), "{why}; polling instead");
                    eprintln!("warning: {}: {why}; polling instead", root.display());
                }
            }
        } else if let Some(why) = &why_poll {
            println!("watching {} by polling ({why})", root.display());
        }
        let config = notify::Config::default().with_poll_interval(poll_interval);
        let mut d = new_debouncer_opt::<_, PollWatcher, _>(
            DEBOUNCE,
            None,
            handler(tx.clone()),
            RecommendedCache::new(),
            config,
        )?;
        d.watch(root, RecursiveMode::Recursive)?;
        tracing::info!(folder = %root.display(), interval = ?poll_interval, "watching (polling)");
        w._polling.push(d);
    }
    Ok(w)
}

/// Turns debounced events into [`Change`]s.
fn handler(tx: Sender<Change>) -> impl FnMut(DebounceEventResult) + Send + 'static {
    move |result| match result {
        Ok(events) => {
            let mut paths = Vec::new();
            let mut rescan = false;
            for e in events {
                rescan |= e.need_rescan();
                match (&e.kind, e.paths.as_slice()) {
                    (EventKind::Modify(ModifyKind::Name(RenameMode::Both)), [from, to]) => {
                        paths.push((from.clone(), false));
                        paths.push((to.clone(), true));
                    }
                    (EventKind::Modify(ModifyKind::Name(RenameMode::To)), [to]) => {
                        paths.push((to.clone(), true));
                    }
                    (EventKind::Access(_), _) => {}
                    (_, all) => paths.extend(all.iter().map(|p| (p.clone(), false))),
                }
            }
            if rescan {
                let _ = tx.send(Change::Rescan);
            }
            if !paths.is_empty() {
                let _ = tx.send(Change::Paths(paths));
            }
        }
        Err(errors) => {
            for e in errors {
                tracing::warn!(error = %e, "watch error");
            }
            let _ = tx.send(Change::Rescan);
        }
    }
}

/// The network filesystem `path` is on, if it is on one (inotify sees only local changes).
fn network_filesystem(path: &Path) -> Option<&'static str> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `st` a writable statfs.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)]
        match st.f_type as i64 {
            0x6969 => Some("NFS"),
            0x517B => Some("SMB"),
            0xFF53_4D42 => Some("CIFS"),
            0xFE53_4D42 => Some("SMB2"),
            0x6573_5546 => Some("FUSE"),
            0x0102_1997 => Some("9p"),
            _ => None,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        None
    }
}
