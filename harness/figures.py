"""The figures and GIFs beside REPORT.md, and the one way every file of a run is written.

    from harness import figures
    figures.write_figures(figs, data, args, out_dir)   # run.py's first seed: every figure at once
    figures.write_atomically(path, lambda tmp: ...)     # write tmp, then rename onto path

The tasks (tasks.py) return arrays; these functions draw them with matplotlib and pillow and
write each file atomically (temp file + rename), so an interrupted run never leaves half a figure.

First read: skip this file; it is styling. `write_figures` names which figure shows what.
"""

import os
import pathlib
import tempfile

import numpy as np

import mnist
import tasks
from harness.protocol import BUDGET_DRAWS, N_SHOWN, PIXELS, QUICK, SAMPLERS

# ---- constants

GIF_FRAME_MS, GIF_PAUSE_MS = 40, 800   # ~25 fps along the path, a pause on each real image
GIF_SCALE = 2                # 32 px digits are too small to see; nearest-neighbour upscaling
SAMPLE_ROWS = 2              # rows of digits per model and sampler in the samples figure


# ---- the figures beside REPORT.md (run.py draws them from the first seed's arrays)

def write_figures(figs, data, args, out_dir):
    """The first seed's figures and GIFs, beside REPORT.md."""
    maps, gen = figs["latent"], figs["generation"]
    y_map = data["y_test"][:len(next(iter(maps["maps20"].values())))]
    names = mnist.FASHION_CLASSES if args.dataset == "fashion" else None
    at = lambda filename: os.path.join(out_dir, filename)
    plot_reconstructions(data["x_test"][:N_SHOWN], figs["reconstruction"], at("reconstructions.png"))
    if gen["samples"]:
        plot_samples(gen["samples"], at("samples.png"), gen["notes"], order=SAMPLERS.values())
    for filename, frames in gen["gifs"].items():
        save_gif(frames, at(filename))
    plot_latents(maps["maps20"], y_map, at("latent_umap.png"), maps["notes20"], names)
    plot_latents(maps["maps2"], y_map, at("latent_2d.png"), maps["notes2"], names)
    plot_roc(figs["anomaly"]["roc"], at("anomaly_roc.png"))
    if figs["anomaly"]["density"] is not None:
        plot_code_density(figs["anomaly"]["density"], at("anomaly_code_density.png"))
    curves = figs["classification"]
    budgets = sorted({b for c in curves.values() for b in c})
    lines = lambda c: ([c[b][0] for b in budgets], [c[b][1] for b in budgets])
    if budgets:
        plot_label_budget(budgets, {n: lines(c) for n, c in curves.items()}, at("label_budgets.png"),
                                draws=QUICK["budget_draws"] if args.quick else BUDGET_DRAWS,
                                references={PIXELS: lines(figs["pixels"])})


def remove_stale_figures(out_dir, since):
    """Delete the figures and GIFs in out_dir that this run (started at `since`) did not write:
    those of models or tasks an earlier report had and this one lacks."""
    for path in pathlib.Path(out_dir).glob("*"):
        if path.suffix in (".png", ".gif") and path.stat().st_mtime < since:
            path.unlink()


# ---- figures

def plot_reconstructions(originals, recons_by_model, path):
    """Top row: the 16 originals; then one row of 16 reconstructions per model."""
    plt = _pyplot()
    rows = [("input", originals)] + list(recons_by_model.items())
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 0.85 * len(rows) + 0.3))
    for ax, (name, imgs) in zip(np.atleast_1d(axes), rows):
        ax.imshow(_tile(imgs, cols=len(imgs)), cmap="gray", vmin=0, vmax=1)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    _savefig(fig, path)


