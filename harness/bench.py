"""Benchmarks of the Autoencoder Bake-Off (not tests: they time things and print the numbers).

Run:
    python -m harness.bench [--data-dir DIR] [--only train|jobs|umap|gmm|probe|quick|all] [--device cpu]

The data is run.py's: data/mnist, downloaded there if missing (--data-dir for local files).

train: one epoch of the vanilla autoencoder on the 55,000 MNIST training images, timed three ways:
  (a) ae.fit as the project runs it (data on the device, index-shuffled batches, validation);
  (b) the same epoch's matrix products alone, as bare torch.matmul calls of the same shapes
      (forward and backward of every Linear, plus the validation forwards): the practical limit;
  (c) the same epoch in the style of the article's code: a torchvision-style Dataset that turns
      each image into a PIL image, pads and converts it on every access, and a DataLoader
      (batch 256, shuffled);
  (d) a floor for (a): the loop of (a) over the six Linears alone (no BatchNorm, ReLU or
      bottleneck), with the same loss and fused Adam: what autograd and the optimizer cost
      around these matrix products before anything else is added.
  It prints (a)/(b) (target <= 1.25 on a 2-core CPU), (c)/(a) and (d)/(b), then times vanilla and
  VAE at latent 20 and 2 and extrapolates the full protocol (9 contestants x 2 latent dims x 60
  epochs).

jobs: run.py's parallel trainings. N trainings of vanilla at latent 20 (seeds 42, 43, ...;
  JOBS_EPOCHS epochs each on the 55,000 training images), N = the cores this process may use:
  one after the other with every thread (run.py --jobs 1) versus all at once as N one-thread
  worker processes (the default --jobs), both through trainings.train_all, worker start-up included.
  Prints both wall times and their ratio, and the thread scaling of one training (an epoch with
  1 thread against one with every thread).

umap: umap_lite against umap-learn (optional: pip install umap-learn scikit-learn; without them
  the section is skipped with one line naming what is missing) on the 20-d
  codes of the 10,000 test images from a vanilla autoencoder trained for 3 epochs:
  trustworthiness (k = 15), 5-fold 10-NN accuracy of the map, wall time (umap-learn cold and
  warm), peak extra memory, then umap_lite on the 60,000 training codes; both maps side by side
  in a PNG. Each embedding runs in a fresh child process.

gmm: the ex-post Gaussian mixture (tasks.choose_gmm) on real codes: the 20-d codes of the 55,000
  training images from a vanilla autoencoder trained for 3 epochs (as in umap), K chosen on the
  5,000 validation codes. Times one fit at K = 10 and the whole choice over tasks.GMM_K_GRID (what
  run.py does per model and seed; target < 10 s on 2 cores), with EM's iterations per K.
probe: the converged probe (tasks.linear_probe, as run.py calls it) on the 1,024 raw pixels of the
  550 labelled images, timed (target < 30 s on 2 cores), with its test accuracy; then, on every 8th
  pixel (128 features, where the old dense-Hessian solver still runs) with 100 labels (fewer images
  than features) and with the 550, the fast solver against the old one: both test accuracies
  (target: within 0.001), both times, and the largest difference of a test probability.
quick: `python run.py --quick` end to end in a fresh output folder (nothing reused), its wall time
  against the target (QUICK_TARGET_S) and the seconds of training and of every task, as its
  results.json records them.

Simplified: one timed run per measurement (median of three epochs), no warm-up beyond that;
on a busy machine the numbers are noisy, so check the load (uptime) first.

First read: skip this file; it measures, it does not define anything the report uses.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

import ae
import mnist
import tasks
import umap_lite
from harness import cli, trainings, workers
from harness.protocol import FIRST_SEED

# ---- constants

JOBS_EPOCHS = 5  # per training in the jobs section; the protocol's 60 would take minutes
BATCH_SIZE = 256
PAD = 2  # 28x28 -> 32x32
PROTOCOL_EPOCHS = 60
REPEATS = 3  # timed epochs per measurement; the median is reported
BUSY_LOAD = 0.5  # a load average above this means another process competes for the cores

# ---- data


def load_split(args):
    """uint8 train and validation images (55,000 and 5,000, 28x28), split as the protocol does."""
    train_images = load_mnist(args)[0]
    train_idx, val_idx = mnist.split_indices(trainings.split_permutation(len(train_images)))
    return train_images[train_idx], train_images[val_idx]


def load_mnist(args):
    """The four MNIST arrays from where run.py keeps them (downloaded if missing), or --data-dir."""
    try:
        return mnist.load("mnist", root=args.data_dir or os.path.join("data", "mnist"),
                          download=not args.no_download)
    except (ValueError, OSError) as err:
        raise SystemExit(f"bench.py: error: {err}") from err


class PaddedMNIST(torch.utils.data.Dataset):
    """The original's way in: every access builds a PIL image, pads it and converts it to a tensor."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i])  # as torchvision's MNIST dataset does
        padded = np.pad(np.asarray(image), PAD)  # transforms.Pad(2)
        x = torch.from_numpy(padded.astype(np.float32) / 255).unsqueeze(0)  # ToTensor: (1, 32, 32)
        return x, 0


