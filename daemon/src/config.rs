//! The TOML config file (`configs/default.toml` documents every key).

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The whole config file. Unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Settings of `byol ingest`.
    #[serde(default)]
    pub ingest: byol_ingest::IngestConfig,
    /// BYOL's two views (`preset`, `size`, `view1`, `view2`); see `configs/default.toml`.
    #[serde(default)]
    pub augment: Option<byol_augment::AugmentConfig>,
    /// Batches: size, seed, threads, order, sampling policy.
    #[serde(default)]
    pub loader: byol_loader::LoaderConfig,
    /// Encoder, projector and predictor.
    #[serde(default)]
    pub model: byol_trainer::ModelConfig,
    /// Optimizer and schedules.
    #[serde(default)]
    pub optim: byol_trainer::OptimConfig,
    /// Method, device, seed, length, logging and checkpoints.
    #[serde(default)]
    pub train: byol_trainer::TrainConfig,
    /// BYOL's settings (`tau_base`).
    #[serde(default)]
    pub byol: byol_trainer::ByolConfig,
    /// MSF's settings (`k`, `bank_size`, `tau`, `tau_cosine`).
    #[serde(default)]
    pub msf: byol_trainer::MsfConfig,
    /// SimSiam's settings (`bottleneck`, `output_bn`).
    #[serde(default)]
    pub simsiam: byol_trainer::SimSiamConfig,
    /// SimCLR's settings (`temperature`).
    #[serde(default)]
    pub simclr: byol_trainer::SimClrConfig,
    /// Barlow Twins' settings (`lambda`).
    #[serde(default)]
    pub barlow_twins: byol_trainer::BarlowTwinsConfig,
    /// MoCo v2's settings (`queue_size`, `temperature`, `tau`).
    #[serde(default)]
    pub mocov2: byol_trainer::MocoV2Config,
    /// Optional kNN accuracy on small labelled datasets while training.
    #[serde(default)]
    pub monitor: Option<byol_run::MonitorConfig>,
    /// `byol daemon`: watched folders, dataset and run folders, idle and watch knobs.
    #[serde(default)]
    pub daemon: Option<DaemonConfig>,
    /// The file sets `[optim] schedule` (an unset one means `constant` in the daemon).
    #[serde(skip)]
    pub schedule_written: bool,
}

/// The `[daemon]` table (`configs/default.toml` documents every key).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Folders watched recursively: a path, or `{ path, layout }`.
    pub watch: Vec<WatchEntry>,
    /// Dataset folder the daemon ingests into.
    pub data: PathBuf,
    /// Run folder (checkpoints, metrics, encoder-latest.safetensors).
    pub run: PathBuf,
    /// Address of the metrics endpoint (`/metrics`, `/healthz`); loopback unless
    /// `allow_remote_metrics`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Let `listen` be a non-loopback address (anyone who reaches it reads the metrics).
    #[serde(default)]
    pub allow_remote_metrics: bool,
    /// Seconds before a failed ingest (the dataset reopened), checkpoint or metrics
    /// write is tried again (a full disk).
    #[serde(default = "default_retry")]
    pub retry_secs: f64,
    /// Seconds a file's size and mtime must stay unchanged before it is ingested.
    #[serde(default = "default_settle")]
    pub settle_secs: f64,
    /// Poll the folders instead of using inotify (network filesystems); also the
    /// fallback when a watch cannot be registered.
    #[serde(default)]
    pub poll: bool,
    /// Seconds between two polls.
    #[serde(default = "default_poll_interval")]
    pub poll_interval_secs: f64,
    /// Pause training after this many epochs without new data (0: never).
    #[serde(default = "default_idle")]
    pub idle_after_epochs: u64,
    /// New records are sampled within this many steps of their commit (sets
    /// `[loader] refresh_every_batches` when that is 0).
    #[serde(default = "default_new_data_within")]
    pub new_data_within_steps: u64,
    /// Threads for ingest and the loader together (0: one per core); ingest gets
    /// half, at a lower priority.
    #[serde(default)]
    pub threads: usize,
    /// Share of the time ingest workers may work while training runs, in (0, 1]:
    /// they rest in proportion after each file (cache and memory bandwidth for training).
    #[serde(default = "default_duty")]
    pub ingest_duty: f64,
    /// Compact in the background once this many small shards lie side by side (waves
    /// leave one each); 0 never compacts.
    #[serde(default = "default_compact")]
    pub compact_min_shards: usize,
    /// Seconds a stop (SIGTERM/SIGINT) may take to finish the step and checkpoint
    /// before the process exits anyway.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: f64,
}

