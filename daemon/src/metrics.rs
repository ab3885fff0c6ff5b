//! The daemon's metrics (prometheus-client), served over HTTP at `/metrics` with
//! `/healthz` beside it. The only module that knows the wire format: the libraries
//! report events and stats, this turns them into series.
//!
//! `/metrics` negotiates its format by `Accept`, as Prometheus' own clients do: the
//! OpenMetrics text when the scraper names `application/openmetrics-text` (Prometheus
//! does, preferring it), else the Prometheus text format 0.0.4.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;
use byol_ingest::IngestReport;
use byol_ingest::fsutil::FailureKind;
use byol_run::continuous::Event;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

type FloatGauge = Gauge<f64, AtomicU64>;
type Labels = Vec<(String, String)>;

/// The `outcome` label values of `byol_ingest_files_total`.
const OUTCOMES: [&str; 4] = ["ingested", "rejected", "retired", "relabelled"];

fn outcome_label(outcome: &str) -> Labels {
    vec![("outcome".to_owned(), outcome.to_owned())]
}

/// Every series the daemon exports.
pub struct Metrics {
    registry: Registry,
    train_step: Gauge,
    train_loss: FloatGauge,
    learning_rate: FloatGauge,
    ema_tau: FloatGauge,
    embedding_collapse: FloatGauge,
    embedding_effective_rank: FloatGauge,
    memory_entries: Gauge,
    memory_capacity: Gauge,
    dataset_records: Gauge,
    loader_queue_depth: Gauge,
    last_checkpoint: FloatGauge,
    training_paused: Gauge,
    train_images: Counter,
    ingest_files: Family<Labels, Counter>,
    failures: Family<Labels, Counter>,
}

/// The `operation` label values of `byol_failures_total`.
const OPERATIONS: [&str; 6] = [
    "checkpoint",
    "prune",
    "export",
    "metrics",
    "ingest",
    "compaction",
];

fn failure_labels(operation: &str, kind: FailureKind) -> Labels {
    vec![
        ("operation".to_owned(), operation.to_owned()),
        ("kind".to_owned(), kind.as_str().to_owned()),
    ]
}