# ---- timing helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def epoch_seconds_fit(name, latent_dim, train_x, val_x, device, epochs=REPEATS):
    """Median wall time of one ae.fit epoch (training + validation)."""
    ae.set_seed(42)
    model = ae.build(name, latent_dim).to(device)
    ends = []
    ae.fit(model, train_x, val_x, epochs=epochs, device=device, progress=lambda r: ends.append(r["seconds"]))
    return statistics.median(np.diff([0.0] + ends))


def epoch_seconds_gemm(model, n_train, n_val, device, repeats=REPEATS):
    """Median time of one epoch's matrix products alone, as bare torch.matmul calls.

    Per batch of b rows and per Linear with weight W (out, in), in the order they run:
    forward X (b, in) @ W^T; backward dW = G^T (out, b) @ X and, but for the first layer
    (the input needs no gradient), dX = G (b, out) @ W. Validation batches run forward only.
    """
    weights = [m.weight.detach().to(device) for m in model.modules() if isinstance(m, nn.Linear)]

    def sizes(n):
        return [BATCH_SIZE] * (n // BATCH_SIZE) + ([n % BATCH_SIZE] if n % BATCH_SIZE else [])

    inputs = {b: [torch.rand(b, w.shape[1], device=device) for w in weights] for b in set(sizes(n_train) + sizes(n_val))}
    grads = {b: [torch.rand(b, w.shape[0], device=device) for w in weights] for b in inputs}
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for b in sizes(n_train):
            for x, w in zip(inputs[b], weights):
                torch.matmul(x, w.t())
            for i in reversed(range(len(weights))):
                torch.matmul(grads[b][i].t(), inputs[b][i])
                if i > 0:
                    torch.matmul(grads[b][i], weights[i])
        for b in sizes(n_val):
            for x, w in zip(inputs[b], weights):
                torch.matmul(x, w.t())
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def epoch_seconds_original(train_images, val_images, device):
    """One epoch (training + validation) through a per-item Dataset and a DataLoader."""
    ae.set_seed(42)
    model = ae.build("vanilla", 20).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = torch.utils.data.DataLoader(PaddedMNIST(train_images), batch_size=BATCH_SIZE, shuffle=True)
    val = torch.utils.data.DataLoader(PaddedMNIST(val_images), batch_size=BATCH_SIZE)
    sync(device)
    start = time.perf_counter()
    model.train()
    for x, _ in train:
        x = x.to(device).flatten(1)  # (B, 1, 32, 32) -> (B, 1024)
        optimizer.zero_grad()
        loss, _ = model.loss(x)
        loss.backward()
        optimizer.step()
        loss.item()  # logged every step, as a Lightning module does
    model.eval()
    with torch.no_grad():
        for x, _ in val:
            model.loss(x.to(device).flatten(1))[0].item()
    sync(device)
    return time.perf_counter() - start


def epoch_seconds_linears(model, train_x, val_x, device, repeats=REPEATS):
    """Median time of one epoch of fit's loop over model's Linears alone, chained (a floor for (a)).

    Same data handling, loss (summed BCE on logits) and fused Adam as ae.fit; what is missing is
    BatchNorm, ReLU, the bottleneck and fit's bookkeeping.
    """
    ae.set_seed(42)
    net = nn.Sequential(*[m for m in model.modules() if isinstance(m, nn.Linear)]).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    train_x, val_x = train_x.to(device), val_x.to(device)
    times = []
    for _ in range(repeats):
        order = torch.randperm(len(train_x)).to(device)
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(train_x), BATCH_SIZE):
            x = train_x.index_select(0, order[i:i + BATCH_SIZE])  # (B, 1024)
            optimizer.zero_grad()
            loss = ae.bce(net(x), x)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for i in range(0, len(val_x), BATCH_SIZE):
                ae.bce(net(val_x[i:i + BATCH_SIZE]), val_x[i:i + BATCH_SIZE])
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- train


