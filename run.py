"""Run the Autoencoder Bake-Off: train the contestants, put them through the gauntlet, report.

    python run.py                                  # full protocol on MNIST (downloads it if needed)
    python run.py --quick                          # reduced settings, a complete report in minutes
    python run.py --dataset fashion                # Fashion-MNIST (data/fashion, or --data-dir)
    python run.py --seeds 3 --anomaly-digits all   # error bars and the one-vs-rest anomaly sweep
    python run.py --jobs 1                         # one training at a time (default: one per core)

Writes <out>/<dataset>/results.json, REPORT.md and the figures beside it (<out>: runs, or
runs/quick with --quick; the committed reports are in results). Finished trainings are
kept as checkpoints (with the settings that produced them) and reused when run.py runs again with
the same settings, so an interrupted run continues where it stopped. The anomaly sweep's own
trainings are scored as soon as they finish and kept as numbers in anomaly_cells.json beside
results.json, which a later run reuses without their checkpoints.

The recipe, as `main` follows it (PROTOCOL.md has every detail):
    1. load the data and split it as the companion code did
    2. train every contestant at latent 20 (all tasks) and at latent 2 without the anomaly class
       (anomaly detection), 60 epochs each, several trainings at once in worker processes (workers.py)
    3. per seed, run the gauntlet: reconstruction, classification, anomaly detection, samples and
       interpolation, latent structure, and the three baselines
    4. summarise over seeds (mean, std, the runs) and write results.json
    5. report.py audits the article's claims seed by seed and writes REPORT.md beside it

Simplified: one output folder serves one run at a time.

First read: `main`, then the task functions (`task_*`, in the order `run_gauntlet` calls them).
Skip the command-line checks, the checkpoint bookkeeping and the signal handling.
"""

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import os
import pathlib
import signal
import sys
import tempfile
import time

import numpy as np
import torch

import ae
import mnist
import tasks
import umap_lite
import workers


# ---- constants

DATASETS = ("mnist", "fashion", "kmnist")
FIRST_SEED = 42                 # the companion code's seed; further runs use 43, 44, ...
SPLIT_SEED = 42                 # the companion code's split: torch.randperm on a CPU generator seeded 42
SPLIT = f"torch.randperm seed {SPLIT_SEED}"   # recorded with every checkpoint: a new split retrains
EPOCHS = 60                     # the article's training length
LATENT, LATENT_ANOMALY = 20, 2  # the two trainings per contestant
ANOMALY_DIGIT = 1               # the article's held-out class
PIXELS = "pixels"               # the row of the raw-pixel references: not a contestant
# The sweep's anomaly-only trainings (every digit but the article's at latent 2, the article's
# digit at the other latent sizes) serve one task, so each is scored right after it is trained
# and its numbers are kept here, in the output folder: a few kB that can be committed with the
# results and carried to another machine, where a checkpoint of megabytes cannot go (README).
CELLS = "anomaly_cells.json"
ANOMALY_METRICS = ("anomaly_auc", "anomaly_auprc", "anomaly_auc_signed_score",
                   "anomaly_ink_spearman", "anomaly_ink_spearman_signed_score")
CELLS_ABOUT = ("The anomaly-only trainings of run.py's sweep, each scored right after its training: "
               "run.py reuses a cell whose settings match, as it reuses a checkpoint")
CELL_PROVENANCE = ("git_commit", "git_dirty", "cpu", "gpu", "device", "torch")   # what scored a cell
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
# The tasks run on one torch thread: their small steps (the article's probe trains on batches of
# 32) gain little from a second one, and where anything else runs, threads that wait for each
# other at every operation make torch crawl (a busy 2-core machine: 10x). Trainings: workers.plan_jobs.
TASK_THREADS = 1
OUT, QUICK_OUT = "runs", os.path.join("runs", "quick")   # git-ignored; results/ is written only on request


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
    p.add_argument("--models", default=",".join(ae.MODELS), help="comma list (default: every contestant of ae.py)")
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
    args.anomaly_digits = _numbers(p, "--anomaly-digits", args.anomaly_digits, 0, 9, ANOMALY_DIGIT)
    args.anomaly_latents = _numbers(p, "--anomaly-latents", args.anomaly_latents, 1, ae.INPUT_DIM // 2,
                                    LATENT_ANOMALY)
    return args