def plot_samples(samples, path, notes=None, order=()):
    """One row per model, one column block per sampler: samples[model][sampler] = (16, 1024) images.

    Columns follow `order`, then any other sampler in the order met. A block shows its images in
    SAMPLE_ROWS rows; a model without that sampler leaves it blank. notes[model][sampler] is
    written under the block.
    """
    plt = _pyplot()
    present = {s for by_sampler in samples.values() for s in by_sampler}
    samplers = [s for s in dict.fromkeys([*order, *(s for b in samples.values() for s in b)]) if s in present]
    shown = next(iter(next(iter(samples.values())).values()))
    cols = int(np.ceil(len(shown) / SAMPLE_ROWS))            # digits per row of a block
    blank = _tile(shown, cols)
    fig, axes = plt.subplots(len(samples), len(samplers), squeeze=False,
                             figsize=(3.4 * len(samplers) + 1, 1.25 * len(samples) + 0.5))
    for r, (name, by_sampler) in enumerate(samples.items()):
        for c, sampler in enumerate(samplers):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(sampler, fontsize=10)
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
            if sampler not in by_sampler:
                # a white block of the same size: the row keeps its name, the column its title's height
                ax.imshow(np.ones_like(blank), cmap="gray", vmin=0, vmax=1)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            ax.imshow(_tile(by_sampler[sampler], cols), cmap="gray", vmin=0, vmax=1)
            if notes and sampler in notes.get(name, {}):
                ax.set_xlabel(notes[name][sampler], fontsize=7)
    fig.tight_layout()
    _savefig(fig, path)


def save_gif(frames, path):
    """Looping GIF that goes forth and back along `frames` (N, 1024), pausing at both ends."""
    from PIL import Image
    side = int(round(np.sqrt(frames.shape[1])))
    # (N, 1024) -> (N, 32, 32) uint8
    pixels = (np.clip(frames, 0, 1) * 255).astype(np.uint8).reshape(len(frames), side, side)
    seq = list(pixels) + list(pixels[-2:0:-1])          # forth, then back without repeating ends
    images = [Image.fromarray(p).resize((side * GIF_SCALE,) * 2, Image.NEAREST) for p in seq]
    durations = [GIF_FRAME_MS] * len(images)
    durations[0] = durations[len(pixels) - 1] = GIF_PAUSE_MS
    write_atomically(path, lambda tmp: images[0].save(tmp, format="GIF", save_all=True,
                                             append_images=images[1:], duration=durations, loop=0))