def bench_train(args, device):
    train_images, val_images = load_split(args)
    train_x = torch.from_numpy(mnist.to_vectors(train_images))
    val_x = torch.from_numpy(mnist.to_vectors(val_images))
    print(f"data: {len(train_x):,} train, {len(val_x):,} validation images; torch threads: {torch.get_num_threads()}")

    fit_s = epoch_seconds_fit("vanilla", 20, train_x, val_x, device)
    print(f"(a) ae.fit epoch, vanilla latent 20:          {fit_s:7.2f} s")
    vanilla = ae.build("vanilla", 20)
    gemm_s = epoch_seconds_gemm(vanilla, len(train_x), len(val_x), device)
    print(f"(b) its matrix products alone (limit):        {gemm_s:7.2f} s")
    original_s = epoch_seconds_original(train_images, val_images, device)
    print(f"(c) per-item Dataset + DataLoader epoch:      {original_s:7.2f} s")
    linears_s = epoch_seconds_linears(vanilla, train_x, val_x, device)
    print(f"(d) (a)'s loop on the six Linears alone:      {linears_s:7.2f} s")
    print(f"(a)/(b) = {fit_s / gemm_s:.2f}  (target <= 1.25: overhead beyond the matrix products)")
    print(f"(c)/(a) = {original_s / fit_s:.2f}  (speed-up over the original's data pipeline)")
    print(f"(d)/(b) = {linears_s / gemm_s:.2f}  (autograd + loss + Adam alone; BatchNorm, ReLU and "
          f"the bottleneck add (a)-(d) = {fit_s - linears_s:.2f} s)")

    # the protocol trains 9 contestants at each latent dim; the six non-variational ones are
    # timed as vanilla (shallow and stacked are cheaper, so this errs on the slow side)
    total = 0.0
    for latent_dim in (20, 2):
        dense = fit_s if latent_dim == 20 else epoch_seconds_fit("vanilla", latent_dim, train_x, val_x, device)
        variational = epoch_seconds_fit("vae", latent_dim, train_x, val_x, device)
        print(f"epoch at latent {latent_dim:2d}: vanilla {dense:5.2f} s, vae {variational:5.2f} s")
        total += PROTOCOL_EPOCHS * (6 * dense + 3 * variational)
    print(f"full protocol (18 trainings x {PROTOCOL_EPOCHS} epochs), extrapolated: {total / 60:.1f} min")


# ---- jobs


def bench_jobs(args, device):
    cores = workers.plan_jobs(None, 10**6, device)[0]
    n = max(2, cores)
    argv = ["--models", "vanilla", "--seeds", str(n), "--epochs", str(JOBS_EPOCHS), "--no-download"]
    argv += ["--data-dir", args.data_dir or os.path.join("data", "mnist")]
    if args.device:
        argv += ["--device", args.device]
    print(f"{n} trainings of vanilla latent 20, {JOBS_EPOCHS} epochs each, {cores} core(s)")
    threads = torch.get_num_threads()
    train_images, val_images = load_split(args)
    x = [torch.from_numpy(mnist.to_vectors(images)) for images in (train_images, val_images)]
    one_s, all_s = (_threads_epoch(t, x, device) for t in (1, cores))
    print(f"one training, one epoch: 1 thread {one_s:.2f} s, {cores} threads {all_s:.2f} s "
          f"(x{one_s / all_s:.2f} from {cores}x the threads)")
    torch.set_num_threads(cores)
    sequential_s, _ = _train_all_seconds(argv + ["--jobs", "1"], device)
    print(f"one after the other, {cores} threads each (--jobs 1): {sequential_s:7.1f} s")
    parallel_s, longest_fit_s = _train_all_seconds(argv + ["--jobs", str(n)], device)
    print(f"all at once, {n} worker processes (--jobs {n}):        {parallel_s:7.1f} s "
          f"(of which {parallel_s - longest_fit_s:.1f} s before and after the longest fit: "
          f"worker start-up, data loading, checkpoints)")
    print(f"ratio {sequential_s / parallel_s:.2f} (target >= 1.6 on 2 cores whose threads scale badly)")
    torch.set_num_threads(threads)


