#!/usr/bin/env python3
"""Measures the byol daemon as a service (benchmarks, not tests; this machine is noisy).

  throughput  training images/s while a wave of large photos is ingested, against the
              windows around it without ingest (ratio; the aim is at least 0.9)
  latency     seconds from a file's last write to its first appearance in a batch
              (p50, p95), from the daemon's batch trace (BYOL_TRACE_BATCHES)
  rss         anonymous resident memory (RssAnon; the mapped shards inflate RSS) over
              a long run with a wave every minute: first and last minutes, peak

Usage: scripts/bench_daemon.py [throughput|latency|rss|all] [--minutes N] [--byol PATH]
Needs a release build (target/release/byol, or the binary given in --byol: e.g. an older
commit's, for runs before and after), the photos in ../shared/data/photos256 and
Debian's wallpapers (apt-get install mate-backgrounds plasma-workspace-wallpapers).
"""
import glob, json, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYOL = os.path.join(ROOT, "target/release/byol")
PHOTOS = sorted(glob.glob(os.path.join(ROOT, "../shared/data/photos256/*.jpg")))
WALLPAPERS = sorted(p for p in glob.glob("/usr/share/backgrounds/**/*.jpg", recursive=True)
                    + glob.glob("/usr/share/wallpapers/**/*.jpg", recursive=True)
                    if os.path.getsize(p) > 300_000)

CONFIG = """
[augment]
preset = "byol"
size = 64
[loader]
batch_size = 32
newest_share = 0.25
newest_records = 512
[model]
arch = "resnet18"
width = 32
[optim]
optimizer = "lars"
base_lr = 0.2
warmup_steps = 20
schedule = "constant"
[train]
device = "cpu"
log_every = 10
checkpoint_every_steps = 1000
checkpoint_every_minutes = 5.0
[ingest]
max_side = 128
[daemon]
watch = [{{ path = "{d}/in", layout = "imagefolder" }}]
data = "{d}/data"
run = "{d}/run"
listen = "127.0.0.1:0"
settle_secs = 0.5
idle_after_epochs = 0
new_data_within_steps = {within}
"""

counter = [0]


def put(src, dst_dir, cls="c0"):
    """Copies `src` into the watched tree as a distinct file (its number appended)."""
    d = os.path.join(dst_dir, cls)
    os.makedirs(d, exist_ok=True)
    name = os.path.join(d, f"f{counter[0]:06d}.jpg")
    tmp = name + ".part"
    with open(src, "rb") as f, open(tmp, "wb") as g:
        g.write(f.read())
        g.write(b"byol-bench-%08d" % counter[0])
    os.rename(tmp, name)
    counter[0] += 1
    return name