def _numbers(p, flag, text, lo, hi, always):
    """'3,1' -> sorted whole numbers from lo to hi ('all' for every one), `always` among them."""
    if text == "all" and flag == "--anomaly-digits":
        return list(range(lo, hi + 1))
    try:
        numbers = {int(v) for v in text.split(",")}
    except ValueError:
        numbers = set()
    if not numbers or not all(lo <= v <= hi for v in numbers):
        p.error(f"{flag} takes numbers from {lo} to {hi} separated by commas"
                f"{' (or all)' if flag == '--anomaly-digits' else ''}, got {text!r}")
    return sorted(numbers | {always})


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
    if not args.replace:        # a report made with other settings is replaced only on request
        import report           # here, not at the top: report.py reads this file's constants
        problem = report.replace_problem(out_dir, {**vars(args), "seeds": seeds_of(args)})
        if problem:
            sys.exit(f"run.py: error: {problem}; choose another --out, or pass --replace to replace it")
    read_cells(os.path.join(out_dir, CELLS))    # a damaged file stops the run here, not after the data
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
                label = f"{name} z={latent} seed {seed}" + ("" if digit is None else f" w/o {digit}")
                n_params = sum(p.numel() for p in ae.build(name, latent).parameters())
                jobs.append({"settings": settings, "idx": idx, "label": label,
                             "path": os.path.join(out_dir, "checkpoints", checkpoint_name(settings)),
                             "work": args.epochs * len(idx) * (n_params + workers.ETA_OVERHEAD_PARAMS)})
    return jobs


def checkpoint_name(settings):
    """<model>-z<latent>-s<seed>[-no<digit>]-<hash of every setting>.pt"""
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    digit = settings["held_out_digit"]
    return (f"{settings['model']}-z{settings['latent_dim']}-s{settings['seed']}"
            f"{'' if digit is None else f'-no{digit}'}-{key}.pt")


def anomaly_trainings(args):
    """(latent, held-out digit) of every anomaly model: each digit at latent 2, digit 1 at the others."""
    return ([(LATENT_ANOMALY, d) for d in args.anomaly_digits]
            + [(z, ANOMALY_DIGIT) for z in args.anomaly_latents if z != LATENT_ANOMALY])


def train_all(jobs, data, args, device, cells=None, env=None):
    """Train what no checkpoint holds yet, then load every job's model from its checkpoint.

    cells: the path of the sweep's scored cells (CELLS), or None to keep none. With it, an
    anomaly-only job (sweep_only) that the file holds with the job's settings is neither trained
    nor loaded: its numbers come from the file. Every other anomaly-only job is scored as soon as
    its model is there and added to the file (env: the provenance kept with each cell); such jobs
    train first, so that an interrupted run leaves the most behind in the file.
    Returns ({(model, latent, seed, digit): (model, meta)}, {"jobs": N, "threads_per_job": T});
    a cell's model is None and its meta has the cell's "anomaly" numbers.
    """
    kept = read_cells(cells) if cells else {}
    for job in jobs:
        job["cell"] = cells is not None and sweep_only(job["settings"])
        scored = job["cell"] and _kept(kept, job)
        job["reused"] = scored or _finished(job)
        if job["reused"]:
            print(f"{job['label']} | reused {'scores' if scored else 'checkpoint'}", flush=True)
        if job["cell"] and job["reused"] and not scored:    # a checkpoint not scored yet
            _score_cell(job, data, kept, cells, env)
    todo = sorted((job for job in jobs if not job["reused"]), key=lambda job: not job["cell"])
    by_label = {job["label"]: job for job in todo}

    def done(label):
        if by_label[label]["cell"]:
            _score_cell(by_label[label], data, kept, cells, env)

    n_jobs, threads = workers.plan_jobs(args.jobs, len(todo), device)
    progress = workers.Progress(todo)
    if n_jobs == 1:
        for job in todo:
            try:
                train_one(job, data, device, lambda info, label=job["label"]: progress.epoch(label, info))
            except workers.EXPECTED as err:
                workers.STATUS.end()
                sys.exit(f"run.py: error: {job['label']}: {err}")
            progress.finished(job["label"])
            done(job["label"])
    else:
        print(f"training {len(todo)} models, {n_jobs} at a time, {threads} thread(s) each", flush=True)
        try:    # each worker loads the data itself: spawned processes share nothing
            workers.train_in_workers(todo, functools.partial(load_data, args), train_one, device,
                                     n_jobs, threads, progress, done)
        except workers.TrainingFailed as err:
            workers.STATUS.end()
            sys.exit(f"run.py: error: {err}")
    workers.STATUS.end()
    trained = {_key(job): (None, kept[os.path.basename(job["path"])]) if job["cell"]
               else ae.load(job["path"], device=device) for job in jobs}
    return trained, {"jobs": n_jobs, "threads_per_job": threads}


