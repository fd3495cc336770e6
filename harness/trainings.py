"""The trainings of a run: the data it trains on, which trainings it needs, and checkpoints that
are reused, so that an interrupted run continues where it stopped.

    from harness import trainings
    data = trainings.load_data(args)                        # arrays and the index splits
    jobs = trainings.training_jobs(args, data, out_dir)     # every training, with its settings
    trained, kept, parallel = trainings.train_all(jobs, data, args, device, cells_path, env)

A checkpoint is named by the hash of every setting of its training (checkpoint_name), so a run
with other settings never picks up the wrong model. Trainings run in worker processes
(workers.py); the sweep's anomaly-only trainings are scored as soon as they finish and kept as
numbers (cells.py).

First read: skip this file; run.py's `main` says what it is for.
"""

import functools
import hashlib
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ae
import mnist
import umap_lite
from harness import cells, checkpoints, workers
from harness.figures import write_atomically
from harness.protocol import (ANOMALY_DIGIT, FIRST_SEED, JUDGE_EPOCHS, LATENT, LATENT_ANOMALY, N_PROBE,
                              QUICK, SPLIT, SPLIT_SEED)


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
    y_all = train_labels.astype(np.int64)
    if args.quick:     # a first look: fewer training and test images, the same split; only the
        # images the run uses are kept, so that no task encodes the other 50,000 training images
        train_idx, val_idx = train_idx[:QUICK["n_train"]], val_idx[:QUICK["n_val"]]
        x_all, y_all = x_all[np.r_[train_idx, val_idx]], y_all[np.r_[train_idx, val_idx]]
        train_idx, val_idx = np.arange(len(train_idx)), np.arange(len(train_idx), len(x_all))
        x_test, test_labels = x_test[:QUICK["n_test"]], test_labels[:QUICK["n_test"]]
    return {"x_all": x_all, "y_all": y_all, "train_idx": train_idx,
            "val_idx": val_idx, "probe_idx": mnist.probe_indices(train_idx, min(N_PROBE, len(train_idx))),
            "x_test": x_test, "y_test": test_labels.astype(np.int64),
            "fingerprint": hashlib.md5(train_images.tobytes()[:1 << 20]
                                       + train_labels.tobytes()).hexdigest()[:12]}


def split_permutation(n, seed=SPLIT_SEED):
    """The companion code's permutation of the n training images (src/data.py, _split_train_val)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def seeds_of(args):
    return [FIRST_SEED + i for i in range(args.seeds)]


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


def train_all(jobs, data, args, device, cells_path=None, env=None):
    """Train what no checkpoint holds yet, then load every job's model from its checkpoint.

    cells_path: the path of the sweep's scored cells (CELLS), or None to keep none. With it, an
    anomaly-only job (sweep_only) that the file holds with the job's settings is neither trained
    nor loaded: its numbers come from the file. Every other anomaly-only job is scored as soon as
    its model is there and added to the file (env: the provenance kept with each cell); such jobs
    train first, so that an interrupted run leaves the most behind in the file.
    Returns ({(model, latent, seed, digit): (model, meta)} of the trained models,
    {(model, latent, seed, digit): cell} of the kept cells, {"jobs": N, "threads_per_job": T}).
    """
    kept = cells.read_cells(cells_path) if cells_path else {}
    for job in jobs:
        job["cell"] = cells_path is not None and cells.sweep_only(job["settings"])
        scored = job["cell"] and cells.is_kept(kept, job)
        job["reused"] = scored or _finished(job)
        if job["reused"]:
            print(f"{job['label']} | reused {'scores' if scored else 'checkpoint'}", flush=True)
        if job["cell"] and job["reused"] and not scored:    # a checkpoint not scored yet
            cells.score_cell(job, data, kept, cells_path, env)
    todo = sorted((job for job in jobs if not job["reused"]), key=lambda job: not job["cell"])
    by_label = {job["label"]: job for job in todo}

    def done(label):
        if by_label[label]["cell"]:
            cells.score_cell(by_label[label], data, kept, cells_path, env)

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
    trained = {_key(job): checkpoints.load(job["path"], device=device) for job in jobs if not job["cell"]}
    kept = {_key(job): kept[os.path.basename(job["path"])] for job in jobs if job["cell"]}
    return trained, kept, {"jobs": n_jobs, "threads_per_job": threads}


def train_one(job, data, device, progress=None):
    """Build the job's model from its seed, fit it and save it atomically with its settings."""
    s = job["settings"]
    ae.set_seed(s["seed"])
    model = ae.build(s["model"], s["latent_dim"], input_dim=data["x_all"].shape[1])
    x_train = torch.from_numpy(data["x_all"][job["idx"]])
    x_val = torch.from_numpy(data["x_all"][data["val_idx"]])
    history = ae.fit(model, x_train, x_val, epochs=s["epochs"], batch_size=s["batch_size"],
                     lr=s["lr"], seed=s["seed"], device=device, progress=progress)
    # threads are provenance, not a setting (any checkpoint is reused): they change a step only by
    # float rounding, though 60 epochs grow that to about seed-spread size (README, Reproducibility)
    checkpoints.save(model, job["path"], meta={"settings": s, "history": history,
                                      "threads": torch.get_num_threads()})


