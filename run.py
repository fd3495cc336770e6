"""Run the Autoencoder Bake-Off: train the nine contestants, put them through the gauntlet, report.

    python run.py                                  # full protocol on MNIST (downloads it if needed)
    python run.py --quick                          # reduced settings, a complete report in minutes
    python run.py --dataset fashion --data-dir /usr/share/datasets/fashion-mnist
    python run.py --seeds 3 --anomaly-digits all   # error bars and the one-vs-rest anomaly sweep

Writes <out>/<dataset>/results.json, REPORT.md and the figures beside it. Finished trainings are
kept as checkpoints (with the settings that produced them) and reused when run.py runs again with
the same settings, so an interrupted run continues where it stopped.

The protocol is ../shared/spec/REFERENCE.md: per contestant one training at latent 20 (all tasks)
and one at latent 2 without the anomaly digit (anomaly detection), 60 epochs each.
"""

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

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
LATENT, LATENT_ANOMALY = 20, 2  # the two trainings per contestant
ANOMALY_DIGIT = 1               # the reference's held-out class
CLEAR_MARGIN = 0.02             # audit: a lead in confidence smaller than this is no lead
VARIATIONAL = ("vae", "beta_vae_strict", "beta_vae_loose")   # encode() can sample or give mu
N_PROBE = 550                   # labelled images for the classification probe
LABEL_BUDGETS = (10, 100, 550, 5500)
BUDGET_DRAWS = 3                # stratified draws per label budget
N_GENERATED = 1000              # samples per generative model judged by the classifier
N_SHOWN = 16                    # images per reconstruction row and per sample grid
JUDGE_EPOCHS = 5
QUICK = {"epochs": 3, "n_train": 8000, "map_points": 2000, "umap_epochs": 100,
         "judge_epochs": 1, "budget_draws": 1}
PUBLISHED = {   # MNIST, single runs, REFERENCE.md; AUC uses the old signed score
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
    "training_seconds": {"shallow": 638, "vanilla": 675, "stacked": 665, "sparse": 687,
                         "denoising": 678, "vae": 690, "beta_vae_strict": 689,
                         "beta_vae_loose": 688, "vq": 687},
}
PUBLISHED_BASELINE = 0.4364     # vanilla encoder + linear layer trained from scratch on 550 labels
# Per-image training cost ~ parameters + this: the part that does not grow with the model (Python,
# BatchNorm, Adam's bookkeeping). Measured on CPU: shallow (42k params) runs 3x faster than
# vanilla (783k), not 18x.
ETA_OVERHEAD_PARAMS = 300_000
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
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--models", default=",".join(ae.MODELS), help="comma list (default: all nine)")
    p.add_argument("--seeds", type=int, default=1, help="runs per training: seeds 42, 43, ...")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: auto)")
    p.add_argument("--anomaly-digits", default=str(ANOMALY_DIGIT),
                   help="held-out digit(s) for the anomaly sweep: a comma list or 'all'")
    p.add_argument("--quick", action="store_true",
                   help=f"reduced settings ({QUICK['n_train']} training images, "
                        f"{QUICK['epochs']} epochs unless --epochs is given): a smoke run")
    args = p.parse_args(argv)
    quick_epochs = args.quick and "--epochs" not in " ".join(argv if argv is not None else sys.argv)
    if quick_epochs:
        args.epochs = QUICK["epochs"]
    if args.dataset not in DATASETS:
        p.error(f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in ae.MODELS]
    if unknown or not args.models:
        p.error(f"unknown model(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(ae.MODELS)}")
    for flag in ("epochs", "seeds", "batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.anomaly_digits == "all":
        args.anomaly_digits = list(range(10))
    else:
        try:
            args.anomaly_digits = sorted({int(d) for d in args.anomaly_digits.split(",")})
        except ValueError:
            p.error(f"--anomaly-digits takes digits 0-9 separated by commas or 'all', "
                    f"got {args.anomaly_digits!r}")
        if not args.anomaly_digits or not all(0 <= d <= 9 for d in args.anomaly_digits):
            p.error("--anomaly-digits takes digits 0-9 separated by commas or 'all'")
    if ANOMALY_DIGIT not in args.anomaly_digits:
        args.anomaly_digits.insert(0, ANOMALY_DIGIT)   # the reference's digit is always run
    return args


# ---- data

def load_data(args):
    """Arrays and index splits for the run, as REFERENCE.md lays them out."""
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
            "val_idx": val_idx, "x_test": x_test, "y_test": test_labels.astype(np.int64),
            "fingerprint": hashlib.md5(train_images.tobytes()[:1 << 20]
                                       + train_labels.tobytes()).hexdigest()[:12]}


