#!/usr/bin/env python3
"""The daemon on a device under a wave of new images (scripts/gpu-run.sh, part `daemon`).

Starts `byol daemon` on a watched folder seeded with images made from the carried photos,
lets it train, then drops a wave of distinct images (random crops and flips of the
photos with Pillow; without it, copies with distinct trailing bytes, which the dataset
still takes as distinct files), and measures:
  - training images/s while the wave is ingested against the window before it (aim >= 0.9)
  - seconds from the wave's first file written to the first batch holding a wave record
    (the daemon's batch trace, BYOL_TRACE_BATCHES)
  - peak device memory (nvidia-smi, every 100 ms; 0 on CPU)
  - SIGTERM: seconds to exit, and the checkpoint it wrote (aim: within stop_timeout_secs)
Prints one JSON object (the last line) and writes it to --json.
"""
import argparse, glob, json, os, random, re, signal, subprocess, sys, threading, time, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("--byol", required=True)
ap.add_argument("--photos", required=True, help="folder of .jpg/.png photos")
ap.add_argument("--work", required=True)
ap.add_argument("--device", default="cuda:0")
ap.add_argument("--arch", default="resnet50")
ap.add_argument("--width", type=int, default=64)
ap.add_argument("--size", type=int, default=224)
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--precision", default="bf16")
ap.add_argument("--seed-images", type=int, default=512)
ap.add_argument("--wave", type=int, default=2000)
ap.add_argument("--seconds", type=float, default=90.0, help="the whole measurement's budget")
ap.add_argument("--stop-timeout", type=float, default=30.0)
ap.add_argument("--json")
a = ap.parse_args()

PHOTOS = sorted(glob.glob(os.path.join(a.photos, "*.jpg")) + glob.glob(os.path.join(a.photos, "*.png")))
if not PHOTOS:
    sys.exit(f"no photos in {a.photos}")
try:
    from PIL import Image
except ImportError:
    Image = None
rng = random.Random(0)
counter = [0]


def put(dst):
    """One new distinct image in `dst`/cK/, written aside and renamed into place."""
    src = PHOTOS[counter[0] % len(PHOTOS)]
    d = os.path.join(dst, f"c{counter[0] % 4}")
    os.makedirs(d, exist_ok=True)
    name = os.path.join(d, f"f{counter[0]:06d}.jpg")
    tmp = name + ".part"
    if Image is not None:
        img = Image.open(src).convert("RGB")
        w, h = img.size
        s = rng.uniform(0.7, 1.0)
        cw, ch = max(8, int(w * s)), max(8, int(h * s))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img.save(tmp, format="JPEG", quality=90)
    else:
        with open(src, "rb") as f, open(tmp, "wb") as g:
            g.write(f.read())
            g.write(b"byol-wave-%08d" % counter[0])
    os.rename(tmp, name)
    counter[0] += 1


CONFIG = f"""
[augment]
preset = "byol"
size = {a.size}
[loader]
batch_size = {a.batch}
threads = 0
newest_share = 0.25
newest_records = 1024
[model]
arch = "{a.arch}"
width = {a.width}
[optim]
optimizer = "lars"
base_lr = 0.2
warmup_steps = 10
schedule = "constant"
[train]
device = "{a.device}"
precision = "{a.precision}"
log_every = 10
checkpoint_every_steps = 0
checkpoint_every_minutes = 0.0
[ingest]
max_side = 256
[daemon]
watch = [{{ path = "{a.work}/in", layout = "imagefolder" }}]
data = "{a.work}/data"
run = "{a.work}/run"
listen = "127.0.0.1:0"
settle_secs = 0.5
idle_after_epochs = 0
new_data_within_steps = 20
stop_timeout_secs = {a.stop_timeout}
"""

start = time.time()
deadline = start + a.seconds
os.makedirs(a.work, exist_ok=True)
inbox = os.path.join(a.work, "in")
for _ in range(a.seed_images):
    put(inbox)
