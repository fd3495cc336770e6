"""Benchmarks of the Autoencoder Bake-Off (not tests: they time things and print the numbers).

Run:
    python bench.py [--data-dir /work/shared/data/mnist] [--only train|all] [--device cpu]

train: one epoch of the vanilla autoencoder on the 55,000 MNIST training images, timed three ways:
  (a) ae.fit as the project runs it (data on the device, index-shuffled batches, validation);
  (b) the same epoch's matrix products alone, as bare torch.matmul calls of the same shapes
      (forward and backward of every Linear, plus the validation forwards): the practical limit;
  (c) the same epoch in the style of the article's code: a torchvision-style Dataset that turns
      each image into a PIL image, pads and converts it on every access, and a DataLoader
      (batch 256, shuffled).
  It prints (a)/(b) (target <= 1.25 on a 2-core CPU) and (c)/(a), then times vanilla and VAE at
  latent 20 and 2 and extrapolates the full protocol (9 contestants x 2 latent dims x 60 epochs).

Simplified: one timed run per measurement (median of three epochs), no warm-up beyond that;
on a busy machine the numbers are noisy, so check the load (uptime) first.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

import ae
import mnist

# ---- constants

DATA_DIR = "/work/shared/data/mnist"
BATCH_SIZE = 256
PAD = 2  # 28x28 -> 32x32
PROTOCOL_EPOCHS = 60
REPEATS = 3  # timed epochs per measurement; the median is reported

# ---- data


def load_split(data_dir):
    """uint8 train and validation images (55,000 and 5,000, 28x28), split as the protocol does."""
    try:
        train_images = mnist.load("mnist", root=data_dir, download=False)[0]
    except FileNotFoundError as err:
        raise SystemExit(f"{err}; pass --data-dir with the four MNIST files") from err
    train_idx, val_idx = mnist.split_indices(len(train_images))
    return train_images[train_idx], train_images[val_idx]


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


# ---- train


def bench_train(args, device):
    train_images, val_images = load_split(args.data_dir)
    train_x = torch.from_numpy(mnist.to_vectors(train_images))
    val_x = torch.from_numpy(mnist.to_vectors(val_images))
    print(f"data: {len(train_x):,} train, {len(val_x):,} validation images; torch threads: {torch.get_num_threads()}")

    fit_s = epoch_seconds_fit("vanilla", 20, train_x, val_x, device)
    print(f"(a) ae.fit epoch, vanilla latent 20:          {fit_s:7.2f} s")
    gemm_s = epoch_seconds_gemm(ae.build("vanilla", 20), len(train_x), len(val_x), device)
    print(f"(b) its matrix products alone (limit):        {gemm_s:7.2f} s")
    original_s = epoch_seconds_original(train_images, val_images, device)
    print(f"(c) per-item Dataset + DataLoader epoch:      {original_s:7.2f} s")
    print(f"(a)/(b) = {fit_s / gemm_s:.2f}  (target <= 1.25: overhead beyond the matrix products)")
    print(f"(c)/(a) = {original_s / fit_s:.2f}  (speed-up over the original's data pipeline)")

    # the protocol trains 9 contestants at each latent dim; the six non-variational ones are
    # timed as vanilla (shallow and stacked are cheaper, so this errs on the slow side)
    total = 0.0
    for latent_dim in (20, 2):
        dense = fit_s if latent_dim == 20 else epoch_seconds_fit("vanilla", latent_dim, train_x, val_x, device)
        variational = epoch_seconds_fit("vae", latent_dim, train_x, val_x, device)
        print(f"epoch at latent {latent_dim:2d}: vanilla {dense:5.2f} s, vae {variational:5.2f} s")
        total += PROTOCOL_EPOCHS * (6 * dense + 3 * variational)
    print(f"full protocol (18 trainings x {PROTOCOL_EPOCHS} epochs), extrapolated: {total / 60:.1f} min")


# ---- umap
# (bench_umap(args, device) goes here and into SECTIONS below)


# ---- main

SECTIONS = {"train": bench_train}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=DATA_DIR, help="folder with the four MNIST IDX .gz files")
    parser.add_argument("--only", choices=[*SECTIONS, "all"], default="all", help="which benchmark to run")
    parser.add_argument("--device", default=None, help="cpu, cuda or mps (default: picked automatically)")
    args = parser.parse_args()
    device = ae.pick_device(args.device)
    for name, section in SECTIONS.items():
        if args.only in (name, "all"):
            print(f"== {name}")
            section(args, device)


if __name__ == "__main__":
    main()