/// `path` made absolute and resolved as far as it exists (a folder not made yet is
/// judged by its nearest existing parent).
fn resolved(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let mut rest = Vec::new();
    let mut at = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(at) {
            return rest.iter().rev().fold(c, |p, r| p.join(r));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                at = parent;
            }
            _ => return abs,
        }
    }
}

impl DaemonConfig {
    /// The folders the daemon writes, by name: `("dataset folder", data)`, `("run
    /// folder", run)`; everything under them is never ingested.
    fn own_folders(&self) -> [(&'static str, &Path); 2] {
        [("dataset folder", &self.data), ("run folder", &self.run)]
    }

    /// A watched folder at or inside a folder the daemon writes (nothing in it would
    /// ever be ingested): the error that says so.
    fn check_own_folders(&self, layout: byol_ingest::Layout) -> anyhow::Result<()> {
        for entry in &self.watch {
            let (path, _) = entry.resolve(layout);
            let w = resolved(&path);
            for (what, own) in self.own_folders() {
                let o = resolved(own);
                anyhow::ensure!(
                    !w.starts_with(&o),
                    "[daemon] watch: {} is inside the {what} {}, which holds the daemon's own \
                     files and is never ingested; watch a folder outside it",
                    path.display(),
                    own.display()
                );
            }
        }
        Ok(())
    }

    /// What `byol validate` and the daemon say about a folder the daemon writes inside
    /// a watched folder: it is never ingested.
    pub fn own_folder_notes(&self, layout: byol_ingest::Layout) -> Vec<String> {
        let mut notes = Vec::new();
        for entry in &self.watch {
            let (path, _) = entry.resolve(layout);
            let w = resolved(&path);
            for (what, own) in self.own_folders() {
                if resolved(own).starts_with(&w) {
                    notes.push(format!(
                        "the {what} {} is inside the watched folder {}: the daemon's own files \
                         are never ingested",
                        own.display(),
                        path.display()
                    ));
                }
            }
        }
        notes
    }

    /// The metrics endpoint's address.
    pub fn listen_addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.listen
            .parse()
            .with_context(|| format!("[daemon] listen: {:?} is not an address:port", self.listen))
    }
}

/// One watched folder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum WatchEntry {
    /// A folder with `[ingest] layout`.
    Path(PathBuf),
    /// A folder with its own layout.
    Folder {
        /// The folder.
        path: PathBuf,
        /// `auto`, `imagefolder` or `flat`.
        layout: Option<byol_ingest::Layout>,
    },
}

