//! Watched folders that change under the daemon: the folder itself replaced
//! (`mv in in.old; mkdir in`), and inotify's watch limit reached by a new sub-folder
//! while the daemon runs (inside a user namespace whose limit the test lowers, so the
//! machine's own limit is untouched). In both, files written afterwards reach the
//! dataset. Then the three rules: a folder whose watch cannot be added (kind 1), a file
//! changed through another name (kind 2), the daemon's own files (kind 3).

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

// Kind 1: a folder under a watched folder whose watch cannot be added is polled, tried
// again every second, and watched natively once it can be. Root ignores mode 000, so
// these run the daemon in a user namespace with no root mapping (its files are root's,
// its powers over them none).

/// `byol daemon --config cfg` without root's powers over files, or `None` (skipped)
/// where the machine refuses a user namespace.
fn unprivileged_daemon(cfg: &std::path::Path, out: std::path::PathBuf) -> Option<Daemon> {
    let probe = "test ! -r /proc/1/root";
    if !machine_allows(
        Command::new("unshare").args(["-U", "sh", "-c", probe]),
        "run without root's powers in a user namespace",
    ) {
        return None;
    }
    let mut unshare = Command::new("unshare");
    unshare
        .args(["-U", env!("CARGO_BIN_EXE_byol"), "daemon", "--config"])
        .arg(cfg);
    Some(Daemon::spawn(unshare, out))
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Sources labelled `label`.
fn labelled(root: &std::path::Path, label: &str) -> usize {
    common::dataset_sources(&root.join("data"))
        .values()
        .filter(|(_, l)| l.as_deref() == Some(label))
        .count()
}

/// A daemon over `root/in/a` (8 images) with a fast poll, started unprivileged.
fn kind1_setup(root: &std::path::Path) -> std::path::PathBuf {
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
            "settle_secs = 0.3\npoll_interval_secs = 0.5",
        )],
    );
    std::fs::write(&cfg, text).unwrap();
    // The daemon must reach its folders without root's powers.
    chmod(root, 0o755);
    cfg
}

/// The issue's case: a class folder that arrives unreadable (moved in, mode 000) and is
/// made readable a moment later: its files are ingested, and so are files added later,
/// once its watch holds.
#[test]
fn an_unreadable_class_folder_moved_in_is_watched_once_readable() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = kind1_setup(root);
    let Some(mut d) = unprivileged_daemon(&cfg, root.join("out.txt")) else {
        return;
    };
    d.wait_for("training", |o| o.contains("training from step"));
    let private = root.join("private");
    std::fs::create_dir_all(&private).unwrap();
    for i in 100..102 {
        std::fs::write(private.join(format!("{i}.png")), distinct_png(i)).unwrap();
    }
    chmod(&private, 0o000);
    std::fs::rename(&private, root.join("in/c")).unwrap();
    d.wait_for("the failed watch said", |o| {
        o.contains("cannot watch natively") && o.contains("in/c")
    });
    chmod(&root.join("in/c"), 0o755);
    d.wait_for("the watch restored", |o| {
        o.contains("is watched natively again")
    });
    d.wait_for("its first files", |_| labelled(root, "c") == 2);
    for i in 102..105 {
        std::fs::write(root.join(format!("in/c/{i}.png")), distinct_png(i)).unwrap();
    }
    d.wait_for("the later files", |_| labelled(root, "c") == 5);
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
    let said = out
        .lines()
        .filter(|l| l.starts_with("warning:") && l.contains("cannot watch natively"))
        .count();
    assert_eq!(said, 1, "said once:\n{out}");
}

/// An unreadable class folder present at start-up: the watched folder stays native
/// (only that folder is polled), and files reach it after it is made readable.
#[test]
fn an_unreadable_folder_at_start_up_leaves_the_rest_watched_natively() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = kind1_setup(root);
    let locked = root.join("in/locked");
    std::fs::create_dir_all(&locked).unwrap();
    std::fs::write(locked.join("200.png"), distinct_png(200)).unwrap();
    chmod(&locked, 0o000);
    let Some(mut d) = unprivileged_daemon(&cfg, root.join("out.txt")) else {
        return;
    };
    d.wait_for("training", |o| o.contains("training from step"));
    let out = d.output();
    assert!(
        out.contains("(inotify)"),
        "the watched folder is native:\n{out}"
    );
    assert!(
        out.contains("cannot watch natively (Permission denied"),
        "{out}"
    );
    chmod(&locked, 0o755);
    d.wait_for("the watch restored", |o| {
        o.contains("is watched natively again")
    });
    d.wait_for("its file", |_| labelled(root, "locked") == 1);
    std::fs::write(locked.join("201.png"), distinct_png(201)).unwrap();
    d.wait_for("a later file", |_| labelled(root, "locked") == 2);
    // A new class folder is still followed natively.
    std::fs::create_dir_all(root.join("in/b")).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::write(root.join("in/b/300.png"), distinct_png(300)).unwrap();
    d.wait_for("the new class", |_| labelled(root, "b") == 1);
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}