impl Metrics {
    /// The registry with every series at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            train_step: Gauge::default(),
            train_loss: FloatGauge::default(),
            learning_rate: FloatGauge::default(),
            ema_tau: FloatGauge::default(),
            embedding_collapse: FloatGauge::default(),
            embedding_effective_rank: FloatGauge::default(),
            memory_entries: Gauge::default(),
            memory_capacity: Gauge::default(),
            dataset_records: Gauge::default(),
            loader_queue_depth: Gauge::default(),
            last_checkpoint: FloatGauge::default(),
            training_paused: Gauge::default(),
            train_images: Counter::default(),
            ingest_files: Family::default(),
            failures: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "byol_train_step",
            "Optimizer steps done",
            m.train_step.clone(),
        );
        registry.register(
            "byol_train_loss",
            "Loss of the last step (BYOL: symmetric, in [0, 8])",
            m.train_loss.clone(),
        );
        registry.register(
            "byol_learning_rate",
            "Learning rate of the last step",
            m.learning_rate.clone(),
        );
        registry.register(
            "byol_ema_tau",
            "EMA coefficient of the target network at the last step",
            m.ema_tau.clone(),
        );
        registry.register(
            "byol_embedding_collapse",
            "Collapse indicator of the embeddings at the last log step (about 1 spread, 0 collapsed)",
            m.embedding_collapse.clone(),
        );
        registry.register(
            "byol_embedding_effective_rank",
            "Effective rank of the embeddings at the last log step (RankMe; 1 collapsed)",
            m.embedding_effective_rank.clone(),
        );
        registry.register(
            "byol_objective_memory_entries",
            "Filled entries of the objective's memory (MSF's bank, MoCo's queue)",
            m.memory_entries.clone(),
        );
        registry.register(
            "byol_objective_memory_capacity",
            "Entries of the objective's memory when full (msf.bank_size, mocov2.queue_size)",
            m.memory_capacity.clone(),
        );
        registry.register(
            "byol_dataset_records",
            "Live records in the dataset",
            m.dataset_records.clone(),
        );
        registry.register(
            "byol_loader_queue_depth",
            "Finished batches waiting for the trainer",
            m.loader_queue_depth.clone(),
        );
        registry.register_with_unit(
            "byol_last_checkpoint_timestamp",
            "Unix time of the last checkpoint",
            Unit::Seconds,
            m.last_checkpoint.clone(),
        );
        registry.register(
            "byol_training_paused",
            "1 while training waits for new data (idle), else 0",
            m.training_paused.clone(),
        );
        registry.register(
            "byol_train_images",
            "Images trained on (each gives two views)",
            m.train_images.clone(),
        );
        registry.register(
            "byol_ingest_files",
            "Files handled by the ingester, by outcome",
            m.ingest_files.clone(),
        );
        registry.register(
            "byol_failures",
            "Failed jobs by operation (checkpoint, prune, export, metrics, ingest, compaction) \
             and kind (disk_full, permission_denied, read_only, damaged, other)",
            m.failures.clone(),
        );
        // Every outcome exists from the start (at 0), so rates are defined at once.
        for outcome in OUTCOMES {
            m.ingest_files
                .get_or_create(&outcome_label(outcome))
                .inc_by(0);
        }
        for operation in OPERATIONS {
            for kind in FailureKind::ALL {
                m.failures
                    .get_or_create(&failure_labels(operation, kind))
                    .inc_by(0);
            }
        }
        Metrics { registry, ..m }
    }

    /// Follows the training loop.
    pub fn on_event(&self, e: &Event) {
        match e {
            Event::Step(r) => {
                self.train_step.set(r.stats.step as i64);
                self.learning_rate.set(r.stats.lr);
                if let Some(tau) = r.stats.objective.tau {
                    self.ema_tau.set(tau);
                }
                if let Some(m) = r.memory {
                    self.memory_entries.set(m.filled as i64);
                    self.memory_capacity.set(m.capacity as i64);
                }
                if let Some(line) = &r.line {
                    // The loss is read from the device at log steps only.
                    self.train_loss.set(f64::from(line.loss));
                    self.embedding_collapse.set(f64::from(line.collapse));
                    self.embedding_effective_rank
                        .set(f64::from(line.effective_rank));
                }
                self.loader_queue_depth.set(r.queue_depth as i64);
                self.train_images.inc_by(r.images as u64);
                self.training_paused.set(0);
            }
            // A resumed run's last checkpoint is the one it resumed from.
            Event::Resumed { unix_secs, .. } => {
                self.last_checkpoint.set(*unix_secs);
            }
            Event::Checkpoint(c) => {
                self.last_checkpoint.set(c.unix_secs);
            }
            Event::Failed {
                operation, error, ..
            } => self.on_failure(operation.as_str(), error.kind()),
            Event::Paused { .. } | Event::Waiting { .. } => {
                self.training_paused.set(1);
            }
            Event::Training { step } => {
                self.train_step.set(*step as i64);
                self.training_paused.set(0);
            }
            Event::RolledBack { .. } | Event::MemoryFilling { .. } | Event::Heartbeat => {}
        }
    }

    /// Counts a failed job (`operation`: an [`OPERATIONS`] value).
    pub fn on_failure(&self, operation: &str, kind: FailureKind) {
        self.failures
            .get_or_create(&failure_labels(operation, kind))
            .inc();
    }

    /// Follows the ingester: counts by outcome, and the dataset's live records.
    pub fn on_ingest(&self, r: &IngestReport, live_records: u64) {
        let s = &r.summary;
        let counts = [s.ingested, s.rejected_total(), s.retired, s.relabelled];
        for (outcome, n) in OUTCOMES.into_iter().zip(counts) {
            self.ingest_files
                .get_or_create(&outcome_label(outcome))
                .inc_by(n);
        }
        self.dataset_records.set(live_records as i64);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The exposition in `format`.
    pub fn encode_as(&self, format: Format) -> String {
        match format {
            Format::OpenMetrics => self.encode(),
            Format::Text004 => openmetrics_to_text004(&self.encode()),
        }
    }
}

/// An exposition format of `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Text004,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a quality at least that of `text/plain`,
    /// else 0.0.4 (also without the header), as Prometheus' clients negotiate.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let (mut openmetrics, mut text) = (0.0f64, 0.0f64);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|v| v.parse::<f64>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The 0.0.4 text of an OpenMetrics exposition: a counter family's `# HELP` and