def sweep_only(settings):
    """Whether a training serves the anomaly task alone: every held-out digit's model but the
    article's setting (digit 1 at latent 2), whose models the latent-structure task uses too."""
    digit = settings["held_out_digit"]
    return digit is not None and (settings["latent_dim"], digit) != (LATENT_ANOMALY, ANOMALY_DIGIT)


def _kept(cells, job):
    """Whether `cells` hold the job's cell, trained with the job's settings, with every number."""
    cell = cells.get(os.path.basename(job["path"]))
    return (cell is not None and cell["settings"] == job["settings"]
            and sorted(cell["anomaly"]) == sorted(ANOMALY_METRICS))


def read_cells(path):
    """{checkpoint file name: cell} from CELLS, {} if there is none; a damaged file stops the run."""
    if not os.path.exists(path):
        return {}
    try:
        cells = json.loads(pathlib.Path(path).read_text())["cells"]
        if not all({"settings", "anomaly", "history"} <= set(c) for c in cells.values()):
            raise ValueError("a cell lacks its settings, scores or training time")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        sys.exit(f"run.py: error: {path} cannot be read ({err}); restore it from git, or delete it "
                 "to train its cells again")
    return cells


def _score_cell(job, data, kept, path, env):
    """Score an anomaly-only job's model, add it to `kept` and rewrite the file."""
    model, meta = ae.load(job["path"])
    s = job["settings"]
    with torch_threads(TASK_THREADS):        # as the gauntlet scores, so both give the same numbers
        row = anomaly_row(model, data, s["held_out_digit"], s["seed"])
    kept[os.path.basename(job["path"])] = {
        "settings": s, "anomaly": row, "history": {"seconds": meta["history"]["seconds"]},
        "threads": meta.get("threads"), "scored": {k: (env or {}).get(k) for k in CELL_PROVENANCE}}
    write_cells(path, kept)


def write_cells(path, cells):
    """CELLS, atomically, one line per cell: a commit that adds cells adds lines."""
    lines = ",\n".join(f"  {json.dumps(name)}: {json.dumps(cell)}" for name, cell in sorted(cells.items()))
    body = f'{{"about": {json.dumps(CELLS_ABOUT)},\n "cells": {{\n{lines}\n}}}}\n'
    tasks.write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(body))


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


def _finished(job):
    """Whether the job's checkpoint exists and was trained with exactly the job's settings."""
    if not os.path.exists(job["path"]):
        return False
    _, meta = ae.load(job["path"])
    return meta.get("settings") == job["settings"]


def _key(job):
    s = job["settings"]
    return s["model"], s["latent_dim"], s["seed"], s["held_out_digit"]


