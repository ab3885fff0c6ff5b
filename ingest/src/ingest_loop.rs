//! The daemon's ingest loop as a state machine: changed paths are settled, then handed
//! to a [`Follower`]; a lost event stream asks for a full rescan; an error (a full disk)
//! closes the dataset, whose last commit stays intact, and after the retry interval it
//! is opened again and every folder rescanned, so nothing that arrived meanwhile is
//! missed; background compaction follows each batch when a policy is set.
//!
//! [`IngestLoop::tick`] does one round and returns what happened as [`IngestEvent`]s:
//! the caller (the daemon's ingest thread) only feeds changes in, and logs and counts
//! what comes out. Time is passed in, so the policies are tested without waiting.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{
    CompactPolicy, CompactReport, Follower, IngestError, IngestReport, IngesterOptions, Layout,
    Settler,
};

/// How to open the dataset again after an error.
#[derive(Debug, Clone)]
pub struct Reopen {
    /// The dataset folder.
    pub data: PathBuf,
    /// The watched folders and their layouts.
    pub roots: Vec<(PathBuf, Layout)>,
    /// The ingester's options.
    pub options: IngesterOptions,
}

/// What one [`IngestLoop::tick`] did.
#[derive(Debug)]
pub enum IngestEvent {
    /// The dataset was opened again after an error; every folder is rescanned next.
    Reopened,
    /// The dataset could not be opened again; the next try is after `retry_in`.
    ReopenFailed {
        /// Why.
        error: IngestError,
        /// When it is tried again.
        retry_in: Duration,
    },
    /// A batch of paths (or a rescan) was ingested and committed.
    Batch {
        /// What it did.
        report: IngestReport,
        /// Live records after it.
        live_records: u64,
        /// It changed what training samples or how it is labelled (records added,
        /// retired or relabelled).
        changed: bool,
    },
    /// Ingesting failed: the dataset keeps its last commit and is closed; it is opened
    /// again (and every folder rescanned) after `retry_in`.
    Failed {
        /// Why.
        error: IngestError,
        /// When it is tried again.
        retry_in: Duration,
    },
    /// Small shards were merged.
    Compacted(CompactReport),
    /// Compaction failed: the dataset is unchanged and closed; reopened after
    /// `retry_in`.
    CompactionFailed {
        /// Why.
        error: IngestError,
        /// When it is tried again.
        retry_in: Duration,
    },
}

/// The ingest loop's state (see the module docs).
pub struct IngestLoop {
    follower: Option<Follower>,
    reopen: Reopen,
    settler: Settler,
    retry: Duration,
    retry_at: Option<Instant>,
    rescan: bool,
    compact: Option<CompactPolicy>,
    /// The follower's excluded folders, kept for a reopened one.
    excluded: Vec<PathBuf>,
}

impl IngestLoop {
    /// A loop around an open `follower` (its start-up scan done by the caller): files
    /// are ingested once unchanged for `settle`; after an error the dataset is reopened
    /// `retry` later with `reopen`; `compact` merges small shards after each batch.
    pub fn new(
        follower: Follower,
        reopen: Reopen,
        settle: Duration,
        retry: Duration,
        compact: Option<CompactPolicy>,
    ) -> Self {
        IngestLoop {
            excluded: follower.excluded().to_vec(),
            follower: Some(follower),
            reopen,
            settler: Settler::new(settle),
            retry,
            retry_at: None,
            rescan: false,
            compact,
        }
    }

    /// A path changed at `now`; `complete` when the change says the file is whole (a
    /// close after writing, a rename into place).
    pub fn note(&mut self, path: PathBuf, complete: bool, now: Instant) {
        if complete {
            self.settler.note_complete(path, now);
        } else {
            self.settler.note(path, now);
        }
    }

    /// Every watched folder is scanned at the next tick (events were lost).
    pub fn request_rescan(&mut self) {
        self.rescan = true;
    }

    /// True while the dataset is closed after an error.
    pub fn is_closed(&self) -> bool {
        self.follower.is_none()
    }

    /// One round at `now`: reopen the dataset when it is closed and the retry is due,
    /// then a rescan when asked for, else the settled paths; then compaction.
    pub fn tick(&mut self, now: Instant) -> Vec<IngestEvent> {
        let mut events = Vec::new();
        if self.follower.is_none() {
            if self.retry_at.is_some_and(|t| now < t) {
                return events;
            }
            let Reopen {
                data,
                roots,
                options,
            } = &self.reopen;
            match Follower::open(data, roots, options.clone()) {
                Ok(mut f) => {
                    f.exclude(self.excluded.iter().cloned());
                    self.follower = Some(f);
                    self.retry_at = None;
                    self.rescan = true;
                    events.push(IngestEvent::Reopened);
                }
                Err(error) => {
                    self.retry_at = Some(now + self.retry);
                    events.push(IngestEvent::ReopenFailed {
                        error,
                        retry_in: self.retry,
                    });
                    return events;
                }
            }
        }
        let follower = self.follower.as_mut().expect("opened above");
        let result = if std::mem::take(&mut self.rescan) {
            follower.scan_all().map(Some)
        } else {
            let ready = self.settler.take_ready(now);
            if ready.is_empty() {
                Ok(None)
            } else {
                // Paths lost to an error are taken again by the rescan after it.
                follower.apply(&ready).map(Some)
            }
        };
        let report = match result {
            Ok(Some(report)) => report,
            Ok(None) => return events,
            Err(error) => {
                self.close(now);
                events.push(IngestEvent::Failed {
                    error,
                    retry_in: self.retry,
                });
                return events;
            }
        };
        events.push(IngestEvent::Batch {
            changed: changed(&report),
            live_records: follower.live_records(),
            report,
        });
        if let Some(policy) = &self.compact {
            match follower.compact(policy) {
                Ok(Some(c)) => events.push(IngestEvent::Compacted(c)),
                Ok(None) => {}
                Err(error) => {
                    self.close(now);
                    events.push(IngestEvent::CompactionFailed {
                        error,
                        retry_in: self.retry,
                    });
                }
            }
        }
        events
    }

    /// Closes the dataset after an error; it is reopened `retry` after `now`.
    fn close(&mut self, now: Instant) {
        self.follower = None;
        self.retry_at = Some(now + self.retry);
    }
}

/// True when an ingest batch changed what training samples or how it is labelled.
pub fn changed(r: &IngestReport) -> bool {
    let s = &r.summary;
    s.ingested > 0 || s.retired > 0 || s.relabelled > 0 || !r.changes.is_empty()
}