def _threads_epoch(threads, x, device):
    """Median epoch of vanilla at latent 20 with `threads` torch threads; x = (train, val)."""
    torch.set_num_threads(threads)
    return epoch_seconds_fit("vanilla", 20, *x, device, epochs=2)


def _train_all_seconds(argv, device):
    """Wall time of trainings.train_all on the latent-20 jobs of argv, in a fresh output folder, and
    the longest of those trainings' own fit times."""
    run_args = cli.parse_args(argv)
    data = trainings.load_data(run_args)
    with tempfile.TemporaryDirectory() as out:
        jobs = [j for j in trainings.training_jobs(run_args, data, out) if j["settings"]["latent_dim"] == 20]
        start = time.perf_counter()
        trained, _, _ = trainings.train_all(jobs, data, run_args, device)
        wall = time.perf_counter() - start
    return wall, max(meta["history"]["seconds"] for _, meta in trained.values())


# ---- umap

UMAP_AE_EPOCHS = 3        # a few epochs already give the codes their digit clusters
UMAP_SEED = 0             # for the autoencoder and both UMAPs (umap-learn then runs on one thread)
UMAP_PNG = "results/umap_compare.png"
UMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # buffers over 128 KiB go back to the OS when freed
UMAP_NEEDS = {"sklearn": "scikit-learn", "umap": "umap-learn"}  # optional: module -> pip name

# Runs in a fresh process. argv: codes.npy, out prefix, seed, then "umap_lite" or umap-learn
# inits; prints a JSON list of {seconds, peak_mb}, one per call, and saves each map.
UMAP_CHILD = r"""
import json, sys, time, warnings
import numpy as np

def status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024

x, prefix, seed, runs = np.load(sys.argv[1]), sys.argv[2], int(sys.argv[3]), []
for i, what in enumerate(sys.argv[4:]):
    if what == "umap_lite":
        import umap_lite
        embed = lambda: umap_lite.embed(x, seed=seed)
    else:
        import umap
        warnings.simplefilter("ignore")           # "n_jobs overridden by random_state": intended
        embed = lambda: umap.UMAP(random_state=seed, init=what).fit_transform(x)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                               # VmHWM := the current resident set
    start_mb, start = status_mb("VmRSS"), time.perf_counter()
    np.save(f"{prefix}{i}.npy", embed())
    runs.append({"seconds": time.perf_counter() - start, "peak_mb": status_mb("VmHWM") - start_mb})
print(json.dumps(runs))
"""


def missing_packages(modules):
    """Of `modules` ({module: pip name}), the pip names of those that are not installed."""
    return [pip for module, pip in modules.items() if importlib.util.find_spec(module) is None]