/// `# TYPE` name its `_total` sample, and the `# UNIT` lines and `# EOF` go (0.0.4 has
/// neither). Samples are the same lines.
fn openmetrics_to_text004(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Serves `/metrics` and `/healthz` on `addr` from a thread; returns the address bound
/// (port 0 picks a free one) and the thread. `/healthz` answers 200 while `healthy`.
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    healthy: Arc<AtomicBool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .context("metrics server has no IP address")?;
    let thread = std::thread::Builder::new()
        .name("byol-metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let path = request.url().split('?').next().unwrap_or("").to_owned();
                let accept = request
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Accept"))
                    .map(|h| h.value.as_str().to_owned());
                let response = match path.as_str() {
                    "/metrics" => {
                        let format = Format::negotiate(accept.as_deref());
                        tiny_http::Response::from_string(metrics.encode_as(format))
                            .with_header(header("Content-Type", format.content_type()))
                    }
                    "/healthz" if healthy.load(Ordering::SeqCst) => {
                        tiny_http::Response::from_string("ok\n")
                    }
                    "/healthz" => {
                        tiny_http::Response::from_string("stopping\n").with_status_code(503)
                    }
                    _ => tiny_http::Response::from_string("not found\n").with_status_code(404),
                };
                let _ = request.respond(response);
            }
        })
        .context("cannot start the metrics thread")?;
    Ok((bound, thread))
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid header")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every series the shipped Grafana dashboard queries is one the daemon exports.
    #[test]
    fn the_dashboard_queries_only_exported_series() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/grafana-byol.json");
        let dash: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let exported = Metrics::new().encode();
        let mut queried = 0;
        for panel in dash["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for name in expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("byol_"))
                {
                    queried += 1;
                    // A counter's family is named without its `_total` suffix.
                    let family = name.strip_suffix("_total").unwrap_or(name);
                    assert!(
                        exported.contains(&format!("# TYPE {family} ")),
                        "{name} is not exported:\n{exported}"
                    );
                }
            }
        }
        assert!(queried >= 10);
    }

    #[test]
    fn accept_picks_the_format_as_prometheus_clients_do() {
        let prometheus = "application/openmetrics-text;version=1.0.0;q=0.5,\
                          application/openmetrics-text;version=0.0.1;q=0.4,\
                          text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; version=1.0.0")),
            Format::OpenMetrics
        );
        for plain in [
            None,
            Some("text/plain;version=0.0.4"),
            Some("*/*"),
            Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"),
            Some("application/openmetrics-text;q=0"),
        ] {
            assert_eq!(Format::negotiate(plain), Format::Text004, "{plain:?}");
        }
    }

    #[test]
    fn the_004_text_names_counters_by_their_samples_and_drops_units_and_eof() {
        let text = Metrics::new().encode_as(Format::Text004);
        assert!(
            text.contains("# TYPE byol_train_images_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP byol_train_images_total "), "{text}");
        assert!(text.contains("# TYPE byol_train_step gauge\n"), "{text}");
        assert!(
            !text.contains("# UNIT") && !text.contains("# EOF"),
            "{text}"
        );
        assert!(text.contains("\nbyol_train_images_total 0\n"), "{text}");
    }

    /// A logged step sets loss, τ and the embedding gauges; a step without a line keeps
    /// the loss and embedding gauges (they are read from the device at log steps only).
    #[test]
    fn a_logged_step_sets_the_embedding_gauges() {
        let m = Metrics::new();
        let stats = byol_trainer::StepStats {
            step: 20,
            lr: 0.1,
            objective: byol_trainer::ObjectiveStats { tau: Some(0.99) },
        };
        let line = byol_run::MetricsLine {
            step: 20,
            epoch: 0,
            loss: 1.5,
            lr: 0.1,
            tau: Some(0.99),
            collapse: 0.75,
            effective_rank: 12.5,
            images_per_sec: 100.0,
            data_wait_secs: 0.0,
            elapsed_secs: 10.0,
            skipped_records: 0,
            knn_accuracy: None,
            knn_skipped_records: None,
        };
        let report = |line: Option<byol_run::MetricsLine>| byol_run::StepReport {
            stats,
            epoch: 0,
            images: 256,
            logged: line.is_some(),
            line,
            checkpoint: None,
            metrics_error: None,
            queue_depth: 1,
            memory: Some(byol_trainer::objective::MemoryFill {
                filled: 96,
                capacity: 4096,
            }),
        };
        m.on_event(&Event::Step(&report(Some(line))));
        m.on_event(&Event::Step(&report(None)));
        let text = m.encode();
        for sample in [
            "\nbyol_embedding_collapse 0.75\n",
            "\nbyol_embedding_effective_rank 12.5\n",
            "\nbyol_ema_tau 0.99\n",
            "\nbyol_train_loss 1.5\n",
            "\nbyol_objective_memory_entries 96\n",
            "\nbyol_objective_memory_capacity 4096\n",
        ] {
            assert!(text.contains(sample), "{sample:?} in\n{text}");
        }
    }

    /// A restarted daemon's dashboard shows the checkpoint it resumed from, not 1970.
    #[test]
    fn a_resume_sets_the_last_checkpoint_time_to_the_checkpoints() {
        let m = Metrics::new();
        let path = std::path::Path::new("/run/checkpoints/step-0000000010");
        m.on_event(&Event::Resumed {
            path,
            step: 10,
            unix_secs: 1_790_000_000.0,
            skipped: &[],
        });
        let text = m.encode();
        assert!(
            text.contains("\nbyol_last_checkpoint_timestamp_seconds 1790000000.0\n"),
            "{text}"
        );
    }

    /// Each failed job counts under its own operation and kind.
    #[test]
    fn failures_count_by_operation_and_kind() {
        let m = Metrics::new();
        let error = byol_run::RunError::Io {
            path: "/run/metrics.jsonl".into(),
            source: std::io::Error::from(std::io::ErrorKind::StorageFull),
        };
        m.on_event(&Event::Failed {
            operation: byol_run::Operation::Metrics,
            error: &error,
            retry_in: None,
        });
        let text = m.encode();
        assert!(
            text.contains("byol_failures_total{operation=\"metrics\",kind=\"disk_full\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("byol_failures_total{operation=\"checkpoint\",kind=\"disk_full\"} 0\n"),
            "{text}"
        );
    }
}