def split_permutation(n, seed=SPLIT_SEED):
    """The companion code's permutation of the n training images (src/data.py, _split_train_val)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


# ---- training, with checkpoints that are reused

class Progress:
    """One status line for the whole run: which training, its epoch and losses, and an ETA.

    The ETA weighs each training by epochs x images x (parameters + ETA_OVERHEAD_PARAMS).
    """

    def __init__(self, jobs):
        self.total = sum(j["work"] for j in jobs)
        self.done, self.seconds, self.n_jobs, self.index = 0.0, 0.0, len(jobs), 0
        self.tty = sys.stdout.isatty()

    def start(self, job):
        self.index += 1
        self.job, self.job_seconds = job, 0.0

    def __call__(self, info):
        """fit's per-epoch callback: info has epoch, epochs, losses, samples_per_s, seconds."""
        self.done += self.job["work"] / info["epochs"]
        self.seconds += info["seconds"] - self.job_seconds    # info["seconds"] counts from fit's start
        self.job_seconds = info["seconds"]
        eta = self.seconds / max(self.done, 1e-9) * (self.total - self.done)
        line = (f"[{self.index}/{self.n_jobs}] {self.job['label']} | epoch {info['epoch']}/"
                f"{info['epochs']} | train {info['train_loss']:.2f} val {info['val_loss']:.2f} | "
                f"{info['samples_per_s']:,.0f} img/s | run ETA {_hms(eta)}")
        if self.tty:
            print("\r" + line.ljust(110), end="", flush=True)
        elif info["epoch"] == info["epochs"] or info["epoch"] % 10 == 0:
            print(line, flush=True)

    def skip(self, job):
        self.index += 1
        self.total -= job["work"]
        print(f"[{self.index}/{self.n_jobs}] {job['label']} | reused checkpoint", flush=True)


def training_jobs(args, data, out_dir):
    """Every training the run needs, each with the settings that identify its checkpoint."""
    jobs = []
    for seed in seeds_of(args):
        for name in args.models:
            for latent, digit in [(LATENT, None)] + [(LATENT_ANOMALY, d) for d in args.anomaly_digits]:
                idx = data["train_idx"]
                if digit is not None:
                    idx = mnist.drop_class(idx, data["y_all"], digit)
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


def train_all(jobs, data, args, device):
    """Train (or reuse) every job's model; returns {(model, latent, seed, digit): (model, meta)}."""
    progress = Progress(jobs)
    x_val = torch.from_numpy(data["x_all"][data["val_idx"]])
    trained = {}
    for job in jobs:
        s, key = job["settings"], _key(job)
        if os.path.exists(job["path"]):
            model, meta = ae.load(job["path"], device=device)
            if meta.get("settings") == s:
                progress.skip(job)
                trained[key] = (model, meta)
                job["reused"] = True
                continue
        progress.start(job)
        ae.set_seed(s["seed"])
        model = ae.build(s["model"], s["latent_dim"])
        x_train = torch.from_numpy(data["x_all"][job["idx"]])
        history = ae.fit(model, x_train, x_val, epochs=s["epochs"], batch_size=s["batch_size"],
                         lr=s["lr"], seed=s["seed"], device=device, progress=progress)
        if progress.tty:
            print()
        meta = {"settings": s, "history": history}
        ae.save(model, job["path"], meta=meta)
        trained[key] = (model, meta)
        job["reused"] = False
    return trained


def _key(job):
    s = job["settings"]
    return s["model"], s["latent_dim"], s["seed"], s["held_out_digit"]


def seeds_of(args):
    return [FIRST_SEED + i for i in range(args.seeds)]


# ---- the gauntlet for one seed

