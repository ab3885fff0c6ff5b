//! The daemon's metrics in the Prometheus text format (prometheus-client), served over
//! HTTP at `/metrics` with `/healthz` beside it. The only module that knows the wire
//! format: the libraries report events and stats, this turns them into series.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::Context;
use byol_ingest::IngestReport;
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
    dataset_records: Gauge,
    loader_queue_depth: Gauge,
    last_checkpoint: FloatGauge,
    training_paused: Gauge,
    train_images: Counter,
    ingest_files: Family<Labels, Counter>,
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
            dataset_records: Gauge::default(),
            loader_queue_depth: Gauge::default(),
            last_checkpoint: FloatGauge::default(),
            training_paused: Gauge::default(),
            train_images: Counter::default(),
            ingest_files: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "byol_train_step",
            "Optimizer steps done",
            m.train_step.clone(),
        );
        registry.register(
            "byol_train_loss",
            "BYOL loss of the last step (symmetric, in [0, 8])",
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
        // Every outcome exists from the start (at 0), so rates are defined at once.
        for outcome in OUTCOMES {
            m.ingest_files
                .get_or_create(&outcome_label(outcome))
                .inc_by(0);
        }
        Metrics { registry, ..m }
    }

    /// Follows the training loop.
    pub fn on_event(&self, e: &Event) {
        match e {
            Event::Step(r) => {
                self.train_step.set(r.stats.step as i64);
                self.train_loss.set(f64::from(r.stats.loss));
                self.learning_rate.set(r.stats.lr);
                self.ema_tau.set(r.stats.tau);
                self.loader_queue_depth.set(r.queue_depth as i64);
                self.train_images.inc_by(r.images as u64);
                self.training_paused.set(0);
            }
            Event::Checkpoint { .. } => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                self.last_checkpoint.set(now);
            }
            Event::Paused { .. } | Event::Waiting { .. } => {
                self.training_paused.set(1);
            }
            Event::Training { step } => {
                self.train_step.set(*step as i64);
                self.training_paused.set(0);
            }
            Event::Resumed { .. }
            | Event::RolledBack { .. }
            | Event::CheckpointFailed { .. }
            | Event::Heartbeat => {}
        }
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

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
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
                let response = match path.as_str() {
                    "/metrics" => {
                        tiny_http::Response::from_string(metrics.encode()).with_header(header(
                            "Content-Type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ))
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
}
