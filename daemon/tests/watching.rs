//! Watched folders that change under the daemon: the folder itself replaced
//! (`mv in in.old; mkdir in`), and inotify's watch limit reached by a new sub-folder
//! while the daemon runs (inside a user namespace whose limit the test lowers, so the
//! machine's own limit is untouched). In both, files written afterwards reach the
//! dataset.

mod common;

use std::process::Command;

use common::{Daemon, daemon_config, distinct_png, live_records, machine_allows};

#[test]
fn a_replaced_watched_folder_is_watched_again() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    std::fs::create_dir_all(watch.join("a")).unwrap();
    for i in 0..8 {
        std::fs::write(watch.join(format!("a/{i}.png")), distinct_png(i)).unwrap();
    }
    let cfg = root.join("d.toml");
    std::fs::write(&cfg, daemon_config(root, &[])).unwrap();
    let mut d = Daemon::start(&cfg, root.join("out.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    std::fs::rename(&watch, root.join("in.old")).unwrap();
    std::fs::create_dir_all(watch.join("b")).unwrap();
    d.wait_for("the re-watch", |o| {
        o.contains("was replaced; watching the new folder")
    });
    for i in 100..108 {
        std::fs::write(watch.join(format!("b/{i}.png")), distinct_png(i)).unwrap();
    }
    // The new folder's files are in; the old folder's files are gone from it.
    d.wait_for("the new folder's files", |_| {
        common::dataset_sources(&root.join("data"))
            .values()
            .filter(|(_, label)| label.as_deref() == Some("b"))
            .count()
            == 8
    });
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}

#[test]
fn a_sub_folder_past_the_watch_limit_is_polled() {
    let probe = "echo 64 > /proc/sys/user/max_inotify_watches";
    if !machine_allows(
        Command::new("unshare").args(["-U", "-r", "sh", "-c", probe]),
        "lower the inotify watch limit in a user namespace",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    std::fs::create_dir_all(watch.join("a")).unwrap();
    for i in 0..8 {
        std::fs::write(watch.join(format!("a/{i}.png")), distinct_png(i)).unwrap();
    }
    let cfg = root.join("d.toml");
    let text = daemon_config(
        root,
        &[(
            "settle_secs = 0.4",
            "settle_secs = 0.2\npoll_interval_secs = 0.3",
        )],
    );
    std::fs::write(&cfg, text).unwrap();
    // The watched folder and `a` take two watches; the limit leaves room for no more.
    let script =
        "echo 2 > /proc/sys/user/max_inotify_watches && exec \"$0\" daemon --config \"$1\"";
    let mut unshare = Command::new("unshare");
    unshare
        .args(["-U", "-r", "sh", "-c", script, env!("CARGO_BIN_EXE_byol")])
        .arg(&cfg);
    let mut d = Daemon::spawn(unshare, root.join("out.txt"));
    d.wait_for("training", |o| o.contains("training from step"));
    assert!(
        d.output().contains("(inotify)"),
        "the start-up watch is native"
    );
    // A new class folder past the limit; its files come after its creation.
    std::fs::create_dir_all(watch.join("b")).unwrap();
    d.wait_for("the fallback", |o| {
        o.contains("watch limit") && o.contains("polling it every")
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    for i in 100..108 {
        std::fs::write(watch.join(format!("b/{i}.png")), distinct_png(i)).unwrap();
    }
    d.wait_for("the polled files", |_| {
        live_records(&root.join("data")) == 16
    });
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}

/// A class folder added as a symlink while the daemon runs follows the start-up rule:
/// its images are stored under the watched folder's path, labelled by the link's name,
/// later files in it are seen, and a restart finds nothing stale.
#[test]
fn a_symlinked_class_folder_added_at_run_time_is_a_class() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    std::fs::create_dir_all(watch.join("a")).unwrap();
    for i in 0..8 {
        std::fs::write(watch.join(format!("a/{i}.png")), distinct_png(i)).unwrap();
    }
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    for i in 100..104 {
        std::fs::write(elsewhere.join(format!("{i}.png")), distinct_png(i)).unwrap();
    }
    let cfg = root.join("d.toml");
    std::fs::write(&cfg, daemon_config(root, &[])).unwrap();
    let canonical_watch = std::fs::canonicalize(&watch).unwrap();
    let linked_sources = || {
        common::dataset_sources(&root.join("data"))
            .into_iter()
            .filter(|(_, (_, label))| label.as_deref() == Some("linked"))
            .map(|(path, _)| path)
            .collect::<Vec<String>>()
    };
    let mut d = Daemon::start(&cfg, root.join("out1.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    std::os::unix::fs::symlink(&elsewhere, watch.join("linked")).unwrap();
    d.wait_for("the linked class", |_| linked_sources().len() == 4);
    // A later file in the linked folder is seen too.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::write(elsewhere.join("104.png"), distinct_png(104)).unwrap();
    d.wait_for("the later file", |_| linked_sources().len() == 5);
    for path in linked_sources() {
        assert!(
            path.starts_with(&canonical_watch.join("linked").display().to_string()),
            "{path} is not under the watched folder"
        );
    }
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
    // A restart: every source is under the watched folder, nothing stale.
    let mut d = Daemon::start(&cfg, root.join("out2.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    let sources = common::dataset_sources(&root.join("data"));
    assert_eq!(sources.len(), 13, "{sources:?}");
    assert!(
        sources
            .keys()
            .all(|p| p.starts_with(&canonical_watch.display().to_string())),
        "{sources:?}"
    );
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}
