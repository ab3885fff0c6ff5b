//! Watching folders for the daemon: notify's debounced events (inotify), or polling
//! for network filesystems, when asked, or when a watch cannot be registered (inotify's
//! watch limit reached, at start-up or later under a new sub-folder). Each configured
//! folder stays watched: replaced under its path or back after it went missing, it is
//! watched again ([`Watchers::check`]). Events become [`Change`]s on a channel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// How often [`Watchers::check`] looks at the folders themselves.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// A folder's identity: device and inode (a folder replaced under the same path has
/// another).
type Identity = (u64, u64);

fn identity(path: &Path) -> Option<Identity> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok().filter(|m| m.is_dir())?;
    Some((m.dev(), m.ino()))
}

/// One folder's watcher (held for its events: dropping it stops the watch).
enum Watcher {
    Native {
        _debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
    },
    Polling {
        _debouncer: Debouncer<PollWatcher, RecommendedCache>,
    },
}

/// One watched folder: the folder its watcher follows, and the watcher.
struct RootWatch {
    path: PathBuf,
    /// The folder being watched (`None` while the path is missing).
    watched: Option<Identity>,
    watcher: Option<Watcher>,
    /// What the event handler asks of [`Watchers::check`].
    flags: Arc<Flags>,
}

/// Set by a folder's event handler for [`Watchers::check`].
#[derive(Default)]
struct Flags {
    /// inotify's watch limit stopped the native watch from following a new sub-folder.
    watch_limit: AtomicBool,
    /// A symlink to a folder appeared: inotify follows it only from a fresh recursive
    /// watch (a new real folder is followed at once).
    new_symlinked_folder: AtomicBool,
}

/// The watchers of every folder; dropping it stops them. [`Watchers::check`] keeps
/// each configured folder watched: re-watched when it is replaced or reappears, and
/// polled when inotify runs out of watches under it.
pub struct Watchers {
    roots: Vec<RootWatch>,
    poll: bool,
    poll_interval: Duration,
    tx: Sender<Change>,
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
        roots: Vec::new(),
        poll,
        poll_interval,
        tx: tx.clone(),
    };
    for root in roots {
        let flags = Arc::new(Flags::default());
        let watcher = w.start(root, &flags, None)?;
        w.roots.push(RootWatch {
            path: root.clone(),
            watched: identity(root),
            watcher: Some(watcher),
            flags,
        });
    }
    Ok(w)
}

impl Watchers {
    /// Looks at every folder (call it every [`CHECK_EVERY`]): a folder replaced under
    /// its path (`mv in in.old; mkdir in`) or back after it went missing is watched
    /// again, and a folder whose native watch hit inotify's watch limit is polled
    /// instead; each is logged, and a rescan asked for, so nothing that arrived
    /// meanwhile is missed. A missing folder is reported once (and retires nothing).
    pub fn check(&mut self) {
        for i in 0..self.roots.len() {
            if let Err(e) = self.check_root(i) {
                let path = &self.roots[i].path;
                tracing::error!(
                    event = "watch_failed",
                    folder = %path.display(),
                    error = format!("{e:#}"),
                    "cannot watch {} again (retrying): {e:#}",
                    path.display()
                );
            }
        }
    }

    fn check_root(&mut self, i: usize) -> anyhow::Result<()> {
        let now = identity(&self.roots[i].path);
        let root = &self.roots[i];
        let path = root.path.clone();
        let native = matches!(root.watcher, Some(Watcher::Native { .. }));
        if root
            .flags
            .new_symlinked_folder
            .swap(false, Ordering::SeqCst)
            && native
        {
            tracing::info!(
                event = "watching",
                folder = %path.display(),
                "a symlinked folder appeared under {}: watching the folder afresh to follow it",
                path.display()
            );
            self.roots[i].watcher = None;
            let flags = self.roots[i].flags.clone();
            let watcher = self.start(&path, &flags, None)?;
            self.roots[i].watcher = Some(watcher);
            let _ = self.tx.send(Change::Rescan);
            return Ok(());
        }
        let root = &self.roots[i];
        if root.flags.watch_limit.swap(false, Ordering::SeqCst) && native {
            let why = "inotify's watch limit (fs.inotify.max_user_watches) was reached under \
                       it";
            tracing::warn!(
                event = "watch_fallback",
                folder = %path.display(),
                "{}: {why}; polling it every {:?} instead",
                path.display(),
                self.poll_interval
            );
            let watcher = self.start_polling(&path, Some(why))?;
            self.roots[i].watcher = Some(watcher);
            let _ = self.tx.send(Change::Rescan);
            return Ok(());
        }
        match (root.watched, now) {
            (Some(before), Some(after)) if before != after => {
                tracing::warn!(
                    event = "watch_replaced",
                    folder = %path.display(),
                    "watched folder {} was replaced; watching the new folder and rescanning",
                    path.display()
                );
            }
            (Some(_), None) => {
                tracing::warn!(
                    event = "watch_missing",
                    folder = %path.display(),
                    "watched folder {} is missing; nothing is retired, and it is watched again \
                     when it reappears",
                    path.display()
                );
                self.roots[i].watcher = None;
                self.roots[i].watched = None;
                return Ok(());
            }
            (None, Some(_)) => {
                tracing::warn!(
                    event = "watch_back",
                    folder = %path.display(),
                    "watched folder {} is back; watching it and rescanning",
                    path.display()
                );
            }
            _ => return Ok(()),
        }
        // Replaced or back: a fresh watcher on the folder now at the path.
        self.roots[i].watcher = None;
        let flags = self.roots[i].flags.clone();
        let watcher = self.start(&path, &flags, None)?;
        self.roots[i].watcher = Some(watcher);
        self.roots[i].watched = now;
        let _ = self.tx.send(Change::Rescan);
        Ok(())
    }

