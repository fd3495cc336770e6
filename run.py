"""Run the Autoencoder Bake-Off: train the nine contestants, put them through the gauntlet, report.

    python run.py                                  # full protocol on MNIST (downloads it if needed)
    python run.py --quick                          # reduced settings, a complete report in minutes
    python run.py --dataset fashion                # Fashion-MNIST (data/fashion, or --data-dir)
    python run.py --seeds 3 --anomaly-digits all   # error bars and the one-vs-rest anomaly sweep
    python run.py --jobs 1                         # one training at a time (default: one per core)

Writes <out>/<dataset>/results.json, REPORT.md and the figures beside it (<out>: runs, or
runs/quick with --quick; the committed reports are in results). Finished trainings are
kept as checkpoints (with the settings that produced them) and reused when run.py runs again with
the same settings, so an interrupted run continues where it stopped.

The recipe, as `main` follows it (PROTOCOL.md has every detail):
    1. load the data and split it as the companion code did
    2. train every contestant at latent 20 (all tasks) and at latent 2 without the anomaly class
       (anomaly detection), 60 epochs each, several trainings at once in worker processes
    3. per seed, run the gauntlet: reconstruction, classification, anomaly detection, samples and
       interpolation, latent structure, and the three baselines
    4. summarise over seeds (mean, std, the runs), audit the article's claims seed by seed
    5. write results.json and REPORT.md

Simplified: one output folder serves one run at a time; workers are plain processes fed from a
queue (no scheduler); the report is Markdown written line by line.
"""

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import pathlib
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

import numpy as np
import torch

import ae
import mnist
import tasks
import umap_lite

# ---- constants

DATASETS = ("mnist", "fashion", "kmnist")
FIRST_SEED = 42                 # the companion code's seed; further runs use 43, 44, ...
SPLIT_SEED = 42                 # the companion code's split: torch.randperm on a CPU generator seeded 42
SPLIT = f"torch.randperm seed {SPLIT_SEED}"   # recorded with every checkpoint: a new split retrains
EPOCHS = 60                     # the article's training length
LATENT, LATENT_ANOMALY = 20, 2  # the two trainings per contestant
ANOMALY_DIGIT = 1               # the article's held-out class
CLEAR_MARGIN = 0.02             # audit: a lead in confidence smaller than this is no lead
INK_STRONG = 0.7                # audit: |rank correlation| with ink from which a score "measures ink":
                                # rho^2 ~ 0.5, ink alone orders half the variance of the score's ranks
SAME_TIME_RATIO = 1.25          # audit: training times within this factor count as "about equal"
EVIDENCE_MAX_DIGITS = 6         # audit evidence: decimals enough for any two float32-derived values
VARIATIONAL = ("vae", "beta_vae_strict", "beta_vae_loose")   # encode() can sample or give mu
PIXELS = "pixels"               # the row of the raw-pixel references: not a contestant
N_PROBE = 550                   # labelled images for the classification probes
LABEL_BUDGETS = (10, 100, 550, 5500)
BUDGET_DRAWS = 3                # stratified draws per label budget
N_GENERATED = 1000              # samples per model and sampler judged by the classifier
SAMPLERS = {"": "own prior",    # metric-key suffix -> name; "" keeps the keys of the own priors
            "_gmm": "ex-post mixture", "_categorical": "learned categorical (vq)",
            "_gmm_prequant": "mixture before the quantiser (vq)"}
N_SHOWN = 16                    # images per reconstruction row and per sample grid
JUDGE_EPOCHS = 5
QUICK = {"epochs": 3, "n_train": 8000, "map_points": 2000, "umap_epochs": 100,
         "judge_epochs": 1, "budget_draws": 1}
PUBLISHED = {   # the article's MNIST table (single runs); its AUCs come from the signed score
    "reconstruction_bce": {"shallow": 123.2, "vanilla": 63.92, "stacked": 87.87, "sparse": 64.27,
                           "denoising": 75.15, "vae": 76.12, "beta_vae_strict": 86.12,
                           "beta_vae_loose": 69.51, "vq": 64.49},
    "probe_accuracy_reference_protocol": {
        "shallow": 0.4511, "vanilla": 0.7835, "stacked": 0.6107, "sparse": 0.2221,
        "denoising": 0.8049, "vae": 0.6016, "beta_vae_strict": 0.4536, "beta_vae_loose": 0.6311,
        "vq": 0.7717},
    "anomaly_auc_signed_score": {
        "shallow": 0.9126, "vanilla": 0.7972, "stacked": 0.8659, "sparse": 0.8284,
        "denoising": 0.7811, "vae": 0.7823, "beta_vae_strict": 0.8098, "beta_vae_loose": 0.8202,
        "vq": 0.8180},
    "probe_accuracy_baseline_as_published": {"vanilla": 0.4364},
    "training_seconds": {"shallow": 638, "vanilla": 675, "stacked": 665, "sparse": 687,
                         "denoising": 678, "vae": 690, "beta_vae_strict": 689,
                         "beta_vae_loose": 688, "vq": 687},
}
# Per-image training cost ~ parameters + this: the part that does not grow with the model (Python,
# BatchNorm, Adam's bookkeeping). Measured on CPU: shallow (42k params) runs 3x faster than
# vanilla (783k), not 18x.
ETA_OVERHEAD_PARAMS = 300_000
WATCH_PARENT_S = 0.5            # how often a worker checks that run.py is still there
# Rows of the report that are not contestants: closed-form pca, the raw pixels (classification) and
# ink, each image's summed intensity (anomaly detection). No claim about "the contestants" ranks them.
REFERENCE_ROWS = tuple(ae.REFERENCES) + (PIXELS, "ink")
# The tasks run on one torch thread: their small steps (the article's probe trains on batches of
# 32) gain little from a second one, and where anything else runs, threads that wait for each
# other at every operation make torch crawl (a busy 2-core machine: 10x). Trainings: plan_jobs.
TASK_THREADS = 1
STOP_S = 2                      # a worker gets this long to leave after SIGTERM, then SIGKILL
LINE_WIDTH = 80                 # the status line never grows wider than a classic terminal
# the settings a report stands for: a report made with others is not replaced without --replace
REPORT_SETTINGS = ("dataset", "models", "seeds", "epochs", "batch_size", "lr", "anomaly_digits",
                   "anomaly_latents", "quick")
OUT, QUICK_OUT = "runs", os.path.join("runs", "quick")   # git-ignored; results/ is written only on request
DEAD_SPAN = 1e-6                # a latent unit spanning less than this of the widest one's range is
                                # constant: far below one pixel of any map
FASHION_CLASSES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "boot"]


# ---- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, no usage dump
        sys.exit(f"run.py: error: {message} (see python run.py --help)")


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-dir", default=None,
                   help="folder holding the four IDX files (default: data/<dataset>)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    p.add_argument("--out", default=None,
                   help=f"output folder (default: {OUT}, or {QUICK_OUT} with --quick; the committed "
                        "reports are in results)")
    p.add_argument("--replace", action="store_true",
                   help="replace a report in --out that was made with other settings")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default {EPOCHS}, or {QUICK['epochs']} with --quick")
    p.add_argument("--models", default=",".join(ae.MODELS), help="comma list (default: all nine)")
    p.add_argument("--seeds", type=int, default=1, help="runs per training: seeds 42, 43, ...")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: auto)")
    p.add_argument("--jobs", type=int, default=None,
                   help="trainings at once, each in its own process (default: one per core)")
    p.add_argument("--anomaly-digits", default=str(ANOMALY_DIGIT),
                   help=f"held-out digit(s) for the anomaly sweep: a comma list or 'all' "
                        f"(digit {ANOMALY_DIGIT}, the article's, always runs)")
    p.add_argument("--anomaly-latents", default=str(LATENT_ANOMALY),
                   help=f"latent size(s) of the anomaly models, e.g. {LATENT_ANOMALY},{LATENT}: each "
                        f"size beyond {LATENT_ANOMALY} is trained without digit {ANOMALY_DIGIT} only")
    p.add_argument("--quick", action="store_true",
                   help=f"reduced settings ({QUICK['n_train']} training images, "
                        f"{QUICK['epochs']} epochs unless --epochs is given): a smoke run")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = QUICK["epochs"] if args.quick else EPOCHS
    if args.out is None:
        args.out = QUICK_OUT if args.quick else OUT
    if args.dataset not in DATASETS:
        p.error(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in ae.MODELS]
    if unknown or not args.models:
        p.error(f"unknown model(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(ae.MODELS)}")
    for flag, least in (("epochs", 1), ("seeds", 1), ("batch_size", 2), ("jobs", 1)):   # BatchNorm: 2
        if getattr(args, flag) is not None and getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} must be at least {least}, got {getattr(args, flag)}")
    if not 0 < args.lr < float("inf"):
        p.error(f"--lr must be a positive number, got {args.lr}")
    args.anomaly_digits = _digits(p, args.anomaly_digits)
    args.anomaly_latents = _latents(p, args.anomaly_latents)
    return args


