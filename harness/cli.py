"""run.py's command line: its flags, the checks before any work, and Ctrl-C.

    from harness import cli
    args = cli.parse_args(argv)       # the flags, each checked, one-line errors
    device = cli.preflight(args)      # device, output folder, an earlier report, the cells file
    cli.run_cli(main)                 # main() with Ctrl-C and SIGTERM ending the run cleanly

Every failure here is one line that says what is wrong and what to do, and nothing is written
before these checks pass (the data is checked next, by trainings.load_data).

First read: skip this file; `python run.py --help` lists the flags.
"""

import argparse
import os
import signal
import sys
import tempfile

import torch

import ae
import mnist
from harness import cells, report, workers
from harness.protocol import ANOMALY_DIGIT, DATASETS, EPOCHS, LATENT, LATENT_ANOMALY, QUICK, SPLIT
from harness.trainings import seeds_of

OUT, QUICK_OUT = "runs", os.path.join("runs", "quick")   # git-ignored; results/ is written only on request
DESCRIPTION = "Run the Autoencoder Bake-Off: train the contestants, put them through the gauntlet, report."


# ---- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, no usage dump
        sys.exit(f"run.py: error: {message} (see python run.py --help)")


def parse_args(argv=None):
    p = _Parser(description=DESCRIPTION)
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
    args.anomaly_latents = _numbers(p, "--anomaly-latents", args.anomaly_latents, 1, (mnist.IMAGE_SIDE + 2 * mnist.PAD) ** 2 // 2,
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

def pick_device(name=None):
    """cuda, else mps, else cpu, unless `name` says which; prints the choice."""
    if name is None:
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available; use cpu")
    print(f"device: {device}")
    return device


def preflight(args):
    """The device, then the output folder and the report it may hold; returns the device.

    The data comes next (load_data checks it); training starts only once all of them pass.
    """
    try:
        device = pick_device(args.device)
    except ValueError as err:
        sys.exit(f"run.py: error: --device: {err}")
    out_dir = os.path.join(args.out, args.dataset)
    _check_writable(out_dir)
    if not args.replace:        # a report made with other settings is replaced only on request
        problem = report.replace_problem(out_dir, {**vars(args), "seeds": seeds_of(args)})
        if problem:
            sys.exit(f"run.py: error: {problem}; choose another --out, or pass --replace to replace it")
    cells.read_cells(os.path.join(out_dir, cells.CELLS))    # a damaged file stops the run here, not after the data
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


# ---- what results.json records of the command line

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


def run_cli(main):
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

