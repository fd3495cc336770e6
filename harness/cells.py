"""The sweep's kept scores: each anomaly-only training scored right after it is trained.

The sweep's anomaly-only trainings (every digit but the article's at latent 2, the article's
digit at the other latent sizes) serve one task, so each is scored as soon as it is trained and
its numbers are kept in anomaly_cells.json beside results.json: a few kB that can be committed
with the results and carried to another machine, where a checkpoint of megabytes cannot go. A
later run reuses a cell whose settings match, as it reuses a checkpoint, without training it.

    from harness import cells
    kept = cells.read_cells(path)              # {checkpoint file name: cell}; {} if none
    cells.score_cell(job, data, kept, path, env)   # score a trained job, add it, rewrite the file
    cells.add_kept_scores(m, kept, seed)       # their numbers under the anomaly task's keys

First read: skip this file. The scores are the anomaly task's own (tasks.anomaly_row).
"""

import json
import os
import pathlib
import sys

import ae
import mnist
import tasks
from harness import checkpoints
from harness.figures import write_atomically
from harness.protocol import ANOMALY_DIGIT, LATENT_ANOMALY, TASK_THREADS, anomaly_suffix
from harness.workers import torch_threads

CELLS = "anomaly_cells.json"
SCORES = ("bce", "signed", "bce_excess", "sse", "code_nll", "bce_png")   # tasks.anomaly_row's, every model
VAE_SCORES = ("neg_elbo", "neg_iwae", "neg_elbo_excess")                  # and the VAEs' likelihood bounds
CELLS_ABOUT = ("The anomaly-only trainings of run.py's sweep, each scored right after its training: "
               "run.py reuses a cell whose settings match, as it reuses a checkpoint")
CELL_PROVENANCE = ("git_commit", "git_dirty", "cpu", "gpu", "device", "torch")   # what scored a cell


def sweep_only(settings):
    """Whether a training serves the anomaly task alone: every held-out digit's model but the
    article's setting (digit 1 at latent 2), whose models the latent-structure task uses too."""
    digit = settings["held_out_digit"]
    return digit is not None and (settings["latent_dim"], digit) != (LATENT_ANOMALY, ANOMALY_DIGIT)


def anomaly_metrics(model):
    """The metrics a kept cell of this model must hold: every score's (a cell without one is stale)."""
    scores = SCORES + (VAE_SCORES if ae.CONTESTANTS[model].stochastic else ())
    return sorted(name for score in scores for name in tasks.metric_names(score) if name)


def is_kept(cells, job):
    """Whether `cells` hold the job's cell, trained with the job's settings, with every number."""
    cell = cells.get(os.path.basename(job["path"]))
    return (cell is not None and cell["settings"] == job["settings"]
            and sorted(cell["anomaly"]) == anomaly_metrics(job["settings"]["model"]))


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


def score_cell(job, data, kept, path, env):
    """Score an anomaly-only job's model, add it to `kept` and rewrite the file."""
    model, meta = checkpoints.load(job["path"])
    s = job["settings"]
    with torch_threads(TASK_THREADS):        # as the gauntlet scores, so both give the same numbers
        digit = s["held_out_digit"]
        fit, val = (data["x_all"][mnist.drop_class(data[idx], data["y_all"], digit)] for idx in ("train_idx", "val_idx"))
        row, _ = tasks.anomaly_row(model, data["x_test"], data["y_test"] == digit, s["seed"], fit, val)
    kept[os.path.basename(job["path"])] = {
        "settings": s, "anomaly": row, "history": {"seconds": meta["history"]["seconds"]},
        "threads": meta.get("threads"), "scored": {k: (env or {}).get(k) for k in CELL_PROVENANCE}}
    write_cells(path, kept)


def write_cells(path, cells):
    """CELLS, atomically, one line per cell: a commit that adds cells adds lines."""
    lines = ",\n".join(f"  {json.dumps(name)}: {json.dumps(cell)}" for name, cell in sorted(cells.items()))
    body = f'{{"about": {json.dumps(CELLS_ABOUT)},\n "cells": {{\n{lines}\n}}}}\n'
    write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(body))


def add_kept_scores(m, kept, seed):
    """Add the kept cells of one seed to m, {metric + suffix: {model: value}}, the anomaly task's keys.

    kept: {(model, latent, seed, digit): cell}. A cell is never the article's setting (digit 1
    at latent 2), so it has no plain, suffix-less keys.
    """
    for (name, latent, cell_seed, digit), cell in kept.items():
        if cell_seed == seed:
            for metric, value in cell["anomaly"].items():
                m.setdefault(metric + anomaly_suffix(latent, digit), {})[name] = value