def _latents(p, text):
    """'2,20' -> sorted latent sizes of the anomaly models, the protocol's 2 always among them."""
    try:
        sizes = {int(z) for z in text.split(",")}
    except ValueError:
        sizes = set()
    if not sizes or not all(1 <= z <= ae.INPUT_DIM // 2 for z in sizes):
        p.error(f"--anomaly-latents takes latent sizes from 1 to {ae.INPUT_DIM // 2} separated by "
                f"commas, got {text!r}")
    return sorted(sizes | {LATENT_ANOMALY})


def _digits(p, text):
    """'all' or '3,1' -> sorted digits, the article's held-out digit always among them."""
    if text == "all":
        return list(range(10))
    try:
        digits = {int(d) for d in text.split(",")}
    except ValueError:
        digits = set()
    if not digits or not all(0 <= d <= 9 for d in digits):
        p.error(f"--anomaly-digits takes digits 0-9 separated by commas or 'all', got {text!r}")
    return sorted(digits | {ANOMALY_DIGIT})


# ---- checks before any work: each failure is one line, and nothing is written before them

def preflight(args):
    """The device, then the output folder and the report it may hold; returns the device.

    The data comes next (load_data checks it); training starts only once all of them pass.
    """
    try:
        device = ae.pick_device(args.device)
    except ValueError as err:
        sys.exit(f"run.py: error: --device: {err}")
    out_dir = os.path.join(args.out, args.dataset)
    _check_writable(out_dir)
    _check_replace(out_dir, args)
    return device


def _check_writable(folder):
    """Exit with one line unless `folder` is, or can become, a folder this process can write."""
    existing = folder
    while not os.path.isdir(existing):      # the nearest folder that exists; nothing is made yet
        if os.path.exists(existing):
            sys.exit(f"run.py: error: --out: {existing} is a file, not a folder; choose another --out")
        existing = os.path.dirname(existing) or "."
    try:    # writing is the only sure test: permission bits lie for root and on read-only mounts
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        sys.exit(f"run.py: error: --out: cannot write in {existing} ({err.strerror or err}); "
                 "choose another --out")


def _check_replace(out_dir, args):
    """Exit with one line if out_dir holds a report made with other settings, unless --replace."""
    path = os.path.join(out_dir, "results.json")
    if args.replace or not os.path.exists(path):
        return
    try:
        before = json.loads(pathlib.Path(path).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        sys.exit(f"run.py: error: {path} cannot be read as a report; choose another --out, or "
                 "pass --replace to replace it")
    now = {**vars(args), "seeds": seeds_of(args)}
    show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)
    changed = [f"{k} {show(before.get(k))} -> {show(now[k])}" for k in REPORT_SETTINGS
               if before.get(k) != now[k]]
    if changed:
        sys.exit(f"run.py: error: {out_dir} holds a report made with other settings "
                 f"({'; '.join(changed)}); choose another --out, or pass --replace to replace it")


# ---- data

def load_data(args):
    """Arrays and index splits for the run, as PROTOCOL.md lays them out."""
    root = args.data_dir or os.path.join("data", args.dataset)
    try:
        train_images, train_labels, test_images, test_labels = mnist.load(
            args.dataset, root=root, download=not args.no_download)
    except (ValueError, OSError, RuntimeError) as err:
        sys.exit(f"run.py: error: {err}")
    x_all, x_test = mnist.to_vectors(train_images), mnist.to_vectors(test_images)
    n_val = min(mnist.N_VAL, len(x_all) // 10)       # tiny test data sets keep a tenth for val
    train_idx, val_idx = mnist.split_indices(split_permutation(len(x_all)), n_val=n_val)
    if args.quick:
        train_idx = train_idx[:QUICK["n_train"]]
    return {"x_all": x_all, "y_all": train_labels.astype(np.int64), "train_idx": train_idx,
            "val_idx": val_idx, "probe_idx": mnist.probe_indices(train_idx, min(N_PROBE, len(train_idx))),
            "x_test": x_test, "y_test": test_labels.astype(np.int64),
            "fingerprint": hashlib.md5(train_images.tobytes()[:1 << 20]
                                       + train_labels.tobytes()).hexdigest()[:12]}


def split_permutation(n, seed=SPLIT_SEED):
    """The companion code's permutation of the n training images (src/data.py, _split_train_val)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


# ---- training, with checkpoints that are reused

def training_jobs(args, data, out_dir):
    """Every training the run needs, each with the settings that identify its checkpoint."""
    jobs = []
    for seed in seeds_of(args):
        for name in args.models + list(ae.REFERENCES):
            for latent, digit in [(LATENT, None)] + anomaly_trainings(args):
                idx = data["train_idx"]
                if digit is not None:
                    idx = mnist.drop_class(idx, data["y_all"], digit)   # val and test keep it
                settings = {"model": name, "latent_dim": latent, "seed": seed,
                            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                            "dataset": args.dataset, "held_out_digit": digit,
                            "n_train": int(len(idx)), "data": data["fingerprint"], "split": SPLIT}
                key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
                label = f"{name} z={latent} seed {seed}" + ("" if digit is None else f" w/o {digit}")
                n_params = sum(p.numel() for p in ae.build(name, latent).parameters())
                jobs.append({"settings": settings, "idx": idx, "label": label,
                             "path": os.path.join(out_dir, "checkpoints", f"{name}-z{latent}-s{seed}"
                                                  f"{'' if digit is None else f'-no{digit}'}-{key}.pt"),
                             "work": args.epochs * len(idx) * (n_params + ETA_OVERHEAD_PARAMS)})
    return jobs


def anomaly_trainings(args):
    """(latent, held-out digit) of every anomaly model: each digit at latent 2, digit 1 at the others."""
    return ([(LATENT_ANOMALY, d) for d in args.anomaly_digits]
            + [(z, ANOMALY_DIGIT) for z in args.anomaly_latents if z != LATENT_ANOMALY])


def train_all(jobs, data, args, device):
    """Train what no checkpoint holds yet, then load every job's model from its checkpoint.

    Returns ({(model, latent, seed, digit): (model, meta)}, {"jobs": N, "threads_per_job": T}).
    """
    for job in jobs:
        job["reused"] = _finished(job)
        if job["reused"]:
            print(f"{job['label']} | reused checkpoint", flush=True)
    todo = [job for job in jobs if not job["reused"]]
    n_jobs, threads = plan_jobs(args.jobs, len(todo), device)
    progress = Progress(todo)
    if n_jobs == 1:
        for job in todo:
            _train_or_exit(job, data, device, progress)
    else:
        print(f"training {len(todo)} models, {n_jobs} at a time, {threads} thread(s) each", flush=True)
        train_in_workers(todo, args, device, n_jobs, threads, progress)
    STATUS.end()
    trained = {_key(job): ae.load(job["path"], device=device) for job in jobs}
    return trained, {"jobs": n_jobs, "threads_per_job": threads}


def train_one(job, data, device, progress=None):
    """Build the job's model from its seed, fit it and save it atomically with its settings."""
    s = job["settings"]
    ae.set_seed(s["seed"])
    model = ae.build(s["model"], s["latent_dim"])
    x_train = torch.from_numpy(data["x_all"][job["idx"]])
    x_val = torch.from_numpy(data["x_all"][data["val_idx"]])
    history = ae.fit(model, x_train, x_val, epochs=s["epochs"], batch_size=s["batch_size"],
                     lr=s["lr"], seed=s["seed"], device=device, progress=progress)
    # threads are provenance, not a setting (any checkpoint is reused): they change a step only by
    # float rounding, though 60 epochs grow that to about seed-spread size (README, Reproducibility)
    ae.save(model, job["path"], meta={"settings": s, "history": history,
                                      "threads": torch.get_num_threads()})


def plan_jobs(requested, n_left, device):
    """(trainings at once, torch threads each): by default one training per core.

    Small MLPs scale badly across threads, so N one-thread trainings beat one N-thread training.
    On MPS, one job (the device does not share across processes).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_jobs = 1 if device.type == "mps" else requested or cores
    n_jobs = max(1, min(n_jobs, n_left))
    return n_jobs, (torch.get_num_threads() if n_jobs == 1 else max(1, cores // n_jobs))


class Progress:
    """One status line for the whole run: trainings done, those in flight, and an ETA.

    Each training weighs epochs x images x (parameters + ETA_OVERHEAD_PARAMS); the ETA divides the
    work left by the work done per second of wall time, so parallel jobs are accounted for.
    """

    def __init__(self, jobs):
        self.work = {job["label"]: job["work"] for job in jobs}
        self.flying, self.done_work, self.n_done = {}, 0.0, 0
        self.start = time.perf_counter()

    def epoch(self, label, info):
        self.flying[label] = info
        self.show(log=info["epoch"] % 10 == 0)      # a log file gets every 10th epoch

    def finished(self, label):
        self.flying.pop(label, None)
        self.done_work += self.work[label]
        self.n_done += 1
        self.show()

    def show(self, log=True):
        done = self.done_work + sum(self.work[label] * info["epoch"] / info["epochs"]
                                    for label, info in self.flying.items())
        elapsed = time.perf_counter() - self.start
        eta = _hms(elapsed / done * (sum(self.work.values()) - done)) if done else "?"
        flying = "; ".join(f"{label} {info['epoch']}/{info['epochs']} val {info['val_loss']:.1f}"
                           for label, info in self.flying.items())
        STATUS.show(f"{self.n_done}/{len(self.work)} trained | {flying or '-'}", f" | ETA {eta}", log)


class StatusLine:
    """The one line of status run.py keeps: on a terminal it is rewritten in place, never wider
    than LINE_WIDTH (or the terminal), and ended before anything else prints; a log file gets
    whole lines instead."""

    def __init__(self):
        self.shown = 0              # length of the line now open on the terminal (0: none)
        self.task = ""              # the task under way, for _Announced

    def show(self, text, tail="", log=True):
        width = min(LINE_WIDTH, shutil.get_terminal_size().columns) - 1   # the last column wraps
        if len(text) + len(tail) > width:
            text = text[:max(0, width - len(tail) - 1)] + "~"
        line = text + tail
        if sys.stdout.isatty():
            print("\r" + line.ljust(self.shown), end="", flush=True)
            self.shown = len(line)
        elif log:
            print(line, flush=True)

    def end(self):
        """End the open line, so that the next output starts on a line of its own."""
        if self.shown:
            print(flush=True)
            self.shown = 0


STATUS = StatusLine()


def _train_or_exit(job, data, device, progress):
    try:
        train_one(job, data, device, lambda info: progress.epoch(job["label"], info))
    except (FloatingPointError, ValueError, OSError) as err:
        STATUS.end()
        sys.exit(f"run.py: error: {job['label']}: {err}")
    progress.finished(job["label"])


def _finished(job):
    """Whether the job's checkpoint exists and was trained with exactly the job's settings."""
    if not os.path.exists(job["path"]):
        return False
    _, meta = ae.load(job["path"])
    return meta.get("settings") == job["settings"]


def _key(job):
    s = job["settings"]
    return s["model"], s["latent_dim"], s["seed"], s["held_out_digit"]


def seeds_of(args):
    return [FIRST_SEED + i for i in range(args.seeds)]


# ---- training in worker processes

def train_in_workers(todo, args, device, n_jobs, threads, progress):
    """Train `todo` in n_jobs processes; each loads the data itself and takes jobs from a queue.

    Workers report epochs, completions and failures on a second queue. A failure stops the run
    with its one-line message. However run.py ends (done, failure, Ctrl-C, SIGTERM), the workers
    get SIGTERM, on which they delete a half-written checkpoint and leave, and whatever is still
    queued is dropped, not flushed into a pipe nobody reads. If run.py itself is killed, the
    workers notice that their parent is gone and leave too.
    """
    ctx = multiprocessing.get_context("spawn")   # fork is unsafe with torch's thread pools and CUDA
    jobs_q, events = ctx.Queue(), ctx.Queue()
    for job in todo:
        jobs_q.put({k: job[k] for k in ("settings", "idx", "label", "path")})
    for _ in range(n_jobs):
        jobs_q.put(None)                         # one stop sign per worker
    workers = [ctx.Process(target=_worker, args=(args, str(device), threads, jobs_q, events,
                                                 os.getpid()), daemon=True) for _ in range(n_jobs)]
    # a worker is born with Ctrl-C and SIGTERM blocked (the mask survives exec), so a signal
    # during its start-up is held until _worker has its handlers; run.py gets its own at once after
    stop = {signal.SIGINT, signal.SIGTERM}
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)
        try:
            for w in workers:
                w.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stop)
        n_done = 0
        while n_done < len(todo):
            kind, label, payload = _next_event(events, workers)
            if kind == "epoch":
                progress.epoch(label, payload)
            elif kind == "done":
                n_done += 1
                progress.finished(label)
            else:
                STATUS.end()
                sys.exit(f"run.py: error: {label}: {payload}")
    finally:
        _stop_workers(workers, jobs_q)


def _stop_workers(workers, jobs_q):
    """SIGTERM every worker, SIGKILL those still there after STOP_S; drop the unsent jobs."""
    jobs_q.cancel_join_thread()     # else exit waits to push them into a pipe nobody reads
    workers = [w for w in workers if w.pid is not None]   # started ones only
    for w in workers:
        w.terminate()
    deadline = time.time() + STOP_S
    for w in workers:
        w.join(max(0.0, deadline - time.time()))
        if w.exitcode is None:      # still starting up (signals held) or stuck in a torch call
            w.kill()
            w.join()


def _next_event(events, workers):
    """The next (kind, label, payload) from the workers; an error event if one of them died."""
    while True:
        try:
            return events.get(timeout=1)
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                return "error", "worker", f"a training process stopped (exit code {dead[0].exitcode})"
            if all(w.exitcode is not None for w in workers):
                return "error", "worker", "the training processes ended before every training was done"


class _Stop(BaseException):
    """SIGTERM in a worker: unwinds the training, so that ae.save deletes a half-written file."""


def _worker(args, device, threads, jobs_q, events, parent):
    """A training process: takes jobs until a stop sign, reports every epoch to run.py."""
    def stop(signum, frame):
        raise _Stop

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches every process; run.py decides
    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _exit_with_parent(parent)
    try:
        torch.set_num_threads(threads)
        data = load_data(args)
        for job in iter(jobs_q.get, None):
            report = lambda info, label=job["label"]: events.put(("epoch", label, info))
            try:
                train_one(job, data, torch.device(device), report)
            except (FloatingPointError, ValueError, OSError) as err:   # OSError: disk full, say
                events.put(("error", job["label"], str(err)))
                break
            except Exception:
                events.put(("error", job["label"], traceback.format_exc()))
                break
            events.put(("done", job["label"], None))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # nothing left to save: SIGTERM may cut the teardown
    except _Stop:
        # unwound; now leave at once: no flush of events run.py no longer reads, and none of the
        # interpreter's teardown, which takes seconds on a busy machine
        os._exit(128 + signal.SIGTERM)


def _exit_with_parent(parent):
    """End this process as soon as run.py (pid `parent`) is gone: even SIGKILL of run.py stops
    the workers, also one that was still starting when run.py died."""
    def watch():
        while os.getppid() == parent:
            time.sleep(WATCH_PARENT_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# ---- the gauntlet: one function per task, each over every model of one seed

def run_gauntlet(trained, data, args, seed, judge, device, out_dir, first):
    """All tasks for one seed; returns {metric: {model: value}} and, for the first seed, figures."""
    names = args.models + list(ae.REFERENCES)      # the contestants, then the references
    models = _Announced({n: trained[(n, LATENT, seed, None)][0] for n in names})
    anomaly = {(z, d): _Announced({n: trained[(n, z, seed, d)][0] for n in names})
               for z, d in anomaly_trainings(args)}
    m = {"training_seconds": {n: trained[(n, LATENT, seed, None)][1]["history"]["seconds"]
                              for n in names}}
    figs = {}
    steps = [("reconstruction", lambda: task_reconstruction(models, data, seed)),
             ("classification", lambda: task_classification(models, data, seed, args.quick)),
             ("pixels", lambda: task_pixel_references(data, seed, args.quick, device)),
             ("baselines", lambda: (task_baselines(data, seed, device), None)),
             ("anomaly", lambda: task_anomaly(anomaly, data, seed)),
             ("generation", lambda: task_generation(models, data, judge, seed)),
             ("latent", lambda: task_latent_structure(models, anomaly[LATENT_ANOMALY, ANOMALY_DIGIT], data, seed,
                                                      args.quick, out_dir if first else None))]
    for step, task in steps:
        t, STATUS.task = time.time(), f"seed {seed}: {step}"
        STATUS.show(f"{STATUS.task} ...")
        metrics, figs[step] = task()
        for metric, by_model in metrics.items():      # the pixels join the contestants' metrics
            m.setdefault(metric, {}).update(by_model)
        STATUS.show(f"{STATUS.task} ({time.time() - t:.0f} s)")
        STATUS.end()
    if first:
        write_figures(figs, data, args, out_dir)
    return m


class _Announced(dict):
    """{name: model} whose items() names, on the status line, the model the task is at."""

    def items(self):
        for i, (name, model) in enumerate(super().items(), 1):
            STATUS.show(f"{STATUS.task}: {name} ({i}/{len(self)})", log=False)
            yield name, model


def task_reconstruction(models, data, seed):
    """Mean over the test images of the BCE summed over the pixels; 16 reconstructions to show."""
    bce, shown = {}, {}
    for name, model in models.items():
        ae.set_seed(seed)       # the VAEs sample in evaluation too, as in the companion code
        bce[name] = float(tasks.per_image_bce(model, data["x_test"]).mean())
        ae.set_seed(seed)
        shown[name] = tasks.reconstruct(model, data["x_test"][:N_SHOWN])
    return {"reconstruction_bce": bce}, shown


def task_classification(models, data, seed, quick):
    """Codes of the frozen encoders -> the converged probe, the article's probe, 10-NN, label budgets.

    Only the 550 labelled training images train; the validation images choose every setting
    (the L2 strength, the early-stopping epoch); the test images are only ever scored.
    """
    m, curves = {}, {}
    for name, model in models.items():
        z_all, z_test = _codes(model, data, seed, sample=True)
        ae.set_seed(seed)
        net = tasks.FrozenEncoderProbe(model).to(_device(model))
        scores, curves[name] = _classify(z_all, z_test, net, data, seed, quick)
        if name in VARIATIONAL:
            mu_all, mu_test = _codes(model, data, seed, sample=False)
            scores["probe_accuracy_mu"] = _converged_probe(mu_all, mu_test, data["probe_idx"], data)
        for metric, value in scores.items():
            m.setdefault(metric, {})[name] = value
    return m, curves


def task_pixel_references(data, seed, quick=False, device="cpu"):
    """The contestants' classification metrics on the raw 1,024 pixels, as model "pixels".

    What an encoder must beat: the same labelled, validation and test images, label-budget
    draws and seeds as `task_classification`; the article's probe is a Linear(1024, 10) on the
    pixels, initialised from the run seed and trained as on a frozen encoder.
    """
    ae.set_seed(seed)
    net = torch.nn.Linear(data["x_all"].shape[1], tasks.N_CLASSES).to(device)
    scores, curve = _classify(data["x_all"], data["x_test"], net, data, seed, quick)
    return {metric: {PIXELS: value} for metric, value in scores.items()}, curve


def _classify(z_all, z_test, net, data, seed, quick):
    """{metric: value} and the label-budget curve {budget: (mean, std)} of one set of features.

    z_all, z_test: features of all training images and of the test images; net: images -> logits
    for the article's probe.
    """
    y_all, probe = data["y_all"], data["probe_idx"]
    knn = tasks.knn_predict(z_all[probe], y_all[probe], z_test, k=10)
    scores = {"probe_accuracy": _converged_probe(z_all, z_test, probe, data),
              "probe_accuracy_reference_protocol": _articles_probe(net, data, seed),
              "knn_probe_accuracy": float(np.mean(knn == data["y_test"]))}
    curve = {}
    for budget in LABEL_BUDGETS:
        per_class = budget // tasks.N_CLASSES
        if per_class * 2 > np.bincount(y_all[data["train_idx"]]).min():
            continue    # the data set is too small for this budget (tiny test data)
        draws = QUICK["budget_draws"] if quick else BUDGET_DRAWS
        accs = [_converged_probe(z_all, z_test, _budget_draw(data, per_class, seed + i), data)
                for i in range(draws)]
        scores[f"probe_accuracy_{budget}_labels"] = float(np.mean(accs))
        curve[budget] = (float(np.mean(accs)), float(np.std(accs)))
    return scores, curve


def task_baselines(data, seed, device):
    """The article's probe without a trained autoencoder: three readings of "the baseline".

    baseline_as_published: what the companion code's baseline really was. Its Classifier hands
    Adam only the linear head's parameters (src/downstream/classification.py,
    configure_optimizers), so the random vanilla encoder never changes, but its BatchNorm layers
    follow the classifier into training mode (batch statistics, running averages updated).
    from_scratch: the vanilla encoder and the linear layer both trained, as the article describes.
    random_encoder: the random encoder frozen with BatchNorm in eval mode, only the layer trained;
    what the probe gets from the architecture alone.
    """
    m = {}
    for kind in ("baseline_as_published", "from_scratch", "random_encoder"):
        ae.set_seed(seed)
        model = ae.build("vanilla", LATENT).to(device)
        if kind == "random_encoder":
            net = tasks.FrozenEncoderProbe(model).to(device)
        else:
            if kind == "baseline_as_published":
                model.encoder.requires_grad_(False)   # no update, but .train() still reaches BatchNorm
            net = torch.nn.Sequential(model.encoder, torch.nn.Linear(LATENT, tasks.N_CLASSES)).to(device)
        m[f"probe_accuracy_{kind}"] = {"vanilla": _articles_probe(net, data, seed)}
    return m


def task_anomaly(anomaly, data, seed):
    """Each anomaly model, trained without digit d, scores every test image; positives are the d's.

    Two scores per model: the summed BCE, and the article's signed score sum(x_hat - x). Beside
    them, ink (each image's summed intensity) as a reference that needs no training, and as a
    diagnostic: the rank correlation of each score with ink. Ink ranks *low* ink as anomalous,
    the direction of the signed score (sum(x_hat) - ink); the summed BCE's direction, high ink,
    gets exactly 1 - that AUROC. Keys: `<metric>_digit_<d>` for every (latent 2) digit,
    `..._z<latent>` for the other latent sizes, and the plain `<metric>` for the article's digit
    at latent 2. Returns the ROC curves of the article's setting to plot.
    """
    y_test, ink = data["y_test"], tasks.ink(data["x_test"])
    m, curves = {}, {}
    put = lambda metric, name, value: m.setdefault(metric, {}).update({name: value})
    for (latent, digit), models in anomaly.items():
        is_anomaly = y_test == digit
        suffix = f"_digit_{digit}" + ("" if latent == LATENT_ANOMALY else f"_z{latent}")
        headline = latent == LATENT_ANOMALY and digit == ANOMALY_DIGIT
        scores = {}
        for name, model in models.items():
            ae.set_seed(seed)
            scores[name] = tasks.anomaly_scores(model, data["x_test"])
        scores["ink"] = (-ink, -ink)       # the reference: the same ranking under both names
        for name, (bce, signed) in scores.items():
            row = {"anomaly_auc": tasks.roc_auc(is_anomaly, bce),
                   "anomaly_auprc": tasks.average_precision(is_anomaly, bce),
                   "anomaly_auc_signed_score": tasks.roc_auc(is_anomaly, signed)}
            if name != "ink":
                row["anomaly_ink_spearman"] = tasks.spearman(bce, ink)
                row["anomaly_ink_spearman_signed_score"] = tasks.spearman(signed, ink)
            for metric, value in row.items():
                put(metric + suffix, name, value)
                if headline:
                    put(metric, name, value)
            if headline:
                curves[name] = [("low ink" if name == "ink" else "summed BCE",
                                 *tasks.roc_curve(is_anomaly, bce)[:2], row["anomaly_auc"])]
                if name != "ink":
                    curves[name].append(("signed (article)", *tasks.roc_curve(is_anomaly, signed)[:2],
                                         row["anomaly_auc_signed_score"]))
    return m, curves


def task_generation(models, data, judge, seed):
    """Samples of every model under each of its samplers, and interpolations of all, scored by the judge."""
    x_test, y_test = data["x_test"], data["y_test"]
    _, test_features = tasks.judge_images(judge, x_test[:N_GENERATED])
    m, figs = {}, {"samples": {}, "notes": {}, "gifs": {}}
    put = lambda metric, name, value: m.setdefault(metric, {}).update({name: value})
    for name, model in models.items():
        samples, components = draw_samples(model, data, seed)
        figs["samples"][name], figs["notes"][name] = {}, {}
        for suffix, generated in samples.items():
            quality = tasks.sample_quality(*tasks.judge_images(judge, generated), test_features)
            for k, v in quality.items():
                put(f"sample_{k}{suffix}", name, v)
            figs["samples"][name][SAMPLERS[suffix]] = generated[:N_SHOWN]
            figs["notes"][name][SAMPLERS[suffix]] = (f"legible {quality['legibility']:.2f} | diversity "
                                                     f"{quality['diversity']:.2f} | FD {quality['frechet']:.0f}")
        for suffix, k in components.items():
            put(f"sample_components{suffix}", name, k)
        # between the first two test images; the VAEs also with their noise drawn once per path
        for suffix, fixed in [("", False)] + ([("_fixed_noise", True)] if name in VARIATIONAL else []):
            ae.set_seed(seed)
            frames = tasks.interpolate(model, x_test[0], x_test[1], fixed_noise=fixed, seed=seed)
            path = tasks.path_quality(tasks.judge_images(judge, frames)[0], int(y_test[0]), int(y_test[1]))
            put(f"interpolation_confidence{suffix}", name, path["mean_confidence"])
            put(f"interpolation_third_class{suffix}", name, float(path["third_class"]))
            figs["gifs"][f"interp_{name}{suffix}.gif"] = frames
    return m, figs


def draw_samples(model, data, seed):
    """({metric suffix: (N_GENERATED, 1024) images}, {metric suffix: mixture size K}) of one model.

    "" is the model's own prior, where it has one (model.sample); "_gmm" the ex-post Gaussian
    mixture fitted to its training codes (the VAEs: sampled z, the codes their decoder was trained
    on), K chosen on the validation codes, decoded. The vq-VAE adds "_categorical" (per-dimension
    codebook frequencies of its training codes) and "_gmm_prequant" (a mixture on the encoder
    outputs before the quantiser, whose samples pass the quantiser). Only training and
    validation images are encoded: the test images never fit or choose anything.
    """
    samples, components = {}, {}
    ae.set_seed(seed)
    own = model.eval().sample(N_GENERATED)
    if own is not None:
        samples[""] = own.cpu().numpy()                                  # (N_GENERATED, 1024)
    ae.set_seed(seed)           # the same sampled codes as every other task's
    mixtures = {"_gmm": (tasks.encode(model, data["x_all"], sample=True), False)}   # (60000, Z)
    if hasattr(model.bottleneck, "codebook"):                           # the vq-VAE
        codebook = model.bottleneck.codebook.detach().cpu().numpy()     # (Z, 512)
        indices = tasks.vq_indices(model, data["x_all"])[data["train_idx"]]
        codes = tasks.sample_categorical(tasks.categorical_prior(indices, codebook.shape[1]), codebook,
                                         N_GENERATED, seed)             # (N_GENERATED, Z)
        samples["_categorical"] = tasks.decode(model, codes)
        mixtures["_gmm_prequant"] = (tasks.encoder_outputs(model, data["x_all"]), True)   # before the quantiser
    for suffix, (codes, through_bottleneck) in mixtures.items():
        try:
            gmm, _ = tasks.choose_gmm(codes[data["train_idx"]], codes[data["val_idx"]], seed)
        except ValueError as err:     # codes that admit no mixture, e.g. every dimension dead
            warnings.warn(f"{model.name}: no ex-post mixture ({err})", RuntimeWarning, stacklevel=2)
            continue
        draws = tasks.sample_gmm(gmm, N_GENERATED, seed)
        samples[suffix] = tasks.decode(model, draws, through_bottleneck=through_bottleneck)
        components[suffix] = len(gmm["weights"])
    return samples, components


def task_latent_structure(models, models_z2, data, seed, quick, map_dir=None):
    """Leave-one-out 10-NN accuracy of the 20-d test codes; with map_dir, their umap_lite maps too.

    The maps (first seed only: they are the slowest task) come with their trustworthiness, and
    the latent-2 codes are plotted as they are.
    """
    n_map = min(len(data["x_test"]), QUICK["map_points"]) if quick else len(data["x_test"])
    y_map, m, figs = data["y_test"][:n_map], {"latent_knn_accuracy": {}}, {"maps20": {}, "maps2": {},
                                                                           "notes20": {}, "notes2": {}}
    for name, model in models.items():
        z_map = _codes(model, data, seed, sample=True)[1][:n_map]            # (n_map, 20)
        knn = np.mean(tasks.knn_predict(z_map, y_map, z_map, k=10, exclude_self=True) == y_map)
        m["latent_knn_accuracy"][name] = float(knn)
        if map_dir is None:
            continue
        emb = cached_embedding(map_dir, name, z_map, seed, QUICK["umap_epochs"] if quick else None)
        trust = float(umap_lite.trustworthiness(z_map, emb, k=15))
        m.setdefault("umap_trustworthiness", {})[name] = trust
        figs["maps20"][name] = emb
        figs["notes20"][name] = f"trust(15) {trust:.3f} | 10-NN 20-d {knn:.3f}" + _dead_units_note(z_map)
        ae.set_seed(seed)
        z2 = tasks.encode(models_z2[name], data["x_test"][:n_map])             # (n_map, 2)
        knn2 = np.mean(tasks.knn_predict(z2, y_map, z2, k=10, exclude_self=True) == y_map)
        figs["maps2"][name], figs["notes2"][name] = z2, f"10-NN {knn2:.3f}" + _dead_units_note(z2)
    return m, figs


def _dead_units_note(z):
    """' | k of Z units constant' for a panel whose codes z (N, Z) have units that never vary.

    A unit counts as constant when its range over the images is below DEAD_SPAN of the widest
    unit's: a dead ReLU unit (always 0) turns a latent-2 map into a line.
    """
    spans = np.ptp(z, axis=0)                                               # (Z,)
    dead = int(np.sum(spans <= DEAD_SPAN * max(float(spans.max()), np.finfo(np.float32).tiny)))
    return f" | {dead} of {z.shape[1]} units constant" if dead else ""


def _codes(model, data, seed, sample):
    """Codes of all training images and of the test images, (60000, Z) and (10000, Z)."""
    ae.set_seed(seed)           # a VAE's sampled codes are the same in every task that asks
    return tasks.encode(model, data["x_all"], sample=sample), tasks.encode(model, data["x_test"], sample=sample)


def _converged_probe(z_all, z_test, train_idx, data):
    """Test accuracy of the converged probe trained on z_all[train_idx]; validation picks the L2."""
    y_all, val = data["y_all"], data["val_idx"]
    return tasks.linear_probe(z_all[train_idx], y_all[train_idx], z_all[val], y_all[val],
                              z_test, data["y_test"])


def _articles_probe(net, data, seed):
    """The article's probe on the 550 labelled images; early stopping on the validation images."""
    x_all, y_all, probe, val = data["x_all"], data["y_all"], data["probe_idx"], data["val_idx"]
    return tasks.train_classifier(net, x_all[probe], y_all[probe], x_all[val], y_all[val],
                                  data["x_test"], data["y_test"], seed)


def _budget_draw(data, per_class, seed):
    """A stratified draw of per_class labelled images per class from the training split."""
    train_idx = data["train_idx"]
    return train_idx[tasks.label_budget_indices(data["y_all"][train_idx], per_class, seed)]


def cached_embedding(out_dir, name, z, seed, n_epochs):
    """umap_lite of the codes, cached beside the checkpoints (it is the slowest task)."""
    key = hashlib.sha1(z.tobytes() + json.dumps([seed, n_epochs]).encode()).hexdigest()[:12]
    path = os.path.join(out_dir, "cache", f"umap-{name}-{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    emb = umap_lite.embed(z, seed=seed, n_epochs=n_epochs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tasks.write_atomically(path, lambda tmp: np.save(tmp, emb))
    return emb


def get_judge(data, args, device, out_dir):
    """The digit classifier that scores samples and interpolations, trained once and cached."""
    epochs = QUICK["judge_epochs"] if args.quick else JUDGE_EPOCHS
    path = os.path.join(out_dir, "checkpoints",
                        f"judge-{data['fingerprint']}-e{epochs}-n{len(data['train_idx'])}-split{SPLIT_SEED}.pt")
    judge = tasks.Judge().to(device)
    if os.path.exists(path):
        judge.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return judge.eval()
    idx = data["train_idx"]
    judge = tasks.train_judge(data["x_all"][idx], data["y_all"][idx], epochs=epochs, device=device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tasks.write_atomically(path, lambda tmp: torch.save(judge.state_dict(), tmp))
    return judge


def write_figures(figs, data, args, out_dir):
    """The first seed's figures and GIFs, beside REPORT.md."""
    maps, gen = figs["latent"], figs["generation"]
    y_map = data["y_test"][:len(next(iter(maps["maps20"].values())))]
    names = FASHION_CLASSES if args.dataset == "fashion" else None
    at = lambda filename: os.path.join(out_dir, filename)
    tasks.plot_reconstructions(data["x_test"][:N_SHOWN], figs["reconstruction"], at("reconstructions.png"))
    if gen["samples"]:
        tasks.plot_samples(gen["samples"], at("samples.png"), gen["notes"], order=SAMPLERS.values())
    for filename, frames in gen["gifs"].items():
        tasks.save_gif(frames, at(filename))
    tasks.plot_latents(maps["maps20"], y_map, at("latent_umap.png"), maps["notes20"], names)
    tasks.plot_latents(maps["maps2"], y_map, at("latent_2d.png"), maps["notes2"], names)
    tasks.plot_roc(figs["anomaly"], at("anomaly_roc.png"))
    curves = figs["classification"]
    budgets = sorted({b for c in curves.values() for b in c})
    lines = lambda c: ([c[b][0] for b in budgets], [c[b][1] for b in budgets])
    if budgets:
        tasks.plot_label_budget(budgets, {n: lines(c) for n, c in curves.items()}, at("label_budgets.png"),
                                draws=QUICK["budget_draws"] if args.quick else BUDGET_DRAWS,
                                references={PIXELS: lines(figs["pixels"])})


def _device(module):
    return next(module.parameters()).device


# ---- results

def main(argv=None):
    args = parse_args(argv)
    t_start, stages = time.time(), {}
    out_dir = os.path.join(args.out, args.dataset)
    device = preflight(args)
    env = environment(device)       # before any output: figures written into a git tree dirty it
    data = load_data(args)
    print(f"{args.dataset}: {len(data['train_idx'])} train / {len(data['val_idx'])} val / "
          f"{len(data['x_test'])} test images; models: {', '.join(args.models)}; "
          f"seeds: {', '.join(map(str, seeds_of(args)))}", flush=True)
    stages["data"] = time.time() - t_start
    jobs = training_jobs(args, data, out_dir)
    t = time.time()
    trained, parallel = train_all(jobs, data, args, device)
    stages["training"] = time.time() - t
    torch.set_num_threads(TASK_THREADS)
    t = time.time()
    STATUS.show("judge (the digit classifier that scores samples) ...")
    judge = get_judge(data, args, device, out_dir)
    STATUS.end()
    per_seed = [run_gauntlet(trained, data, args, seed, judge, device, out_dir, first=i == 0)
                for i, seed in enumerate(seeds_of(args))]
    stages["tasks"] = time.time() - t
    stages["total"] = time.time() - t_start
    results = {"config": config(args, data, argv), "environment": {**env, **parallel},
               "stages_seconds": stages,
               "trainings": [{"training": j["label"], "checkpoint": os.path.basename(j["path"]),
                              "reused": j["reused"], "seconds": trained[_key(j)][1]["history"]["seconds"],
                              "threads": trained[_key(j)][1].get("threads")} for j in jobs],
               "finished": datetime.datetime.now().isoformat(timespec="seconds"),
               "metrics": summarise(per_seed)}
    path = os.path.join(out_dir, "results.json")
    tasks.write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(results, indent=1)))
    report_path = write_report(results, out_dir)
    remove_stale_figures(out_dir, t_start)
    print(f"done in {_hms(stages['total'])}: {report_path} (results: {path})")
    return results


def remove_stale_figures(out_dir, since):
    """Delete the figures and GIFs in out_dir that this run (started at `since`) did not write:
    those of models or tasks an earlier report had and this one lacks."""
    for path in pathlib.Path(out_dir).glob("*"):
        if path.suffix in (".png", ".gif") and path.stat().st_mtime < since:
            path.unlink()


def config(args, data, argv):
    """The run's settings as results.json records them, with the command that reproduces it."""
    command = "python run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return {**vars(args), "seeds": seeds_of(args), "latent_dims": [LATENT, LATENT_ANOMALY],
            "n_train": int(len(data["train_idx"])), "n_val": int(len(data["val_idx"])),
            "n_test": int(len(data["x_test"])), "probe_labels": int(len(data["probe_idx"])),
            "split": SPLIT, "command": command.strip()}


def summarise(per_seed):
    """[{metric: {model: v}}] over seeds -> {metric: {model: {mean, std, runs}}}."""
    out = {}
    for metric in per_seed[0]:
        out[metric] = {}
        for name in per_seed[0][metric]:
            runs = [r[metric][name] for r in per_seed if name in r.get(metric, {})]
            out[metric][name] = {"mean": float(np.mean(runs)),
                                 "std": float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0,
                                 "runs": runs}
    return out


def environment(device):
    """Versions, processor, device and the git commit the numbers came from."""
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=5,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "cpu": cpu,
            "cpu_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}


# ---- the audit: the article's conclusions, each checked in every seed

def audit(m, names, digits):
    """[claim, verdict, evidence] rows: confirmed if the claim holds in every seed, not confirmed
    if in none, depends otherwise; the evidence gives the count and each seed's numbers."""
    n_seeds = len(m["reconstruction_bce"][names[0]]["runs"])
    per_seed = [{metric: {n: v["runs"][i] for n, v in by_model.items() if len(v["runs"]) > i}
                 for metric, by_model in m.items()} for i in range(n_seeds)]
    rows = []
    for claim, needed, check in CLAIMS:
        if not all(n in names for n in needed):
            continue
        try:
            outcomes = [check(s, names, digits) for s in per_seed]
        except KeyError:
            continue     # the run lacks a task this claim needs (e.g. no generative model)
        if None in outcomes:
            continue     # or a setting it needs (e.g. one anomaly digit only)
        k = sum(holds for holds, _ in outcomes)
        verdict = "confirmed" if k == n_seeds else "not confirmed" if k == 0 else "depends"
        evidence = ("one run: " + outcomes[0][1] if n_seeds == 1 else
                    f"holds in {k} of {n_seeds} seeds; " +
                    " / ".join(f"{FIRST_SEED + i}: {ev}" for i, (_, ev) in enumerate(outcomes)))
        rows.append([claim, verdict, evidence])
    return rows


def claim_shallow_worst(s, names, digits):
    worst = _ranked(s, "reconstruction_bce", names)[-1]
    return worst == "shallow", f"worst {worst} {s['reconstruction_bce'][worst]:.1f}"


def claim_top_three(s, names, digits):
    best = _ranked(s, "reconstruction_bce", names)[:3]
    return set(best) == {"vanilla", "sparse", "vq"}, _listed(s["reconstruction_bce"], best, 1)


def claim_vaes_reconstruct_worse(s, names, digits):
    bce, vaes = s["reconstruction_bce"], [v for v in VARIATIONAL if v in names]
    holds = all(bce[v] > bce["vanilla"] for v in vaes) and max(vaes, key=bce.get) == "beta_vae_strict"
    return holds, _listed(bce, ["vanilla"] + vaes, 1)


def claim_denoising_best(metric):
    def check(s, names, digits):
        best = _ranked(s, metric, names)[-1]
        return best == "denoising", f"best {best} {s[metric][best]:.3f}"
    return check


def claim_sparse_below_baseline(s, names, digits):
    sparse, base = s["probe_accuracy_reference_protocol"]["sparse"], _baseline(s)
    return sparse < base, _listed({"sparse": sparse, "baseline": base}, ["sparse", "baseline"], 3)


def claim_sparse_below_median(s, names, digits):
    sparse = s["probe_accuracy"]["sparse"]
    median = float(np.median([s["probe_accuracy"][n] for n in names if n != "sparse"]))
    return sparse < median, _listed({"sparse": sparse, "others' median": median},
                                    ["sparse", "others' median"], 3)


def claim_beat_baseline(s, names, digits):
    others, base = [n for n in names if n != "sparse"], _baseline(s)
    acc = s["probe_accuracy_reference_protocol"]
    above = [n for n in others if acc[n] > base]
    d = _apart([base] + [acc[n] for n in others], 3)
    return len(above) >= len(others) - 1, f"{len(above)} of {len(others)} above {base:.{d}f}"


def claim_loose_best_vae(s, names, digits):
    acc = s["probe_accuracy_reference_protocol"]
    best = max(VARIATIONAL, key=acc.get)
    return best == "beta_vae_loose", _listed(acc, VARIATIONAL, 3)


def claim_anomaly_order(metric):
    def check(s, names, digits):
        order = _ranked(s, metric, names)[::-1]
        return order[:2] == ["shallow", "stacked"], _listed(s[metric], order[:3], 3)
    return check


def claim_anomaly_order_every_digit(metric):
    def check(s, names, digits):
        if len(digits) < 2:
            return None
        held = [d for d in digits if _ranked(s, f"{metric}_digit_{d}", names)[::-1][:2] == ["shallow", "stacked"]]
        firsts = ", ".join(f"{d}: {_ranked(s, f'{metric}_digit_{d}', names)[-1]}" for d in digits)
        return len(held) == len(digits), f"holds for {len(held)} of {len(digits)} digits (best: {firsts})"
    return check


def claim_anomaly_order_every_latent(metric):
    def check(s, names, digits):
        latents = _anomaly_latents(s)
        if len(latents) < 2:
            return None
        key = lambda z: f"{metric}_digit_{ANOMALY_DIGIT}" + ("" if z == LATENT_ANOMALY else f"_z{z}")
        tops = {z: _ranked(s, key(z), names)[::-1][:2] for z in latents}
        rho = tasks.spearman([s[key(latents[0])][n] for n in names], [s[key(latents[-1])][n] for n in names])
        return (all(t == ["shallow", "stacked"] for t in tops.values()),
                "; ".join(f"z={z}: {', '.join(f'{n} {s[key(z)][n]:.3f}' for n in t)}" for z, t in tops.items())
                + f"; rank correlation z={latents[0]} vs z={latents[-1]} {rho:.2f}")
    return check


def claim_pca_first_try(metric):
    """PCA within CLEAR_MARGIN of the best contestant, at the article's digit or (sweep) on the
    mean over the held-out digits: a first try that is hardly worse than the best autoencoder."""
    def check(s, names, digits):
        keys = [metric] if len(digits) < 2 else [f"{metric}_digit_{d}" for d in digits]
        mean = lambda n: float(np.mean([s[k][n] for k in keys]))
        best = max(names, key=mean)
        close = sum(s[k]["pca"] >= max(s[k][n] for n in names) - CLEAR_MARGIN for k in keys)
        return (mean("pca") >= mean(best) - CLEAR_MARGIN,
                f"pca {mean('pca'):.3f}, shallow {mean('shallow'):.3f}, best {best} {mean(best):.3f}"
                + (f" (means over {len(keys)} digits; pca close to the best for {close})" if len(keys) > 1 else ""))
    return check


def claim_signed_score_is_ink(s, names, digits):
    rho = {n: s["anomaly_ink_spearman_signed_score"][n] for n in names}
    strong = [n for n in names if abs(rho[n]) >= INK_STRONG]
    median = float(np.median(list(rho.values())))
    return (len(strong) > len(names) / 2,
            f"|ρ| >= {INK_STRONG} for {len(strong)} of {len(names)}; median ρ {median:.3f}")


def claim_beat_pixels(metric):
    def check(s, names, digits):
        pixels = s[metric]["pixels"]
        above = [n for n in names if s[metric][n] > pixels]
        return len(above) > len(names) / 2, f"{len(above)} of {len(names)} above pixels {pixels:.3f}"
    return check


def claim_strict_most_legible(suffix):
    """Among the contestants in `names` that have this sampler (never a reference model)."""
    def check(s, names, digits):
        legible = {n: v for n, v in s[f"sample_legibility{suffix}"].items() if n in names}
        best = max(legible, key=legible.get)
        return best == "beta_vae_strict", _listed(legible, list(legible), 2)
    return check


def claim_loose_diverse_less_legible(s, names, digits):
    div, leg = s["sample_diversity"], s["sample_legibility"]
    strict, loose = "beta_vae_strict", "beta_vae_loose"
    dd, dl = _apart([div[loose], div[strict]], 2), _apart([leg[loose], leg[strict]], 2)
    return (div[loose] > div[strict] and leg[loose] < leg[strict],
            f"diversity {div[loose]:.{dd}f} vs {div[strict]:.{dd}f}, "
            f"legible {leg[loose]:.{dl}f} vs {leg[strict]:.{dl}f}")


def claim_vq_samples_worst(s, names, digits):
    legible = {n: v for n, v in s["sample_legibility"].items() if n in names}   # own priors, contestants
    least = sorted(legible, key=legible.get)[:2]
    return least[0] == "vq", "least legible: " + _listed(legible, least, 2)


def claim_vq_needs_learned_prior(suffix):
    """The learned prior's vq-VAE samples beat uniform codes: more legible and a lower FD."""
    def check(s, names, digits):
        leg, fd = s[f"sample_legibility{suffix}"]["vq"], s[f"sample_frechet{suffix}"]["vq"]
        leg0, fd0 = s["sample_legibility"]["vq"], s["sample_frechet"]["vq"]
        return leg > leg0 and fd < fd0, f"legible {leg:.2f} vs {leg0:.2f} uniform, FD {fd:.0f} vs {fd0:.0f}"
    return check


def claim_only_vaes_sample(s, names, digits):
    """No deterministic contestant with the ex-post mixture reaches the VAEs' mean legibility with
    their own N(0, I) prior."""
    mixture, own = s["sample_legibility_gmm"], s["sample_legibility"]
    deterministic = [n for n in names if n not in ae.GENERATIVE]
    vaes = float(np.mean([own[n] for n in names if n in VARIATIONAL]))
    best = max(deterministic, key=mixture.get)
    return mixture[best] < vaes, (f"best deterministic with the mixture: {best} {mixture[best]:.2f}; "
                                  f"VAEs with their own prior: mean {vaes:.2f}")


def claim_vae_interpolations(s, names, digits):
    conf = s["interpolation_confidence"]
    vaes = np.mean([conf[n] for n in names if n in VARIATIONAL])
    others = np.mean([conf[n] for n in names if n not in VARIATIONAL])
    d = _apart([vaes - others, CLEAR_MARGIN], 3)
    return vaes - others > CLEAR_MARGIN, f"VAEs {vaes:.{d}f}, others {others:.{d}f} (lead {vaes - others:.{d}f})"


def claim_same_training_time(s, names, digits):
    seconds = [s["training_seconds"][n] for n in names]
    ratio = max(seconds) / min(seconds)
    return ratio < SAME_TIME_RATIO, (f"{min(seconds):.0f} to {max(seconds):.0f} s "
                                     f"(x{ratio:.{_apart([ratio, SAME_TIME_RATIO], 2)}f})")


# (the article's claim, the contestants it needs, its check on one seed's numbers)
CLAIMS = [
    ("The shallow AE reconstructs worst.", ("shallow",), claim_shallow_worst),
    ("Vanilla, sparse and vq-VAE share first place in reconstruction.",
     ("vanilla", "sparse", "vq"), claim_top_three),
    ("The VAEs reconstruct worse than vanilla; strict beta-VAE worst of them.",
     ("vanilla",) + VARIATIONAL, claim_vaes_reconstruct_worse),
    ("Denoising features classify best (the article's probe).", ("denoising",),
     claim_denoising_best("probe_accuracy_reference_protocol")),
    ("Denoising features classify best (converged probe).", ("denoising",),
     claim_denoising_best("probe_accuracy")),
    ("Sparse features are not suited for classification: below the baseline (the article's probe).",
     ("sparse",), claim_sparse_below_baseline),
    ("Sparse features are not suited for classification: below the others' median (converged probe).",
     ("sparse",), claim_sparse_below_median),
    ("Nearly all autoencoders (sparse aside) beat the baseline (the article's probe).", (),
     claim_beat_baseline),
    ("Among the VAEs, the loose beta-VAE classifies best (the article's probe).", VARIATIONAL,
     claim_loose_best_vae),
    ("Shallow is best at anomaly detection, stacked second (summed BCE score).",
     ("shallow", "stacked"), claim_anomaly_order("anomaly_auc")),
    ("Shallow is best at anomaly detection, stacked second (the article's signed score).",
     ("shallow", "stacked"), claim_anomaly_order("anomaly_auc_signed_score")),
    ("The anomaly order (shallow best, stacked second) is stable for every held-out digit (summed BCE).",
     ("shallow", "stacked"), claim_anomaly_order_every_digit("anomaly_auc")),
    ("The anomaly order (shallow best, stacked second) is stable for every held-out digit (signed score).",
     ("shallow", "stacked"), claim_anomaly_order_every_digit("anomaly_auc_signed_score")),
    ("The anomaly order is stable across latent sizes (held-out 1; summed BCE).", ("shallow", "stacked"),
     claim_anomaly_order_every_latent("anomaly_auc")),
    ("The anomaly order is stable across latent sizes (held-out 1; signed score).", ("shallow", "stacked"),
     claim_anomaly_order_every_latent("anomaly_auc_signed_score")),
    (f"PCA is a good first try for anomaly detection: within {CLEAR_MARGIN} of the best contestant "
     "(summed BCE).", ("shallow",), claim_pca_first_try("anomaly_auc")),
    (f"PCA is a good first try for anomaly detection: within {CLEAR_MARGIN} of the best contestant "
     "(signed score).", ("shallow",), claim_pca_first_try("anomaly_auc_signed_score")),
    (f"(ours) The signed score mostly measures ink: |rank correlation| >= {INK_STRONG} for most "
     "contestants.", (), claim_signed_score_is_ink),
    ("(ours) Autoencoder features beat raw pixels with 550 labels: most contestants above them "
     "(converged probe).", (), claim_beat_pixels("probe_accuracy")),
    ("(ours) Autoencoder features beat raw pixels with 550 labels: most contestants above them "
     "(the article's probe).", (), claim_beat_pixels("probe_accuracy_reference_protocol")),
    ("The strict beta-VAE gives the most meaningful samples (own priors: the four generative "
     "contestants).", ae.GENERATIVE, claim_strict_most_legible("")),
    ("The strict beta-VAE gives the most meaningful samples (ex-post mixture: all contestants).",
     ae.GENERATIVE, claim_strict_most_legible("_gmm")),
    ("The loose beta-VAE's samples are more diverse but less legible than the strict one's.",
     ("beta_vae_strict", "beta_vae_loose"), claim_loose_diverse_less_legible),
    ("vq-VAE samples (uniform codes) do not resemble digits.", ae.GENERATIVE, claim_vq_samples_worst),
    ("vq-VAE samples need a learned prior: a learned categorical prior beats uniform codes (more "
     "legible, lower FD).", ("vq",), claim_vq_needs_learned_prior("_categorical")),
    ("vq-VAE samples need a learned prior: an ex-post mixture on the codes beats uniform codes.",
     ("vq",), claim_vq_needs_learned_prior("_gmm")),
    ("vq-VAE samples need a learned prior: a mixture before the quantiser beats uniform codes.",
     ("vq",), claim_vq_needs_learned_prior("_gmm_prequant")),
    ("Only the VAEs can sample: no deterministic model with an ex-post mixture is as legible as the "
     "VAEs' own prior (their mean).", ("vanilla",) + VARIATIONAL, claim_only_vaes_sample),
    (f"VAE interpolations stay digit-like; the others fade (VAEs lead the judge's confidence by "
     f"more than {CLEAR_MARGIN}).", ("vae", "vanilla"), claim_vae_interpolations),
    (f"Training time is about the same for every model (within x{SAME_TIME_RATIO}).", ("shallow", "vanilla"),
     claim_same_training_time),
]


def _apart(values, digits):
    """Decimals, at least `digits`, at which the unequal ones among `values` print unequal (at
    most EVIDENCE_MAX_DIGITS): evidence rounded into a tie would contradict its verdict."""
    for d in range(digits, EVIDENCE_MAX_DIGITS):
        if len({f"{v:.{d}f}" for v in values}) == len(set(values)):
            return d
    return EVIDENCE_MAX_DIGITS


def _listed(values, names, digits):
    """'name value, name value' with enough decimals to tell the values apart."""
    d = _apart([values[n] for n in names], digits)
    return ", ".join(f"{n} {values[n]:.{d}f}" for n in names)


def _ranked(s, metric, names):
    """names sorted by one seed's value of metric, lowest first."""
    return sorted(names, key=lambda n: s[metric][n])


def _anomaly_latents(s):
    """The latent sizes whose anomaly models this seed's numbers hold."""
    prefix = f"anomaly_auc_digit_{ANOMALY_DIGIT}_z"
    return [LATENT_ANOMALY] + sorted(int(k[len(prefix):]) for k in s if k.startswith(prefix))


def _baseline(s):
    """The article's baseline as the companion code really ran it (see task_baselines)."""
    return s["probe_accuracy_baseline_as_published"]["vanilla"]


# ---- the report, one section at a time

def write_report(results, out_dir):
    """REPORT.md beside results.json: every table, every figure, the settings and the audit."""
    cfg, m = results["config"], results["metrics"]
    names = [n for n in ae.MODELS if n in cfg["models"]]
    article = cfg["dataset"] == "mnist"          # the article published MNIST numbers only
    sections = [report_header(results, article), report_summary(m, names),
                report_reconstruction(m, names, article), report_training_time(results, names, article),
                report_samples(m, names), report_interpolation(m, names), report_latent(m, names),
                report_classification(m, names, cfg, article), report_anomaly(m, names, cfg, article, out_dir),
                report_published(m, names) if article else "",
                report_audit(m, names, cfg), report_settings(results)]
    path = os.path.join(out_dir, "REPORT.md")
    tasks.write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text("\n".join(s for s in sections if s)))
    return path