impl WatchEntry {
    /// The folder and its layout (`default` when it sets none).
    pub fn resolve(&self, default: byol_ingest::Layout) -> (PathBuf, byol_ingest::Layout) {
        match self {
            WatchEntry::Path(p) => (p.clone(), default),
            WatchEntry::Folder { path, layout } => (path.clone(), layout.unwrap_or(default)),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_duty() -> f64 {
    0.5
}
fn default_compact() -> usize {
    8
}
fn default_retry() -> f64 {
    30.0
}
fn default_settle() -> f64 {
    2.0
}
fn default_poll_interval() -> f64 {
    5.0
}
fn default_idle() -> u64 {
    3
}
fn default_new_data_within() -> u64 {
    100
}
fn default_stop_timeout() -> f64 {
    90.0
}

impl Config {
    /// Reads and parses a config file (unknown keys are errors).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut cfg: Config =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        let table: toml::Table = toml::from_str(&text)?;
        cfg.schedule_written = table.get("optim").and_then(|o| o.get("schedule")).is_some();
        let mut trainer = cfg.trainer();
        if let Some(warning) = trainer
            .resolve_deprecated()
            .with_context(|| format!("invalid config {}", path.display()))?
        {
            tracing::warn!("{}: {warning}", path.display());
            (cfg.optim, cfg.byol) = (trainer.optim, trainer.byol);
        }
        Ok(cfg)
    }

    /// Reads a config for `byol daemon`: an unset `[optim] schedule` means `constant`
    /// (open-ended training); a written `cosine` stays, for [`Config::validate`] to
    /// refuse by name.
    pub fn load_for_daemon(path: &Path) -> anyhow::Result<Self> {
        Ok(Config::load(path)?.for_daemon())
    }

    /// This config as `byol daemon` reads it (see [`Config::load_for_daemon`]).
    pub fn for_daemon(mut self) -> Self {
        if !self.schedule_written {
            self.optim.schedule = byol_trainer::Schedule::Constant;
        }
        self
    }

    /// The trainer's part.
    pub fn trainer(&self) -> byol_trainer::TrainerConfig {
        byol_trainer::TrainerConfig {
            model: self.model.clone(),
            optim: self.optim.clone(),
            train: self.train.clone(),
            byol: self.byol.clone(),
            msf: self.msf.clone(),
            simsiam: self.simsiam.clone(),
            simclr: self.simclr.clone(),
            barlow_twins: self.barlow_twins.clone(),
            mocov2: self.mocov2.clone(),
        }
    }

    /// Checks every value a run reads, naming the table and key of the first bad one;
    /// with `daemon`, also the `[daemon]` table and an open-ended schedule.
    pub fn validate(&self, daemon: bool) -> anyhow::Result<()> {
        self.trainer().validate()?;
        self.loader.validate().context("invalid [loader]")?;
        byol_augment::Augmenter::new(self.augment.clone().unwrap_or_default())
            .context("invalid [augment]")?;
        self.ingest.ingester_options().context("invalid [ingest]")?;
        if !daemon {
            return Ok(());
        }
        let d = self
            .daemon
            .as_ref()
            .context("no [daemon] table: byol daemon needs watch, data and run")?;
        byol_run::continuous::check_schedule(&self.optim)?;
        anyhow::ensure!(
            !d.watch.is_empty(),
            "[daemon] watch: name at least one folder"
        );
        for entry in &d.watch {
            let (path, _) = entry.resolve(self.ingest.layout());
            anyhow::ensure!(
                path.is_dir(),
                "[daemon] watch: {} is not a folder",
                path.display()
            );
        }
        d.check_own_folders(self.ingest.layout())?;
        let secs = |key: &str, v: f64| {
            anyhow::ensure!(
                v.is_finite() && v >= 0.0,
                "[daemon] {key}: must be a non-negative number of seconds, not {v}"
            );
            Ok(())
        };
        secs("settle_secs", d.settle_secs)?;
        secs("poll_interval_secs", d.poll_interval_secs)?;
        secs("stop_timeout_secs", d.stop_timeout_secs)?;
        secs("retry_secs", d.retry_secs)?;
        anyhow::ensure!(
            d.ingest_duty > 0.0 && d.ingest_duty <= 1.0,
            "[daemon] ingest_duty: must be in (0, 1], not {}",
            d.ingest_duty
        );
        anyhow::ensure!(
            d.poll_interval_secs > 0.0,
            "[daemon] poll_interval_secs: must be above 0"
        );
        let addr = d.listen_addr()?;
        anyhow::ensure!(
            addr.ip().is_loopback() || d.allow_remote_metrics,
            "[daemon] listen: {addr} is not a loopback address; set allow_remote_metrics = true \
             to serve metrics beyond this machine"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let cfg = Config::load(&path).unwrap();
                cfg.validate(false)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            }
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<Config>("[ingest]\nmax_sid = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_sid"), "{err}");
        assert!(toml::from_str::<Config>("[ingset]\n").is_err());
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.toml");
        let watch = dir.path().join("in");
        std::fs::create_dir_all(&watch).unwrap();
        let daemon = format!(
            "[daemon]\nwatch = [\"{}\"]\ndata = \"{}\"\nrun = \"{}\"\n",
            watch.display(),
            dir.path().join("data").display(),
            dir.path().join("run").display()
        );
        std::fs::write(&path, format!("{text}\n{daemon}")).unwrap();
        (dir, path)
    }

    /// A daemon config that names no schedule trains with `constant`; one that writes
    /// `cosine` is refused, naming the key.
    #[test]
    fn an_unset_daemon_schedule_is_constant_and_a_written_cosine_is_refused() {
        let (_dir, path) = write("[optim]\nbase_lr = 0.1\n");
        let cfg = Config::load_for_daemon(&path).unwrap();
        assert_eq!(cfg.optim.schedule, byol_trainer::Schedule::Constant);
        cfg.validate(true).unwrap();
        let (_dir, path) = write("[optim]\nschedule = \"cosine\"\n");
        let err = Config::load_for_daemon(&path)
            .unwrap()
            .validate(true)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("[optim] schedule = \"cosine\""),
            "{err:#}"
        );
    }