def bench_umap(args, device=None):
    missing = missing_packages(UMAP_NEEDS)
    if missing:
        print(f"skipped: the umap comparison needs {' and '.join(missing)} "
              f"(pip install {' '.join(missing)})")
        return
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    train_codes, test_codes, labels = _vanilla_codes(args, device)
    print(f"codes: {len(test_codes):,} x {test_codes.shape[1]} (MNIST test) from a vanilla "
          f"autoencoder trained {UMAP_AE_EPOCHS} epochs; load average {os.getloadavg()[0]:.2f}")
    (ours,) = _umap_run(test_codes, ["umap_lite"])
    # cold (numba compiles), warm, and warm with umap_lite's initialisation
    cold, default, pca = _umap_run(test_codes, ["spectral", "spectral", "pca"])
    # the warm peaks again, with freed buffers handed back to the OS so that a warm call cannot
    # reuse heap an earlier one left (not used for times: it slows big allocations down)
    _, default["peak_mb"], pca["peak_mb"] = (
        run["peak_mb"] for run in _umap_run(test_codes, ["spectral", "spectral", "pca"], UMAP_ENV))
    ours["label"], default["label"] = "umap_lite (PCA init)", "umap-learn (spectral init)"
    pca["label"] = 'umap-learn init="pca"'
    print(f"{'':28s} {'trust(15)':>9s} {'10-NN acc':>9s} {'warm s':>7s} {'cold s':>7s} {'peak MB':>8s}")
    for row in (ours, default, pca):
        row["trust"] = umap_lite.trustworthiness(test_codes, row["y"], k=15)
        knn10 = KNeighborsClassifier(n_neighbors=10)
        row["acc"] = cross_val_score(knn10, row["y"], labels, cv=5).mean()
        cold_s = f"{cold['seconds']:7.1f}" if row is default else f"{'-':>7s}"
        print(f"{row['label']:28s} {row['trust']:9.4f} {row['acc']:9.4f} {row['seconds']:7.1f} "
              f"{cold_s} {row['peak_mb']:8.0f}")
    print(f"(umap_lite has nothing to compile: its one call is its time; umap-learn's cold call "
          f"peaked at {cold['peak_mb']:.0f} MB)")
    d_trust, d_acc = ours["trust"] - default["trust"], ours["acc"] - default["acc"]
    ratio = ours["seconds"] / default["seconds"]
    print(f"umap_lite vs umap-learn default: trustworthiness {d_trust:+.4f} (target |d| <= 0.01: "
          f"{_umap_ok(abs(d_trust) <= 0.01)}), 10-NN accuracy {d_acc:+.4f} (|d| <= 0.02: "
          f"{_umap_ok(abs(d_acc) <= 0.02)}), time {ratio:.2f}x warm (<= 2: {_umap_ok(ratio <= 2)})")

    (big,) = _umap_run(train_codes, ["umap_lite"])
    print(f"umap_lite on {len(train_codes):,} x {train_codes.shape[1]} (MNIST train codes): "
          f"{big['seconds']:.1f} s, peak extra {big['peak_mb']:.0f} MB "
          f"(target < 2048 MB: {_umap_ok(big['peak_mb'] < 2048)})")

    path = getattr(args, "umap_png", UMAP_PNG)
    _umap_plot([ours, default], labels, path)
    print(f"wrote {path}")


# ---- umap helpers


def _vanilla_codes(args, device):
    """Train a vanilla autoencoder briefly; its codes: train (60k, 20), test (10k, 20), labels."""
    train_images, _, test_images, test_labels = load_mnist(args)
    x = mnist.to_vectors(train_images)
    train_idx, val_idx = mnist.split_indices(trainings.split_permutation(len(x)))
    ae.set_seed(UMAP_SEED)
    model = ae.build("vanilla", 20)
    ae.fit(model, x[train_idx], x[val_idx], epochs=UMAP_AE_EPOCHS, progress=False, device=device)
    on = next(model.parameters()).device

    @torch.no_grad()
    def encode(v):
        batches = (torch.as_tensor(v[i:i + 4096], device=on) for i in range(0, len(v), 4096))
        return np.concatenate([model.encode(batch).cpu().numpy() for batch in batches])

    return encode(x), encode(mnist.to_vectors(test_images)), test_labels


def _umap_run(codes, calls, env=None):
    """Run UMAP_CHILD in a fresh process: one embedding per entry of calls ("umap_lite" or a
    umap-learn init). Returns a dict per call: seconds, peak_mb, y (the map)."""
    here = os.path.dirname(os.path.abspath(umap_lite.__file__))
    with tempfile.TemporaryDirectory() as tmp:
        path, prefix = os.path.join(tmp, "codes.npy"), os.path.join(tmp, "map")
        np.save(path, codes)
        command = [sys.executable, "-c", UMAP_CHILD, path, prefix, str(UMAP_SEED), *calls]
        done = subprocess.run(command, cwd=here, env={**os.environ, **(env or {})},
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"UMAP run {calls} failed:\n{done.stderr[-2000:]}")
        runs = json.loads(done.stdout.strip().splitlines()[-1])
        for i, run in enumerate(runs):
            run["y"] = np.load(f"{prefix}{i}.npy")
    return runs


def _umap_ok(passed):
    return "ok" if passed else "MISSED"