def report_header(results, article):
    cfg, env, trained = results["config"], results["environment"], results["trainings"]
    lines = [f"# Autoencoder Bake-Off: {cfg['dataset']}\n"]
    if cfg["quick"]:
        lines.append(f"> **Quick run: NOT the full protocol.** {cfg['n_train']} training images, "
                     f"{cfg['epochs']} epochs, reduced map and judge settings. Numbers are for checking "
                     "the pipeline only; run `python run.py` for the real comparison.\n")
    elif cfg["epochs"] != EPOCHS:
        lines.append(f"> **Shortened run: {cfg['epochs']} epochs instead of the article's {EPOCHS}.** "
                     "Differences from the published numbers are expected.\n")
    n_seeds, reused = len(cfg["seeds"]), sum(t["reused"] for t in trained)
    lines.append(
        f"`{cfg['command']}` finished {results['finished']} in {_hms(results['stages_seconds']['total'])} "
        f"on {env['gpu'] or env['cpu']} ({env['device']}); its {len(trained)} trainings took "
        f"{_hms(sum(t['seconds'] for t in trained))} of training time in all. "
        + (f"{reused} of them were reused from checkpoints of an earlier run with the same settings. "
           if reused else "")
        + (f"This run trained {len(trained) - reused}, {env['jobs']} at a time with "
           f"{env['threads_per_job']} torch thread(s) each. " if reused < len(trained) else "")
        + f"{n_seeds} run(s) per training (seeds {', '.join(map(str, cfg['seeds']))}); "
        + ("tables show mean ± std over the runs. " if n_seeds > 1 else "tables show single runs (no error bars). ")
        + "Figures and GIFs show the first seed."
        + (" *Published* numbers are the article's single MNIST runs (PROTOCOL.md); *diff* is ours minus "
           "published; *within 2 std* says whether the published value lies within our mean ± 2 std."
           if article else "") + "\n")
    return "\n".join(lines)