@contextlib.contextmanager
def torch_threads(n):
    """torch's thread count set to n for the block, then back to what it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seeds_of(args):
    return [FIRST_SEED + i for i in range(args.seeds)]


# ---- the gauntlet: one function per task, each over every model of one seed

def run_gauntlet(trained, data, args, seed, judge, device, out_dir, first):
    """All tasks for one seed: ({metric: {model: value}}, {task: what its figures show})."""
    names = args.models + list(ae.REFERENCES)      # the contestants, then the references
    models = workers.Announced({n: trained[(n, LATENT, seed, None)][0] for n in names})
    cell = lambda model, meta: meta["anomaly"] if model is None else model    # a kept cell: its numbers
    anomaly = {(z, d): workers.Announced({n: cell(*trained[(n, z, seed, d)]) for n in names})
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
        with workers.STATUS.step(f"seed {seed}: {step}"):
            metrics, figs[step] = task()
        for metric, by_model in metrics.items():      # the pixels join the contestants' metrics
            m.setdefault(metric, {}).update(by_model)
    return m, figs


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
        if model.bottleneck.stochastic:         # the VAEs: their mean code too
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
              "probe_accuracy_articles_probe": _articles_probe(net, data, seed),
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
    at latent 2. A model may be given as its numbers, {metric: value} (a cell train_all kept).
    Returns the ROC curves of the article's setting to plot.
    """
    y_test, ink = data["y_test"], tasks.ink(data["x_test"])
    m, curves = {}, {}
    put = lambda metric, name, value: m.setdefault(metric, {}).update({name: value})
    for (latent, digit), models in anomaly.items():
        is_anomaly = y_test == digit
        suffix = f"_digit_{digit}" + ("" if latent == LATENT_ANOMALY else f"_z{latent}")
        headline = latent == LATENT_ANOMALY and digit == ANOMALY_DIGIT
        rows = {}
        for name, model in models.items():
            if isinstance(model, dict):
                rows[name] = model
                continue
            bce, signed = _scores(model, data, seed)
            rows[name] = _anomaly_metrics(is_anomaly, bce, signed, ink)
            if headline:
                curves[name] = [("summed BCE", *tasks.roc_curve(is_anomaly, bce)[:2], rows[name]["anomaly_auc"]),
                                ("signed (article)", *tasks.roc_curve(is_anomaly, signed)[:2],
                                 rows[name]["anomaly_auc_signed_score"])]
        rows["ink"] = _anomaly_metrics(is_anomaly, -ink, -ink)   # the same ranking under both names
        if headline:
            curves["ink"] = [("low ink", *tasks.roc_curve(is_anomaly, -ink)[:2], rows["ink"]["anomaly_auc"])]
        for name, row in rows.items():
            for metric, value in row.items():
                put(metric + suffix, name, value)
                if headline:
                    put(metric, name, value)
    return m, curves


def anomaly_row(model, data, digit, seed):
    """One model's numbers (ANOMALY_METRICS) with digit `digit` as the anomaly."""
    return _anomaly_metrics(data["y_test"] == digit, *_scores(model, data, seed), tasks.ink(data["x_test"]))


def _scores(model, data, seed):
    """(summed BCE, signed score) of every test image; a stochastic model draws from `seed`."""
    ae.set_seed(seed)
    return tasks.anomaly_scores(model, data["x_test"])


def _anomaly_metrics(is_anomaly, bce, signed, ink=None):
    """AUROC and AUPRC of the summed BCE, AUROC of the signed score; with ink, their rank
    correlations with it (ink's own row has none)."""
    row = {"anomaly_auc": tasks.roc_auc(is_anomaly, bce),
           "anomaly_auprc": tasks.average_precision(is_anomaly, bce),
           "anomaly_auc_signed_score": tasks.roc_auc(is_anomaly, signed)}
    if ink is not None:
        row["anomaly_ink_spearman"] = tasks.spearman(bce, ink)
        row["anomaly_ink_spearman_signed_score"] = tasks.spearman(signed, ink)
    return row