def _umap_plot(rows, labels, path):
    """The maps side by side, one tab10 colour per digit; written via a temp file + rename."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(rows) + 1, 6.4), layout="constrained")
    for ax, row in zip(fig.subplots(1, len(rows)), rows):
        for digit in range(10):
            at = labels == digit
            ax.scatter(row["y"][at, 0], row["y"][at, 1], s=1, color=colormaps["tab10"](digit),
                       label=str(digit), rasterized=True)
        ax.set_title(f"{row['label']}\ntrustworthiness {row['trust']:.4f}, "
                     f"10-NN accuracy {row['acc']:.4f}")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, title="digit", markerscale=8, loc="outside right center")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


# ---- gmm

GMM_K = 10                # one fit at Pythae's default mixture size, beside the whole grid


def bench_gmm(args, device=None):
    codes = _vanilla_codes(args, device)[0]                              # (60000, 20), file order
    train_idx, val_idx = mnist.split_indices(trainings.split_permutation(len(codes)))
    z_train, z_val = codes[train_idx], codes[val_idx]
    print(f"codes: {len(z_train):,} x {z_train.shape[1]} training, {len(z_val):,} validation, from a vanilla "
          f"autoencoder trained {UMAP_AE_EPOCHS} epochs; torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    gmm = tasks.fit_gmm(z_train, GMM_K, seed=42)
    one_s = time.perf_counter() - start
    print(f"tasks.fit_gmm, K = {GMM_K}: {one_s:.1f} s, {len(gmm['log_likelihood'])} EM iterations")
    start = time.perf_counter()
    best, scores = tasks.choose_gmm(z_train, z_val, seed=42)
    all_s = time.perf_counter() - start
    print(f"tasks.choose_gmm over K = {', '.join(map(str, scores))}: {all_s:.1f} s (target < 10 s on 2 cores: "
          f"{_umap_ok(all_s < 10)}); chosen K = {len(best['weights'])}; validation log-likelihood per code "
          + ", ".join(f"{k}: {v:.2f}" for k, v in scores.items()))


# ---- probe

PROBE_TARGET_S = 30       # the target for one converged probe on 1,024 pixels, 550 labels
PROBE_EVERY = 8           # every 8th pixel (128 features): small enough for the old dense solver


def bench_probe(args, device=None):
    argv = ["--data-dir", args.data_dir or os.path.join("data", "mnist")] + ["--no-download"] * args.no_download
    data = trainings.load_data(cli.parse_args(argv))
    x, x_test, y = data["x_all"], data["x_test"], data["y_all"]
    print(f"converged probe on {x.shape[1]} pixel features, {len(data['probe_idx'])} labelled images, "
          f"{len(data['val_idx'])} validation, {len(x_test)} test; load average {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    acc = tasks.linear_probe(x[data["probe_idx"]], y[data["probe_idx"]], x[data["val_idx"]], y[data["val_idx"]],
                             x_test, data["y_test"])
    seconds = time.perf_counter() - start
    print(f"fast probe, 1,024 pixels, {len(data['probe_idx'])} labels: {seconds:.1f} s, test accuracy "
          f"{acc:.4f} (target < {PROBE_TARGET_S} s: {_umap_ok(seconds < PROBE_TARGET_S)})")
    few = data["train_idx"][tasks.label_budget_indices(y[data["train_idx"]], 10, FIRST_SEED)]          # 100 labels: fewer images than features
    sub, sub_test = x[:, ::PROBE_EVERY], x_test[:, ::PROBE_EVERY]
    for idx in (few, data["probe_idx"]):
        fits = {}
        for label, fit in (("fast", tasks._probe_weights), ("old", _old_probe_weights)):
            start = time.perf_counter()
            design, w = fit(sub[idx], y[idx], sub[data["val_idx"]], y[data["val_idx"]], tasks.L2_GRID)
            logits = design(sub_test) @ w
            fits[label] = (time.perf_counter() - start, np.mean(logits.argmax(1) == data["y_test"]),
                           np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)))
        (fast_s, fast_acc, fast_p), (old_s, old_acc, old_p) = fits["fast"], fits["old"]
        print(f"{sub.shape[1]} pixels (every {PROBE_EVERY}th), {len(idx)} labels: fast {fast_acc:.4f} "
              f"({fast_s:.1f} s), old {old_acc:.4f} ({old_s:.1f} s), |accuracy difference| "
              f"{abs(fast_acc - old_acc):.4f} (target <= 0.001: {_umap_ok(abs(fast_acc - old_acc) <= 1e-3)}), "
              f"max |probability difference| {np.abs(fast_p - old_p).max():.1e}")


def _old_probe_weights(z_train, y_train, z_val, y_val, l2_grid):
    """The probe as tasks.py fitted it before the span solver: Newton with the full (d K, d K)
    Hessian on all d standardised features. Kept here for the comparison only; (design, W)."""
    mean, std = z_train.mean(0), z_train.std(0)
    std[std == 0] = 1.0
    design = lambda z: np.c_[(z - mean) / std, np.ones(len(z))]
    x_tr, x_va = design(z_train), design(z_val)
    best_acc, best_w, w = -1.0, None, np.zeros((x_tr.shape[1], tasks.N_CLASSES))
    for lam in sorted(l2_grid, reverse=True):
        w = _old_newton(x_tr, y_train, lam, w)
        acc = np.mean((x_va @ w).argmax(1) == y_val)
        if acc > best_acc:
            best_acc, best_w = acc, w
    return design, best_w


def _old_newton(x, y, lam, w0):
    """Newton's method with the explicit Hessian and Armijo backtracking (the old solver)."""
    n, d = x.shape
    k = tasks.N_CLASSES
    penalty = np.full((d, k), lam)
    penalty[-1] = tasks.BIAS_RIDGE
    w = w0.copy()
    for _ in range(tasks.NEWTON_MAX_ITER):
        value, grad, p = tasks.logistic_objective(x, y, w, lam)
        if np.abs(grad).max() < tasks.NEWTON_TOL:
            break
        # d2L / dW[a,c] dW[b,e] = 1/n sum_i x_ia x_ib (p_ic [c == e] - p_ic p_ie), W row-major
        m = (x[:, :, None] * p[:, None, :]).reshape(n, d * k)       # (n, d*k): rows x_i kron p_i
        hess = -m.T @ m / n + np.diag(penalty.ravel())
        for c in range(k):
            hess[c::k, c::k] += (x * p[:, c:c + 1]).T @ x / n        # (d, d): X^T diag(p_:c) X / n
        step = np.linalg.solve(hess, grad.ravel()).reshape(d, k)
        t = 1.0
        while t > 1e-10 and tasks.logistic_objective(x, y, w - t * step, lam)[0] > (
                value - 1e-4 * t * (grad * step).sum()):
            t /= 2
        w = w - t * step
    return w