def report_summary(m, names):
    return "## Summary\n\n" + _table(
        ["model", "recon BCE ↓", "probe acc (converged) ↑", "probe acc (article's probe) ↑",
         "anomaly AUROC ↑", "training s"],
        [[_label(n), _fmt(m, "reconstruction_bce", n, 2), _fmt(m, "probe_accuracy", n, 4),
          _fmt(m, "probe_accuracy_reference_protocol", n, 4), _fmt(m, "anomaly_auc", n, 4),
          _fmt(m, "training_seconds", n, 0)]
         for n in _rows(m, ["reconstruction_bce", "probe_accuracy", "anomaly_auc"], names)])


def report_reconstruction(m, names, article):
    return ("## Reconstruction\n\nMean over the test images of the BCE summed over the 1024 pixels. "
            "The VAEs sample in evaluation too, as the companion code did.\n\n"
            + _compare_table(m, "reconstruction_bce", names, article, 2, relative=True)
            + "\nFirst 16 test images (top) and their reconstructions:\n\n"
              "![reconstructions](reconstructions.png)\n")


def report_training_time(results, names, article):
    env, m = results["environment"], results["metrics"]
    return (f"## Training time\n\nWall time of {results['config']['epochs']} epochs incl. per-epoch "
            f"validation, latent 20, on {env['gpu'] or env['cpu']}, as timed when each model was trained"
            + (" (published: one GPU, data loading dominated)." if article else ".") + "\n\n"
            + _compare_table(m, "training_seconds", names, article, 0, spread=False))