class Daemon:
    def __init__(self, d, within=20, env=None):
        self.d = d
        with open(os.path.join(d, "d.toml"), "w") as f:
            f.write(CONFIG.format(d=d, within=within))
        self.out = open(os.path.join(d, "out.txt"), "w")
        self.p = subprocess.Popen([BYOL, "daemon", "--config", os.path.join(d, "d.toml")],
                                  stdout=self.out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})})
        self.addr = None
        for _ in range(600):
            text = open(os.path.join(d, "out.txt")).read()
            m = re.search(r"metrics on http://(\S+)/metrics", text)
            if m:
                self.addr = m.group(1)
                break
            time.sleep(0.1)

    def metrics(self):
        text = urllib.request.urlopen(f"http://{self.addr}/metrics").read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
        return out

    def training(self):
        return "training from step" in open(os.path.join(self.d, "out.txt")).read()

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=120)

    def rss_anon_kb(self):
        for line in open(f"/proc/{self.p.pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])


def wait(cond, secs, what):
    t = time.time()
    while not cond():
        if time.time() - t > secs:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def images(dm):
    return dm.metrics()["byol_train_images_total"]


def ingested(dm):
    return dm.metrics()['byol_ingest_files_total{outcome="ingested"}']


def throughput():
    d = tempfile.mkdtemp(prefix="byol-bench-")
    for i in range(1000):
        put(PHOTOS[i % len(PHOTOS)], os.path.join(d, "in"), f"c{i % 4}")
    dm = Daemon(d)
    wait(dm.training, 600, "training")
    time.sleep(30)  # warm-up
    rows = []
    for rnd in range(2):
        # Without ingest: 45 s.
        i0, t0 = images(dm), time.time()
        time.sleep(45)
        quiet = (images(dm) - i0) / (time.time() - t0)
        # A wave of large photos: the window is the ingest's.
        before = ingested(dm)
        n = 400
        i0, t0 = images(dm), time.time()
        for k in range(n):
            put(WALLPAPERS[k % len(WALLPAPERS)], os.path.join(d, "in"), f"w{k % 4}")
        wait(lambda: ingested(dm) >= before + n, 900, "the wave")
        secs = time.time() - t0
        busy = (images(dm) - i0) / secs
        rows.append((quiet, busy, secs))
        print(f"round {rnd + 1}: {quiet:.1f} img/s without ingest, {busy:.1f} img/s while "
              f"{n} wallpapers ({secs:.1f} s) were ingested: {busy / quiet:.2f}x", flush=True)
    dm.stop()
    q = statistics.mean(r[0] for r in rows)
    b = statistics.mean(r[1] for r in rows)
    print(f"throughput: {b / q:.2f}x of the training speed without ingest "
          f"({b:.1f} vs {q:.1f} img/s, mean of {len(rows)} rounds)")
    shutil.rmtree(d, ignore_errors=True)


def latency():
    d = tempfile.mkdtemp(prefix="byol-bench-")
    for i in range(400):
        put(PHOTOS[i % len(PHOTOS)], os.path.join(d, "in"), f"c{i % 4}")
    trace = os.path.join(d, "batches.jsonl")
    dm = Daemon(d, within=20, env={"BYOL_TRACE_BATCHES": trace})
    wait(dm.training, 600, "training")
    time.sleep(10)
    written = {}
    for i in range(40):
        path = put(PHOTOS[(i * 7) % len(PHOTOS)], os.path.join(d, "in"), f"c{i % 4}")
        written[os.path.realpath(path)] = os.stat(path).st_mtime
        time.sleep(2)
    time.sleep(30)
    dm.stop()
    m = json.load(open(os.path.join(d, "data/manifest.json")))
    start, total = {}, 0
    for s in m["shards"]:
        start[s["id"]] = total
        total += s["records"]
    first_seen = {}
    for line in open(trace):
        b = json.loads(line)
        for r in b["records"]:
            first_seen.setdefault(r, b["unix_ms"] / 1000)
    lat = []
    for s in m["sources"]:
        if s["path"] in written:
            span = s["records"][0]
            g = start[span["shard"]] + span["first"]
            if g in first_seen:
                lat.append(first_seen[g] - written[s["path"]])
    lat.sort()
    missing = len(written) - len(lat)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    print(f"latency from last write to first batch over {len(lat)} files "
          f"({missing} never drawn in the window): p50 {p(0.5):.1f} s, p95 {p(0.95):.1f} s, "
          f"max {lat[-1]:.1f} s (settle 0.5 s, refresh every 20 batches)")
    shutil.rmtree(d, ignore_errors=True)


def rss(minutes):
    d = tempfile.mkdtemp(prefix="byol-bench-")
    for i in range(300):
        put(PHOTOS[i % len(PHOTOS)], os.path.join(d, "in"), f"c{i % 4}")
    dm = Daemon(d)
    wait(dm.training, 600, "training")
    samples = []
    t0 = time.time()
    next_wave = t0
    k = 0
    while time.time() - t0 < minutes * 60:
        if time.time() >= next_wave:
            for _ in range(50):
                put(PHOTOS[k % len(PHOTOS)], os.path.join(d, "in"), f"c{k % 4}")
                k += 1
            next_wave += 60
        samples.append((time.time() - t0, dm.rss_anon_kb()))
        time.sleep(10)
    recs = dm.metrics()["byol_dataset_records"]
    dm.stop()
    first = [kb for t, kb in samples if t < 120]
    last = [kb for t, kb in samples if t > minutes * 60 - 120]
    print(f"RssAnon over {minutes} min, a wave of 50 photos a minute ({int(recs)} records at "
          f"the end): first 2 min {statistics.mean(first) / 1024:.0f} MiB, last 2 min "
          f"{statistics.mean(last) / 1024:.0f} MiB, peak {max(kb for _, kb in samples) / 1024:.0f} MiB")
    with open(os.path.join(ROOT, "target/rss-samples.json"), "w") as f:
        json.dump(samples, f)
    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    minutes = 30
    if "--minutes" in sys.argv:
        minutes = float(sys.argv[sys.argv.index("--minutes") + 1])
    if "--byol" in sys.argv:
        BYOL = os.path.abspath(sys.argv[sys.argv.index("--byol") + 1])
    if not os.access(BYOL, os.X_OK):
        raise SystemExit("build first: cargo build --release")
    if what in ("throughput", "all"):
        throughput()
    if what in ("latency", "all"):
        latency()
    if what in ("rss", "all"):
        rss(minutes)
