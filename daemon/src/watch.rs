//! Watching folders for the daemon: notify's debounced events (inotify), or polling
//! for network filesystems, when asked, or when a watch cannot be registered (inotify's
//! watch limit reached, at start-up or later under a new sub-folder). Each configured
//! folder stays watched: replaced under its path or back after it went missing, it is
//! watched again ([`Watchers::check`]). Events become [`Change`]s on a channel.
//!
//! One rule for a folder under a watched folder whose native watch cannot be added,
//! whatever the reason (unreadable, gone in a create-then-delete race, a filesystem
//! that refuses inotify, a watch lost with events the kernel dropped): every folder that
//! appears is made sure of at the next check; one that cannot be watched is said once,
//! polled, and tried again at every check until its watch holds, then rescanned. A
//! folder that is gone is dropped. inotify's watch limit polls the whole watched folder.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
        debouncer: Debouncer<RecommendedWatcher, RecommendedCache>,
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
    /// Folders under a native watch that have none of their own: each polled (its
    /// poller, if one could be made), and tried again at every check.
    unwatched: BTreeMap<PathBuf, Option<Watcher>>,
}

/// Set by a folder's event handler for [`Watchers::check`].
#[derive(Default)]
struct Flags {
    /// inotify's watch limit stopped the native watch from following a new sub-folder.
    watch_limit: AtomicBool,
    /// A symlink to a folder appeared: inotify follows it only from a fresh recursive
    /// watch (a new real folder is followed at once).
    new_symlinked_folder: AtomicBool,
    /// Folders that appeared (created, renamed in): their watches are made sure of at
    /// the next check (notify drops a failed one silently).
    new_folders: Mutex<Vec<PathBuf>>,
    /// Events were lost (the kernel's queue overflowed): so may the watches of the
    /// folders they announced be; every folder is made sure of at the next check.
    events_lost: AtomicBool,
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
        let (watcher, failed) = w.start(root, &flags, None)?;
        w.roots.push(RootWatch {
            path: root.clone(),
            watched: identity(root),
            watcher: Some(watcher),
            flags,
            unwatched: BTreeMap::new(),
        });
        let i = w.roots.len() - 1;
        w.note_unwatched(i, failed);
    }
    Ok(w)
}