def report_samples(m, names):
    shown = _rows(m, ["sample_legibility", "sample_legibility_gmm"], names)   # + reference models
    rows = [[_label(n), SAMPLERS[suffix], _fmt(m, f"sample_legibility{suffix}", n, 3),
             _fmt(m, f"sample_diversity{suffix}", n, 2), _fmt(m, f"sample_frechet{suffix}", n, 1),
             _fmt(m, f"sample_components{suffix}", n, 1)]
            for n in shown for suffix in SAMPLERS if n in m.get(f"sample_legibility{suffix}", {})]
    if not rows:
        return ""
    return ("## Samples\n\n"
            f"{N_GENERATED} unconditional samples per model and sampler, scored by a small MLP digit "
            "classifier (the *judge*, trained once on the training split): *legible* = share the judge "
            "classifies with confidence > 0.9; *diversity* = entropy of the predicted-class "
            "histogram (max ln 10 = 2.30); *FD* = Frechet distance between the judge's penultimate "
            f"features of samples and of {N_GENERATED} test images (lower is closer).\n\n"
            "Samplers: *own prior* = the model's own (N(0, I) for the VAEs, a uniform codebook index "
            "per dimension for the vq-VAE, a reference model's own Gaussian); *ex-post mixture* = a "
            "Gaussian mixture with full covariances fitted by EM to the model's training codes (the "
            f"VAEs: sampled z), its size K from {{{', '.join(map(str, tasks.GMM_K_GRID))}}} chosen by "
            "validation log-likelihood, decoded; *learned categorical* = each latent dimension's "
            "codebook index drawn independently with its frequency among the training codes; "
            "*mixture before the quantiser* = the mixture fitted to the vq-VAE's encoder outputs, its "
            "samples quantised, then decoded. *K* = the chosen mixture size.\n\n"
            + _table(["model", "sampler", "legible ↑", "diversity ↑", "FD ↓", "K"], rows)
            + "\n![samples: one row per model, one column block per sampler](samples.png)\n")