with open(os.path.join(a.work, "d.toml"), "w") as f:
    f.write(CONFIG)
trace = os.path.join(a.work, "batches.jsonl")
log = open(os.path.join(a.work, "daemon.log"), "w")
proc = subprocess.Popen([a.byol, "daemon", "--config", os.path.join(a.work, "d.toml")],
                        stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, "BYOL_TRACE_BATCHES": trace})

peak = [0]
polling = [True]


def poll_memory():
    while polling[0] and a.device.startswith("cuda"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            peak[0] = max(peak[0], max(int(x) for x in out.split()))
        except Exception:
            pass
        time.sleep(0.1)


threading.Thread(target=poll_memory, daemon=True).start()


def text():
    return open(os.path.join(a.work, "daemon.log")).read()


def wait(cond, what):
    while not cond():
        if time.time() > deadline or proc.poll() is not None:
            polling[0] = False
            proc.kill()
            sys.exit(f"gave up waiting for {what}:\n{text()[-2000:]}")
        time.sleep(0.1)


def address():
    m = re.search(r"metrics on http://(\S+)/metrics", text())
    return m and m.group(1)


wait(address, "the metrics address")
addr = address()


def metrics():
    body = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


images = lambda: metrics().get("byol_train_images_total", 0.0)
ingested = lambda: metrics().get('byol_ingest_files_total{outcome="ingested"}', 0.0)
wait(lambda: images() > 0, "training")
budget = deadline - time.time()
time.sleep(max(1.0, 0.15 * budget))  # warm-up: the first steps plan kernels
i0, t0 = images(), time.time()
time.sleep(max(1.0, 0.2 * budget))
quiet = (images() - i0) / (time.time() - t0)

records_before = metrics().get("byol_dataset_records", 0.0)
before = ingested()
i0, t0 = images(), time.time()
wave_start = time.time()
for _ in range(a.wave):
    put(inbox)
wait(lambda: ingested() >= before + a.wave or time.time() > deadline - a.stop_timeout - 5, "the wave")
wave_secs = time.time() - t0
busy = (images() - i0) / wave_secs
wave_done = ingested() - before


def first_new_batch():
    if not os.path.exists(trace):
        return None
    for line in open(trace):
        b = json.loads(line)
        if any(r >= records_before for r in b["records"]):
            return b["unix_ms"] / 1000
    return None


while first_new_batch() is None and time.time() < deadline - a.stop_timeout - 2:
    time.sleep(0.2)
seen = first_new_batch()

t_stop = time.time()
proc.send_signal(signal.SIGTERM)
try:
    code = proc.wait(timeout=a.stop_timeout + 10)
except subprocess.TimeoutExpired:
    proc.kill()
    code = None
stop_secs = time.time() - t_stop
polling[0] = False
checkpoints = sorted(glob.glob(os.path.join(a.work, "run/checkpoints/step-*")))
steps = [json.loads(l)["step"] for l in open(os.path.join(a.work, "run/metrics.jsonl")) if l.strip()]
result = dict(
    quiet_images_per_sec=round(quiet, 2), wave_images_per_sec=round(busy, 2),
    wave_over_quiet=round(busy / quiet, 3) if quiet else None,
    wave_files=a.wave, wave_ingested=int(wave_done), wave_secs=round(wave_secs, 2),
    wave_to_first_batch_secs=round(seen - wave_start, 2) if seen else None,
    peak_device_mib=peak[0], sigterm_exit_code=code, sigterm_secs=round(stop_secs, 2),
    stop_timeout_secs=a.stop_timeout,
    last_checkpoint=os.path.basename(checkpoints[-1]) if checkpoints else None,
    last_logged_step=steps[-1] if steps else None, varied_images=Image is not None)
print(json.dumps(result))
if a.json:
    json.dump(result, open(a.json, "w"), indent=1)
