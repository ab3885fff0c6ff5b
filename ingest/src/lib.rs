//! Packs image folders, image files, IDX files and WebDataset shards into memory-mapped, zstd-compressed
//! shards with a manifest, and reads them back.
//!
//! - [`shard`]: the shard file format, writer and reader (specified in `FORMAT.md`);
//! - [`manifest`]: the dataset manifest, the single source of truth;
//! - [`ingest()`]: the incremental, parallel, crash-safe ingest run, which reconciles
//!   the dataset with its sources (vanished files retired, moved files relabelled);
//! - [`Ingester`]: the engine under it, a dataset opened for writing file by file (add,
//!   retire, relabel, commit), for long-lived ingesters;
//! - [`Follower`]: an [`Ingester`] kept in step with watched folders, path by path
//!   (the daemon's), and [`Settler`], which decides when a changed file is complete;
//! - [`IngestLoop`]: the daemon's ingest loop (settle, apply, rescan, reopen after an
//!   error, compact) as a state machine that reports [`IngestEvent`]s;
//! - [`Dataset`]: a packed dataset opened for reading;
//! - [`inspect`]: statistics and verification of a dataset.
//!
//! ```no_run
//! use byol_ingest::{Dataset, IngestOptions, NoProgress, ingest};
//! let opts = IngestOptions::new(vec!["photos/".into()], "dataset/".into());
//! let report = ingest(&opts, &NoProgress)?;
//! println!("{} records added", report.summary.ingested);
//! let ds = Dataset::open("dataset/".as_ref())?;
//! println!("{} records in {} shards", ds.len(), ds.shards().len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod change;
mod config;
pub mod dataset;
pub mod decode;
mod encode;
pub mod fault;
pub mod follow;
pub mod fsutil;
mod gone;
pub mod idx;
mod ingest;
pub mod ingest_loop;
mod ingester;
pub mod inspect;
pub mod manifest;
mod pipeline;
pub mod reject;
pub mod settle;
pub mod shard;
pub mod source;
pub mod webdataset;

pub use change::SourceChange;
pub use config::IngestConfig;
pub use dataset::{Dataset, DatasetError, RecordRef, RecordScratch, Sample};
pub use decode::DecodeLimits;
pub use follow::{Follower, WatchRoot};
pub use ingest::{
    IngestError, IngestOptions, IngestReport, IngestSummary, NoProgress, Progress, RootReport,
    SettingsOverride, ingest,
};
pub use ingest_loop::{IngestEvent, IngestLoop, Reopen};
pub use ingester::{
    CompactPolicy, CompactReport, Ingester, IngesterOptions, LOCK_FILE, lower_thread_priority,
};
pub use manifest::{IngestSettings, Manifest};
pub use reject::{Reject, RejectReason};
pub use settle::Settler;
pub use shard::{Codec, Compression};
pub use source::Layout;