def task_generation(models, data, judge, seed):
    """Samples of every model under each of its samplers, and interpolations of all, scored by the judge."""
    x_test, y_test = data["x_test"], data["y_test"]
    _, test_features = tasks.judge_images(judge, x_test[:N_GENERATED])
    m, figs = {}, {"samples": {}, "notes": {}, "gifs": {}}
    put = lambda metric, name, value: m.setdefault(metric, {}).update({name: value})
    for name, model in models.items():
        samples, components = tasks.draw_samples(model, data["x_all"], data["train_idx"], data["val_idx"],
                                                  N_GENERATED, seed)
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
        for suffix, fixed in [("", False)] + ([("_fixed_noise", True)] if model.bottleneck.stochastic else []):
            ae.set_seed(seed)
            frames = tasks.interpolate(model, x_test[0], x_test[1], fixed_noise=fixed, seed=seed)
            path = tasks.path_quality(tasks.judge_images(judge, frames)[0], int(y_test[0]), int(y_test[1]))
            put(f"interpolation_confidence{suffix}", name, path["mean_confidence"])
            put(f"interpolation_third_class{suffix}", name, float(path["third_class"]))
            figs["gifs"][f"interp_{name}{suffix}.gif"] = frames
    return m, figs


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
    dead = tasks.dead_units(z)
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
    tasks.write_atomically(path, lambda tmp: torch.save(judge.state_dict(), tmp))
    return judge


def _device(module):
    return next(module.parameters()).device


# ---- the recipe, and results.json

def main(argv=None):
    args = parse_args(argv)
    t_start, stages = time.time(), {}
    out_dir = os.path.join(args.out, args.dataset)
    device = preflight(args)
    env = workers.environment(device)       # before any output: figures written into a git tree dirty it
    data = load_data(args)
    print(f"{args.dataset}: {len(data['train_idx'])} train / {len(data['val_idx'])} val / "
          f"{len(data['x_test'])} test images; models: {', '.join(args.models)}; "
          f"seeds: {', '.join(map(str, seeds_of(args)))}", flush=True)
    stages["data"] = time.time() - t_start
    jobs = training_jobs(args, data, out_dir)
    t = time.time()
    trained, parallel = train_all(jobs, data, args, device, os.path.join(out_dir, CELLS), env)
    stages["training"] = time.time() - t
    torch.set_num_threads(TASK_THREADS)
    t = time.time()
    with workers.STATUS.step("judge (the digit classifier that scores samples)"):
        judge = get_judge(data, args, device, out_dir)
    import report       # here, not at the top: report.py reads this file's constants
    per_seed = []
    for i, seed in enumerate(seeds_of(args)):
        m, figs = run_gauntlet(trained, data, args, seed, judge, device, out_dir, first=i == 0)
        if i == 0:
            report.write_figures(figs, data, args, out_dir)     # the figures show the first seed
        per_seed.append(m)
    stages["tasks"] = time.time() - t
    stages["total"] = time.time() - t_start
    results = {"config": config(args, data, argv), "environment": {**env, **parallel},
               "stages_seconds": stages,
               "trainings": [training_record(j, trained[_key(j)][1]) for j in jobs],
               "finished": datetime.datetime.now().isoformat(timespec="seconds"),
               "metrics": report.summarise(per_seed)}
    path = os.path.join(out_dir, "results.json")
    tasks.write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(results, indent=1)))
    report_path = report.write_report(results, out_dir)
    report.remove_stale_figures(out_dir, t_start)
    print(f"done in {workers.hms(stages['total'])}: {report_path} (results: {path})")
    return results


def training_record(job, meta):
    """results.json's line for one training; a kept cell says what scored it."""
    record = {"training": job["label"], "checkpoint": os.path.basename(job["path"]), "reused": job["reused"],
              "seconds": meta["history"]["seconds"], "threads": meta.get("threads")}
    return {**record, "scored": meta["scored"]} if job["cell"] else record


def config(args, data, argv):
    """The run's settings as results.json records them, with the command that reproduces it."""
    command = "python run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    return {**vars(args), "seeds": seeds_of(args), "latent_dims": [LATENT, LATENT_ANOMALY],
            "n_train": int(len(data["train_idx"])), "n_val": int(len(data["val_idx"])),
            "n_test": int(len(data["x_test"])), "probe_labels": int(len(data["probe_idx"])),
            "split": SPLIT, "command": command.strip()}


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
        workers.STATUS.end()
        print("interrupted: finished trainings are saved; run the same command to continue",
              file=sys.stderr)
        sys.exit(128 + signum)


if __name__ == "__main__":
    cli()
