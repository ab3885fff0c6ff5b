//! The daemon as a service: the systemd notify protocol over a real `NOTIFY_SOCKET`
//! (the watchdog fed while paused too), the metrics endpoint parsed by real Prometheus
//! parsers in both formats it negotiates (the Python client's OpenMetrics and 0.0.4
//! text parsers, Debian's python3-prometheus-client), and the shipped unit file judged
//! by `systemd-analyze`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{byol, daemon_config, distinct_png};

/// The shared daemon config, logging and checkpointing often.
fn config(dir: &Path) -> String {
    daemon_config(
        dir,
        &[
            ("log_every = 5", "log_every = 2"),
            ("checkpoint_every_steps = 25", "checkpoint_every_steps = 4"),
            ("settle_secs = 0.4", "settle_secs = 0.2"),
        ],
    )
}

/// `GET path` on `addr` with an `Accept` header: the status line, the head and the body.
fn get(addr: &str, path: &str, accept: Option<&str>) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head.lines().next().unwrap().to_owned(),
        head.to_owned(),
        body.to_owned(),
    )
}

/// What Prometheus sends when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,\
    application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";

/// Families of an exposition as (name, type, samples as (name, labels, value)),
/// parsed by the Prometheus Python client's OpenMetrics parser (`openmetrics`) or its
/// 0.0.4 text parser.
fn parse_exposition(text: &str, openmetrics: bool) -> serde_json::Value {
    let module = if openmetrics {
        "prometheus_client.openmetrics.parser"
    } else {
        "prometheus_client.parser"
    };
    let script = format!(
        r#"
import json, sys
from {module} import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({{"name": f.name, "type": f.type,
                "samples": [[s.name, s.labels, s.value] for s in f.samples]}})
print(json.dumps(out))
"#
    );
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 runs (Debian's python3; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !stderr.contains("No module named 'prometheus_client'"),
        "Debian's python3-prometheus-client is not installed: scripts/test.sh installs \
         what the tests need (or apt-get install python3-prometheus-client)"
    );
    assert!(
        o.status.success(),
        "the Prometheus parser rejected the exposition:\n{stderr}\n{text}"
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A `NOTIFY_SOCKET` read on its own thread, as systemd reads it (a daemon blocks
/// when the socket's queue is full), with each message's arrival time.
struct NotifyListener {
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NotifyListener {
    fn bind(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, s) = (messages.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::SeqCst) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    m.lock().unwrap().push((Instant::now(), text));
                }
            }
        });
        NotifyListener {
            messages,
            stop,
            thread: Some(thread),
        }
    }

    /// The messages so far.
    fn texts(&self) -> Vec<String> {
        let m = self.messages.lock().unwrap();
        m.iter().map(|(_, t)| t.clone()).collect()
    }

    /// When each WATCHDOG=1 arrived.
    fn pings(&self) -> Vec<Instant> {
        let m = self.messages.lock().unwrap();
        m.iter()
            .filter(|(_, t)| t.contains("WATCHDOG=1"))
            .map(|(at, _)| *at)
            .collect()
    }
}