impl Watchers {
    /// Looks at every folder (call it every [`CHECK_EVERY`]): a folder replaced under
    /// its path (`mv in in.old; mkdir in`) or back after it went missing is watched
    /// again, and a folder whose native watch hit inotify's watch limit is polled
    /// instead; each is logged, and a rescan asked for, so nothing that arrived
    /// meanwhile is missed. A missing folder is reported once (and retires nothing).
    /// Under a native watch, each folder that appeared since is made sure of, and each
    /// folder without a watch of its own is tried again (see the module docs).
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
            self.roots[i].unwatched.clear();
            let flags = self.roots[i].flags.clone();
            let (watcher, failed) = self.start(&path, &flags, None)?;
            self.roots[i].watcher = Some(watcher);
            self.note_unwatched(i, failed);
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
            // The whole folder is polled: its sub-folders' pollers go.
            self.roots[i].unwatched.clear();
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
                self.roots[i].unwatched.clear();
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
            _ => {
                self.ensure_watched(i);
                return Ok(());
            }
        }
        // Replaced or back: a fresh watcher on the folder now at the path.
        self.roots[i].watcher = None;
        self.roots[i].unwatched.clear();
        let flags = self.roots[i].flags.clone();
        let (watcher, failed) = self.start(&path, &flags, None)?;
        self.roots[i].watcher = Some(watcher);
        self.roots[i].watched = now;
        self.note_unwatched(i, failed);
        let _ = self.tx.send(Change::Rescan);
        Ok(())
    }

    /// Under root `i`'s native watch: the folders that appeared since the last check
    /// (all of them after lost events) made sure of, and each folder without a watch
    /// of its own tried again; one whose watch now holds is rescanned (what reached it
    /// meanwhile), one that is gone dropped.
    fn ensure_watched(&mut self, i: usize) {
        let root = &mut self.roots[i];
        let Some(Watcher::Native { debouncer }) = &mut root.watcher else {
            return;
        };
        let mut folders: Vec<PathBuf> = std::mem::take(
            &mut *root
                .flags
                .new_folders
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        if root.flags.events_lost.swap(false, Ordering::SeqCst) {
            folders.push(root.path.clone());
        }
        if folders.is_empty() && root.unwatched.is_empty() {
            return;
        }
        folders.extend(root.unwatched.keys().cloned());
        folders.sort();
        folders.dedup();
        let mut failed = Vec::new();
        let mut limit = false;
        let mut tried = Vec::new();
        for f in &folders {
            // A folder under another of the list is walked with it.
            if tried.iter().any(|t: &PathBuf| f.starts_with(t)) {
                continue;
            }
            ensure_tree(debouncer, f, &mut failed, &mut limit);
            tried.push(f.clone());
        }
        if limit {
            root.flags.watch_limit.store(true, Ordering::SeqCst);
        }
        let failed_paths: HashSet<&PathBuf> = failed.iter().map(|(p, _)| p).collect();
        let restored: Vec<PathBuf> = root
            .unwatched
            .keys()
            .filter(|p| !failed_paths.contains(p))
            .cloned()
            .collect();
        for p in restored {
            root.unwatched.remove(&p);
            if p.is_dir() {
                tracing::info!(
                    event = "watch_restored",
                    folder = %p.display(),
                    "{} is watched natively again; rescanning it",
                    p.display()
                );
                let _ = self.tx.send(Change::Paths(vec![(p, false)]));
            }
        }
        self.note_unwatched(i, failed);
    }

    /// Folders under root `i` whose native watch failed (with why): each not polled yet
    /// is said once and polled until [`Watchers::ensure_watched`] adds its watch.
    fn note_unwatched(&mut self, i: usize, failed: Vec<(PathBuf, String)>) {
        for (folder, why) in failed {
            if self.roots[i].unwatched.contains_key(&folder) {
                continue;
            }
            let poller = match self.poller(&folder) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(
                        event = "watch_failed",
                        folder = %folder.display(),
                        "cannot watch {} ({why}) nor poll it ({e:#}); trying again every {:?}",
                        folder.display(),
                        CHECK_EVERY
                    );
                    self.roots[i].unwatched.insert(folder, None);
                    continue;
                }
            };
            tracing::warn!(
                event = "watch_fallback",
                folder = %folder.display(),
                "{}: cannot watch natively ({why}); polling it every {:?} and trying the watch \
                 again every {:?}",
                folder.display(),
                self.poll_interval,
                CHECK_EVERY
            );
            self.roots[i].unwatched.insert(folder, poller);
        }
    }

    /// A watcher for `root`: native unless polling is asked for, the folder is on a
    /// network filesystem, or the native watch cannot be registered.
    /// A native watcher also comes with the folders under `root` it could not watch
    /// (for [`Watchers::note_unwatched`]).
    fn start(
        &self,
        root: &Path,
        flags: &Arc<Flags>,
        why_poll: Option<&str>,
    ) -> anyhow::Result<(Watcher, Vec<(PathBuf, String)>)> {
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
            .map_err(|e| reason(&e))
            .and_then(|mut d| {
                // The folder itself must take a watch (or the limit stops it); a folder
                // under it that does not is polled on its own.
                let (mut failed, mut limit) = (Vec::new(), false);
                ensure_tree(&mut d, root, &mut failed, &mut limit);
                match failed.iter().find(|(p, _)| p == root) {
                    Some((_, why)) => Err(why.clone()),
                    None if limit => Err("inotify's watch limit was reached".to_owned()),
                    None => Ok((d, failed)),
                }
            });
            match native {
                Ok((d, failed)) => {
                    tracing::info!(
                        event = "watching",
                        folder = %root.display(),
                        "watching {} (inotify)",
                        root.display()
                    );
                    return Ok((Watcher::Native { debouncer: d }, failed));
                }
                Err(why) => {
                    let why = format!("cannot watch natively: {why}");
                    tracing::warn!(
                        event = "watch_fallback",
                        folder = %root.display(),
                        "{}: {why}; polling instead",
                        root.display()
                    );
                    return Ok((self.start_polling(root, None)?, Vec::new()));
                }
            }
        }
        Ok((self.start_polling(root, why_poll.as_deref())?, Vec::new()))
    }

    /// A polling watcher for `root` (not said).
    fn poller(&self, root: &Path) -> anyhow::Result<Watcher> {
        let config = notify::Config::default().with_poll_interval(self.poll_interval);
        let mut d = new_debouncer_opt::<_, PollWatcher, _>(
            DEBOUNCE,
            None,
            handler(self.tx.clone(), None),
            RecommendedCache::new(),
            config,
        )?;
        d.watch(root, RecursiveMode::Recursive)?;
        Ok(Watcher::Polling { _debouncer: d })
    }

    /// A polling watcher for `root`, said with `why` when given.
    fn start_polling(&self, root: &Path, why: Option<&str>) -> anyhow::Result<Watcher> {
        let watcher = self.poller(root)?;
        let why = why.map_or(String::new(), |w| format!(" ({w})"));
        tracing::info!(
            event = "watching",
            folder = %root.display(),
            interval = ?self.poll_interval,
            "watching {} by polling{why}",
            root.display()
        );
        Ok(watcher)
    }
}