def _finished(job):
    """Whether the job's checkpoint exists and was trained with exactly the job's settings."""
    if not os.path.exists(job["path"]):
        return False
    _, meta = checkpoints.load(job["path"])
    return meta.get("settings") == job["settings"]


def _key(job):
    s = job["settings"]
    return s["model"], s["latent_dim"], s["seed"], s["held_out_digit"]


def training_records(jobs, trained, kept):
    """results.json's line for each training; a kept cell says what scored it."""
    return [_record(job, kept[_key(job)] if job["cell"] else trained[_key(job)][1]) for job in jobs]


def _record(job, meta):
    record = {"training": job["label"], "checkpoint": os.path.basename(job["path"]), "reused": job["reused"],
              "seconds": meta["history"]["seconds"], "threads": meta.get("threads")}
    return {**record, "scored": meta["scored"]} if job["cell"] else record


# ---- the judge: the digit classifier that scores samples and interpolations

class Judge(nn.Module):
    """A small MLP digit classifier that scores generated images (not a contestant)."""

    def __init__(self, input_dim=1024, hidden=256):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(),
                                      nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, mnist.N_CLASSES)

    def forward(self, x):
        return self.head(self.features(x))


def train_judge(x_train, y_train, epochs=5, seed=0, device="cpu", batch_size=128, lr=1e-3):
    """Train the judge with Adam on cross-entropy; returns it in eval mode."""
    torch.manual_seed(seed)
    judge = Judge(x_train.shape[1]).to(device)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(x_train, dtype=torch.float32, device=device), torch.as_tensor(y_train, device=device).long()
    opt = torch.optim.Adam(judge.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            idx = idx.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(judge(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return judge.eval()


# ---- caches of the tasks' slow steps

def cached_embedding(out_dir, name, z, seed, n_epochs):
    """umap_lite of the codes, cached beside the checkpoints (it is the slowest task)."""
    key = hashlib.sha1(z.tobytes() + json.dumps([seed, n_epochs]).encode()).hexdigest()[:12]
    path = os.path.join(out_dir, "cache", f"umap-{name}-{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    emb = umap_lite.embed(z, seed=seed, n_epochs=n_epochs)
    write_atomically(path, lambda tmp: np.save(tmp, emb))
    return emb


def get_judge(data, args, device, out_dir):
    """The digit classifier that scores samples and interpolations, trained once and cached."""
    epochs = QUICK["judge_epochs"] if args.quick else JUDGE_EPOCHS
    path = os.path.join(out_dir, "checkpoints",
                        f"judge-{data['fingerprint']}-e{epochs}-n{len(data['train_idx'])}-split{SPLIT_SEED}.pt")
    judge = Judge(data["x_all"].shape[1]).to(device)
    if os.path.exists(path):
        judge.load_state_dict(torch.load(path, map_location=device, weights_only=True))
        return judge.eval()
    idx = data["train_idx"]
    judge = train_judge(data["x_all"][idx], data["y_all"][idx], epochs=epochs, device=device)
    write_atomically(path, lambda tmp: torch.save(judge.state_dict(), tmp))
    return judge
