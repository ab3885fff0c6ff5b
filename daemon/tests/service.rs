//! The daemon as a service: the systemd notify protocol over a real `NOTIFY_SOCKET`,
//! the metrics endpoint parsed by a real Prometheus parser (the Python client's
//! OpenMetrics parser, Debian's python3-prometheus-client), and the shipped unit file
//! judged by `systemd-analyze`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
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

/// `GET path` on `addr`: the status line and the body.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// Families of an exposition as (name, type, samples as (name, labels, value)),
/// parsed by the Prometheus Python client's OpenMetrics parser.
fn parse_openmetrics(text: &str) -> serde_json::Value {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({"name": f.name, "type": f.type,
                "samples": [[s.name, s.labels, s.value] for s in f.samples]})
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 runs (.ci/run installs python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "the Prometheus parser rejected the exposition (or python3-prometheus-client is \
         missing):\n{}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
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
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
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
    let mut messages: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    // Until a few steps were reported over STATUS and the watchdog was fed.
    while !(messages
        .iter()
        .filter(|m| m.contains("STATUS=step"))
        .count()
        >= 2
        && messages.iter().any(|m| m.contains("WATCHDOG=1")))
    {
        assert!(start.elapsed() < Duration::from_secs(120), "{messages:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let out = std::fs::read_to_string(&out_path).unwrap();
    let addr = out
        .lines()
        .find_map(|l| l.strip_prefix("metrics on http://"))
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("no metrics address in:\n{out}"))
        .to_owned();
    let (status, body) = get(&addr, "/healthz");
    assert!(status.contains("200"), "{status} {body}");
    let (status, body) = get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let families = parse_openmetrics(&body);
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
    while let Ok(n) = sock.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
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

#[test]
fn the_unit_file_is_hardened_and_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/byol.service");
    let o = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs (Debian's systemd)");
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