def plot_latents(points_by_model, labels, path, notes=None, class_names=None):
    """One scatter panel per model of 2-D points, coloured by class (tab10) with one legend."""
    plt = _pyplot()
    n = len(points_by_model)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, pts) in zip(axes.ravel(), points_by_model.items()):
        for c in range(mnist.N_CLASSES):
            sel = labels == c
            ax.scatter(pts[sel, 0], pts[sel, 1], s=1.5, color=cmap(c), rasterized=True,
                       label=class_names[c] if class_names else str(c))
        ax.set_title(name, fontsize=11)
        ax.set_xticks([]), ax.set_yticks([])
        if notes and name in notes:
            ax.set_xlabel(notes[name], fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    handles, names = axes.ravel()[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=mnist.N_CLASSES, markerscale=6, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _savefig(fig, path)


def plot_roc(curves_by_model, path):
    """One ROC panel per model; `curves_by_model[name]` = list of (label, fpr, tpr, auc)."""
    plt = _pyplot()
    n = len(curves_by_model)
    cols = min(3, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, curves) in zip(axes.ravel(), curves_by_model.items()):
        for label, fpr, tpr, auc in curves:
            ax.plot(fpr, tpr, label=f"{label}: AUC {auc:.3f}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    _savefig(fig, path)


def code_density_picture(model, name, fit, val, x_test, is_anomaly, seed, n_grid=100):
    """code_nll's picture: log p(z) of its mixture on a grid over the training codes, with the test
    codes of the held-out digit and of the other digits on top; None unless the code is 2-d."""
    gmm, codes = tasks.code_density(model, fit, val, seed)
    z_fit, z_test = codes(fit), codes(x_test)
    if z_fit.shape[1] != 2:
        return None                 # only a 2-d code space can be drawn as it is
    lo, hi = np.percentile(z_fit, 0.5, axis=0), np.percentile(z_fit, 99.5, axis=0)
    gx, gy = np.meshgrid(*(np.linspace(a - 0.1 * (b - a), b + 0.1 * (b - a), n_grid) for a, b in zip(lo, hi)))
    log_p = tasks.gmm_log_density(gmm, np.c_[gx.ravel(), gy.ravel()]).reshape(n_grid, n_grid)
    return {"model": name, "grid": (gx, gy, log_p), "anomalies": z_test[is_anomaly], "normal": z_test[~is_anomaly]}


def plot_code_density(density, path):
    """Contours of log p(z) of the training codes' mixture, the test codes on top (code_nll's picture)."""
    plt = _pyplot()
    gx, gy, log_p = density["grid"]
    fig, ax = plt.subplots(figsize=(6, 5))
    contours = ax.contourf(gx, gy, log_p, levels=np.linspace(log_p.max() - 12, log_p.max(), 13), cmap="Greys",
                           extend="min")
    fig.colorbar(contours, ax=ax, label="log p(z), mixture of the training codes")
    ax.scatter(*density["normal"][:2000].T, s=2, c="tab:blue", alpha=0.4, label="test codes, other digits")
    ax.scatter(*density["anomalies"][:500].T, s=3, c="tab:red", alpha=0.7, label="test codes, held-out digit")
    ax.set_xlim(gx.min(), gx.max()), ax.set_ylim(gy.min(), gy.max())
    ax.set_title(f"{density['model']}, latent 2: where the held-out digit's codes land", fontsize=9)
    ax.legend(fontsize=7, loc="upper right", markerscale=3)
    _savefig(fig, path)


def plot_heatmaps(panels, row_names, col_names, path, vmin=0.0, vmax=1.0):
    """Side-by-side heatmaps with each cell's value written in it; panels = {title: (R, C) array}."""
    plt = _pyplot()
    n_rows, n_cols = len(row_names), len(col_names)
    fig, axes = plt.subplots(1, len(panels), figsize=(0.55 * n_cols * len(panels) + 2.5, 0.36 * n_rows + 1.4),
                             squeeze=False, sharey=True)
    axes[0, 0].set_yticks(range(n_rows), row_names, fontsize=8)   # the rows' names once, at the left
    for ax, (title, values) in zip(axes[0], panels.items()):
        image = ax.imshow(values, cmap="RdBu_r", vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(values):   # dark text on light cells, white on the saturated
            if np.isnan(v):
                continue                            # a reference without this score
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5,
                    color="white" if abs(v - (vmin + vmax) / 2) > 0.3 * (vmax - vmin) else "black")
        ax.set_xticks(range(n_cols), col_names, fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03)
    _savefig(fig, path)


def plot_label_budget(budgets, acc_by_model, path, draws=1, references=None):
    """Probe accuracy vs number of labels (log x, ticked at the budgets), one line per model;
    acc = (mean, std) lists. With several draws per budget, bars show the std over the draws.
    `references` (same form, e.g. the raw pixels) are drawn grey and dashed, apart from the contestants.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (mean, std) in acc_by_model.items():
        ax.errorbar(budgets, mean, yerr=std if draws > 1 else None, marker="o", ms=3, capsize=2,
                    label=name)
    for name, (mean, std) in (references or {}).items():
        ax.errorbar(budgets, mean, yerr=std if draws > 1 else None, marker="s", ms=3, capsize=2,
                    color="0.45", ls="--", lw=2, label=f"{name} (reference)")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:,}" for b in budgets])
    ax.minorticks_off()     # log ticks would add 10^1, 10^2 and unlabelled marks between budgets
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test accuracy (converged linear probe)")
    ax.set_title(f"accuracy vs labels (bars: std over {draws} label draws)" if draws > 1 else
                 "accuracy vs labels (one label draw per budget: no error bars)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _savefig(fig, path)



# ---- helpers

def _tile(imgs, cols):
    """(N, 1024) -> one (rows*32, cols*32) image, row-major."""
    imgs = np.asarray(imgs)
    side = int(round(np.sqrt(imgs.shape[1])))
    rows = int(np.ceil(len(imgs) / cols))
    grid = np.zeros((rows * cols, side, side), dtype=np.float32)
    grid[:len(imgs)] = imgs.reshape(-1, side, side)
    # (rows*cols, s, s) -> (rows*s, cols*s)
    return grid.reshape(rows, cols, side, side).transpose(0, 2, 1, 3).reshape(rows * side, cols * side)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")    # figures go to files; no display is needed or wanted
    import matplotlib.pyplot as plt
    return plt


def _savefig(fig, path):
    plt = _pyplot()
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    write_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))
    plt.close(fig)


def write_atomically(path, write, suffix=None):
    """Call write(tmp_path) and move the result onto `path` only once it is complete. The hidden
    temporary file ends in `suffix` (default: path's own, which tells savefig the format)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1] if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)     # mkstemp makes files private; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