/// A tree moved in whose one sub-folder is unreadable: inotify's recursive add stops
/// there, yet every other folder of the tree is watched (later files in each are seen),
/// and folders created and deleted at once leave nothing behind.
#[test]
fn a_moved_in_tree_with_an_unreadable_folder_has_its_other_folders_watched() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = kind1_setup(root);
    let Some(mut d) = unprivileged_daemon(&cfg, root.join("out.txt")) else {
        return;
    };
    d.wait_for("training", |o| o.contains("training from step"));
    // Created and deleted before a watch can be added.
    for i in 0..20 {
        let p = root.join(format!("in/gone{i}"));
        std::fs::create_dir_all(p.join("sub")).unwrap();
        std::fs::remove_dir_all(&p).unwrap();
    }
    let tree = root.join("tree");
    let names = ["k1", "k2", "k3", "k4", "k5", "k6"];
    for n in names {
        std::fs::create_dir_all(tree.join(n)).unwrap();
    }
    std::fs::create_dir_all(tree.join("k0")).unwrap();
    chmod(&tree.join("k0"), 0o000);
    std::fs::rename(&tree, root.join("in/t")).unwrap();
    d.wait_for("the failed watch said", |o| {
        o.contains("cannot watch natively")
    });
    // Polling is slower than a native watch, but the native watches must carry these:
    // wait past a check, then write into every readable folder.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    for (i, n) in names.iter().enumerate() {
        std::fs::write(
            root.join(format!("in/t/{n}/{}.png", 400 + i)),
            distinct_png(400 + i as u32),
        )
        .unwrap();
    }
    d.wait_for("a file in every folder", |_| {
        labelled(root, "t") == names.len()
    });
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
    assert!(
        !out.contains("gone0"),
        "nothing said of a folder gone:\n{out}"
    );
    chmod(&root.join("in/t/k0"), 0o755);
}

// Kind 2: a file changed through one name is re-checked under every name the dataset
// records for it (same device and inode).

/// Writes new content into the file at `path` in place (same inode).
fn rewrite_in_place(path: &std::path::Path, n: u32) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(&distinct_png(n)).unwrap();
    f.sync_all().unwrap();
}

fn hash_of(data: &std::path::Path, path: &std::path::Path) -> Option<String> {
    let key = std::fs::canonicalize(path).unwrap_or(path.to_owned());
    common::dataset_sources(data)
        .get(&key.display().to_string())
        .map(|(h, _)| h.clone())
}

fn blake3_of(n: u32) -> String {
    blake3::hash(&distinct_png(n)).to_hex().to_string()
}