def run_tasks(trained, data, args, seed, device, out_dir, judge, first):
    """All tasks for one seed; returns {metric: {model: value}} and writes figures if `first`."""
    x_all, y_all, x_test, y_test = data["x_all"], data["y_all"], data["x_test"], data["y_test"]
    train_idx, val_idx = data["train_idx"], data["val_idx"]
    probe_idx = mnist.probe_indices(train_idx, n=min(N_PROBE, len(train_idx)))
    n_map = min(len(x_test), QUICK["map_points"]) if args.quick else len(x_test)
    budget_draws = QUICK["budget_draws"] if args.quick else BUDGET_DRAWS
    m = {}
    put = lambda metric, name, value: m.setdefault(metric, {}).__setitem__(name, value)
    figs = {"recon": {}, "samples": {}, "maps20": {}, "maps2": {}, "roc": {}, "notes20": {},
            "notes2": {}, "sample_notes": {}, "budgets": {}}
    _, judge_test_feats = tasks.judge_images(judge, x_test[:N_GENERATED])
    for name in args.models:
        t0 = time.time()
        model, meta = trained[(name, LATENT, seed, None)]
        put("training_seconds", name, meta["history"]["seconds"])
        # reconstruction: mean over test images of the summed BCE
        ae.set_seed(seed)
        put("reconstruction_bce", name, float(tasks.per_image_bce(model, x_test).mean()))
        # classification: converged probe, reference protocol, k-NN, label budgets
        codes = {True: {}, False: {}}
        for sample in ([True, False] if name in VARIATIONAL else [True]):
            torch.manual_seed(seed)
            codes[sample] = {part: tasks.encode(model, x, sample=sample) for part, x in
                             [("all", x_all), ("test", x_test)]}
        z_all, z_test = codes[True]["all"], codes[True]["test"]
        y_probe = y_all[probe_idx]
        put("probe_accuracy", name, tasks.linear_probe(z_all[probe_idx], y_probe, z_all[val_idx],
                                                        y_all[val_idx], z_test, y_test))
        if name in VARIATIONAL:
            mu_all, mu_test = codes[False]["all"], codes[False]["test"]
            put("probe_accuracy_mu", name, tasks.linear_probe(
                mu_all[probe_idx], y_probe, mu_all[val_idx], y_all[val_idx], mu_test, y_test))
        ae.set_seed(seed)
        net = tasks.FrozenEncoderProbe(model).to(device)
        put("probe_accuracy_reference_protocol", name, tasks.train_classifier(
            net, x_all[probe_idx], y_probe, x_all[val_idx], y_all[val_idx], x_test, y_test, seed))
        knn = tasks.knn_predict(z_all[probe_idx], y_probe, z_test, k=10)
        put("knn_probe_accuracy", name, float(np.mean(knn == y_test)))
        curve = {}
        for budget in LABEL_BUDGETS:
            per_class = budget // tasks.N_CLASSES
            if per_class * 2 > np.bincount(y_all[train_idx]).min():
                continue    # the data set is too small for this budget (tiny test data)
            accs = []
            for draw in range(budget_draws):
                sub = train_idx[tasks.label_budget_indices(y_all[train_idx], per_class, seed + draw)]
                accs.append(tasks.linear_probe(z_all[sub], y_all[sub], z_all[val_idx],
                                               y_all[val_idx], z_test, y_test))
            put(f"probe_accuracy_{budget}_labels", name, float(np.mean(accs)))
            curve[budget] = (float(np.mean(accs)), float(np.std(accs)))
        figs["budgets"][name] = curve
        # latent structure: 20-d codes through umap_lite; their k-NN accuracy and trustworthiness
        z_map = z_test[:n_map]
        loo = tasks.knn_predict(z_map, y_test[:n_map], z_map, k=10, exclude_self=True)
        put("latent_knn_accuracy", name, float(np.mean(loo == y_test[:n_map])))
        # anomaly: latent-2 model trained without the digit; score = summed BCE per image
        model2, _ = trained[(name, LATENT_ANOMALY, seed, ANOMALY_DIGIT)]
        is_anomaly = y_test == ANOMALY_DIGIT
        ae.set_seed(seed)
        bce, signed = tasks.anomaly_scores(model2, x_test)
        put("anomaly_auc", name, tasks.roc_auc(is_anomaly, bce))
        put("anomaly_auprc", name, tasks.average_precision(is_anomaly, bce))
        put("anomaly_auc_signed_score", name, tasks.roc_auc(is_anomaly, signed))
        for digit in args.anomaly_digits:     # the reference's digit is scored above already
            ae.set_seed(seed)
            score = bce if digit == ANOMALY_DIGIT else tasks.per_image_bce(
                trained[(name, LATENT_ANOMALY, seed, digit)][0], x_test)
            put(f"anomaly_auc_digit_{digit}", name, tasks.roc_auc(y_test == digit, score))
        # samples and interpolation, judged by the classifier
        if name in ae.GENERATIVE:
            torch.manual_seed(seed)
            with torch.no_grad():
                generated = model.eval().sample(N_GENERATED).cpu().numpy()
            probs, feats = tasks.judge_images(judge, generated)
            quality = tasks.sample_quality(probs, feats, judge_test_feats)
            for k, v in quality.items():
                put(f"sample_{k}", name, v)
            figs["samples"][name] = generated[:N_SHOWN]
            figs["sample_notes"][name] = (f"legible {quality['legibility']:.2f} | diversity "
                                          f"{quality['diversity']:.2f} | FD {quality['frechet']:.0f}")
        start, end = int(y_test[0]), int(y_test[1])
        variants = [("", False)] + ([("_fixed_noise", True)] if name in VARIATIONAL else [])
        for suffix, fixed in variants:
            ae.set_seed(seed)
            frames = tasks.interpolate(model, x_test[0], x_test[1], fixed_noise=fixed, seed=seed)
            path_probs, _ = tasks.judge_images(judge, frames)
            pq = tasks.path_quality(path_probs, start, end)
            put(f"interpolation_confidence{suffix}", name, pq["mean_confidence"])
            put(f"interpolation_third_class{suffix}", name, float(pq["third_class"]))
            if first:
                tasks.save_gif(frames, os.path.join(out_dir, f"interp_{name}{suffix}.gif"))
        if first:
            ae.set_seed(seed)
            figs["recon"][name] = tasks.reconstruct(model, x_test[:N_SHOWN])
            umap_epochs = QUICK["umap_epochs"] if args.quick else None
            emb = cached_embedding(out_dir, meta, z_map, seed, umap_epochs)
            trust = umap_lite.trustworthiness(z_map, emb, k=15)
            put("umap_trustworthiness", name, float(trust))
            figs["maps20"][name] = emb
            figs["notes20"][name] = (f"trust(15) {trust:.3f} | 10-NN 20-d "
                                     f"{m['latent_knn_accuracy'][name]:.3f}")
            ae.set_seed(seed)
            z2 = tasks.encode(model2, x_test[:n_map])
            figs["maps2"][name] = z2
            figs["notes2"][name] = f"10-NN {np.mean(tasks.knn_predict(z2, y_test[:n_map], z2, 10, True) == y_test[:n_map]):.3f}"
            fpr, tpr, _ = tasks.roc_curve(is_anomaly, bce)
            fpr_s, tpr_s, _ = tasks.roc_curve(is_anomaly, signed)
            figs["roc"][name] = [("summed BCE", fpr, tpr, m["anomaly_auc"][name]),
                                 ("signed (published)", fpr_s, tpr_s,
                                  m["anomaly_auc_signed_score"][name])]
        print(f"  tasks {name} seed {seed}: BCE {m['reconstruction_bce'][name]:.2f} | probe "
              f"{m['probe_accuracy'][name]:.3f} | ref-probe "
              f"{m['probe_accuracy_reference_protocol'][name]:.3f} | AUC "
              f"{m['anomaly_auc'][name]:.3f} ({time.time() - t0:.0f}s)", flush=True)
    if first:
        write_figures(figs, data, args, out_dir, n_map)
    return m