def report_interpolation(m, names):
    fixed, shown = [n for n in names if n in VARIATIONAL], _rows(m, ["interpolation_confidence"], names)
    rows = [[_label(n), _fmt(m, "interpolation_confidence", n, 3), _fmt(m, "interpolation_third_class", n, 2),
             _fmt(m, "interpolation_confidence_fixed_noise", n, 3),
             _fmt(m, "interpolation_third_class_fixed_noise", n, 2)]
            for n in shown]
    text = ("## Interpolation\n\nBetween the first two test images, through the encoder outputs before "
            f"the bottleneck ({tasks.INTERP_STEPS} steps). *Confidence* = the judge's mean top-class "
            "probability along the path; *third class* = share of runs whose path is classified as a "
            "digit other than its two ends somewhere. *Fixed noise*: the VAE's noise drawn once for "
            "the whole path.\n\n"
            + _table(["model", "confidence", "third class", "confidence (fixed noise)",
                      "third class (fixed noise)"], rows)
            + "\n" + " ".join(f"![{n}](interp_{n}.gif)" for n in shown) + "\n")
    if fixed:
        text += ("\nFixed noise: " + " ".join(f"![{n} fixed](interp_{n}_fixed_noise.gif)" for n in fixed)
                 + "\n\nGIF order: " + ", ".join(shown) + "; then " + ", ".join(fixed) + " with fixed noise.\n")
    return text