# ---- quick

QUICK_TARGET_S = 60       # the first command a newcomer runs: a first look in under a minute


def bench_quick(args, device=None):
    argv = ["--data-dir", args.data_dir or os.path.join("data", "mnist")] + ["--no-download"] * args.no_download
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as out:
        print(f"python run.py --quick, fresh output folder; load average {os.getloadavg()[0]:.2f}")
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "run.py", "--quick", "--out", out, *argv], cwd=root,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"bench.py: error: run.py --quick failed:\n{done.stderr[-2000:]}")
        with open(os.path.join(out, "mnist", "results.json")) as f:
            stages = json.load(f)["stages_seconds"]
    print(f"wall time {wall:.1f} s (target < {QUICK_TARGET_S} s: {_umap_ok(wall < QUICK_TARGET_S)})")
    for stage, seconds in stages.items():
        print(f"  {stage}: {seconds:.1f} s")


# ---- main

SECTIONS = {"train": bench_train, "jobs": bench_jobs, "umap": bench_umap, "gmm": bench_gmm, "quick": bench_quick,
            "probe": bench_probe}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None, help="folder with the four MNIST IDX files "
                        "(default: data/mnist, downloaded there if missing)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    parser.add_argument("--only", choices=[*SECTIONS, "all"], default="all", help="which benchmark to run")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: picked automatically)")
    parser.add_argument("--umap-png", default=UMAP_PNG, help="where the umap section draws both maps")
    args = parser.parse_args()
    device = cli.pick_device(args.device)
    load = os.getloadavg()[0]
    if load > BUSY_LOAD:
        print(f"warning: load average {load:.1f}: other processes are running, so these timings "
              "are slow and noisy (torch's threads wait for each other on a busy machine)")
    for name, section in SECTIONS.items():
        if args.only in (name, "all"):
            print(f"== {name}")
            section(args, device)


if __name__ == "__main__":
    main()