def cached_embedding(out_dir, meta, z, seed, n_epochs):
    """umap_lite of the codes, cached beside the checkpoints (it is the slowest task)."""
    key = hashlib.sha1(json.dumps([meta["settings"], len(z), seed, n_epochs],
                                  sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(out_dir, "cache", f"umap-{meta['settings']['model']}-{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    emb = umap_lite.embed(z, seed=seed, n_epochs=n_epochs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tasks.write_atomically(path, lambda tmp: np.save(tmp, emb))
    return emb


def write_figures(figs, data, args, out_dir, n_map):
    y_map = data["y_test"][:n_map]
    names = FASHION_CLASSES if args.dataset == "fashion" else None
    tasks.plot_reconstructions(data["x_test"][:N_SHOWN], figs["recon"],
                               os.path.join(out_dir, "reconstructions.png"))
    if figs["samples"]:
        tasks.plot_samples(figs["samples"], os.path.join(out_dir, "samples.png"),
                           figs["sample_notes"])
    tasks.plot_latents(figs["maps20"], y_map, os.path.join(out_dir, "latent_umap.png"),
                       figs["notes20"], names)
    tasks.plot_latents(figs["maps2"], y_map, os.path.join(out_dir, "latent_2d.png"),
                       figs["notes2"], names)
    tasks.plot_roc(figs["roc"], os.path.join(out_dir, "anomaly_roc.png"))
    budgets = sorted({b for c in figs["budgets"].values() for b in c})
    if budgets:
        tasks.plot_label_budget(budgets, {n: ([c[b][0] for b in budgets], [c[b][1] for b in budgets])
                                          for n, c in figs["budgets"].items()},
                                os.path.join(out_dir, "label_budgets.png"))


def baselines(data, seed, device):
    """Classifiers without a trained autoencoder, on the 550 labels, with the article's probe.

    baseline_as_published: what the companion code's baseline really was. Its Classifier hands
    Adam only the linear head's parameters (src/downstream/classification.py,
    configure_optimizers), so the random vanilla encoder never changes, but its BatchNorm layers
    follow the classifier into training mode (batch statistics, running averages updated).
    from_scratch: the vanilla encoder and the linear layer both trained, as the article describes.
    random_encoder: the random encoder frozen with BatchNorm in eval mode, only the layer trained;
    what the probe gets from the architecture alone.
    """
    x_all, y_all = data["x_all"], data["y_all"]
    probe_idx = mnist.probe_indices(data["train_idx"], n=min(N_PROBE, len(data["train_idx"])))
    out = {}
    for kind in ("baseline_as_published", "from_scratch", "random_encoder"):
        ae.set_seed(seed)
        model = ae.build("vanilla", LATENT).to(device)
        if kind == "random_encoder":
            net = tasks.FrozenEncoderProbe(model).to(device)
        else:
            if kind == "baseline_as_published":
                model.encoder.requires_grad_(False)   # no update, but .train() still reaches BatchNorm
            net = torch.nn.Sequential(model.encoder, torch.nn.Linear(LATENT, tasks.N_CLASSES)).to(device)
        out[f"probe_accuracy_{kind}"] = {"vanilla": tasks.train_classifier(
                net, x_all[probe_idx], y_all[probe_idx], x_all[data["val_idx"]], y_all[data["val_idx"]],
                data["x_test"], data["y_test"], seed)}
    return out


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


# ---- results and report

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
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=5,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "platform": platform.platform(), "cpu": cpu,
            "cpu_threads": torch.get_num_threads(), "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    stages = {}
    out_dir = os.path.join(args.out, args.dataset)
    device = ae.pick_device(args.device)
    data = load_data(args)
    stages["data"] = time.time() - t_start
    print(f"{args.dataset}: {len(data['train_idx'])} train / {len(data['val_idx'])} val / "
          f"{len(data['x_test'])} test images; models: {', '.join(args.models)}; "
          f"seeds: {', '.join(map(str, seeds_of(args)))}", flush=True)
    jobs = training_jobs(args, data, out_dir)
    t = time.time()
    trained = train_all(jobs, data, args, device)
    stages["training"] = time.time() - t
    t = time.time()
    judge = get_judge(data, args, device, out_dir)
    per_seed = []
    for i, seed in enumerate(seeds_of(args)):
        per_seed.append(run_tasks(trained, data, args, seed, device, out_dir, judge, first=i == 0))
        per_seed[-1].update(baselines(data, seed, device))
    stages["tasks"] = time.time() - t
    stages["total"] = time.time() - t_start
    results = {"config": {**{k: v for k, v in vars(args).items()}, "seeds": seeds_of(args),
                          "quick": args.quick, "latent_dims": [LATENT, LATENT_ANOMALY],
                          "n_train": int(len(data["train_idx"])), "n_val": int(len(data["val_idx"])),
                          "n_test": int(len(data["x_test"])), "probe_labels": N_PROBE,
                          "command": "python run.py " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:])},
               "environment": environment(device), "stages_seconds": stages,
               "trainings": [{"training": j["label"], "checkpoint": os.path.basename(j["path"]),
                              "reused": j["reused"],
                              "seconds": trained[_key(j)][1]["history"]["seconds"]} for j in jobs],
               "finished": datetime.datetime.now().isoformat(timespec="seconds"),
               "metrics": summarise(per_seed)}
    path = os.path.join(out_dir, "results.json")
    tasks.write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(results, indent=1)))
    report_path = write_report(results, out_dir)
    print(f"done in {_hms(stages['total'])}: {report_path} (results: {path})")
    return results