/// Makes sure `folder` and every folder under it hold a native watch (adding one
/// where it holds is a no-op for inotify). notify's recursive add stops at the first
/// folder it cannot watch: that folder goes to `failed` with why, and the walk goes on
/// in its siblings. inotify's watch limit sets `limit` instead. A folder that is gone
/// (created and deleted before this) needs no watch.
fn ensure_tree(
    d: &mut Debouncer<RecommendedWatcher, RecommendedCache>,
    folder: &Path,
    failed: &mut Vec<(PathBuf, String)>,
    limit: &mut bool,
) {
    if !folder.is_dir() {
        return;
    }
    let e = match d.watch(folder, RecursiveMode::Recursive) {
        Ok(()) => return,
        Err(e) => e,
    };
    if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
        *limit = true;
        return;
    }
    let at = e.paths.first().filter(|p| p.starts_with(folder));
    match at {
        Some(at) if at != folder => {
            // A folder below could not be watched: each sub-folder on its own.
            let Ok(entries) = std::fs::read_dir(folder) else {
                return;
            };
            let mut subs: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect();
            subs.sort();
            for sub in subs {
                ensure_tree(d, &sub, failed, limit);
                if *limit {
                    return;
                }
            }
        }
        _ if folder.is_dir() => failed.push((folder.to_owned(), reason(&e))),
        _ => {}
    }
}

/// Why a watch failed, without the paths notify appends.
fn reason(e: &notify::Error) -> String {
    match &e.kind {
        notify::ErrorKind::Io(io) => io.to_string(),
        notify::ErrorKind::PathNotFound => "not found".to_owned(),
        notify::ErrorKind::MaxFilesWatch => "inotify's watch limit was reached".to_owned(),
        notify::ErrorKind::Generic(g) => g.clone(),
        other => format!("{other:?}"),
    }
}

/// Turns debounced events into [`Change`]s. For a native watcher (`flags`), an error
/// that says inotify's watch limit was reached, and a symlink to a folder created, are
/// flagged for [`Watchers::check`].
fn handler(
    tx: Sender<Change>,
    flags: Option<Arc<Flags>>,
) -> impl FnMut(DebounceEventResult) + Send + 'static {
    // Paths a poller could not read, said once (a poll of an unreadable folder fails
    // the same way at every interval).
    let mut unreadable: HashSet<PathBuf> = HashSet::new();
    move |result| match result {
        Ok(events) => {
            let mut paths = Vec::new();
            let mut rescan = false;
            for e in events {
                rescan |= e.need_rescan();
                if let Some(flags) = &flags {
                    note_folders(flags, &e);
                }
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
                if let Some(flags) = &flags {
                    flags.events_lost.store(true, Ordering::SeqCst);
                }
                let _ = tx.send(Change::Rescan);
            }
            if !paths.is_empty() {
                let _ = tx.send(Change::Paths(paths));
            }
        }
        Err(errors) => {
            let mut rescan = false;
            for e in errors {
                let limit = matches!(e.kind, notify::ErrorKind::MaxFilesWatch);
                if limit && let Some(flags) = &flags {
                    flags.watch_limit.store(true, Ordering::SeqCst);
                }
                // A poller's error names the path it could not read: the scan that
                // follows would fail the same way. Said once; the poll goes on.
                if flags.is_none() && !limit && !e.paths.is_empty() {
                    if e.paths.iter().any(|p| unreadable.insert(p.clone())) {
                        tracing::warn!(error = %e, "cannot poll (trying at every interval)");
                    }
                    continue;
                }
                tracing::warn!(error = %e, "watch error");
                rescan = true;
            }
            if rescan {
                if let Some(flags) = &flags {
                    flags.events_lost.store(true, Ordering::SeqCst);
                }
                let _ = tx.send(Change::Rescan);
            }
        }
    }
}

/// Notes for [`Watchers::check`] each folder `e` says appeared under a native watch
/// (created, or renamed into place).
fn note_folders(flags: &Flags, e: &notify::Event) {
    let appeared: Vec<&PathBuf> = match (&e.kind, e.paths.as_slice()) {
        (EventKind::Create(notify::event::CreateKind::Folder), all) => all.iter().collect(),
        (EventKind::Modify(ModifyKind::Name(RenameMode::To)), [to])
        | (EventKind::Modify(ModifyKind::Name(RenameMode::Both)), [_, to]) => {
            if to.is_dir() {
                vec![to]
            } else {
                Vec::new()
            }
        }
        _ => Vec::new(),
    };
    if !appeared.is_empty() {
        flags
            .new_folders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(appeared.into_iter().cloned());
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