impl Drop for NotifyListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn notify_protocol_in_order_and_metrics_a_prometheus_parser_reads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("in/a")).unwrap();
    for i in 0..16 {
        std::fs::write(root.join(format!("in/a/{i}.png")), distinct_png(i)).unwrap();
    }
    std::fs::write(root.join("in/a/bad.png"), b"not a png").unwrap();
    let cfg = root.join("d.toml");
    std::fs::write(&cfg, config(root)).unwrap();
    let sock_path = root.join("notify.sock");
    let listener = NotifyListener::bind(&sock_path);
    let out_path = root.join("out.txt");
    let log = std::fs::File::create(&out_path).unwrap();
    let mut child = common::Reaped(
        byol()
            .args(["daemon", "--config", cfg.to_str().unwrap()])
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "200000")
            .env("BYOL_LOG_FORMAT", "json")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    // Until a few steps were reported over STATUS and the watchdog was fed.
    loop {
        let messages = listener.texts();
        let statuses = messages
            .iter()
            .filter(|m| m.contains("STATUS=step"))
            .count();
        if statuses >= 2 && messages.iter().any(|m| m.contains("WATCHDOG=1")) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "{messages:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = std::fs::read_to_string(&out_path).unwrap();
    let addr = out
        .lines()
        .find_map(|l| l.strip_prefix("metrics on http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in:\n{out}"))
        .to_owned();
    let (status, _, body) = get(&addr, "/healthz", None);
    assert!(status.contains("200"), "{status} {body}");
    // Asked for plain text, as an old scraper does: the 0.0.4 format, same families.
    let (status, head, plain) = get(&addr, "/metrics", Some("text/plain;version=0.0.4"));
    assert!(status.contains("200"), "{status}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let plain_families = parse_exposition(&plain, false);
    let (status, head, body) = get(&addr, "/metrics", Some(PROMETHEUS_ACCEPT));
    assert!(status.contains("200"), "{status}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    let families = parse_exposition(&body, true);
    let types = |f: &serde_json::Value| -> std::collections::BTreeMap<String, String> {
        f.as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().to_owned(),
                    f["type"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(types(&plain_families), types(&families), "{plain}\n{body}");
    let kind = |name: &str| {
        families
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no family {name} in:\n{body}"))
    };
    for gauge in [
        "byol_train_step",
        "byol_train_loss",
        "byol_learning_rate",
        "byol_ema_tau",
        "byol_embedding_collapse",
        "byol_embedding_effective_rank",
        "byol_dataset_records",
        "byol_loader_queue_depth",
        "byol_last_checkpoint_timestamp_seconds",
        "byol_training_paused",
    ] {
        assert_eq!(kind(gauge)["type"], "gauge", "{gauge}");
    }
    for counter in ["byol_train_images", "byol_ingest_files"] {
        assert_eq!(kind(counter)["type"], "counter", "{counter}");
    }
    let sample = |family: &str, name: &str, outcome: Option<&str>| -> f64 {
        kind(family)["samples"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s[0] == name && outcome.is_none_or(|o| s[1]["outcome"] == o))
            .unwrap_or_else(|| panic!("no sample {name} {outcome:?} in:\n{body}"))[2]
            .as_f64()
            .unwrap()
    };
    assert_eq!(
        sample("byol_dataset_records", "byol_dataset_records", None),
        16.0
    );
    assert_eq!(
        sample(
            "byol_ingest_files",
            "byol_ingest_files_total",
            Some("ingested")
        ),
        16.0
    );
    assert_eq!(
        sample(
            "byol_ingest_files",
            "byol_ingest_files_total",
            Some("rejected")
        ),
        1.0
    );
    assert!(sample("byol_train_images", "byol_train_images_total", None) >= 16.0);
    assert!(sample("byol_train_step", "byol_train_step", None) >= 2.0);
    assert!(
        sample(
            "byol_last_checkpoint_timestamp_seconds",
            "byol_last_checkpoint_timestamp_seconds",
            None
        ) > 1.7e9
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    // SAFETY: a signal to our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let messages = listener.texts();
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert!(status.success(), "{status}\n{out}");
    let first = |what: &str| {
        messages
            .iter()
            .position(|m| m.lines().any(|l| l.starts_with(what)))
            .unwrap_or_else(|| panic!("no {what} in {messages:?}"))
    };
    let (ready, watchdog, status_msg, stopping) = (
        first("READY=1"),
        first("WATCHDOG=1"),
        first("STATUS=step"),
        first("STOPPING=1"),
    );
    assert!(
        ready < watchdog && watchdog < stopping && ready <= status_msg && status_msg < stopping,
        "{messages:?}"
    );
    assert_eq!(messages.iter().filter(|m| m.contains("READY=1")).count(), 1);
    assert!(
        messages[stopping..]
            .iter()
            .all(|m| !m.contains("STATUS=step")),
        "progress after STOPPING=1: {messages:?}"
    );
    // The typed events, as JSON lines on stderr.
    for event in [
        "\"event\":\"ingest_batch\"",
        "\"event\":\"reject\"",
        "\"event\":\"checkpoint\"",
        "\"event\":\"stop\"",
    ] {
        assert!(out.contains(event), "no {event} in:\n{out}");
    }
}

/// Paused (nothing new) under systemd's watchdog: WATCHDOG=1 keeps arriving at least
/// every half interval, so systemd does not kill an idle daemon.
#[test]
fn the_watchdog_is_fed_while_paused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("in/a")).unwrap();
    for i in 0..8 {
        std::fs::write(root.join(format!("in/a/{i}.png")), distinct_png(i)).unwrap();
    }
    let cfg = root.join("d.toml");
    let text = daemon_config(root, &[("idle_after_epochs = 0", "idle_after_epochs = 1")]);
    std::fs::write(&cfg, text).unwrap();
    let sock_path = root.join("notify.sock");
    let listener = NotifyListener::bind(&sock_path);
    let watchdog = Duration::from_secs(2);
    let mut d = common::Daemon::start(
        &cfg,
        root.join("out.txt"),
        &[
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", watchdog.as_micros().to_string()),
        ],
    );
    d.wait_for("the pause", |o| o.contains("paused: nothing new"));
    let start = Instant::now();
    let end = start + 3 * watchdog;
    std::thread::sleep(end - start);
    let pings: Vec<Instant> = listener
        .pings()
        .into_iter()
        .filter(|t| (start..end).contains(t))
        .collect();
    let mut marks = vec![start];
    marks.extend(&pings);
    marks.push(end);
    let longest = marks.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest <= watchdog / 2,
        "paused, the longest time without WATCHDOG=1 was {longest:?} (interval {watchdog:?}, \
         {} pings):\n{}",
        pings.len(),
        d.output()
    );
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}

#[test]
fn the_unit_file_is_hardened_and_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/byol.service");
    let o = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs (Debian's systemd: scripts/test.sh installs it)");
    let text = String::from_utf8_lossy(&o.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for byol.service: ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{text}");
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let complaints: Vec<String> = String::from_utf8_lossy(&o.stderr)
        .lines()
        .filter(|l| !l.contains("/usr/local/bin/byol is not executable"))
        .map(str::to_owned)
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");
}