# ---- the report

def write_report(results, out_dir):
    """REPORT.md beside results.json: every table, every figure, the settings and the audit."""
    cfg, env, m = results["config"], results["environment"], results["metrics"]
    names = [n for n in ae.MODELS if n in cfg["models"]]
    mnist_ref = cfg["dataset"] == "mnist"
    L = []
    add = L.append
    add(f"# Autoencoder Bake-Off: {cfg['dataset']}\n")
    if cfg["quick"]:
        add(f"> **Quick run: NOT the full protocol.** {cfg['n_train']} training images, "
            f"{cfg['epochs']} epochs, reduced map and judge settings. Numbers are for checking the "
            "pipeline only; run `python run.py` for the real comparison.\n")
    elif cfg["epochs"] != 60:
        add(f"> **Shortened run: {cfg['epochs']} epochs instead of the reference's 60.** "
            "Differences from the published numbers are expected.\n")
    n_seeds = len(cfg["seeds"])
    trained = results["trainings"]
    reused = sum(t["reused"] for t in trained)
    add(f"`{cfg['command']}` finished {results['finished']} in {_hms(results['stages_seconds']['total'])} "
        f"on {env['gpu'] or env['cpu']} ({env['device']}, {env['cpu_threads']} torch thread(s)); "
        f"its {len(trained)} trainings took {_hms(sum(t['seconds'] for t in trained))} in all"
        + (f" ({reused} of them reused from checkpoints of an earlier run with the same settings)"
           if reused else "") + f". {n_seeds} run(s) per training "
        f"(seeds {', '.join(map(str, cfg['seeds']))}); tables show "
        + ("mean ± std over runs. " if n_seeds > 1 else "single runs (no error bars). ")
        + "Figures and GIFs show the first seed."
        + (" *Published* numbers are the article's single MNIST runs (REFERENCE.md); *diff* is "
           "ours minus published." if mnist_ref else "") + "\n")

    add("## Summary\n")
    add(_table(["model", "recon BCE ↓", "probe acc (converged) ↑", "probe acc (reference) ↑",
                "anomaly AUROC ↑", "training s"],
               [[n, _fmt(m, "reconstruction_bce", n, 2), _fmt(m, "probe_accuracy", n, 4),
                 _fmt(m, "probe_accuracy_reference_protocol", n, 4), _fmt(m, "anomaly_auc", n, 4),
                 _fmt(m, "training_seconds", n, 0)] for n in names]))

    add("## Reconstruction\n")
    add("Mean over the test images of the BCE summed over the 1024 pixels. The VAEs sample in "
        "evaluation too, as the reference did.\n")
    add(_compare_table(m, "reconstruction_bce", names, mnist_ref, 2, relative=True))
    add("First 16 test images (top) and their reconstructions:\n\n![reconstructions](reconstructions.png)\n")

    add("## Training time\n")
    add(f"Wall time of {cfg['epochs']} epochs incl. per-epoch validation, latent 20, on "
        f"{env['gpu'] or env['cpu']}" + (" (published: one GPU, data loading dominated)." if mnist_ref else ".") + "\n")
    add(_compare_table(m, "training_seconds", names, mnist_ref, 0))

    gen = [n for n in names if n in ae.GENERATIVE]
    if gen:
        add("## Samples\n")
        add(f"{N_GENERATED} unconditional samples per model, scored by a small MLP digit classifier "
            "(the *judge*, trained once on the training split): *legible* = share the judge "
            "classifies with confidence > 0.9; *diversity* = entropy of the predicted-class "
            "histogram (max ln 10 = 2.30); *FD* = Frechet distance between the judge's penultimate "
            f"features of samples and of {N_GENERATED} test images (lower is closer).\n")
        add(_table(["model", "legible ↑", "diversity ↑", "FD ↓"],
                   [[n, _fmt(m, "sample_legibility", n, 3), _fmt(m, "sample_diversity", n, 2),
                     _fmt(m, "sample_frechet", n, 1)] for n in gen]))
        add("![samples](samples.png)\n")

    add("## Interpolation\n")
    add("Between the first two test images, through the encoder outputs before the bottleneck "
        f"({tasks.INTERP_STEPS} steps). *Confidence* = the judge's mean top-class probability "
        "along the path; *third class* = share of runs whose path is classified as a digit other "
        "than its two ends somewhere. *Fixed noise*: the VAE's noise drawn once for the whole path.\n")
    rows = []
    for n in names:
        row = [n, _fmt(m, "interpolation_confidence", n, 3), _fmt(m, "interpolation_third_class", n, 2)]
        row += ([_fmt(m, "interpolation_confidence_fixed_noise", n, 3),
                 _fmt(m, "interpolation_third_class_fixed_noise", n, 2)]
                if n in VARIATIONAL else ["", ""])
        rows.append(row)
    add(_table(["model", "confidence", "third class", "confidence (fixed noise)",
                "third class (fixed noise)"], rows))
    add(" ".join(f"![{n}](interp_{n}.gif)" for n in names) + "\n")
    fixed = [n for n in names if n in VARIATIONAL]
    if fixed:
        add("Fixed noise: " + " ".join(f"![{n} fixed](interp_{n}_fixed_noise.gif)" for n in fixed) + "\n")
        add("GIF order: " + ", ".join(names) + "; then " + ", ".join(fixed) + " with fixed noise.\n")

    add("## Latent structure\n")
    if "umap_trustworthiness" in m:
        add("20-d test codes mapped to 2-D by `umap_lite` (15 neighbours, min_dist 0.1). "
            "*Trust* = trustworthiness (k = 15) of the map; *10-NN* = leave-one-out 10-NN accuracy "
            "of the 20-d codes on the test images.\n")
        add(_table(["model", "trust(15) ↑", "10-NN acc ↑"],
                   [[n, _fmt(m, "umap_trustworthiness", n, 3), _fmt(m, "latent_knn_accuracy", n, 3)]
                    for n in names]))
        add("![latent maps, 20-d codes through umap_lite](latent_umap.png)\n")
    add("The raw codes of the latent-2 models (trained without the anomaly digit):\n\n"
        "![latent-2 codes](latent_2d.png)\n")

    add("## Classification\n")
    add(f"Frozen encoder (+ bottleneck), {N_PROBE} labelled training images. *Converged*: "
        "multinomial logistic regression on standardised codes, trained to convergence, L2 "
        "strength picked on the validation set. *Reference*: the article's protocol (a linear "
        "layer, Adam lr 1e-3, batch 32, at most 20 epochs, early stop on validation accuracy, "
        "patience 3). *mu*: the VAEs' mean code instead of a sample. *10-NN*: k-NN (k = 10) on "
        "the same labels.\n")
    cols = ["model", "converged", "converged (mu)", "reference"] + \
        (["published", "diff"] if mnist_ref else []) + ["10-NN"]
    rows = []
    for n in names:
        row = [n, _fmt(m, "probe_accuracy", n, 4), _fmt(m, "probe_accuracy_mu", n, 4),
               _fmt(m, "probe_accuracy_reference_protocol", n, 4)]
        if mnist_ref:
            row += _published_cells(m, "probe_accuracy_reference_protocol", n, 4)
        rows.append(row + [_fmt(m, "knn_probe_accuracy", n, 4)])
    add(_table(cols, rows))
    add(f"Baseline, the vanilla encoder + linear layer trained from scratch on the same labels "
        f"(reference protocol): {_fmt(m, 'probe_accuracy_from_scratch', 'vanilla', 4)}"
        + (f" (published {PUBLISHED_BASELINE})." if mnist_ref else ".")
        + f" The same encoder left frozen at its random initialisation, with only the linear layer "
        f"trained: {_fmt(m, 'probe_accuracy_random_encoder', 'vanilla', 4)}.\n")
    budgets = [b for b in LABEL_BUDGETS if f"probe_accuracy_{b}_labels" in m]
    if budgets:
        add("Label budgets: converged probe trained on a stratified draw of N labels "
            f"({'1' if cfg['quick'] else BUDGET_DRAWS} draw(s) per budget and seed, averaged):\n")
        add(_table(["model"] + [f"{b} labels" for b in budgets],
                   [[n] + [_fmt(m, f"probe_accuracy_{b}_labels", n, 3) for b in budgets]
                    for n in names]))
        add("![accuracy vs labels](label_budgets.png)\n")

    add("## Anomaly detection\n")
    held_out = (f"class {ANOMALY_DIGIT} ({FASHION_CLASSES[ANOMALY_DIGIT]})"
                if cfg["dataset"] == "fashion" else f"digit {ANOMALY_DIGIT}")
    add(f"Latent-2 models trained without {held_out}; score = summed BCE of the "
        f"reconstruction; positives = test images of {held_out}. *Signed* is the "
        "score behind the article's published AUCs: the signed sum of (reconstruction - input), "
        "which is not an error.\n")
    cols = ["model", "AUROC", "AUPRC", "AUROC signed score"] + (["published (signed)", "diff"]
                                                                 if mnist_ref else [])
    add(_table(cols, [[n, _fmt(m, "anomaly_auc", n, 4), _fmt(m, "anomaly_auprc", n, 4),
                       _fmt(m, "anomaly_auc_signed_score", n, 4)]
                      + (_published_cells(m, "anomaly_auc_signed_score", n, 4) if mnist_ref else [])
                      for n in names]))
    add("![ROC curves](anomaly_roc.png)\n")
    digits = cfg["anomaly_digits"]
    if len(digits) > 1:
        add(f"One-vs-rest: for each digit d, a latent-2 model trained without d, AUROC of d against "
            f"the rest (summed BCE score). Best per column in bold.\n")
        best = {d: max(names, key=lambda n: m[f"anomaly_auc_digit_{d}"][n]["mean"]) for d in digits}
        rows = [[n] + [("**" if best[d] == n else "") + f"{m[f'anomaly_auc_digit_{d}'][n]['mean']:.3f}"
                       + ("**" if best[d] == n else "") for d in digits]
                + [f"{np.mean([m[f'anomaly_auc_digit_{d}'][n]['mean'] for d in digits]):.3f}"]
                for n in names]
        add(_table(["model"] + [str(d) for d in digits] + ["mean"], rows))

    add("## Audit of the article's conclusions\n")
    add("Each conclusion of the article, checked against this run's numbers.\n")
    add(_table(["the article says", "verdict", "our numbers"], audit(m, names, digits)))

    add("## Settings and environment\n")
    stages = results["stages_seconds"]
    add(_table(["setting", "value"], [[k, f"`{v}`"] for k, v in cfg.items()]
               + [[f"seconds: {k}", f"{v:.0f}"] for k, v in stages.items()]
               + [[k, f"`{v}`"] for k, v in env.items()]))
    path = os.path.join(out_dir, "REPORT.md")
    tasks.write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text("\n".join(L)))
    return path