    /// A watcher for `root`: native unless polling is asked for, the folder is on a
    /// network filesystem, or the native watch cannot be registered.
    fn start(
        &self,
        root: &Path,
        flags: &Arc<Flags>,
        why_poll: Option<&str>,
    ) -> anyhow::Result<Watcher> {
        let why_poll = match why_poll {
            Some(why) => Some(why.to_owned()),
            None if self.poll => Some("[daemon] poll = true".to_owned()),
            None => network_filesystem(root).map(|fs| format!("{fs} filesystem")),
        };
        if why_poll.is_none() {
            let native = new_debouncer_opt::<_, RecommendedWatcher, _>(
                DEBOUNCE,
                None,
                handler(self.tx.clone(), Some(flags.clone())),
                RecommendedCache::new(),
                notify::Config::default(),
            )
            .and_then(|mut d| d.watch(root, RecursiveMode::Recursive).map(|()| d));
            match native {
                Ok(d) => {
                    tracing::info!(
                        event = "watching",
                        folder = %root.display(),
                        "watching {} (inotify)",
                        root.display()
                    );
                    return Ok(Watcher::Native { _debouncer: d });
                }
                Err(e) => {
                    let why = format!("cannot watch natively: {e}");
                    tracing::warn!(
                        event = "watch_fallback",
                        folder = %root.display(),
                        "{}: {why}; polling instead",
                        root.display()
                    );
                    return self.start_polling(root, None);
                }
            }
        }
        self.start_polling(root, why_poll.as_deref())
    }

    /// A polling watcher for `root`, said with `why` when given.
    fn start_polling(&self, root: &Path, why: Option<&str>) -> anyhow::Result<Watcher> {
        let config = notify::Config::default().with_poll_interval(self.poll_interval);
        let mut d = new_debouncer_opt::<_, PollWatcher, _>(
            DEBOUNCE,
            None,
            handler(self.tx.clone(), None),
            RecommendedCache::new(),
            config,
        )?;
        d.watch(root, RecursiveMode::Recursive)?;
        let why = why.map_or(String::new(), |w| format!(" ({w})"));
        tracing::info!(
            event = "watching",
            folder = %root.display(),
            interval = ?self.poll_interval,
            "watching {} by polling{why}",
            root.display()
        );
        Ok(Watcher::Polling { _debouncer: d })
    }
}

/// Turns debounced events into [`Change`]s. For a native watcher (`flags`), an error
/// that says inotify's watch limit was reached, and a symlink to a folder created, are
/// flagged for [`Watchers::check`].
fn handler(
    tx: Sender<Change>,
    flags: Option<Arc<Flags>>,
) -> impl FnMut(DebounceEventResult) + Send + 'static {
    move |result| match result {
        Ok(events) => {
            let mut paths = Vec::new();
            let mut rescan = false;
            for e in events {
                rescan |= e.need_rescan();
                if let (Some(flags), EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_))) =
                    (&flags, &e.kind)
                    && e.paths.iter().any(|p| is_symlinked_folder(p))
                {
                    flags.new_symlinked_folder.store(true, Ordering::SeqCst);
                }
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
                if matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
                    && let Some(flags) = &flags
                {
                    flags.watch_limit.store(true, Ordering::SeqCst);
                }
                tracing::warn!(error = %e, "watch error");
            }
            let _ = tx.send(Change::Rescan);
        }
    }
}

/// True when `path` is a symbolic link to a folder.
fn is_symlinked_folder(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
        && std::fs::metadata(path).is_ok_and(|m| m.is_dir())
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
