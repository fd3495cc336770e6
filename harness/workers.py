"""How a run runs: trainings in worker processes, the one status line, and the machine's record.

    from harness import workers
    n_jobs, threads = workers.plan_jobs(None, len(todo), device)    # one training per core
    progress = workers.Progress(todo)                               # ETA over every training
    workers.train_in_workers(todo, load, train, device, n_jobs, threads, progress)
    workers.STATUS.end()
    workers.environment(device)     # versions, processor, git commit: results.json's provenance

`load()` returns the data a worker trains on and `train(job, data, device, report)` trains one
job, calling `report({"epoch", "epochs", "val_loss"})` after each epoch; both must be picklable
(module-level functions, or functools.partial of them), because workers are started fresh
("spawn") and load the data themselves. run.py passes its `load_data` and `train_one`.

Why processes: the contestants are small MLPs, and small MLPs scale badly across threads, so N
one-thread trainings beat one N-thread training (bench.py, section jobs, measures it).

What this file guarantees, whatever ends the run (done, a failure, Ctrl-C, SIGTERM, even SIGKILL
of run.py): every worker leaves within seconds, a checkpoint is either whole or absent (the
worker unwinds on SIGTERM so that the training's atomic save deletes its temporary file), and
jobs still queued are dropped, not flushed into a pipe nobody reads.

Simplified: a plain queue instead of a scheduler; no retries (the first failure stops the run).

First read: skip this file. It is plumbing; `run.main` is the recipe, and with `--jobs 1` run.py
trains in its own process without any of it. Standard library and torch only (NumPy for its
version number).
"""

import contextlib
import multiprocessing
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback

import numpy as np
import torch


# ---- constants

# Per-image training cost ~ parameters + this: the part that does not grow with the model (Python,
# BatchNorm, Adam's bookkeeping). Measured on CPU: shallow (42k params) runs 3x faster than
# vanilla (783k), not 18x.
ETA_OVERHEAD_PARAMS = 300_000
WATCH_PARENT_S = 0.5            # how often a worker checks that run.py is still there
STOP_S = 2                      # a worker gets this long to leave after SIGTERM, then SIGKILL
LINE_WIDTH = 80                 # the status line never grows wider than a classic terminal
EXPECTED = (FloatingPointError, ValueError, OSError)   # failures with a one-line message (OSError: disk full)


# ---- the status line

class StatusLine:
    """The one line of status run.py keeps: on a terminal it is rewritten in place, never wider
    than LINE_WIDTH (or the terminal), and ended before anything else prints; a log file gets
    whole lines instead."""

    def __init__(self):
        self.shown = 0              # length of the line now open on the terminal (0: none)
        self.task = ""              # the task under way (step), for Announced
        self.seconds = {}           # {task: seconds} of every step finished (results.json keeps them)

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

    @contextlib.contextmanager
    def step(self, task):
        """'task ...' while the block runs, then 'task (N s)' on a line of its own; models that
        an Announced dict hands out meanwhile are named after the task."""
        start, self.task = time.time(), task
        self.show(f"{task} ...")
        yield
        self.seconds[task] = time.time() - start
        self.show(f"{task} ({self.seconds[task]:.0f} s)")
        self.end()


STATUS = StatusLine()


class Progress:
    """The status line of the trainings: how many are done, those in flight, and an ETA.

    Each job weighs job["work"] (run.py: epochs x images x (parameters + ETA_OVERHEAD_PARAMS));
    the ETA divides the work left by the work done per second of wall time, so parallel jobs are
    accounted for.
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
        eta = hms(elapsed / done * (sum(self.work.values()) - done)) if done else "?"
        flying = "; ".join(f"{label} {info['epoch']}/{info['epochs']} val {info['val_loss']:.1f}"
                           for label, info in self.flying.items())
        STATUS.show(f"{self.n_done}/{len(self.work)} trained | {flying or '-'}", f" | ETA {eta}", log)


class Announced(dict):
    """{name: model} whose items() names, on the status line, the model the task is at."""

    def items(self):
        for i, (name, model) in enumerate(super().items(), 1):
            STATUS.show(f"{STATUS.task}: {name} ({i}/{len(self)})", log=False)
            yield name, model


def hms(seconds):
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@contextlib.contextmanager
def torch_threads(n):
    """torch's thread count set to n for the block, then back to what it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- the machine

def environment(device, out_dir=None):
    """Versions, processor, device and the git commit the numbers came from (results.json keeps them).

    git_dirty: local changes anywhere in the repository but under out_dir, the run's own output.
    """
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], capture_output=True, text=True, timeout=5,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    # the run's own output folder, where it lies inside the repository, is not the code: a resumed
    # run finds its cells file and figures changed by its own first attempt
    root, out = git("rev-parse", "--show-toplevel"), os.path.realpath(out_dir) if out_dir else None
    mine = [f":(exclude){out}"] if root and out and os.path.commonpath([root, out]) == root else []
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
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--", ":/", *mine))}


# ---- the training processes

class TrainingFailed(Exception):
    """A training failed in a worker: str() is '<label>: <one line, or the traceback>'."""


def plan_jobs(requested, n_left, device):
    """(trainings at once, torch threads each): by default one training per core.

    On MPS, one job (the device does not share across processes).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n_jobs = 1 if device.type == "mps" else requested or cores
    n_jobs = max(1, min(n_jobs, n_left))
    return n_jobs, (torch.get_num_threads() if n_jobs == 1 else max(1, cores // n_jobs))


def train_in_workers(todo, load, train, device, n_jobs, threads, progress, done=None):
    """Train `todo` in n_jobs processes that take jobs from a queue; raises TrainingFailed.

    done(label), if given, runs here in this process as each training finishes (run.py scores
    the sweep's cells there), while the workers go on.

    Workers report epochs, completions and failures on a second queue. However this ends, the
    workers get SIGTERM, and whatever is still queued is dropped. If run.py itself is killed, the
    workers notice that their parent is gone and leave too.
    """
    ctx = multiprocessing.get_context("spawn")   # fork is unsafe with torch's thread pools and CUDA
    jobs_q, events = ctx.Queue(), ctx.Queue()
    for job in todo:
        jobs_q.put({k: job[k] for k in ("settings", "idx", "label", "path")})
    for _ in range(n_jobs):
        jobs_q.put(None)                         # one stop sign per worker
    workers = [ctx.Process(target=_worker, args=(load, train, str(device), threads, jobs_q, events,
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
                if done:
                    done(label)
            else:
                raise TrainingFailed(f"{label}: {payload}")
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
    """SIGTERM in a worker: unwinds the training, so that its atomic save deletes a half-written file."""


def _worker(load, train, device, threads, jobs_q, events, parent):
    """A training process: takes jobs until a stop sign, reports every epoch to run.py."""
    def stop(signum, frame):
        raise _Stop

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches every process; run.py decides
    signal.signal(signal.SIGTERM, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _exit_with_parent(parent)
    try:
        torch.set_num_threads(threads)
        data = load()
        for job in iter(jobs_q.get, None):
            report = lambda info, label=job["label"]: events.put(("epoch", label, info))
            try:
                train(job, data, torch.device(device), report)
            except EXPECTED as err:
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