/// A hard link in another class folder, and one in another watched folder: the file
/// rewritten through one name is stored anew under all three, and its old content is
/// retired (no file holds it).
#[test]
fn a_file_changed_through_one_name_is_changed_under_its_hard_links() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    std::fs::create_dir_all(watch.join("a")).unwrap();
    std::fs::create_dir_all(watch.join("b")).unwrap();
    std::fs::create_dir_all(root.join("in2")).unwrap();
    for i in 0..8 {
        std::fs::write(watch.join(format!("a/{i}.png")), distinct_png(i)).unwrap();
    }
    let x = watch.join("a/x.png");
    std::fs::write(&x, distinct_png(500)).unwrap();
    std::fs::hard_link(&x, watch.join("b/x.png")).unwrap();
    std::fs::hard_link(&x, root.join("in2/x.png")).unwrap();
    let cfg = root.join("d.toml");
    let in2 = root.join("in2").display().to_string();
    let text = daemon_config(
        root,
        &[(
            "layout = \"imagefolder\" }]",
            &format!("layout = \"imagefolder\" }}, {{ path = \"{in2}\", layout = \"flat\" }}]"),
        )],
    );
    std::fs::write(&cfg, text).unwrap();
    let data = root.join("data");
    let mut d = Daemon::start(&cfg, root.join("out.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    assert_eq!(live_records(&data), 9);
    // Through the name in the other watched folder, then through a class folder's.
    for (name, n) in [(root.join("in2/x.png"), 501), (watch.join("b/x.png"), 502)] {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        rewrite_in_place(&name, n);
        let names = [x.clone(), watch.join("b/x.png"), root.join("in2/x.png")];
        d.wait_for("every name's new content", |_| {
            names
                .iter()
                .all(|p| hash_of(&data, p).as_deref() == Some(&blake3_of(n)))
        });
        d.wait_for("the old content retired", |_| live_records(&data) == 9);
    }
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}

/// A folder seen through two watched folders (a symlinked class folder pointing into
/// another watched folder): a file rewritten there is stored anew under both paths,
/// and one deleted there is retired under both.
#[test]
fn a_folder_seen_through_two_watched_folders_changes_under_both() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    let shared = root.join("in2/shared");
    std::fs::create_dir_all(watch.join("a")).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    for i in 0..8 {
        std::fs::write(watch.join(format!("a/{i}.png")), distinct_png(i)).unwrap();
    }
    std::fs::write(shared.join("y.png"), distinct_png(600)).unwrap();
    std::fs::write(shared.join("z.png"), distinct_png(601)).unwrap();
    std::os::unix::fs::symlink(&shared, watch.join("linked")).unwrap();
    let cfg = root.join("d.toml");
    let in2 = root.join("in2").display().to_string();
    let text = daemon_config(
        root,
        &[(
            "layout = \"imagefolder\" }]",
            &format!(
                "layout = \"imagefolder\" }}, {{ path = \"{in2}\", layout = \"imagefolder\" }}]"
            ),
        )],
    );
    std::fs::write(&cfg, text).unwrap();
    let data = root.join("data");
    let mut d = Daemon::start(&cfg, root.join("out.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    let canonical = std::fs::canonicalize(&watch).unwrap();
    let via_link = canonical.join("linked/y.png");
    assert!(
        hash_of(&data, &via_link).is_some(),
        "recorded through the link"
    );
    std::thread::sleep(std::time::Duration::from_millis(1100));
    rewrite_in_place(&shared.join("y.png"), 602);
    d.wait_for("both paths' new content", |_| {
        hash_of(&data, &via_link).as_deref() == Some(&blake3_of(602))
            && hash_of(&data, &shared.join("y.png")).as_deref() == Some(&blake3_of(602))
    });
    d.wait_for("the old content retired", |_| live_records(&data) == 10);
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
}

// Kind 3: nothing the daemon (or byol) writes is ever ingested.

/// The run folder inside the watched folder, a symlink to it there too, and `byol
/// export` writing into the watched folder: no reject, no source, while checkpoints,
/// metrics and exports are written; `byol validate` says so.
#[test]
fn the_daemons_own_files_in_a_watched_folder_are_never_ingested() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let watch = root.join("in");
    std::fs::create_dir_all(watch.join("a")).unwrap();
    for i in 0..8 {
        std::fs::write(watch.join(format!("a/{i}.png")), distinct_png(i)).unwrap();
    }
    let run = watch.join("run");
    let cfg = root.join("d.toml");
    let text = daemon_config(
        root,
        &[
            (
                &format!("run = \"{}\"", root.join("run").display()),
                &format!("run = \"{}\"", run.display()),
            ),
            ("checkpoint_every_steps = 25", "checkpoint_every_steps = 5"),
        ],
    );
    std::fs::write(&cfg, text).unwrap();
    let v = common::run(&["validate", "--config", cfg.to_str().unwrap()]);
    assert!(v.status.success(), "{}", common::text(&v));
    assert!(
        common::text(&v).contains("is inside the watched folder"),
        "{}",
        common::text(&v)
    );
    let data = root.join("data");
    let mut d = Daemon::start(&cfg, root.join("out.txt"), &[]);
    d.wait_for("training", |o| o.contains("training from step"));
    std::os::unix::fs::symlink(&run, watch.join("runlink")).unwrap();
    d.wait_for("checkpoints", |_| {
        std::fs::read_dir(run.join("checkpoints")).is_ok_and(|r| r.count() >= 2)
    });
    std::fs::create_dir_all(watch.join("exports")).unwrap();
    let e = common::run(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        watch.join("exports/encoder.safetensors").to_str().unwrap(),
    ]);
    assert!(e.status.success(), "{}", common::text(&e));
    // A class folder after those: once it is in, everything before it was handled.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    std::fs::create_dir_all(watch.join("b")).unwrap();
    std::fs::write(watch.join("b/700.png"), distinct_png(700)).unwrap();
    d.wait_for("the later class", |_| {
        common::dataset_sources(&data).len() == 9
    });
    let (status, out) = d.stop();
    assert!(status.success(), "{status}\n{out}");
    let rejects = std::fs::read_to_string(data.join("rejects.jsonl")).unwrap_or_default();
    assert!(rejects.is_empty(), "{rejects}");
    let sources = common::dataset_sources(&data);
    assert!(
        sources
            .keys()
            .all(|p| !p.contains("/run") && !p.contains("exports")),
        "{sources:?}"
    );
}

/// A watched folder inside the run folder cannot work (nothing in it would be
/// ingested): `byol validate` and `byol daemon` refuse it.
#[test]
fn a_watched_folder_inside_the_run_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("run/in")).unwrap();
    let cfg = root.join("d.toml");
    let text = daemon_config(
        root,
        &[(
            &format!("path = \"{}\"", root.join("in").display()),
            &format!("path = \"{}\"", root.join("run/in").display()),
        )],
    );
    std::fs::write(&cfg, text).unwrap();
    for cmd in ["validate", "daemon"] {
        let args: Vec<&str> = match cmd {
            "validate" => vec!["validate", "--config", cfg.to_str().unwrap()],
            _ => vec!["daemon", "--config", cfg.to_str().unwrap()],
        };
        let o = common::run(&args);
        assert!(!o.status.success(), "{cmd}");
        assert!(
            common::text(&o).contains("inside the run folder"),
            "{}",
            common::text(&o)
        );
    }
}