def report_latent(m, names):
    text = "## Latent structure\n\n"
    if "umap_trustworthiness" in m:
        text += ("20-d test codes mapped to 2-D by `umap_lite` (15 neighbours, min_dist 0.1), first "
                 "seed. *Trust* = trustworthiness (k = 15) of the map; *10-NN* = leave-one-out 10-NN "
                 "accuracy of the 20-d codes on the test images.\n\n"
                 + _table(["model", "trust(15) ↑", "10-NN acc ↑"],
                          [[_label(n), _fmt(m, "umap_trustworthiness", n, 3),
                            _fmt(m, "latent_knn_accuracy", n, 3)]
                           for n in _rows(m, ["latent_knn_accuracy"], names)])
                 + "\n![latent maps, 20-d codes through umap_lite](latent_umap.png)\n\n")
    return text + ("The raw codes of the latent-2 models (trained without the anomaly digit). A panel "
                   "notes latent units that are constant over the test images (a dead ReLU unit "
                   "draws the map as a line):\n\n"
                   "![latent-2 codes](latent_2d.png)\n")


def report_classification(m, names, cfg, article):
    rows = [[_label(n), _fmt(m, "probe_accuracy", n, 4), _fmt(m, "probe_accuracy_mu", n, 4),
             _fmt(m, "probe_accuracy_reference_protocol", n, 4)]
            + (_published_cells(m, "probe_accuracy_reference_protocol", n, 4) if article else [])
            + [_fmt(m, "knn_probe_accuracy", n, 4)] for n in _rows(m, ["probe_accuracy"], names)]
    pixels = PIXELS in m.get("probe_accuracy", {})
    text = ("## Classification\n\n"
            f"Frozen encoder (+ bottleneck), {cfg['probe_labels']} labelled training images. *Converged*: "
            "multinomial logistic regression on standardised codes, trained to convergence, L2 "
            "strength picked on the validation set. *Article's probe*: a linear layer, Adam lr 1e-3, "
            "batch 32, at most 20 epochs, early stop on validation accuracy, patience 3. *mu*: the "
            "VAEs' mean code instead of a sample. *10-NN*: k-NN (k = 10) on the same labels."
            + (" The last row, *pixels*, is no contestant: the same probes on the raw 1,024 pixels of "
               "the same images (the article's probe: a linear layer on the pixels), the reference an "
               "encoder must beat." if pixels else "") + "\n\n"
            + _table(["model", "converged", "converged (mu)", "article's probe"]
                     + (["published", "diff", "within 2 std"] if article else []) + ["10-NN"], rows)
            + "\n" + report_baselines(m, article))
    budgets = [b for b in LABEL_BUDGETS if f"probe_accuracy_{b}_labels" in m]
    if budgets:
        text += ("\nLabel budgets: converged probe trained on a stratified draw of N labels "
                 f"({QUICK['budget_draws'] if cfg['quick'] else BUDGET_DRAWS} draw(s) per budget and "
                 "seed, averaged):\n\n"
                 + _table(["model"] + [f"{b} labels" for b in budgets],
                          [[_label(n)] + [_fmt(m, f"probe_accuracy_{b}_labels", n, 3) for b in budgets]
                           for n in _rows(m, [f"probe_accuracy_{budgets[0]}_labels"], names)])
                 + "\n![accuracy vs labels](label_budgets.png)\n")
    return text


def report_baselines(m, article):
    rows = [["as published: random encoder, weights fixed, BatchNorm in training mode, head trained",
             "probe_accuracy_baseline_as_published"],
            ["from scratch: encoder and head trained", "probe_accuracy_from_scratch"],
            ["random encoder frozen, BatchNorm in eval mode, head trained", "probe_accuracy_random_encoder"]]
    return ("Three baselines without a trained autoencoder: the vanilla encoder's architecture + a "
            "linear layer, the article's probe on the same labels. The article's 0.436 is the first: "
            "the companion code handed Adam only the head's parameters. The audit judges against it.\n\n"
            + _table(["baseline", "accuracy"] + (["published", "diff", "within 2 std"] if article else []),
                     [[label, _fmt(m, metric, "vanilla", 4)]
                      + (_published_cells(m, metric, "vanilla", 4) if article else []) for label, metric in rows]))