def audit(m, names, digits):
    """[claim, verdict, evidence] rows; each verdict follows from a stated rule on the numbers."""
    rows = []
    mean = lambda metric, n: m[metric][n]["mean"]
    have = lambda *ns: all(n in names for n in ns)

    def rank(metric, reverse=False):
        return sorted(names, key=lambda n: mean(metric, n), reverse=reverse)

    def check(claim, ok, evidence, partly=False):
        rows.append([claim, "depends" if partly else ("confirmed" if ok else "not confirmed"),
                     evidence])

    bce = rank("reconstruction_bce")
    if have("shallow"):
        check("The shallow AE reconstructs worst.", bce[-1] == "shallow",
              f"worst BCE: {bce[-1]} {mean('reconstruction_bce', bce[-1]):.1f}")
    if have("vanilla", "sparse", "vq"):
        top3 = set(bce[:3])
        check("Vanilla, sparse and vq-VAE share first place in reconstruction.",
              top3 == {"vanilla", "sparse", "vq"},
              "best three: " + ", ".join(f"{n} {mean('reconstruction_bce', n):.1f}" for n in bce[:3]))
    if have("vanilla", "vae", "beta_vae_strict"):
        check("The VAEs reconstruct worse than vanilla; strict beta-VAE worst of them.",
              all(mean("reconstruction_bce", v) > mean("reconstruction_bce", "vanilla")
                  for v in VARIATIONAL if v in names)
              and max((v for v in VARIATIONAL if v in names),
                      key=lambda v: mean("reconstruction_bce", v)) == "beta_vae_strict",
              ", ".join(f"{n} {mean('reconstruction_bce', n):.1f}" for n in ("vanilla",) + VARIATIONAL
                        if n in names))
    ref, conv = rank("probe_accuracy_reference_protocol", True), rank("probe_accuracy", True)
    if have("denoising"):
        check("Denoising features classify best.", ref[0] == conv[0] == "denoising",
              f"best reference-protocol probe: {ref[0]} {mean('probe_accuracy_reference_protocol', ref[0]):.3f}; "
              f"best converged probe: {conv[0]} {mean('probe_accuracy', conv[0]):.3f}",
              partly=(ref[0] == "denoising") != (conv[0] == "denoising"))
    base = mean("probe_accuracy_from_scratch", "vanilla")
    if have("sparse"):
        r, c = mean("probe_accuracy_reference_protocol", "sparse"), mean("probe_accuracy", "sparse")
        others_conv = [mean("probe_accuracy", n) for n in names if n != "sparse"]
        ref_bad = r < base
        conv_bad = bool(others_conv) and c < np.median(others_conv)
        check("Sparse features are not suited for classification (below the from-scratch baseline).",
              ref_bad and conv_bad,
              f"sparse: reference protocol {r:.3f} (baseline {base:.3f}); converged probe {c:.3f} "
              f"vs the other models' median {np.median(others_conv) if others_conv else float('nan'):.3f}",
              partly=ref_bad != conv_bad)
    others = [n for n in names if n != "sparse"]
    if others:
        above = [n for n in others if mean("probe_accuracy_reference_protocol", n) > base]
        check("Nearly all autoencoders beat the from-scratch baseline (reference protocol).",
              len(above) >= len(others) - 1,
              f"{len(above)} of {len(others)} non-sparse models above {base:.3f}")
    vaes = [v for v in VARIATIONAL if v in names]
    if len(vaes) > 1 and "beta_vae_loose" in vaes:
        best = max(vaes, key=lambda v: mean("probe_accuracy_reference_protocol", v))
        check("Among the VAEs, the loose beta-VAE classifies best.", best == "beta_vae_loose",
              ", ".join(f"{v} {mean('probe_accuracy_reference_protocol', v):.3f}" for v in vaes))
    if have("shallow", "stacked"):
        for metric, label in (("anomaly_auc", "summed BCE"), ("anomaly_auc_signed_score", "signed")):
            order = rank(metric, True)
            check(f"Shallow is best at anomaly detection, stacked second ({label} score).",
                  order[:2] == ["shallow", "stacked"],
                  "top: " + ", ".join(f"{n} {mean(metric, n):.3f}" for n in order[:3]),
                  partly=order[0] == "shallow" and order[1] != "stacked")
        if len(digits) > 1:
            wins = [d for d in digits if max(names, key=lambda n: mean(f"anomaly_auc_digit_{d}", n)) == "shallow"]
            check("The anomaly order is stable for other digits (shallow best).",
                  len(wins) == len(digits), f"shallow best for {len(wins)} of {len(digits)} digits",
                  partly=0 < len(wins) < len(digits))
    if len(vaes) + ("vq" in names) > 1 and "sample_legibility" in m:
        gen = [n for n in names if n in ae.GENERATIVE]
        leg = max(gen, key=lambda n: mean("sample_legibility", n))
        if "beta_vae_strict" in gen:
            check("The strict beta-VAE gives the most meaningful samples.", leg == "beta_vae_strict",
                  ", ".join(f"{n} legible {mean('sample_legibility', n):.2f}" for n in gen))
        if have("beta_vae_strict", "beta_vae_loose"):
            s, l = "beta_vae_strict", "beta_vae_loose"
            more_div = mean("sample_diversity", l) > mean("sample_diversity", s)
            less_leg = mean("sample_legibility", l) < mean("sample_legibility", s)
            check("The loose beta-VAE's samples are more diverse but less legible than the strict one's.",
                  more_div and less_leg,
                  f"diversity {mean('sample_diversity', l):.2f} vs {mean('sample_diversity', s):.2f}; "
                  f"legible {mean('sample_legibility', l):.2f} vs {mean('sample_legibility', s):.2f}",
                  partly=more_div != less_leg)
        if "vq" in gen:
            worst = min(gen, key=lambda n: mean("sample_legibility", n))
            check("vq-VAE samples (uniform codes) do not resemble digits.", worst == "vq",
                  f"vq legible {mean('sample_legibility', 'vq'):.2f}, FD {mean('sample_frechet', 'vq'):.0f}")
    if vaes and any(n not in VARIATIONAL for n in names):
        v_conf = np.mean([mean("interpolation_confidence", n) for n in vaes])
        o_conf = np.mean([mean("interpolation_confidence", n) for n in names if n not in VARIATIONAL])
        check("VAE interpolations stay digit-like; the others fade between the two images.",
              v_conf - o_conf > CLEAR_MARGIN,
              f"mean judge confidence along the path: VAEs {v_conf:.3f}, others {o_conf:.3f} "
              f"(confirmed only if the VAEs lead by more than {CLEAR_MARGIN})")
    times = [mean("training_seconds", n) for n in names]
    if len(times) > 1:
        check("Training time is about the same for every model (overheads dominate).",
              max(times) / min(times) < 1.25,
              f"fastest {min(times):.0f} s, slowest {max(times):.0f} s (x{max(times) / min(times):.2f}); "
              "with no data-loading overhead, compute differences show")
    return rows


def _fmt(m, metric, name, digits):
    """'mean ± std' (or 'mean' for one run) of a metric, blank when it was not measured."""
    if metric not in m or name not in m[metric]:
        return ""
    v = m[metric][name]
    if len(v["runs"]) > 1:
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    return f"{v['mean']:.{digits}f}"


def _published_cells(m, metric, name, digits, relative=False):
    pub = PUBLISHED[metric].get(name)
    if pub is None or name not in m.get(metric, {}):
        return ["", ""]
    diff = m[metric][name]["mean"] - pub
    cell = f"{diff:+.{digits}f}" + (f" ({100 * diff / pub:+.0f}%)" if relative else "")
    return [f"{pub:.{digits}f}", cell]


def _compare_table(m, metric, names, with_published, digits, relative=False):
    cols = ["model", "ours"] + (["published", "diff"] if with_published else [])
    return _table(cols, [[n, _fmt(m, metric, n, digits)]
                         + (_published_cells(m, metric, n, digits, relative) if with_published else [])
                         for n in names])


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _hms(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: finished trainings are saved; run the same command to continue")