    /// A daemon config watching `watch` into `data` and `run`.
    fn layout(watch: &Path, data: &Path, run: &Path) -> Config {
        let text = format!(
            "[daemon]\nwatch = [\"{}\"]\ndata = \"{}\"\nrun = \"{}\"\n",
            watch.display(),
            data.display(),
            run.display()
        );
        toml::from_str::<Config>(&text).unwrap().for_daemon()
    }

    /// What the daemon writes is never its data: a watched folder that holds the run or
    /// dataset folder is noted; one at or inside either is refused, naming both, even
    /// before the run folder exists and through a symlink.
    #[test]
    fn a_watched_folder_inside_the_daemons_own_folders_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("in")).unwrap();
        std::fs::create_dir_all(root.join("run/inbox")).unwrap();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::os::unix::fs::symlink(root.join("run/inbox"), root.join("linked")).unwrap();
        let layout_of = |c: &Config| c.ingest.layout();
        // The run and dataset folders inside the watched folder (one not made yet).
        let cfg = layout(
            &root.join("in"),
            &root.join("in/data"),
            &root.join("in/run"),
        );
        cfg.validate(true).unwrap();
        let notes = cfg
            .daemon
            .as_ref()
            .unwrap()
            .own_folder_notes(layout_of(&cfg));
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[1].contains("run folder") && notes[1].contains("never ingested"));
        // Siblings: nothing to say.
        let cfg = layout(&root.join("in"), &root.join("data"), &root.join("run2"));
        cfg.validate(true).unwrap();
        assert!(
            cfg.daemon
                .as_ref()
                .unwrap()
                .own_folder_notes(layout_of(&cfg))
                .is_empty()
        );
        // Watched folders at or inside the run or dataset folder.
        for (watch, what) in [
            (root.join("run/inbox"), "run folder"),
            (root.join("linked"), "run folder"),
            (root.join("data"), "dataset folder"),
        ] {
            let cfg = layout(&watch, &root.join("data"), &root.join("run"));
            let err = format!("{:#}", cfg.validate(true).unwrap_err());
            assert!(
                err.contains(what) && err.contains("never ingested"),
                "{err}"
            );
        }
    }
}