def report_anomaly(m, names, cfg, article, out_dir):
    held_out = (f"class {ANOMALY_DIGIT} ({FASHION_CLASSES[ANOMALY_DIGIT]})"
                if cfg["dataset"] == "fashion" else f"digit {ANOMALY_DIGIT}")
    rows = [[_label(n), _fmt(m, "anomaly_auc", n, 4), _fmt(m, "anomaly_auprc", n, 4),
             _fmt(m, "anomaly_auc_signed_score", n, 4)]
            + (_published_cells(m, "anomaly_auc_signed_score", n, 4) if article else [])
            + [_fmt(m, "anomaly_ink_spearman", n, 2), _fmt(m, "anomaly_ink_spearman_signed_score", n, 2)]
            for n in _rows(m, ["anomaly_auc"], names)]
    text = ("## Anomaly detection\n\n"
            f"Latent-{LATENT_ANOMALY} models trained without {held_out}; score = summed BCE of the "
            f"reconstruction; positives = test images of {held_out}. *Signed* is the score behind the "
            "article's published AUCs: the signed sum of (reconstruction - input), which is not an "
            "error. *ink* needs no model: it ranks the test images by low summed intensity, the "
            "direction the signed score leans to (sum of the reconstruction minus the ink); ranking by "
            "high ink gives 1 minus its AUROC. *ρ ink*: Spearman rank correlation of a score with the "
            "ink of the test images; near ±1, the score orders images by their stroke mass.\n\n"
            + _table(["model", "AUROC", "AUPRC", "AUROC signed score"]
                     + (["published (signed)", "diff", "within 2 std"] if article else [])
                     + ["ρ ink (BCE)", "ρ ink (signed)"], rows)
            + _below_chance_note(m, names, held_out)
            + "\n![ROC curves](anomaly_roc.png)\n")
    return text + report_anomaly_sweep(m, names, cfg, out_dir) + report_anomaly_latents(m, names, cfg)


def report_anomaly_sweep(m, names, cfg, out_dir):
    """Every held-out digit: a table per score, mean ranks, and the heatmap (all from results.json)."""
    digits = cfg["anomaly_digits"]
    if len(digits) < 2:
        return ""
    shown = _rows(m, [f"anomaly_auc_digit_{d}" for d in digits], names)
    mean = lambda metric, d, n: m[f"{metric}_digit_{d}"][n]["mean"]
    text = (f"\n### Every held-out digit\n\nFor each digit d, latent-{LATENT_ANOMALY} models "
            "trained without d (val and test keep it); positives = the test images of d. Mean ± std "
            "over the seeds; best contestant per column in bold. *Mean rank*: each row's rank among "
            f"the {len(shown)} rows by the mean value (1 = best), averaged over the digits.\n")
    for metric, title, higher in [("anomaly_auc", "AUROC, summed BCE", True),
                                  ("anomaly_auc_signed_score", "AUROC, signed score", True),
                                  ("anomaly_auprc", "AUPRC, summed BCE", True),
                                  ("anomaly_ink_spearman", "ρ with ink, summed BCE", None),
                                  ("anomaly_ink_spearman_signed_score", "ρ with ink, signed score", None)]:
        rows_here = [n for n in shown if n in m.get(f"{metric}_digit_{digits[0]}", {})]
        best = {d: max(names, key=lambda n: mean(metric, d, n)) for d in digits}
        ranks = {n: [] for n in rows_here}
        for d in digits:
            for r, n in enumerate(sorted(rows_here, key=lambda n: -mean(metric, d, n)), start=1):
                ranks[n].append(r)
        table = [[_label(n)] + [f"**{_fmt(m, f'{metric}_digit_{d}', n, 3)}**" if higher and best[d] == n
                                else _fmt(m, f"{metric}_digit_{d}", n, 3) for d in digits]
                 + ([f"{np.mean(ranks[n]):.1f}"] if higher else []) for n in rows_here]
        text += (f"\n{title}:\n\n"
                 + _table(["model"] + [str(d) for d in digits] + (["mean rank"] if higher else []), table))
    panels = {title: np.array([[mean(metric, d, n) for d in digits] for n in shown])
              for metric, title in [("anomaly_auc", "AUROC, summed BCE"),
                                    ("anomaly_auc_signed_score", "AUROC, signed score")]}
    tasks.plot_heatmaps(panels, [f"{n} (ref)" if n in REFERENCE_ROWS else n for n in shown],
                        [str(d) for d in digits], os.path.join(out_dir, "anomaly_digits.png"))
    return text + "\n![AUROC by held-out digit, both scores](anomaly_digits.png)\n"


def report_anomaly_latents(m, names, cfg):
    """The article's digit at every latent size of the anomaly models."""
    latents = cfg.get("anomaly_latents", [LATENT_ANOMALY])
    if len(latents) < 2:
        return ""
    key = lambda metric, z: f"{metric}_digit_{ANOMALY_DIGIT}" + ("" if z == LATENT_ANOMALY else f"_z{z}")
    cols = [(metric, z) for metric in ("anomaly_auc", "anomaly_auc_signed_score") for z in latents]
    return (f"\n### Latent size\n\nHeld-out digit {ANOMALY_DIGIT}, the anomaly models trained at each "
            "latent size (a separate training from the latent-20 models of the other tasks).\n\n"
            + _table(["model"] + [f"{'AUROC' if metric == 'anomaly_auc' else 'AUROC signed'} z={z}"
                                  for metric, z in cols],
                     [[_label(n)] + [_fmt(m, key(metric, z), n, 3) for metric, z in cols]
                      for n in _rows(m, [key("anomaly_auc", latents[-1])], names)]))


def _below_chance_note(m, names, held_out):
    """A sentence on what an AUROC under 0.5 means, when the table has one."""
    aurocs = [m[k][n]["mean"] for k in ("anomaly_auc", "anomaly_auc_signed_score") for n in names
              if n in m.get(k, {})]
    if not aurocs or min(aurocs) >= 0.5:
        return ""
    return (f"\nAn AUROC below 0.5 means the score ranks the test images of {held_out} *below* the "
            "others more often than above: the model reconstructs them better than the images it was "
            "trained on (thin strokes, few lit pixels, a small summed error), so the score points "
            "the wrong way; 1 - AUROC is what the reversed score would reach.\n")


def report_published(m, names):
    """How many of the article's numbers lie within our mean ± 2 std, per kind of number."""
    if len(m["reconstruction_bce"][names[0]]["runs"]) == 1:
        return ("## The article's numbers against our seed spread\n\n"
                "This run has one seed, so there is no spread to hold the article's numbers against: "
                "none of them counts as within it or outside it (the tables above give the plain "
                "differences). Run with `--seeds 3` for this comparison.\n")
    rows = []
    for metric, label in [("reconstruction_bce", "reconstruction BCE"),
                          ("probe_accuracy_reference_protocol", "the article's probe"),
                          ("anomaly_auc_signed_score", "anomaly AUROC, signed score"),
                          ("probe_accuracy_baseline_as_published", "baseline (as published)")]:
        inside = [n for n in PUBLISHED[metric] if n in m.get(metric, {}) and _within(m, metric, n)]
        outside = [n for n in PUBLISHED[metric] if n in m.get(metric, {}) and n not in inside]
        rows.append([label, f"{len(inside)} of {len(inside) + len(outside)}", ", ".join(outside) or "-"])
    return ("## The article's numbers against our seed spread\n\n"
            "Each published MNIST number counts as reproduced when it lies within our mean ± 2 std "
            "over seeds.\n\n"
            + _table(["number", "within 2 std", "outside"], rows))


def report_audit(m, names, cfg):
    n_seeds = len(cfg["seeds"])
    return ("## Audit of the article's conclusions\n\n"
            + (f"Each conclusion of the article, checked in each of the {n_seeds} seeds: *confirmed* "
               "if it holds in every seed, *not confirmed* if in none, *depends* otherwise.\n\n"
               if n_seeds > 1 else
               "Each conclusion of the article, checked against this run's numbers. **These verdicts "
               "are from one run**: run with `--seeds 3` to see which hold in every seed.\n\n")
            + _table(["the article says", "verdict", "our numbers"], audit(m, names, cfg["anomaly_digits"])))


def report_settings(results):
    cfg, env, stages = results["config"], results["environment"], results["stages_seconds"]
    both = set(cfg) & set(env)      # device, jobs: what the command asked for, what the run used
    asked = lambda k, v: [f"{k} (requested)", "automatic" if v is None else f"`{v}`"]
    return "## Settings and environment\n\n" + _table(
        ["setting", "value"], [asked(k, v) if k in both else [k, f"`{v}`"] for k, v in cfg.items()]
        + [[f"seconds: {k}", f"{v:.0f}"] for k, v in stages.items()]
        + [[f"{k} (used)" if k in both else k, f"`{v}`"] for k, v in env.items()])


# ---- helpers

def _rows(m, metrics, names):
    """The contestants, then each reference row (pca, raw pixels, ink) that has one of `metrics`."""
    return names + [r for r in REFERENCE_ROWS if any(r in m.get(metric, {}) for metric in metrics)]


def _label(name):
    """A row's name; references in italics, so that they stand apart from the contestants."""
    return f"*{name} (reference)*" if name in REFERENCE_ROWS else name


def _fmt(m, metric, name, digits):
    """'mean ± std' (or 'mean' for one run) of a metric, blank when it was not measured."""
    if metric not in m or name not in m[metric]:
        return ""
    v = m[metric][name]
    if len(v["runs"]) > 1:
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    return f"{v['mean']:.{digits}f}"


def _within(m, metric, name):
    """Whether the published value lies within our mean ± 2 std (never, with a single run)."""
    v = m[metric][name]
    return len(v["runs"]) > 1 and abs(v["mean"] - PUBLISHED[metric][name]) <= 2 * v["std"]


def _published_cells(m, metric, name, digits, relative=False, spread=True):
    """[published, diff, within 2 std] cells for one model (blank when not published)."""
    pub = PUBLISHED.get(metric, {}).get(name)
    if pub is None or name not in m.get(metric, {}):
        return ["", ""] + ([""] if spread else [])
    diff = m[metric][name]["mean"] - pub
    cells = [f"{pub:.{digits}f}", f"{diff:+.{digits}f}" + (f" ({100 * diff / pub:+.0f}%)" if relative else "")]
    if spread:
        cells.append("yes" if _within(m, metric, name) else
                     "one run" if len(m[metric][name]["runs"]) == 1 else "**no**")
    return cells


def _compare_table(m, metric, names, article, digits, relative=False, spread=True):
    cols = ["model", "ours"] + (["published", "diff"] + (["within 2 std"] if spread else []) if article else [])
    return _table(cols, [[_label(n), _fmt(m, metric, n, digits)]
                         + (_published_cells(m, metric, n, digits, relative, spread) if article else [])
                         for n in _rows(m, [metric], names)])


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _hms(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# ---- the command line's entry point: Ctrl-C and SIGTERM end the run cleanly

class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, raised where run.py is, so that every cleanup on the way out runs."""


def _interrupt(signum, frame):
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)      # a second Ctrl-C must not cut the cleanup short
    raise Interrupted(signum)


def cli():
    """main() as `python run.py` runs it; exit code 128 + the signal's number when interrupted."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        main()
    except KeyboardInterrupt as err:
        signum = err.args[0] if isinstance(err, Interrupted) else signal.SIGINT
        STATUS.end()
        print("interrupted: finished trainings are saved; run the same command to continue",
              file=sys.stderr)
        sys.exit(128 + signum)


if __name__ == "__main__":
    cli()
