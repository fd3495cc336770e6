"""Tests of the course modules (mnist.py, ae.py, tasks.py, umap_lite.py, run.py): `pytest test_ae.py`.

About a minute on 2 idle cores, and it needs nothing but this file and the course: the tests of
the experiment's machinery (command line, checkpoints, workers, kept cells, report) are in
harness/test_harness.py, and `pytest test_ae.py harness` runs both.

Every test makes its own tiny data (IDX files, random images, Gaussian blobs); nothing needs the
real data sets or the network beyond a server the tests start on 127.0.0.1. Where possible a
result is checked against an independent slow reference: a hand-built IDX file, a loss computed
by hand, a brute-force nearest-neighbour search, the pairwise definition of AUC.

First read: the tests of the module you are reading, in the file's order (one section per
module); the last one runs `python run.py` end to end on tiny data.
"""

import contextlib
import datetime
import gzip
import hashlib
import http.server
import json
import math
import os
import pathlib
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ae
import mnist
import run
import tasks
import umap_lite


# Independent of mnist.IDX_DTYPES on purpose: the IDX spec's type codes, written out again.
_CODES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32,
          0x0E: np.float64}


_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_bytes(array, code):
    """Hand-built IDX: 0, 0, type code, ndim, big-endian uint32 dims, big-endian items."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.dtype(_CODES[code]).newbyteorder(">")).tobytes()


def _write(path, data, gz=False):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _fake_arrays(n_train=12, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_test, dtype=np.uint8))


def _fake_files(arrays, gz=True):
    """{file name: file bytes} of a tiny data set in the official layout."""
    files = {stem: _idx_bytes(a, 8) for stem, a in zip(_STEMS, arrays)}
    return {f"{stem}.gz": gzip.compress(data) for stem, data in files.items()} if gz else files


def _write_set(folder, arrays, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _fake_files(arrays, gz).items():
        (folder / name).write_bytes(data)


def _assert_same(got, want):
    assert len(got) == 4
    for g, w in zip(got, want):
        assert g.dtype == np.uint8
        np.testing.assert_array_equal(g, w)


def _all_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _use_md5s(monkeypatch, files, name="mnist"):
    """Make the MD5 table expect exactly these file bytes."""
    monkeypatch.setitem(mnist.DATASETS[name], "md5",
                        {f: hashlib.md5(data).hexdigest() for f, data in files.items()})


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        # a truncating server promises more than it sends, then closes the connection; a server
        # without Content-Length sends the body until it closes (HTTP/1.0)
        if self.server.length:
            self.send_header("Content-Length", str(2 * len(body) if self.server.truncate else len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def _serve(monkeypatch):
    """Start HTTP servers on 127.0.0.1 serving {name: bytes}; return their base URLs."""
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    servers = []

    def start(files, truncate=False, length=True):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.files, server.truncate, server.length = files, truncate, length
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _dead_url():
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("code", sorted(_CODES), ids=lambda c: f"0x{c:02X}")
def test_idx_round_trip_every_type(tmp_path, code, gz):
    rng, dtype = np.random.default_rng(code), np.dtype(_CODES[code])
    if dtype.kind == "f":
        want = rng.normal(0, 1e6, (3, 4, 5)).astype(dtype)
    else:  # the full range, so a sign or byte-order slip shows
        info = np.iinfo(dtype)
        want = rng.integers(info.min, info.max, (3, 4, 5), dtype=dtype, endpoint=True)
    for array in (want, want[0, 0]):  # 3-D and 1-D
        got = mnist.read_idx(_write(tmp_path / "x.idx", _idx_bytes(array, code), gz))
        assert got.dtype == _CODES[code] and got.dtype.isnative and got.shape == array.shape
        np.testing.assert_array_equal(got, array)


def test_idx_gzip_detected_by_content_not_name(tmp_path):
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(mnist.read_idx(_write(tmp_path / "plain.gz", _idx_bytes(a, 8))), a)
    packed = _write(tmp_path / "packed", _idx_bytes(a, 8), gz=True)
    np.testing.assert_array_equal(mnist.read_idx(packed), a)


_GOOD = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08)


_HUGE = bytes([0, 0, 0x0E, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1)


_MALFORMED = {  # content -> what the message must mention
    "empty": (b"", "empty"),
    "short_header": (b"\0\0\x08", "header cut short"),
    "short_dims": (_GOOD[:10], "header cut short"),
    "bad_magic": (b"\x01\x02" + _GOOD[2:], "magic"),
    "bad_type": (_GOOD[:2] + b"\x0A" + _GOOD[3:], "type code 0x0A"),
    "no_dims": (b"\0\0\x08\0" + b"\1" * 8, "0 dimensions"),
    "zero_dim": (b"\0\0\x08\x02" + struct.pack(">2I", 3, 0), "empty dimension"),
    "payload_short": (_GOOD[:-1], "too short"),
    "payload_long": (_GOOD + b"\0", "too long"),
    "absurd_dims": (_HUGE + b"\0" * 64, "limit"),
    "large_dims": (bytes([0, 0, 8, 1]) + struct.pack(">I", 10**9) + b"\0" * 8, "payload too short"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", sorted(_MALFORMED))
def test_idx_malformed_raises_value_error_naming_file(tmp_path, case, gz):
    content, problem = _MALFORMED[case]
    if gz and case == "large_dims":
        problem = "gzip file can hold"  # refused by the size of the .gz, before decompressing
    path = _write(tmp_path / f"{case}.idx", content, gz)
    with pytest.raises(ValueError) as err:
        mnist.read_idx(path)
    assert isinstance(err.value, mnist.IDXError)
    assert str(path) in str(err.value) and problem in str(err.value)


def _corrupt_gzip(data):
    packed = bytearray(gzip.compress(data))
    packed[len(packed) // 2] ^= 0xFF
    return bytes(packed)


_BAD_GZIP = {
    "truncated": lambda: gzip.compress(_GOOD)[:-12],
    "cut_in_header": lambda: gzip.compress(_GOOD)[:5],
    "corrupt_stream": lambda: _corrupt_gzip(_idx_bytes(np.arange(5000, dtype=np.int32), 0x0C)),
    "bad_crc": lambda: gzip.compress(_GOOD)[:-8] + b"\0" * 8,
    "magic_only": lambda: b"\x1f\x8b",
    "bad_header": lambda: b"\x1f\x8b\x99" + b"\0" * 40,
}


@pytest.mark.parametrize("case", sorted(_BAD_GZIP))
def test_idx_bad_gzip_raises_value_error_naming_file(tmp_path, case):
    path = _write(tmp_path / f"{case}.gz", _BAD_GZIP[case]())
    with pytest.raises(mnist.IDXError) as err:
        mnist.read_idx(path)
    assert str(path) in str(err.value)


_LAYOUTS = {  # name -> folder under root that holds the files
    "flat": lambda name: ".",
    "named": lambda name: name,
    "torchvision": lambda name: {"mnist": "MNIST", "fashion": "FashionMNIST", "kmnist": "KMNIST"}[name]
    + "/raw",
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("name", ["mnist", "fashion", "kmnist"])
def test_mnist_load_local_layouts(tmp_path, monkeypatch, name, layout, gz):
    monkeypatch.setitem(mnist.DATASETS[name], "system_dirs", [])  # ignore this machine's installs
    arrays = _fake_arrays()
    _write_set(tmp_path / _LAYOUTS[layout](name), arrays, gz)
    before = _all_files(tmp_path)
    _assert_same(mnist.load(name, root=tmp_path, mirrors=[_dead_url()]), arrays)
    assert _all_files(tmp_path) == before  # nothing written, nothing downloaded


def test_mnist_load_system_dir_recompressed(tmp_path, monkeypatch):
    arrays = _fake_arrays()
    system = tmp_path / "usr-share"
    system.mkdir()
    for stem, a in zip(_STEMS, arrays):  # re-gzipped like Debian's: other bytes, other MD5s
        (system / f"{stem}.gz").write_bytes(gzip.compress(_idx_bytes(a, 8), compresslevel=1, mtime=1))
    monkeypatch.setitem(mnist.DATASETS["fashion"], "system_dirs", [str(system)])
    _assert_same(mnist.load("fashion", root=tmp_path / "absent", download=False), arrays)
    assert not (tmp_path / "absent").exists()


def test_mnist_load_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="'mnist', 'fashion', 'kmnist'"):
        mnist.load("cifar", root=tmp_path)


def test_mnist_load_missing_without_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        mnist.load("kmnist", root=tmp_path / "data", download=False)
    message = str(err.value)
    assert str(tmp_path / "data") in message and os.path.join("KMNIST", "raw") in message
    assert "train-images-idx3-ubyte" in message and not (tmp_path / "data").exists()


@pytest.mark.parametrize("defect, culprit, problem", [
    ("label_count", 1, "labels for the"),
    ("image_size", 0, "expected (N, 28, 28)"),
    ("label_range", 3, "label 10"),
    ("dtype", 2, "expected uint8"),
    ("labels_2d", 1, "expected (N,)"),
])
def test_mnist_load_rejects_inconsistent_set(tmp_path, defect, culprit, problem):
    arrays = list(_fake_arrays())
    codes = [8, 8, 8, 8]
    if defect == "label_count":
        arrays[1] = arrays[1][:-1]
    elif defect == "image_size":
        arrays[0] = np.zeros((12, 32, 32), np.uint8)
    elif defect == "label_range":
        arrays[3][2] = 10
    elif defect == "dtype":
        codes[2] = 0x09
    else:
        arrays[1] = arrays[1].reshape(6, 2)
    for stem, a, code in zip(_STEMS, arrays, codes):
        (tmp_path / stem).write_bytes(_idx_bytes(a, code))
    with pytest.raises(mnist.IDXError) as err:
        mnist.load(root=tmp_path, download=False)
    assert str(err.value).startswith(str(tmp_path / _STEMS[culprit])) and problem in str(err.value)


def test_mnist_download_good(tmp_path, monkeypatch, _serve, capsys):
    arrays = _fake_arrays()
    files = _fake_files(arrays)
    _use_md5s(monkeypatch, files)
    monkeypatch.setattr(mnist, "PROGRESS_MIN_BYTES", 0)  # show the progress line even for tiny files
    root = tmp_path / "data" / "mnist"
    _assert_same(mnist.load(root=root, mirrors=[_serve(files)]), arrays)
    assert _all_files(tmp_path) == ["data", "data/mnist", *sorted(f"data/mnist/{f}" for f in files)]
    for f, data in files.items():
        assert (root / f).read_bytes() == data
    assert "\rdownloading http://127.0.0.1:" in capsys.readouterr().err


def test_mnist_download_only_missing(tmp_path, monkeypatch, _serve):
    arrays = _fake_arrays()
    files = _fake_files(arrays)
    _use_md5s(monkeypatch, files)
    raw = tmp_path / "MNIST" / "raw"  # the partial set is filled up where it lies
    _write_set(raw, arrays, gz=False)
    os.remove(raw / _STEMS[3])
    kept = {p: p.stat().st_mtime_ns for p in raw.iterdir()}
    only_last = {_STEMS[3] + ".gz": files[_STEMS[3] + ".gz"]}
    _assert_same(mnist.load(root=tmp_path, mirrors=[_serve(only_last)]), arrays)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert _all_files(raw) == sorted([*_STEMS[:3], _STEMS[3] + ".gz"])
    assert _all_files(tmp_path) == ["MNIST", "MNIST/raw", *(f"MNIST/raw/{f}" for f in _all_files(raw))]


def test_mnist_download_without_content_length(tmp_path, monkeypatch, _serve, capsys):
    arrays = _fake_arrays()
    files = _fake_files(arrays)
    _use_md5s(monkeypatch, files)
    _assert_same(mnist.load(root=tmp_path / "d", mirrors=[_serve(files, length=False)]), arrays)


def test_mnist_download_dead_first_mirror(tmp_path, monkeypatch, _serve):
    arrays = _fake_arrays()
    files = _fake_files(arrays)
    _use_md5s(monkeypatch, files)
    real_fetch, urls = mnist._fetch, []
    monkeypatch.setattr(mnist, "_fetch", lambda *args: urls.append(args[0]) or real_fetch(*args))
    dead = _dead_url()
    _assert_same(mnist.load(root=tmp_path / "d", mirrors=[dead, _serve(files)]), arrays)
    assert len(urls) == 5 and urls[0].startswith(dead) and not any(u.startswith(dead) for u in urls[1:])


@pytest.mark.parametrize("failure", ["checksum", "truncated", "all_dead", "not_found"])
def test_mnist_download_failure_leaves_nothing(tmp_path, monkeypatch, _serve, failure):
    files = _fake_files(_fake_arrays())
    _use_md5s(monkeypatch, files)
    if failure == "checksum":
        monkeypatch.setitem(mnist.DATASETS["mnist"]["md5"], _STEMS[2] + ".gz", "0" * 32)
        mirrors, reason = [_serve(files)], "differs from the published"
    elif failure == "truncated":
        mirrors, reason = [_serve(files, truncate=True)], "connection closed after"
    elif failure == "all_dead":
        mirrors, reason = [_dead_url(), _dead_url()], "refused"
    else:
        mirrors, reason = [_serve({})], "HTTP 404"
    root = tmp_path / "data" / "mnist"
    with pytest.raises(mnist.DownloadError) as err:
        mnist.load(root=root, mirrors=mirrors)
    message = str(err.value)
    assert all(m in message for m in mirrors) and reason in message and "--data-dir" in message
    assert isinstance(err.value, OSError)
    assert _all_files(tmp_path) == []


def test_mnist_download_interrupted_leaves_nothing(tmp_path, monkeypatch, _serve):
    files = _fake_files(_fake_arrays())
    _use_md5s(monkeypatch, files)
    real_fetch, calls = mnist._fetch, []

    def fetch_then_interrupt(url, tmp, md5):
        calls.append(url)
        if len(calls) == 3:  # two files done, the third cut off by Ctrl-C
            open(tmp, "wb").write(b"partial")
            raise KeyboardInterrupt
        real_fetch(url, tmp, md5)

    monkeypatch.setattr(mnist, "_fetch", fetch_then_interrupt)
    (tmp_path / "data").mkdir()  # an existing folder stays, the ones load() made go
    with pytest.raises(KeyboardInterrupt):
        mnist.load(root=tmp_path / "data" / "mnist", mirrors=[_serve(files)])
    assert _all_files(tmp_path) == ["data"]


def test_mnist_load_defaults_and_the_mirror_list_it_hands_on(tmp_path, monkeypatch):
    import inspect
    defaults = {k: p.default for k, p in inspect.signature(mnist.load).parameters.items()}
    assert defaults == {"name": "mnist", "root": "data", "download": True, "mirrors": None}
    asked = []
    def download(name, folder, missing, mirrors):
        asked.append(mirrors)
        raise mnist.DownloadError("stop here")
    monkeypatch.setattr(mnist, "_download_missing", download)
    for mirrors in (None, "http://127.0.0.1:1/only/", ["http://a/", "http://b/"]):
        with pytest.raises(mnist.DownloadError):
            mnist.load(root=tmp_path, mirrors=mirrors)
    # the built-in list; one URL as a one-item list, not a list of its characters; a list as given
    assert asked == [mnist.DATASETS["mnist"]["mirrors"], ["http://127.0.0.1:1/only/"], ["http://a/", "http://b/"]]


def test_mnist_download_urls_temp_files_and_the_mirror_that_worked_first(tmp_path, monkeypatch):
    files = _fake_files(_fake_arrays())
    _use_md5s(monkeypatch, files)
    calls = []
    def fetch(url, tmp, md5):      # mirror b serves everything; a only the first file
        calls.append((url, tmp))
        if url.startswith("http://a") and not url.endswith(_STEMS[0] + ".gz"):
            raise OSError("not here")
        pathlib.Path(tmp).write_bytes(files[url.rsplit("/", 1)[1]])
    monkeypatch.setattr(mnist, "_fetch", fetch)
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data"
    mnist.load(root=folder, mirrors=["http://a/x/", "http://b/y"])    # with and without a trailing /
    urls = [url for url, _ in calls]
    assert urls[:3] == [f"http://a/x/{_STEMS[0]}.gz", f"http://a/x/{_STEMS[1]}.gz", f"http://b/y/{_STEMS[1]}.gz"]
    # once a mirror fails, the one that worked is asked first, and the others stay behind it
    assert urls[3:] == [f"http://b/y/{_STEMS[2]}.gz", f"http://b/y/{_STEMS[3]}.gz"]
    # every temporary file is hidden, beside its final place
    assert all(os.path.dirname(tmp) == str(folder) and os.path.basename(tmp).startswith(".") for _, tmp in calls)
    assert _all_files(tmp_path) == ["data", *sorted(f"data/{f}" for f in files)]


def test_mnist_download_that_fails_while_renaming_removes_the_files_already_renamed(tmp_path, monkeypatch):
    files = _fake_files(_fake_arrays())
    _use_md5s(monkeypatch, files)
    monkeypatch.setattr(mnist, "_fetch", lambda url, tmp, md5: pathlib.Path(tmp).write_bytes(files[url.rsplit("/", 1)[1]]))
    real_replace, renamed = os.replace, []
    def replace(src, dst):
        if len(renamed) == 2:
            raise OSError("disk full")
        renamed.append(dst)
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        mnist.load(root=tmp_path / "d", mirrors=["http://a/"])
    assert len(renamed) == 2 and _all_files(tmp_path) == []            # all or nothing


def test_mnist_download_failure_keeps_a_folder_someone_else_wrote_into(tmp_path, monkeypatch):
    folder = tmp_path / "new" / "mnist"
    def fetch(url, tmp, md5):       # another program writes into the new folder meanwhile
        (folder / "theirs.txt").write_text("not ours")
        raise ConnectionRefusedError("refused")
    monkeypatch.setattr(mnist, "_fetch", fetch)
    with pytest.raises(mnist.DownloadError, match="refused"):   # the download's error, not rmdir's
        mnist.load(root=folder, mirrors=["http://a/"])
    assert _all_files(tmp_path) == ["new", "new/mnist", "new/mnist/theirs.txt"]


def test_mnist_download_from_mirrors_that_never_answer_leaves_nothing(tmp_path, monkeypatch):
    def refused(url, tmp, md5):     # fails before any temporary file exists: cleanup must cope
        raise ConnectionRefusedError("refused")
    monkeypatch.setattr(mnist, "_fetch", refused)
    with pytest.raises(mnist.DownloadError, match="refused"):
        mnist.load(root=tmp_path / "d", mirrors=["http://a/", "http://b/"])
    assert _all_files(tmp_path) == []


def test_mnist_to_vectors_pads_and_scales():
    images = np.full((2, 28, 28), 255, np.uint8)
    images[1, 0, 0] = 51
    x = mnist.to_vectors(images)
    assert x.dtype == np.float32 and x.shape == (2, 1024)
    grid = x.reshape(2, 32, 32)
    assert grid[:, :2].max() == 0 and grid[:, -2:].max() == 0 and grid[:, :, :2].max() == 0
    assert grid[0, 2:30, 2:30].min() == 1 and grid[1, 2, 2] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="uint8"):
        mnist.to_vectors(images.astype(np.float32))


def test_mnist_split_drop_probe():
    labels = np.arange(100, dtype=np.uint8) % 10
    perm = np.random.default_rng(3).permutation(100)
    train, val = mnist.split_indices(perm, n_val=20)
    assert len(train) == 80 and len(val) == 20
    np.testing.assert_array_equal(train, perm[:80])
    np.testing.assert_array_equal(val, perm[80:])
    kept = mnist.drop_class(train, labels, 1)
    assert set(kept.tolist()) == {i for i in train.tolist() if labels[i] != 1}
    np.testing.assert_array_equal(kept, [i for i in train if labels[i] != 1])  # order kept
    np.testing.assert_array_equal(mnist.probe_indices(train, n=7), train[:7])
    with pytest.raises(ValueError):
        mnist.probe_indices(train, n=81)
    with pytest.raises(ValueError, match="n_val"):
        mnist.split_indices(np.arange(10), n_val=10)
    with pytest.raises(ValueError, match="permutation"):
        mnist.split_indices(np.array([0, 1, 1, 3]), n_val=1)
    with pytest.warns(UserWarning, match="nothing removed"):
        mnist.drop_class(kept, labels, 1)
    with pytest.warns(UserWarning, match="nothing removed"):               # a single index too
        np.testing.assert_array_equal(mnist.drop_class(np.array([2]), labels, 1), [2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                     # the digit there: no warning
        assert len(mnist.drop_class(np.array([1]), labels, 1)) == 0


def test_mnist_split_without_validation_and_the_size_limits_at_their_boundaries(tmp_path, monkeypatch):
    train, val = mnist.split_indices(np.arange(5)[::-1], n_val=0)        # 0 validation images: allowed
    assert list(train) == [4, 3, 2, 1, 0] and len(val) == 0
    # a header declaring exactly the limit passes the limit check (the payload check fails instead)
    monkeypatch.setattr(mnist, "MAX_IDX_BYTES", 64)
    raw = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 64) + bytes(10)
    with pytest.raises(mnist.IDXError, match="payload too short"):
        mnist.read_idx(_write(tmp_path / "at.idx", raw))
    with pytest.raises(mnist.IDXError, match="over the 64-byte limit"):
        mnist.read_idx(_write(tmp_path / "over.idx", bytes([0, 0, 0x08, 1]) + struct.pack(">I", 65)))
    # a .gz may declare up to MAX_DEFLATE_RATIO times its size on disk, not a byte more
    gz = gzip.compress(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 40) + bytes(40))
    monkeypatch.setattr(mnist, "MAX_DEFLATE_RATIO", 40 / len(gz))
    (tmp_path / "at.idx.gz").write_bytes(gz)
    assert len(mnist.read_idx(tmp_path / "at.idx.gz")) == 40
    monkeypatch.setattr(mnist, "MAX_DEFLATE_RATIO", 39.9 / len(gz))
    with pytest.raises(mnist.IDXError, match="gzip file can hold"):
        mnist.read_idx(tmp_path / "at.idx.gz")


def _pixels(n=16, seed=0):
    """(n, 1024) float32 in [0, 1], about a fifth of the pixels bright, like MNIST."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, ae.INPUT_DIM, generator=g) < 0.2).float() * torch.rand(n, ae.INPUT_DIM, generator=g)


def _build(name, latent_dim=20, seed=0):
    ae.set_seed(seed)
    return ae.build(name, latent_dim)


def _hand_bce(probs, x):
    """-(x log p + (1 - x) log(1 - p)), summed over pixels, averaged over the batch."""
    return -(x * torch.log(probs) + (1 - x) * torch.log(1 - probs)).sum(dim=1).mean()


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# REFERENCE.md's counts; the variants share the vanilla or VAE network; shallow = 2 Linear layers
_COUNTS = {20: {"vanilla": 782_814, "vae": 1_059_085, "vq": 793_054, "shallow": 42_004},
           2: {"vanilla": 306_618, "vae": 333_172, "vq": 307_642, "shallow": 1024 * 2 + 2 + 2 * 1024 + 1024}}


_SAME_AS = {"stacked": "vanilla", "sparse": "vanilla", "denoising": "vanilla",
            "beta_vae_strict": "vae", "beta_vae_loose": "vae"}


@pytest.mark.parametrize("latent_dim", [20, 2])
@pytest.mark.parametrize("name", ae.MODELS)
def test_model_parameter_counts(name, latent_dim):
    assert _n_params(ae.build(name, latent_dim)) == _COUNTS[latent_dim][_SAME_AS.get(name, name)]


@pytest.mark.parametrize("name, latent_dim, encoder, decoder", [
    ("vanilla", 20, [1024, 341, 113, 20], [20, 113, 341, 1024]),
    ("vae", 20, [1024, 512, 256, 40], [20, 113, 341, 1024]),
    ("vanilla", 2, [1024, 146, 20, 2], [2, 20, 146, 1024]),
    ("vae", 2, [1024, 170, 28, 4], [2, 20, 146, 1024]),
])
def test_model_widths(name, latent_dim, encoder, decoder):
    model = ae.build(name, latent_dim)
    enc = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    dec = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)]
    assert [enc[0].in_features] + [m.out_features for m in enc] == encoder
    assert [dec[0].in_features] + [m.out_features for m in dec] == decoder
    assert [m.bias is not None for m in enc + dec] == [False, False, True] * 2  # bias only before output


def test_model_names():
    assert ae.MODELS == ("shallow", "vanilla", "stacked", "sparse", "denoising",
                         "vae", "beta_vae_strict", "beta_vae_loose", "vq")
    assert ae.GENERATIVE == ("vae", "beta_vae_strict", "beta_vae_loose", "vq")
    assert ae.VARIATIONAL == ("vae", "beta_vae_strict", "beta_vae_loose") and ae.REFERENCES == ("pca",)


@pytest.mark.parametrize("name", ae.MODELS + ae.REFERENCES)
def test_registry_entry_says_what_the_model_does(name):
    # samples and stochastic are read off the bottleneck: check them against the built model
    entry, model = ae.CONTESTANTS[name], _build(name, latent_dim=3).eval()
    assert issubclass(entry.bottleneck, ae.Bottleneck) and isinstance(model.bottleneck, entry.bottleneck)
    assert entry.samples == (model.sample(4) is not None)
    x = _pixels(8)
    assert entry.stochastic == (not torch.equal(model.encode(x), model.encode(x)))
    for weight, value in entry.weights.items():
        assert getattr(model.bottleneck, weight) == value
    assert model.noise_std == entry.noise_std and type(model) is entry.model


def _rbf_mmd(a, b):
    """MMD^2 = mean k(a, a') + mean k(b, b') - 2 mean k(a, b), k(u, v) = exp(-|u - v|^2 / (2 Z))."""
    k = lambda u, v: torch.exp(-torch.cdist(u, v) ** 2 / (2 * u.shape[1]))
    return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()


class _MMD(ae.Bottleneck):
    """z = h, pulled towards N(0, I) by the maximum mean discrepancy (a Wasserstein autoencoder)."""

    def __init__(self, latent_dim, beta=1.0):
        super().__init__(latent_dim)
        self.beta = beta

    def regularised(self, h, x):
        mmd = _rbf_mmd(h, torch.randn_like(h))
        return h, self.beta * mmd, {"mmd": mmd.detach()}

    def prior(self, n, device):
        return torch.randn(n, self.latent_dim, device=device)


class _Contractive(ae.Bottleneck):
    """z = h, with the contractive penalty ||d h / d x||_F^2 (Rifai et al. 2011), mean over the batch."""

    needs_input_grad = True

    def __init__(self, latent_dim, beta=1.0):
        super().__init__(latent_dim)
        self.beta = beta

    def regularised(self, h, x):
        rows = [torch.autograd.grad(h[:, j].sum(), x, create_graph=True)[0] for j in range(h.shape[1])]
        jacobian = sum((r ** 2).sum() for r in rows) / len(x)
        return h, self.beta * jacobian, {"contractive": jacobian.detach()}


@pytest.fixture
def registered(monkeypatch):
    """ae.register for one test: the registry and its derived lists come back as they were."""
    monkeypatch.setattr(ae, "CONTESTANTS", dict(ae.CONTESTANTS))
    for derived in ("MODELS", "GENERATIVE", "VARIATIONAL", "REFERENCES"):
        monkeypatch.setattr(ae, derived, getattr(ae, derived))
    return ae.register


def test_toy_contestant_loss_by_hand(registered):
    registered("mmd", _MMD, weights={"beta": 3.0})
    model = _build("mmd", latent_dim=3).eval()
    x = _pixels(16)
    with torch.no_grad():       # values only: no graph
        torch.manual_seed(7)
        total, parts = model.loss(x)
        torch.manual_seed(7)
        z = model.encoder(x)
        prior = torch.randn_like(z)
    # slow reference: the three kernel means as explicit loops
    k = lambda u, v: math.exp(-float(((u - v) ** 2).sum()) / (2 * 3))
    mean_k = lambda a, b: sum(k(u, v) for u in a for v in b) / (len(a) * len(b))
    mmd = mean_k(z, z) + mean_k(prior, prior) - 2 * mean_k(z, prior)
    with torch.no_grad():
        recon = F.binary_cross_entropy(model.decode(z), x, reduction="sum") / 16
    assert float(parts["mmd"]) == pytest.approx(mmd, rel=1e-4)
    assert float(total) == pytest.approx(float(recon) + 3.0 * mmd, rel=1e-4)
    assert "mmd" in ae.MODELS and "mmd" in ae.GENERATIVE and "mmd" not in ae.VARIATIONAL
    assert ae.REFERENCES == ("pca",) and "mmd" not in ae.REFERENCES     # a contestant, not a reference


def test_toy_contractive_penalty_trains_and_evaluates_with_input_gradients(registered):
    registered("contractive", _Contractive, weights={"beta": 0.5})
    model = _build("contractive", latent_dim=2)
    history = ae.fit(model, _pixels(64), _pixels(16), epochs=2, batch_size=32, progress=False)
    assert all(math.isfinite(v) for v in history["train_loss"] + history["val_loss"])
    x = _pixels(4)
    model.zero_grad(set_to_none=True)
    got = ae.evaluate(model, x)
    assert all(p.grad is None for p in model.parameters())     # evaluate reads the loss only
    # slow reference: the Jacobian of each image's code, one image at a time (eval mode: no batch
    # statistics, so images do not mix)
    jac = [torch.autograd.functional.jacobian(lambda v: model.encoder(v[None])[0], xi) for xi in x]
    want = sum(float((j ** 2).sum()) for j in jac) / len(x)
    assert got["contractive"] == pytest.approx(want, rel=1e-4)


def test_model_unknown_name_error():
    with pytest.raises(ValueError, match="unknown model 'gan'.*vanilla.*vq"):
        ae.build("gan")
    with pytest.raises(ValueError, match="latent_dim"):
        ae.build("vae", latent_dim=0)


def test_build_latent_dim_at_both_ends_of_its_range():
    # from 1 to the widest code the 1,024-wide input allows (a VAE's encoder outputs 2 per unit)
    for name, widest in (("vanilla", ae.INPUT_DIM), ("vae", ae.INPUT_DIM // 2)):
        for z in (1, widest):
            assert ae.build(name, z).latent_dim == z
        for bad in (0, widest + 1, 2.0):
            with pytest.raises(ValueError, match=f"latent_dim must be an integer from 1 to {widest}, got"):
                ae.build(name, bad)


@pytest.mark.parametrize("name", ae.MODELS)
@pytest.mark.parametrize("training", [True, False])
def test_model_shapes_and_ranges(name, training):
    model = _build(name, latent_dim=3).train(training)
    x = _pixels(8)
    probs = model(x)
    assert probs.shape == (8, 1024) and probs.min() >= 0 and probs.max() <= 1
    z = model.encode(x)
    assert z.shape == (8, 3) and model.latent_dim == 3 and model.name == name
    assert model.decode(z).shape == (8, 1024)
    h = model.encoder(x)
    assert model.decoder(model.bottleneck(h)).shape == (8, 1024)
    total, parts = model.loss(x)
    assert total.ndim == 0 and math.isfinite(float(total.detach())) and "recon" in parts
    samples = model.sample(5)
    if name in ae.GENERATIVE:
        assert samples.shape == (5, 1024) and samples.min() >= 0 and samples.max() <= 1
    else:
        assert samples is None


def test_model_sparse_code_is_a_probability():
    z = _build("sparse").encode(_pixels(8))
    assert z.min() >= 0 and z.max() <= 1


def test_model_vae_encode_sample_flag_and_fixed_noise():
    model = _build("vae", latent_dim=4).eval()
    x = _pixels(8)
    mu = model.encoder(x)[:, :4]
    assert torch.equal(model.encode(x, sample=False), mu)
    assert not torch.allclose(model.encode(x), model.encode(x))  # samples in eval mode too
    h = model.encoder(x)
    assert torch.equal(model.bottleneck(h, eps=torch.zeros(8, 4)), mu)


def test_model_vq_codes_come_from_the_codebook():
    model = _build("vq", latent_dim=4).eval()
    codebook = model.bottleneck.codebook.detach()
    assert codebook.shape == (4, 512) and codebook.abs().max() <= 1 / 512
    for z in (model.encode(_pixels(8)), model.bottleneck.prior(8, "cpu")):
        for j in range(4):
            assert torch.isin(z[:, j], codebook[j]).all()


def test_loss_recon_is_summed_bce_by_hand():
    model = _build("vanilla").eval()
    x = _pixels(8)
    total, parts = model.loss(x)
    expected = _hand_bce(model(x), x)
    assert torch.allclose(parts["recon"], expected, rtol=1e-4)
    assert torch.allclose(total, expected, rtol=1e-4) and parts.keys() == {"recon"}


@pytest.mark.parametrize("name, beta", [("vae", 1.0), ("beta_vae_strict", 2.0), ("beta_vae_loose", 0.5)])
def test_loss_kl_by_hand(name, beta):
    model = _build(name, latent_dim=4).eval()
    with torch.no_grad():
        model.encoder[2].bias[4:] = 0.3  # log sigma away from 0 so the sigma terms count
    x = _pixels(8)
    ae.set_seed(7)
    total, parts = model.loss(x)
    h = model.encoder(x)
    mu, log_sigma = h[:, :4], h[:, 4:]
    sigma = torch.exp(log_sigma)
    kl = 0.5 * (sigma**2 + mu**2 - 1 - torch.log(sigma**2)).sum(dim=1).mean()
    ae.set_seed(7)
    z = mu + sigma * torch.randn(8, 4)  # the same noise the loss drew
    recon = _hand_bce(model.decoder(z), x)
    assert torch.allclose(parts["kl"], kl, rtol=1e-4)
    assert torch.allclose(parts["recon"], recon, rtol=1e-4)
    assert torch.allclose(total, recon + beta * kl, rtol=1e-4)


def test_loss_sparsity_kl_by_hand():
    model = _build("sparse", latent_dim=4).eval()
    x = _pixels(8)
    total, parts = model.loss(x)
    rho = torch.sigmoid(model.encoder(x)).mean(dim=0)
    p = 0.25
    kl = sum(p * math.log(p / r) + (1 - p) * math.log((1 - p) / (1 - r)) for r in rho.tolist())
    assert math.isclose(float(parts["sparsity"]), kl, rel_tol=1e-4)
    assert torch.allclose(total, parts["recon"] + 1.0 * kl, rtol=1e-4)


def test_loss_vq_terms_by_hand_and_straight_through_gradient():
    model = _build("vq", latent_dim=4).eval()
    x = _pixels(8)
    h = model.encoder(x).detach()
    codebook = model.bottleneck.codebook.detach()
    q = torch.stack([torch.stack([codebook[j][(codebook[j] - h[i, j]).abs().argmin()] for j in range(4)])
                     for i in range(8)])  # brute-force nearest value per element
    sse = ((h - q) ** 2).sum(dim=1).mean()
    total, parts = model.loss(x)
    assert torch.allclose(parts["vq"], sse, rtol=1e-5) and torch.allclose(parts["commitment"], sse, rtol=1e-5)
    assert torch.allclose(total, parts["recon"] + sse + 1.0 * sse, rtol=1e-5)
    assert torch.equal(model.encode(x), q)

    total.backward()
    assert model.bottleneck.codebook.grad.abs().sum() > 0  # L_vq moves the codebook
    model.zero_grad()
    parts_only_recon = ae.bce(model.decoder.logits(model.encode(x)), x)
    parts_only_recon.backward()
    assert model.encoder[0][0].weight.grad.abs().sum() > 0  # the decoder's gradient passes the quantiser
    assert model.bottleneck.codebook.grad is None or model.bottleneck.codebook.grad.abs().sum() == 0


def test_loss_denoising_noise_only_in_training_mode():
    model = _build("denoising")
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x = _pixels(32)
    model.train()(x)
    noisy = seen[-1]
    assert not torch.equal(noisy, x) and noisy.min() >= 0 and noisy.max() <= 1
    assert 0.2 < (noisy - x)[(noisy > 0) & (noisy < 1)].std() < 0.5  # std 0.5 before clipping
    model.eval()
    assert torch.equal(model(x), model(x))
    assert torch.equal(seen[-1], x)


def test_fit_loss_falls_and_history():
    model = _build("vanilla", latent_dim=4)
    reports = []
    history = ae.fit(model, _pixels(64), _pixels(16, seed=1), epochs=4, batch_size=16, progress=reports.append)
    assert len(history["train_loss"]) == len(history["val_loss"]) == 4 and history["seconds"] > 0
    assert history["train_loss"][-1] < 0.8 * history["train_loss"][0]
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4] and reports[-1]["epochs"] == 4
    assert {"train_loss", "val_loss", "samples_per_s", "seconds"} <= reports[0].keys()
    assert not model.training


def test_fit_progress_false_prints_nothing_and_true_prints(capsys):
    ae.fit(_build("shallow", latent_dim=2), _pixels(32), _pixels(8), epochs=1, batch_size=16, progress=False)
    assert capsys.readouterr().out == ""
    ae.fit(_build("shallow", latent_dim=2), _pixels(32), _pixels(8), epochs=1, batch_size=16, progress=True)
    assert "shallow" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["vae", "denoising", "stacked"])
def test_fit_same_seed_same_weights(name):
    runs = []
    for _ in range(2):
        model = _build(name, latent_dim=3)
        ae.fit(model, _pixels(48), _pixels(8), epochs=3, batch_size=16, progress=False)
        runs.append(_snapshot(model))
    assert _same(*runs)


def test_fit_nan_loss_stops_with_clear_error():
    model = _build("vanilla", latent_dim=2)
    with torch.no_grad():
        model.encoder[0][0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="vanilla.*nan.*epoch 1"):
        ae.fit(model, _pixels(32), _pixels(8), epochs=2, batch_size=16, progress=False)


def test_fit_rejects_bad_data():
    model = _build("vanilla", latent_dim=2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ae.fit(model, _pixels(32) * 255, _pixels(8), epochs=1, progress=False)
    with pytest.raises(ValueError, match="shape"):
        ae.fit(model, _pixels(32)[:, :784], _pixels(8), epochs=1, progress=False)


def test_fit_single_leftover_sample_is_dropped():
    history = ae.fit(_build("vanilla", 2), _pixels(33), _pixels(8), epochs=1, batch_size=16, progress=False)
    assert math.isfinite(history["train_loss"][0])


def _warm_batchnorm(model, seed=5):
    """A few training-mode forwards so BatchNorm's running statistics are not the defaults."""
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(_pixels(16, seed=seed + i))


def _hand_fit(model, train_x, val_x, epochs, batch_size, lr, seed):
    """fit written out with plain torch: the reference loop."""
    torch.manual_seed(seed)                                   # model noise (denoising, VAEs)
    order_gen = torch.Generator().manual_seed(seed)           # shuffling order
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=order_gen)
        batches = list(order.split(batch_size))
        if len(batches[-1]) == 1:                             # BatchNorm needs two samples
            batches.pop()
        for idx in batches:
            opt.zero_grad()
            loss, _ = model.loss(train_x[idx])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():                                 # validation loss (draws VAE noise)
            for i in range(0, len(val_x), batch_size):
                model.loss(val_x[i:i + batch_size])
    model.eval()


@pytest.mark.parametrize("name", ["denoising", "vae"])
def test_fit_matches_hand_written_adam_loop_step_for_step(name):
    train_x, val_x = _pixels(17, seed=1), _pixels(5, seed=2)    # batches of 8, 8 and a dropped 1
    a, b = _build(name, 2, seed=3), _build(name, 2, seed=3)
    assert _same(_snapshot(a), _snapshot(b))
    ae.fit(a, train_x, val_x, epochs=2, batch_size=8, lr=1e-2, seed=11, progress=False)
    _hand_fit(b, train_x, val_x, epochs=2, batch_size=8, lr=1e-2, seed=11)
    sa, sb = _snapshot(a), _snapshot(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert not _same(sa, _snapshot(_build(name, 2, seed=3)))      # it did train
    assert not a.training


@pytest.mark.parametrize("training", [True, False])
def test_evaluate_in_eval_mode_restores_mode_and_state(training):
    model = _build("denoising", 2)
    _warm_batchnorm(model)
    x = _pixels(10, seed=4)
    model.eval()
    with torch.no_grad():
        want = ae.bce(model.decoder.logits(model.encode(x)), x).item()   # clean input, running stats
    model.train(training)
    before = _snapshot(model)
    for batch_size in (10, 4, 3):
        got = ae.evaluate(model, x, batch_size)
        assert got["loss"] == pytest.approx(want, rel=1e-5)
        assert model.training == training
        assert _same(before, _snapshot(model))


def test_stacked_schedule():
    model = ae.build("stacked")
    assert model.stages(60) == [(1, 20), (2, 20), (3, 20)]
    assert model.stages(7) == [(1, 2), (2, 2), (3, 3)]
    history = ae.fit(_build("stacked", 2), _pixels(32), _pixels(8), epochs=3, batch_size=16, progress=False)
    assert history["stage"] == [1, 2, 3]


def test_stacked_frozen_layers_keep_weights_and_batchnorm_statistics():
    model = _build("stacked", latent_dim=4)
    enc, dec = model.encoder, model.decoder.layers
    snapshots = []
    ae.fit(model, _pixels(64), _pixels(16), epochs=3, batch_size=16,
           progress=lambda report: snapshots.append([_snapshot(layer) for layer in (*enc, *dec)]))
    after1, after2, after3 = snapshots  # layers: enc0 enc1 enc2 dec0 dec1 dec2
    # stage 2 trains enc1 and dec1; enc0 and dec2 (outer, trained in stage 1) stay as they were
    assert _same(after1[0], after2[0]) and _same(after1[5], after2[5])
    assert not _same(after1[1], after2[1]) and not _same(after1[4], after2[4])
    # stage 3 trains enc2 and dec0 only
    for i in (0, 1, 4, 5):
        assert _same(after2[i], after3[i])
    assert not _same(after2[2], after3[2]) and not _same(after2[3], after3[3])
    assert "running_mean" in str(after1[0].keys())  # BatchNorm statistics are in the comparison
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after fit


def test_stacked_stage_one_is_a_shallow_path():
    model = _build("stacked", latent_dim=4).eval()
    model.set_stage(1)
    x = _pixels(8)
    expected = model.decoder.layers[2](model.encoder[0](x))
    total, parts = model.loss(x)
    assert torch.allclose(parts["recon"], _hand_bce(torch.sigmoid(expected), x), rtol=1e-4)
    assert [p.requires_grad for p in model.parameters()].count(True) == 3 + 2  # enc0: W, BN; dec2: W, b


def test_fit_progress_line_reads_the_time_so_far_and_the_time_left(capsys):
    # epoch 2 of 6 after 130 s: 65 s an epoch, 4 epochs = 260 s left
    ae.print_progress({"epoch": 2, "epochs": 6, "seconds": 130.0, "train_loss": 70.123,
                       "val_loss": 71.5, "samples_per_s": 12345.6})
    assert capsys.readouterr().out == (" epoch 2/6 train 70.12 val 71.50 12,346 samples/s "
                                       "2m10s ETA 4m20s\n")


def _blobs(n_blobs=4, per_blob=50, dim=10, seed=0):
    """Well-separated Gaussian blobs: centres ~40 apart, unit spread. Returns (x, labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=30.0, size=(n_blobs, dim))
    x = np.concatenate([c + rng.normal(size=(per_blob, dim)) for c in centres])
    return x, np.repeat(np.arange(n_blobs), per_blob)


def _brute_knn(x, k):
    """k nearest neighbours from the full difference tensor, self excluded."""
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, axis=1)


def _slow_trustworthiness(x_high, x_low, k):
    """The definition, one point at a time: ranks from a full sort of the high-dim distances."""
    n = len(x_high)
    total = 0
    for i in range(n):
        d_high = np.linalg.norm(x_high - x_high[i], axis=1)
        d_low = np.linalg.norm(x_low - x_low[i], axis=1)
        d_high[i] = d_low[i] = np.inf
        order = np.argsort(d_high, kind="stable")
        rank = np.empty(n, dtype=int)
        rank[order] = np.arange(1, n + 1)          # r(i, j): 1 = nearest
        high_nn = set(order[:k])
        for j in np.argsort(d_low, kind="stable")[:k]:
            if j not in high_nn:
                total += rank[j] - k
    return 1 - 2 / (n * k * (2 * n - 3 * k - 1)) * total


def test_umap_blobs_stay_separated():
    x, labels = _blobs()
    y = umap_lite.embed(x, n_neighbors=10, n_epochs=100, seed=0)
    assert y.shape == (len(x), 2) and y.dtype == np.float32
    # each point's 10 nearest neighbours in the map come from its own blob
    idx, _ = umap_lite.knn(y, 10)
    assert np.all(labels[idx] == labels[:, None])
    # and the blobs lie farther apart than they are wide
    centres = np.stack([y[labels == c].mean(axis=0) for c in range(4)])
    spread = max(np.linalg.norm(y[labels == c] - centres[c], axis=1).max() for c in range(4))
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=2)[np.triu_indices(4, 1)]
    assert gaps.min() > 2 * spread


def test_umap_same_seed_same_output():
    x, _ = _blobs(per_blob=30)
    first = umap_lite.embed(x, n_epochs=30, seed=3)
    assert np.array_equal(first, umap_lite.embed(x, n_epochs=30, seed=3))
    assert not np.array_equal(first, umap_lite.embed(x, n_epochs=30, seed=4))


def test_umap_rho_sigma_solve_their_equation():
    x = np.random.default_rng(1).normal(size=(300, 5))
    _, dist = umap_lite.knn(x, 14)
    rho, sigma = umap_lite.smooth_knn(dist, 15)
    assert np.array_equal(rho, dist[:, 0])                 # no duplicates: rho = nearest distance
    # sum_j exp(-max(d_ij - rho_i, 0) / sigma_i) = log2(15)
    total = np.exp(-np.maximum(dist - rho[:, None], 0) / sigma[:, None]).sum(axis=1)
    np.testing.assert_allclose(total, np.log2(15), rtol=1e-9)


def test_umap_duplicates_keep_rho_sigma_finite():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 3))
    x = np.concatenate([x, x[:10], np.repeat(x[:1], 20, axis=0)])   # pairs and a clump of 21
    idx, dist = umap_lite.knn(x, 9)
    rho, sigma = umap_lite.smooth_knn(dist, 10)
    assert np.all(np.isfinite(sigma)) and np.all(sigma > 0)
    # rho skips the zero distances to twins: it is the nearest non-zero distance (0 if none)
    nonzero = np.where(dist > 0, dist, np.inf).min(axis=1)
    np.testing.assert_array_equal(rho, np.where(np.isinf(nonzero), 0, nonzero))
    assert np.all(rho[x[:, 0] != x[0, 0]] > 0) and np.all(rho[x[:, 0] == x[0, 0]] == 0)
    head, tail, weight = umap_lite.fuzzy_graph(idx, dist, rho, sigma)
    assert np.all((weight > 0) & (weight <= 1))
    y = umap_lite.embed(x, n_neighbors=10, n_epochs=30)
    assert np.all(np.isfinite(y))


def test_umap_fuzzy_union_matches_dense():
    x = np.random.default_rng(3).normal(size=(40, 3))
    idx, dist = umap_lite.knn(x, 6)
    rho, sigma = umap_lite.smooth_knn(dist, 7)
    p = np.zeros((40, 40))                                  # dense directed weights
    for i in range(40):
        for j, d in zip(idx[i], dist[i]):
            p[i, j] = np.exp(-max(d - rho[i], 0) / sigma[i])
    expected = p + p.T - p * p.T
    head, tail, weight = umap_lite.fuzzy_graph(idx, dist, rho, sigma)
    got = np.zeros((40, 40))
    got[head, tail] = weight
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert len(head) == np.count_nonzero(expected)          # each edge listed once per direction


def test_umap_ab_fit_matches_min_dist():
    a, b = umap_lite.fit_ab(0.1)
    assert abs(a - 1.577) < 1e-3 and abs(b - 0.895) < 1e-3
    # a least-squares minimum: nudging a or b makes the fit to the target curve worse
    x = np.linspace(0, 3, 300)[1:]
    psi = np.where(x < 0.1, 1, np.exp(-(x - 0.1)))

    def error(a, b):
        return np.sum((1 / (1 + a * x ** (2 * b)) - psi) ** 2)

    for da, db in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        assert error(a + da, b + db) > error(a, b)


def test_umap_blocked_knn_matches_brute_force():
    x = np.random.default_rng(4).normal(size=(97, 4))
    idx, dist = umap_lite.knn(x, 8, block=7)                # 14 blocks, the last one short
    ref_idx, ref_dist = _brute_knn(x, 8)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-9, atol=1e-12)
    # duplicates: a twin is at distance 0, and the point itself is never listed
    x2 = np.concatenate([x, x[:5]])
    idx2, dist2 = umap_lite.knn(x2, 3, block=10)
    assert np.all(idx2 != np.arange(len(x2))[:, None])
    np.testing.assert_allclose(dist2[:5, 0], 0, atol=1e-6)
    np.testing.assert_allclose(dist2, _brute_knn(x2, 3)[1], atol=1e-6)


def test_umap_trustworthiness_matches_slow_reference():
    rng = np.random.default_rng(5)
    x_high = rng.normal(size=(80, 6))
    for x_low in [x_high[:, :2], rng.normal(size=(80, 2))]:  # a fair and a random map
        expected = _slow_trustworthiness(x_high, x_low, 7)
        assert umap_lite.trustworthiness(x_high, x_low, k=7) == pytest.approx(expected, abs=1e-12)
    assert umap_lite.trustworthiness(x_high, x_high, k=7) == 1.0


@pytest.mark.parametrize("x, kwargs, message", [
    (np.array([[0.0, 1.0], [np.nan, 0.0]] * 20), {}, "NaN or infinite"),
    (np.array([[0.0, 1.0], [np.inf, 0.0]] * 20), {}, "NaN or infinite"),
    (np.zeros(50), {}, "2-D"),
    (np.zeros((5, 5, 5)), {}, "2-D"),
    (np.array([["a", "b"]] * 20), {}, "real numbers"),
    (np.ones((30, 3)) * 1j, {}, "real numbers"),
    (np.random.default_rng(0).normal(size=(15, 3)), {}, "more than n_neighbors"),
    (np.random.default_rng(0).normal(size=(30, 3)), {"n_neighbors": 1}, "n_neighbors"),
    (np.random.default_rng(0).normal(size=(30, 3)), {"min_dist": -0.1}, "min_dist"),
    (np.random.default_rng(0).normal(size=(30, 3)), {"min_dist": "0.1"}, "min_dist"),
    (np.random.default_rng(0).normal(size=(30, 3)), {"n_epochs": 0}, "n_epochs"),
    (np.ones((30, 3)), {}, "identical"),
])
def test_umap_bad_input_raises(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        umap_lite.embed(x, **kwargs)


def test_umap_bad_trustworthiness_input_raises():
    x = np.random.default_rng(6).normal(size=(20, 3))
    with pytest.raises(ValueError, match="same points"):
        umap_lite.trustworthiness(x, x[:10, :2])
    with pytest.raises(ValueError, match="k < n/2"):
        umap_lite.trustworthiness(x, x[:, :2], k=10)
    with pytest.raises(ValueError, match="NaN"):
        umap_lite.trustworthiness(x, np.full((20, 2), np.nan))
    with pytest.raises(ValueError, match="k < n"):
        umap_lite.knn(x, 20)


def _pairwise_auc(labels, scores):
    """P(score_pos > score_neg) + 1/2 P(tie), by looking at every pair."""
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_pairwise_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(400) < 0.2
    scores = rng.integers(0, 8, 400).astype(float)       # few distinct values: many ties
    scores[labels] += rng.integers(0, 3, labels.sum())  # positives a bit higher on average
    assert tasks.roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


def _caller():
    """The file a warning with stacklevel=2 names when a test calls the function: this one, or,
    under mutmut, its trampoline, which adds one frame between every caller and the function."""
    trampoline = sys.modules.get("mutmut.mutation.trampoline")
    return trampoline.__file__ if trampoline else __file__


@contextlib.contextmanager
def _caught():
    """Every warning raised inside, recorded (the calls stay in the test, so that a warning's
    filename shows whether its stacklevel points at the caller)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@pytest.mark.parametrize("positives", [0, 1, 2, 3])
def test_ranking_metrics_with_one_class_warn_once_at_the_caller_and_give_nan(positives):
    # one class only (0 or 3 of 3 positive): NaN and one RuntimeWarning that points at the caller;
    # 1 and 2 positives are the boundary's other side: defined, silent, and as by hand
    labels, scores = np.arange(3) < positives, np.array([0.3, 0.1, 0.2])
    one_class = positives in (0, 3)
    with _caught() as caught:
        auc = tasks.roc_auc(labels, scores)
    assert np.isnan(auc) if one_class else auc == _pairwise_auc(labels, scores)
    assert [(w.category, w.filename) for w in caught] == [(RuntimeWarning, _caller())] * one_class
    assert not one_class or "AUC is undefined" in str(caught[0].message)
    with _caught() as caught:
        fpr, tpr, _ = tasks.roc_curve(labels, scores)
    assert [(w.category, w.filename) for w in caught] == [(RuntimeWarning, _caller())] * one_class
    assert np.isnan(fpr).all() == (positives == 3) and np.isnan(tpr).all() == (positives == 0)
    assert np.isfinite(fpr).all() == (positives != 3) and np.isfinite(tpr).all() == (positives != 0)
    with _caught() as caught:
        ap = tasks.average_precision(labels, scores)
    assert [(w.category, w.filename) for w in caught] == [(RuntimeWarning, _caller())] * (positives == 0)
    assert np.isnan(ap) == (positives == 0)


def test_spearman_of_a_constant_warns_at_the_caller_and_two_points_are_enough():
    with _caught() as caught:
        rho = tasks.spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    assert np.isnan(rho) and [(w.category, w.filename) for w in caught] == [(RuntimeWarning, _caller())]
    assert tasks.spearman([1.0, 2.0], [5.0, 7.0]) == 1.0 and tasks.spearman([1.0, 2.0], [7.0, 5.0]) == -1.0
    with pytest.raises(ValueError, match="length >= 2"):
        tasks.spearman([1.0], [2.0])


def test_average_precision_of_one_positive_is_one_over_its_rank():
    # AP = sum over positives of precision at their rank / P: one positive at rank r gives 1 / r
    for rank in range(1, 6):
        labels = np.arange(5) == rank - 1
        assert tasks.average_precision(labels, -np.arange(5.0)) == pytest.approx(1 / rank)
        assert tasks.roc_auc(labels, -np.arange(5.0)) == pytest.approx((5 - rank) / 4)


def test_ranking_metrics_take_0_1_labels_and_any_real_dtype():
    rng = np.random.default_rng(3)
    labels = rng.random(60) < 0.3
    scores = rng.integers(0, 200, 60).astype(np.uint8)      # -scores would wrap around in uint8
    scores[0], labels[0], labels[1] = 0, False, True          # and 0 would rank first
    want = _pairwise_auc(labels, scores.astype(float))
    assert tasks.roc_auc(labels.astype(int), scores) == pytest.approx(want, abs=1e-12)
    assert tasks.average_precision(labels.astype(int), scores) == tasks.average_precision(labels, scores.astype(float))
    with pytest.raises(ValueError, match="boolean .* or 0/1"):
        tasks.roc_auc(labels.astype(int) * 2, scores)
    with pytest.raises(ValueError, match="boolean .* or 0/1"):
        tasks.roc_auc(labels.astype(int) - 1, scores)


def test_roc_auc_extremes_and_all_tied():
    labels = np.array([0, 0, 1, 1], bool)
    assert tasks.roc_auc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert tasks.roc_auc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert tasks.roc_auc(labels, [1, 1, 1, 1]) == 0.5


def test_roc_curve_shape_and_ends():
    rng = np.random.default_rng(0)
    labels, scores = rng.random(200) < 0.5, rng.normal(size=200).round(1)
    fpr, tpr, thresholds = tasks.roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds) < 0)
    assert len(thresholds) == len(np.unique(scores)) + 1


def test_roc_auc_one_class_warns_nan():
    with pytest.warns(RuntimeWarning, match="one class"):
        assert np.isnan(tasks.roc_auc(np.zeros(5, bool), np.arange(5.0)))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(tasks.average_precision(np.zeros(5, bool), np.arange(5.0)))


@pytest.mark.parametrize("labels, scores, match", [
    ([True, False], [0.1, np.nan], "NaN"),
    ([True, False, True], [0.1, 0.2], "same length"),
    ([0, 2, 1], [0.1, 0.2, 0.3], "boolean"),
])
def test_roc_auc_bad_input(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        tasks.roc_auc(labels, scores)


@pytest.mark.parametrize("seed", range(3))
def test_average_precision_matches_definition(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = rng.integers(0, 10, 300).astype(float)
    # AP = mean over positives of the precision at that positive's score (ties flagged together)
    precision_at = [(labels & (scores >= s)).sum() / (scores >= s).sum() for s in scores[labels]]
    assert tasks.average_precision(labels, scores) == pytest.approx(np.mean(precision_at))


def _brute_knn_predict(z_ref, y_ref, z_q, k):
    """Majority vote of the k nearest by a full float64 difference tensor; a tie goes to the
    tied class that has the nearest neighbour."""
    z_ref, z_q = np.asarray(z_ref, np.float64), np.asarray(z_q, np.float64)
    d = ((z_q[:, None] - z_ref[None]) ** 2).sum(-1)
    want = []
    for row in np.argsort(d, axis=1, kind="stable")[:, :k]:
        counts = np.bincount(y_ref[row], minlength=10)
        want.append(next(c for c in y_ref[row] if counts[c] == counts.max()))
    return np.array(want)


def test_knn_predict_matches_brute_force():
    rng = np.random.default_rng(1)
    z_ref, y_ref = rng.normal(size=(300, 5)), rng.integers(0, 10, 300)
    z_q = rng.normal(size=(70, 5))
    got = tasks.knn_predict(z_ref, y_ref, z_q, k=7, block=16)
    assert np.array_equal(got, _brute_knn_predict(z_ref, y_ref, z_q, 7)) and got.dtype.kind == "i"
    # the defaults: 10 neighbours, and the query set is not the reference set, even where a query
    # point lies on top of the reference point of its own index
    z_q = z_ref[:70] + 1e-3 * rng.normal(size=(70, 5))
    assert np.array_equal(tasks.knn_predict(z_ref, y_ref, z_q), _brute_knn_predict(z_ref, y_ref, z_q, 10))


def test_knn_predict_is_exact_for_float32_codes_far_from_the_origin():
    # |a|^2 - 2 a.b cancels catastrophically in float32 for codes near 1,000 that differ by 0.01
    rng = np.random.default_rng(2)
    z_ref = (1000 + 0.01 * rng.normal(size=(200, 4))).astype(np.float32)
    z_q = (1000 + 0.01 * rng.normal(size=(50, 4))).astype(np.float32)
    y_ref = rng.integers(0, 10, 200)
    assert np.array_equal(tasks.knn_predict(z_ref, y_ref, z_q, k=1), _brute_knn_predict(z_ref, y_ref, z_q, 1))


def test_knn_predict_needs_more_than_k_reference_points():
    z, y = np.arange(4.0)[:, None], np.array([0, 0, 1, 1])
    assert tasks.knn_predict(z, y, z, k=3).shape == (4,)            # k + 1 points: enough
    with pytest.raises(ValueError, match="more than k=4"):
        tasks.knn_predict(z, y, z, k=4)


def test_knn_leave_one_out_excludes_self():
    z = np.arange(30, dtype=float)[:, None]
    y = np.r_[np.zeros(15, int), np.ones(15, int)]
    y[3] = 1    # a lone 1 among 0s: with itself excluded its neighbours outvote it
    pred = tasks.knn_predict(z, y, z, k=3, exclude_self=True, block=7)
    assert pred[3] == 0 and pred[20] == 1


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    b = a * np.array([2.0, 1.0, 0.5]) + np.array([1.0, 0.0, 0.0])
    # independent Gaussians: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 = 1 + 1 + 0 + 0.25
    assert tasks.frechet_distance(a, b) == pytest.approx(2.25, rel=0.03)
    assert abs(tasks.frechet_distance(a, a)) < 1e-6


def test_psd_square_root_clips_negative_eigenvalues():
    # a covariance product that rounding pushed below zero: its negative part has no real root
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(3, 3)))
    root = tasks._sqrtm_psd(q @ np.diag([4.0, 1.0, -0.01]) @ q.T)
    np.testing.assert_allclose(root, q @ np.diag([2.0, 1.0, 0.0]) @ q.T, atol=1e-12)


def test_frechet_distance_needs_two_rows_each_and_equal_widths():
    rng = np.random.default_rng(1)
    two, many = rng.normal(size=(2, 3)), rng.normal(size=(50, 3))
    assert np.isfinite(tasks.frechet_distance(two, many))      # 2 rows: a covariance exists
    with pytest.raises(ValueError, match=">= 2 rows"):
        tasks.frechet_distance(two[:1], many)
    with pytest.raises(ValueError, match="equal width"):
        tasks.frechet_distance(many, rng.normal(size=(50, 4)))


def _class_blobs(n, d=6, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(10, d)) * 3
    y = rng.integers(0, 10, n)
    return centres[y] + spread * rng.normal(size=(n, d)), y


def test_linear_probe_separable_data():
    z, y = _class_blobs(700, seed=0)
    acc = tasks.linear_probe(z[:300], y[:300], z[300:500], y[300:500], z[500:], y[500:])
    assert acc > 0.99


def test_newton_logistic_is_stationary_point_of_autograd_loss():
    z, y = _class_blobs(200, d=4, seed=3, spread=2.0)
    x = np.c_[z, np.ones(len(z))]
    lam = 1e-2
    w = tasks._newton_logistic(x, y, lam, np.zeros((5, 10)))
    wt = torch.tensor(w, requires_grad=True)
    xt = torch.tensor(x)
    # the same objective written with torch: mean CE + lam/2 |W_features|^2 (+ tiny bias ridge)
    loss = F.cross_entropy(xt @ wt, torch.tensor(y)) + lam / 2 * (wt[:-1] ** 2).sum() \
        + tasks.BIAS_RIDGE / 2 * (wt[-1] ** 2).sum()
    loss.backward()
    assert wt.grad.abs().max() < 1e-6
    assert tasks.logistic_objective(x, y, w, lam)[0] == pytest.approx(loss.item(), rel=1e-10)


def test_logistic_objective_is_finite_for_huge_logits_in_every_row():
    # rows whose logits sit near +800 and near -800: exp() overflows or underflows without the
    # per-row shift; the value is the by-hand cross-entropy, computed with each row's own maximum
    x = np.array([[800.0, 1.0], [-800.0, 1.0]])
    w = np.array([[1.0, 0.99, 0.0], [0.0, 0.0, 0.0]])
    y = np.array([1, 0])
    value, grad, p = tasks.logistic_objective(x, y, w, lam=0.0)
    logits = x @ w
    by_hand = [np.log(np.exp(r - r.max()).sum()) + r.max() - r[c] for r, c in zip(logits, y)]
    assert np.isfinite(grad).all() and np.allclose(p.sum(1), 1.0)
    assert value == pytest.approx(np.mean(by_hand) + 0.5 * tasks.BIAS_RIDGE * (w[-1] ** 2).sum(), rel=1e-12)


def test_linear_probe_rejects_nan_features():
    z, y = _class_blobs(50)
    z[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tasks.linear_probe(z, y, z, y, z, y)


def test_label_budget_indices_stratified():
    y = np.repeat(np.arange(10), 30)
    idx = tasks.label_budget_indices(y, 4, seed=0)
    assert np.array_equal(np.bincount(y[idx]), np.full(10, 4))
    assert len(np.unique(idx)) == 40
    assert not np.array_equal(idx, tasks.label_budget_indices(y, 4, seed=1))


def test_label_budget_indices_skip_a_class_the_labels_lack():
    y = np.repeat(np.r_[0:3, 4:10], 30)                  # no 3 at all
    idx = tasks.label_budget_indices(y, 4, seed=0)
    assert np.array_equal(np.bincount(y[idx], minlength=10), np.r_[4, 4, 4, 0, np.full(6, 4)])


def test_ink_is_the_exact_sum_of_the_pixels():
    x = np.random.default_rng(0).random((50, 1024)).astype(np.float32)
    assert np.array_equal(tasks.ink(x), x.astype(np.float64).sum(1))     # float64, not float32 rounding


def test_decode_passes_the_bottleneck_only_when_asked():
    torch.manual_seed(0)
    model = ae.build("vq", 4).eval()
    h = torch.randn(8, 4)
    with torch.no_grad():
        plain, quantised = model.decode(h).numpy(), model.decode(model.bottleneck(h)).numpy()
    assert not np.allclose(plain, quantised)
    np.testing.assert_allclose(tasks.decode(model, h.numpy()), plain, atol=1e-6)
    np.testing.assert_allclose(tasks.decode(model, h.numpy(), through_bottleneck=True), quantised, atol=1e-6)


def test_interpolation_default_length_and_fixed_noise_from_its_own_seed():
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((2, 1024)).astype(np.float32)
    vae = ae.build("vae", 6).eval()
    assert tasks.interpolate(vae, x[0], x[1]).shape == (tasks.INTERP_STEPS + 2, 1024)
    # by hand: h(t) = (1 - t) h_a + t h_b, one eps ~ N(0, I_Z) from a generator seeded with `seed`
    with torch.no_grad():
        h = vae.encoder(torch.from_numpy(x))
        t = torch.linspace(0, 1, 6)[:, None]
        eps = torch.randn(1, 6, generator=torch.Generator().manual_seed(5)).expand(6, -1)
        want = vae.decoder(vae.bottleneck((1 - t) * h[0] + t * h[1], eps=eps)).numpy()
    torch.manual_seed(123)                             # the global generator plays no part
    got = tasks.interpolate(vae, x[0], x[1], steps=4, fixed_noise=True, seed=5)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_sample_and_path_quality_by_hand():
    probs = np.array([[0.95, 0.05] + [0.0] * 8, [0.6, 0.4] + [0.0] * 8, [0.0, 0.99, 0.01] + [0.0] * 7])
    feats = np.random.default_rng(0).normal(size=(3, 2))
    q = tasks.sample_quality(probs, feats, feats)
    # legible: top probability > CONFIDENT (0.9) in 2 of 3; classes 0, 0, 1: entropy of (2/3, 1/3)
    assert q["legibility"] == pytest.approx(2 / 3)
    assert q["diversity"] == pytest.approx(-(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3)))
    assert tasks.sample_quality(probs[:2], feats[:2], feats)["diversity"] == 0.0    # one class: 0
    path = tasks.path_quality(probs, 0, 1)
    assert path == {"mean_confidence": pytest.approx((0.95 + 0.6 + 0.99) / 3), "third_class": False,
                    "classes_passed": []}


def test_articles_probe_learns_and_keeps_encoder_frozen():
    torch.manual_seed(0)
    model = ae.build("vanilla", 2)
    x = torch.rand(120, 1024)
    y = (x[:, :512].mean(1) > x[:, 512:].mean(1)).long().numpy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = tasks.FrozenEncoderProbe(model)
    acc = tasks.train_classifier(net, x[:80], y[:80], x[80:], y[80:], x[80:], y[80:], epochs=3)
    assert 0 <= acc <= 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [n for n, _ in net.named_parameters()] == ["linear.weight", "linear.bias"]


def test_articles_probe_shuffles_from_its_own_seed():
    # the same seed gives the same probe whatever the global generator did before; another seed
    # another order (the weights after training differ)
    x = torch.rand(96, 1024, generator=torch.Generator().manual_seed(0))
    y = (x[:, :512].mean(1) > x[:, 512:].mean(1)).long().numpy()
    def trained(seed, global_seed):
        torch.manual_seed(0)
        net = torch.nn.Linear(1024, 10)
        torch.manual_seed(global_seed)
        tasks.train_classifier(net, x[:64], y[:64], x[64:], y[64:], x[64:], y[64:], seed=seed, epochs=2, patience=5)
        return net.weight.detach().clone()
    assert torch.equal(trained(3, 1), trained(3, 2)) and not torch.equal(trained(3, 1), trained(4, 1))


def test_anomaly_score_nonnegative_and_larger_out_of_distribution():
    torch.manual_seed(0)
    model = ae.build("shallow", 2)
    # in-distribution: a faint bar on the left; out-of-distribution: a bright bar on the right
    x_in = np.zeros((256, 32, 32), np.float32)
    x_in[:, 4:28, 6:10] = np.random.default_rng(0).uniform(0.6, 1.0, (256, 1, 1))
    x_in = x_in.reshape(256, 1024)
    ae.fit(model, x_in, x_in[:32], epochs=15, batch_size=32, progress=False)
    x_out = np.zeros((1, 32, 32), np.float32)
    x_out[:, 4:28, 22:26] = 1.0
    s_in, s_out = tasks.anomaly_scores(model, x_in), tasks.anomaly_scores(model, x_out.reshape(1, 1024))
    bce_in, signed_in, bce_out = s_in["bce"], s_in["signed"], s_out["bce"]
    for score in ("bce_excess", "sse"):         # every error score: higher for the bright bar it never saw
        assert (s_in[score] >= 0).all() and s_out[score][0] > np.percentile(s_in[score], 99)
    assert (bce_in >= 0).all() and bce_out[0] >= 0
    assert bce_out[0] > np.percentile(bce_in, 99)
    assert signed_in.shape == (256,)


def test_per_image_bce_matches_hand_formula():
    torch.manual_seed(0)
    model = ae.build("vanilla", 20).eval()
    x = np.random.default_rng(0).random((5, 1024)).astype(np.float32)
    with torch.no_grad():
        p = model(torch.from_numpy(x)).double().numpy()
    hand = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1)
    assert np.allclose(tasks.per_image_bce(model, x), hand, rtol=1e-4)


def test_interpolation_ends_and_fixed_noise():
    torch.manual_seed(0)
    x = np.random.default_rng(0).random((2, 1024)).astype(np.float32)
    model = ae.build("vanilla", 20).eval()
    frames = tasks.interpolate(model, x[0], x[1], steps=6)
    assert frames.shape == (8, 1024)
    assert np.allclose(frames[[0, -1]], tasks.batched(model, x), atol=1e-5)
    vae = ae.build("vae", 20).eval()
    a = tasks.interpolate(vae, x[0], x[0], steps=4, fixed_noise=True)    # same point, same noise
    b = tasks.interpolate(vae, x[0], x[0], steps=4, fixed_noise=False)   # same point, fresh noise
    assert np.allclose(a, a[0], atol=1e-6) and not np.allclose(b, b[0], atol=1e-3)


def test_sample_quality_numbers():
    probs = np.eye(10)[np.arange(100) % 10] * 0.95 + 0.005
    feats = np.random.default_rng(0).normal(size=(100, 4))
    q = tasks.sample_quality(probs, feats, feats)
    assert q["legibility"] == 1.0 and q["diversity"] == pytest.approx(np.log(10))
    assert abs(q["frechet"]) < 1e-6
    pq = tasks.path_quality(probs[[7, 3, 2]], 7, 2)
    assert pq["third_class"] and pq["classes_passed"] == [3]


WEAK, STRONG = 1e-4, 10.0


def _probe_train(seed=0):
    """1-D codes: 30 of class 0 near -1, 10 of class 1 near +1 (plus a noise feature).

    The weak penalty separates the classes at about 0; the strong one shrinks the feature weight
    to almost nothing, so the unpenalised bias predicts the majority class 0 everywhere.
    """
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(30, int), np.ones(10, int)]
    z = np.c_[np.where(y == 1, 1.0, -1.0) + 0.2 * rng.normal(size=40), 0.1 * rng.normal(size=40)]
    return z, y


def _points(centre, n, seed):
    rng = np.random.default_rng(seed)
    return np.c_[centre + 0.1 * rng.normal(size=n), 0.1 * rng.normal(size=n)]


def _per_lambda(z_tr, y_tr, z_va, y_va, sets, grid):
    """{lam: [accuracy on each (z, y) of sets]} of a probe fitted with that one lambda."""
    out = {}
    for lam in grid:
        acc = tasks.fit_probe(z_tr, y_tr, z_va, y_va, l2_grid=[lam])
        out[lam] = [acc(z, y) for z, y in sets]
    return out


# direction A: validation prefers the strong penalty, the test set the weak one; B: the reverse
_DIRECTIONS = {
    "val_prefers_strong": dict(val=[(1.0, 6, 0)], test=[(1.0, 5, 1), (-1.0, 5, 0)]),
    "val_prefers_weak": dict(val=[(1.0, 6, 1)], test=[(1.0, 6, 0), (-1.0, 4, 0)]),
}


def _make_sets(spec):
    out = {}
    for part, seed in (("val", 10), ("test", 20)):
        zs, ys = [], []
        for j, (centre, n, label) in enumerate(spec[part]):
            zs.append(_points(centre, n, seed + j))
            ys.append(np.full(n, label))
        out[part] = (np.concatenate(zs), np.concatenate(ys))
    return out["val"], out["test"]


@pytest.mark.parametrize("direction", sorted(_DIRECTIONS))
def test_linear_probe_lambda_is_chosen_on_validation_not_test(direction):
    z_tr, y_tr = _probe_train()
    (z_va, y_va), (z_te, y_te) = _make_sets(_DIRECTIONS[direction])
    grid = [WEAK, 1e-1, STRONG]
    acc = _per_lambda(z_tr, y_tr, z_va, y_va, [(z_va, y_va), (z_te, y_te)], grid)
    # validation's choice: best validation accuracy, ties to the stronger penalty
    by_val = max(grid, key=lambda lam: (acc[lam][0], lam))
    by_test = max(grid, key=lambda lam: (acc[lam][1], lam))
    # precondition: the two sets disagree, so picking with the test set would show
    assert by_val != by_test and acc[by_val][1] < acc[by_test][1]
    got = tasks.linear_probe(z_tr, y_tr, z_va, y_va, z_te, y_te, l2_grid=grid)
    assert got == pytest.approx(acc[by_val][1], abs=1e-12)


def test_linear_probe_validation_tie_goes_to_stronger_penalty():
    z_tr, y_tr = _probe_train()
    z_va = np.r_[_points(1.0, 1, 30), _points(1.0, 1, 31)]
    y_va = np.array([0, 1])     # strong predicts 0, 0 and weak 1, 1: 1/2 each
    z_te = np.r_[_points(1.0, 5, 32), _points(-1.0, 5, 33)]
    y_te = np.r_[np.ones(5, int), np.zeros(5, int)]
    acc = _per_lambda(z_tr, y_tr, z_va, y_va, [(z_va, y_va), (z_te, y_te)], [WEAK, STRONG])
    assert acc[WEAK][0] == acc[STRONG][0]                    # precondition: a validation tie
    assert acc[WEAK][1] != acc[STRONG][1]                    # ... that the test accuracy can tell
    for grid in ([WEAK, STRONG], [STRONG, WEAK]):            # the grid's order must not matter
        got = tasks.linear_probe(z_tr, y_tr, z_va, y_va, z_te, y_te, l2_grid=grid)
        assert got == pytest.approx(acc[STRONG][1], abs=1e-12)


def _row_predictions(accuracy, z):
    """The class predicted for each row, read off an accuracy(z, y) function one row at a time."""
    preds = []
    for row in z:
        hits = [c for c in range(tasks.N_CLASSES) if accuracy(row[None], [c]) == 1.0]
        assert len(hits) == 1     # one model, one prediction per row
        preds.append(hits[0])
    return np.array(preds)


def test_linear_probe_predictions_on_test_do_not_depend_on_y_test():
    z_tr, y_tr = _probe_train()
    # validation prefers the strong penalty; a test set larger than it, that the weak one fits
    (z_va, y_va), (z_te, y_te) = _make_sets(dict(val=[(1.0, 6, 0)], test=[(1.0, 15, 1), (-1.0, 15, 0)]))
    grid = [WEAK, STRONG]
    preds = _row_predictions(tasks.fit_probe(z_tr, y_tr, z_va, y_va, l2_grid=grid), z_te)
    weak_preds = _row_predictions(tasks.fit_probe(z_tr, y_tr, z_va, y_va, l2_grid=[WEAK]), z_te)
    assert not np.array_equal(preds, weak_preds)   # precondition: another model predicts otherwise
    rng = np.random.default_rng(0)
    variants = [y_te, weak_preds, np.ones_like(y_te)] + [rng.permutation(y_te) for _ in range(3)]
    for y in variants:
        got = tasks.linear_probe(z_tr, y_tr, z_va, y_va, z_te, y, l2_grid=grid)
        assert got == pytest.approx(np.mean(preds == y), abs=1e-12)


def test_fit_probe_standardises_with_training_statistics_only():
    z_tr, y_tr = _probe_train()
    # validation far from the training mean, all class 1: only the weak penalty gets them right
    # once they are standardised with the *training* mean and std
    (z_va, y_va), (z_te, y_te) = _make_sets(_DIRECTIONS["val_prefers_weak"])
    grid = [WEAK, STRONG]
    accuracy = tasks.fit_probe(z_tr, y_tr, z_va, y_va, l2_grid=grid)
    weak = tasks.fit_probe(z_tr, y_tr, z_va, y_va, l2_grid=[WEAK])
    assert accuracy(z_va, y_va) == weak(z_va, y_va) == 1.0
    assert accuracy(z_te, y_te) == pytest.approx(weak(z_te, y_te), abs=1e-12)
    # a row's prediction depends on that row only: not on the other rows of its set
    preds = _row_predictions(accuracy, z_te)
    assert accuracy(z_te, y_te) == pytest.approx(np.mean(preds == y_te), abs=1e-12)
    far = np.c_[np.full(7, 50.0), np.full(7, -30.0)]         # shifts the set's mean and std a lot
    far_preds = _row_predictions(accuracy, far)
    both = accuracy(np.r_[z_te, far], np.r_[y_te, far_preds])
    assert both == pytest.approx(np.mean(np.r_[preds == y_te, np.ones(7, bool)]), abs=1e-12)
    # the fitted model depends on the validation codes only through its choice of lambda:
    # adding far validation rows that every lambda predicts alike moves nothing here
    far_labels = _row_predictions(weak, far)
    assert np.array_equal(far_labels, _row_predictions(
        tasks.fit_probe(z_tr, y_tr, z_va, y_va, l2_grid=[STRONG]), far))
    accuracy2 = tasks.fit_probe(z_tr, y_tr, np.r_[z_va, far], np.r_[y_va, far_labels], l2_grid=grid)
    assert np.array_equal(_row_predictions(accuracy2, z_te), preds)


_OTHER_CLASSES = -100.0    # logits of classes 2..9: never predicted


class _ThresholdNet(nn.Module):
    """Predicts class 1 iff x_0 < theta; trained on x_0 = 10 (class 1), theta climbs by lr a step.

    With a saturated, constant gradient Adam's step is exactly lr * g / |g|, so after epoch e (one
    batch each) theta = lr * e: its validation accuracy is known in advance.
    """

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(()))

    def thresholds(self, epochs, lr):
        return [lr * e for e in range(epochs + 1)]

    def forward(self, x):
        d = 10 * (self.theta - x[:, 0])
        return torch.cat([torch.zeros_like(d)[:, None], d[:, None],
                          torch.full((len(x), 8), _OTHER_CLASSES)], dim=1)


class _RunningMeanNet(nn.Module):
    """Predicts class 1 iff x_0 < BatchNorm's running mean; only that buffer changes in training.

    Trained on x_0 = 1: with momentum 0.1 the running mean after epoch e is 1 - 0.9^e.
    Like the article's published baseline, the number depends on running statistics, not weights.
    """

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(1, affine=False)
        self.dummy = nn.Parameter(torch.zeros(()))    # Adam needs something trainable

    def thresholds(self, epochs, lr):
        return [1 - 0.9 ** e for e in range(epochs + 1)]

    def forward(self, x):
        d = -10 * self.bn(x[:, :1])[:, 0] + 0 * self.dummy
        return torch.cat([torch.zeros_like(d)[:, None], d[:, None],
                          torch.full((len(x), 8), _OTHER_CLASSES)], dim=1)


@pytest.mark.parametrize("net_class", [_ThresholdNet, _RunningMeanNet])
def test_train_classifier_reports_test_accuracy_of_best_validation_epoch(net_class):
    lr, epochs = 0.1, 20
    net = net_class()
    th = net.thresholds(epochs, lr)
    mid = [(a + b) / 2 for a, b in zip(th[:-1], th[1:])]   # m_i is predicted 1 after epoch e iff i < e
    x_train = np.c_[np.full(32, 10.0 if net_class is _ThresholdNet else 1.0)]
    y_train = np.ones(32, int)
    # validation peaks after epoch 2 and then falls; the test set would prefer epoch 4
    x_val, y_val = np.c_[mid[1:5]], np.array([1, 0, 0, 0])
    x_test, y_test = np.c_[mid[:5]], np.array([1, 1, 1, 1, 0])

    def acc_after(e, x, y):
        pred = np.where(x[:, 0] < th[e], 1, 0)
        return float(np.mean(pred == y))

    # the protocol by hand: stop after `patience` epochs without a strict improvement
    best_e, best_val, waited, last_e = None, -1.0, 0, None
    for e in range(1, epochs + 1):
        last_e = e
        if acc_after(e, x_val, y_val) > best_val:
            best_e, best_val, waited = e, acc_after(e, x_val, y_val), 0
        else:
            waited += 1
            if waited >= tasks.ARTICLES_PROBE_PATIENCE:
                break
    assert best_e == 2 and last_e == 5                          # precondition: early peak
    want = acc_after(best_e, x_test, y_test)
    assert want != acc_after(last_e, x_test, y_test)           # last epoch would differ
    assert want != max(acc_after(e, x_test, y_test) for e in range(1, last_e + 1))  # so would test's pick
    got = tasks.train_classifier(net, x_train, y_train, x_val, y_val, x_test, y_test, seed=0,
                                 epochs=epochs, batch_size=32, lr=lr)
    assert got == pytest.approx(want, abs=1e-12)


def _brute_loo_knn(z, y, k):
    """Leave-one-out k-NN by brute force; a tied vote goes to the tied class nearest first."""
    d = ((z[:, None] - z[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    out = []
    for i in range(len(z)):
        neighbours = y[np.argsort(d[i], kind="stable")[:k]]
        counts = np.bincount(neighbours, minlength=10)
        out.append(next(c for c in neighbours if counts[c] == counts.max()))
    return np.array(out)


def test_knn_predict_leave_one_out_excludes_self_in_every_block():
    rng = np.random.default_rng(4)
    n, block = 40, 7
    z = rng.normal(size=(n, 3))
    y = rng.integers(0, 5, n)
    unique_at = [2, 9, 16, 23, 37]          # blocks 0, 1, 2, 3, 5: one point of a unique class each
    y[unique_at] = [5, 6, 7, 8, 9]
    pred = tasks.knn_predict(z, y, z, k=1, exclude_self=True, block=block)
    for i in unique_at:
        assert pred[i] != y[i], f"point {i} (block {i // block}) was its own neighbour"
    for k in (1, 3, 5):
        got = tasks.knn_predict(z, y, z, k=k, exclude_self=True, block=block)
        assert np.array_equal(got, _brute_loo_knn(z, y, k)), k


def _hand_scores(x_hat, x):
    x_hat, x = np.asarray(x_hat, np.float64), np.asarray(x, np.float64)
    correct = -(x * np.log(x_hat) + (1 - x) * np.log(1 - x_hat)).sum(1)
    signed = (x_hat - x).sum(1)
    return correct, signed


# ---- the anomaly scores beyond the summed BCE: each against a slow reference written out by hand

class _Given(nn.Module):
    """A 'model' whose reconstruction of the i-th input is x_hat[i], and whose code is two pixels."""

    bottleneck = type("Plain", (), {"stochastic": False})()

    def __init__(self, x_hat):
        super().__init__()
        self.register_buffer("x_hat", torch.as_tensor(x_hat, dtype=torch.float32))
        self.unused = nn.Parameter(torch.zeros(1))              # the tasks find the device by a parameter

    def forward(self, x):
        return self.x_hat[:len(x)]

    def encode(self, x, sample=True):
        return x[:, :2]


def _bernoulli_kl_by_hand(p, q):
    """KL(Bern(p) || Bern(q)) pixel by pixel, with 0 log 0 = 0 and BCE's clamp of log q at -100."""
    total = 0.0
    for pi, qi in zip(p.tolist(), q.tolist()):
        if pi > 0:
            total += pi * (math.log(pi) - max(math.log(qi) if qi > 0 else -math.inf, -100))
        if pi < 1:
            total += (1 - pi) * (math.log(1 - pi) - max(math.log(1 - qi) if qi < 1 else -math.inf, -100))
    return total


def test_bce_excess_is_the_summed_bernoulli_kl_zero_when_perfect_and_finite_at_0_and_1():
    rng = np.random.default_rng(0)
    x = rng.random((3, 1024)).astype(np.float32)
    x[:, :100], x[:, 100:200] = 0.0, 1.0                         # pixels of exactly 0 and 1
    x_hat = rng.uniform(0.01, 0.99, (3, 1024)).astype(np.float32)
    x_hat[0, :50], x_hat[0, 150:160] = 0.0, 1.0                  # and saturated reconstructions
    got = tasks.anomaly_scores(_Given(x_hat), x)
    hand = [_bernoulli_kl_by_hand(x[i].astype(np.float64), x_hat[i].astype(np.float64)) for i in range(3)]
    np.testing.assert_allclose(got["bce_excess"], hand, rtol=1e-9)
    assert np.isfinite(got["bce_excess"]).all() and (got["bce_excess"] >= 0).all()
    # the identity: summed BCE = H(x) + the KL sum (float32 BCE: a few 1e-4 of ~700 nats)
    np.testing.assert_allclose(got["bce"], tasks.entropy(x) + got["bce_excess"], rtol=1e-5)
    np.testing.assert_allclose(got["sse"], ((x_hat.astype(np.float64) - x) ** 2).sum(1), rtol=1e-9)
    perfect = tasks.anomaly_scores(_Given(x), x)                 # x_hat = x, 0s and 1s included
    np.testing.assert_allclose(perfect["bce_excess"], 0.0, atol=1e-9)
    np.testing.assert_allclose(perfect["bce"], tasks.entropy(x), rtol=1e-5)   # the floor is H(x)


def test_entropy_is_the_per_pixel_formula_with_0_log_0_as_0():
    x = np.array([[0.0, 1.0, 0.5, 0.25], [0.0, 0.0, 1.0, 1.0]])
    h = lambda p: 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))
    np.testing.assert_allclose(tasks.entropy(x), [sum(h(p) for p in row) for row in x.tolist()], rtol=1e-12)
    assert tasks.entropy(x)[1] == 0.0


def test_importance_weighted_bound_rises_to_the_closed_form_log_likelihood_and_never_below_the_elbo():
    # a linear-Gaussian model: p(z) = N(0, I), p(x|z) = N(W z + b, s^2 I), so p(x) = N(b, W W^T + s^2 I);
    # q(z|x) is the exact posterior, shifted and widened, so that no bound is tight
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    Z, D, B, s = 2, 5, 3, 0.5
    W, b = torch.randn(D, Z, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) + b
    cov = W @ W.T + s ** 2 * torch.eye(D, dtype=torch.float64)
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)                    # (B,)
    post_cov = torch.linalg.inv(torch.eye(Z, dtype=torch.float64) + W.T @ W / s ** 2)
    mu = (post_cov @ W.T @ (x - b).T / s ** 2).T + 0.3                                        # (B, Z)
    log_sigma = (0.5 * torch.log(torch.diagonal(post_cov)) + math.log(1.3)).expand(B, Z)
    gauss = lambda z: -0.5 * (((x - (z @ W.T + b)) / s) ** 2 + math.log(2 * math.pi * s ** 2)).sum(-1)
    repeats, means = 4000, {}
    for k in (1, 16, 128):
        log_w = ae.log_importance_weights(gauss, mu, log_sigma, k * repeats).reshape(repeats, k, B)
        means[k] = (torch.logsumexp(log_w, 1) - math.log(k)).mean(0)                      # (B,)
    gap = {k: log_px - means[k] for k in means}
    assert (gap[1] > gap[16]).all() and (gap[16] > gap[128]).all()    # rises with k ...
    assert (gap[128] > -0.01).all() and (gap[128] < 0.05).all()      # ... to log p(x), from below
    assert (gap[1] > 0.2).all()                                      # precondition: the ELBO is not tight
    # through the VAE's own method: on the same draws -IWAE <= -ELBO, image by image (Jensen)
    vae = ae.build("vae", 2).eval()
    neg_elbo, neg_iwae = vae.likelihood_bounds(torch.rand(6, 1024), k=8)
    assert (neg_iwae <= neg_elbo + 1e-4).all() and (neg_elbo - neg_iwae).max() > 1e-3
    with pytest.raises(ValueError, match="only the VAEs"):
        ae.build("vanilla", 2).likelihood_bounds(torch.rand(2, 1024))


def test_png_length_of_a_blank_image_is_below_a_noisy_one_and_the_file_decodes_to_the_pixels():
    from PIL import Image
    import io
    rng = np.random.default_rng(0)
    x = np.zeros((2, 1024), np.float32)
    x[1].reshape(32, 32)[2:30, 2:30] = rng.random((28, 28))
    bits = tasks.png_bits(x)
    assert bits[0] < bits[1] and bits[0] % 8 == 0
    pixels = np.round(255 * x[1].reshape(32, 32)[2:30, 2:30]).astype(np.uint8)
    with Image.open(io.BytesIO(tasks.png_file(pixels))) as img:
        assert img.format == "PNG" and img.mode == "L"
        np.testing.assert_array_equal(np.array(img), pixels)              # lossless, 8-bit, cropped
    assert bits[1] == 8 * len(tasks.png_file(pixels))


def test_code_density_of_constant_codes_warns_and_scores_every_image_alike():
    # every code unit dead (a shallow model's ReLU at latent 2 can do this): no density to fit
    x = np.random.default_rng(0).random((50, 1024)).astype(np.float32)
    model = _Given(np.zeros((50, 1024)))
    model.name = "dead"
    model.encode = lambda images, sample=True: torch.zeros(len(images), 2)
    with pytest.warns(RuntimeWarning, match="no code density"):
        nll = tasks.code_nll(model, x, x[:40], x[40:], seed=0)
    np.testing.assert_array_equal(nll, np.zeros(50))


def test_code_density_scores_a_code_far_from_the_training_codes_higher():
    rng = np.random.default_rng(0)
    x_train, x_val = rng.normal(0.5, 0.02, (400, 1024)), rng.normal(0.5, 0.02, (100, 1024))
    x = np.vstack([rng.normal(0.5, 0.02, (5, 1024)), np.full((1, 1024), 0.9)])   # the last: far away
    nll = tasks.code_nll(_Given(np.zeros((6, 1024))), x.astype(np.float32), x_train.astype(np.float32),
                         x_val.astype(np.float32), seed=0)
    assert nll.shape == (6,) and nll[-1] > nll[:-1].max() + 10
    # the same mixture scores the training codes as gmm_log_density does (orientation: minus)
    gmm, _ = tasks.choose_gmm(x_train[:, :2], x_val[:, :2], 0)
    np.testing.assert_allclose(nll, -tasks.gmm_log_density(gmm, x[:, :2]), rtol=1e-5)


def test_code_density_reads_the_vaes_mean_code_and_the_vq_code_before_its_quantiser():
    rng = np.random.default_rng(0)
    x_train, x_val, x = (rng.random((n, 1024)).astype(np.float32) for n in (300, 100, 20))
    for name, code in (("vae", lambda m, b: m.encode(b, sample=False)), ("vq", lambda m, b: m.encoder(b))):
        model = _build(name, 2).eval()
        with torch.no_grad():
            z_train, z_val, z = (code(model, torch.from_numpy(a)).numpy() for a in (x_train, x_val, x))
        gmm, _ = tasks.choose_gmm(z_train, z_val, 0)
        torch.manual_seed(1)      # a sampled code would differ from draw to draw; the mean does not
        np.testing.assert_allclose(tasks.code_nll(model, x, x_train, x_val, seed=0),
                                   -tasks.gmm_log_density(gmm, z), rtol=1e-4, atol=1e-4)


def test_anomaly_row_bce_png_is_the_summed_bce_in_bits_less_the_png_length():
    x = np.random.default_rng(0).random((8, 1024)).astype(np.float32)
    model = _build("vanilla", 2)
    _warm_batchnorm(model)
    _, scores = tasks.anomaly_row(model, x, np.arange(8) % 2 == 0, seed=0)
    np.testing.assert_allclose(scores["bce_png"], scores["bce"] / math.log(2) - tasks.png_bits(x))


def test_anomaly_scores_are_bce_then_signed_of_the_same_reconstruction():
    x = np.random.default_rng(0).random((6, 1024)).astype(np.float32)
    # a deterministic model: the two scores against model(x) by hand, in that order
    model = _build("vanilla", 2)
    _warm_batchnorm(model)
    model.eval()
    with torch.no_grad():
        x_hat = model(torch.from_numpy(x)).numpy()
    correct, signed = _hand_scores(x_hat, x)
    assert np.abs(correct - signed).min() > 10             # precondition: the two can't be confused
    got = tasks.anomaly_scores(model.train(), x)            # evaluated in eval mode whatever it was in
    assert sorted(got) == ["bce", "bce_excess", "signed", "sse"]    # no likelihood bounds: not a VAE
    got = (got["bce"], got["signed"])
    assert np.allclose(got[0], correct, rtol=1e-5, atol=1e-3)
    assert np.allclose(got[1], signed, rtol=1e-5, atol=1e-3)
    # a VAE: one sampled reconstruction must give both scores
    vae = _build("vae", 2).eval()
    torch.manual_seed(7)
    got = tasks.anomaly_scores(vae, x)
    assert {"neg_elbo", "neg_iwae", "neg_elbo_excess"} <= set(got)
    got = (got["bce"], got["signed"])
    torch.manual_seed(8)
    other = tasks.anomaly_scores(vae, x)
    other = (other["bce"], other["signed"])
    assert not np.allclose(got[1], other[1], atol=1e-3)      # precondition: samples differ
    torch.manual_seed(7)
    with torch.no_grad():
        x_hat = vae.eval()(torch.from_numpy(x)).numpy()      # the same draw of eps
    correct, signed = _hand_scores(x_hat, x)
    assert np.allclose(got[0], correct, rtol=1e-5, atol=1e-3)
    assert np.allclose(got[1], signed, rtol=1e-5, atol=1e-3)


def _by_hand(what, model, x):
    model.eval()
    with torch.no_grad():
        if what == "per_image_bce":
            p = model(x).double()
            xd = x.double()
            return (-(xd * torch.log(p) + (1 - xd) * torch.log(1 - p)).sum(1)).numpy()
        if what == "encode":
            return model.encode(x).numpy()
        return model(x).numpy()


@pytest.mark.parametrize("what", ["per_image_bce", "encode", "batched"])
def test_model_tasks_use_eval_mode_and_ignore_batch_composition(what):
    model = _build("denoising", 2)        # training mode: input noise and BatchNorm batch statistics
    _warm_batchnorm(model)
    x = _pixels(12, seed=9)
    want = _by_hand(what, model, x)
    fn = getattr(tasks, what)
    for rows in (slice(None), slice(0, 5), slice(5, 12)):
        before = _snapshot(model)
        got = fn(model.train(), x[rows].numpy())
        assert _same(before, _snapshot(model))          # running statistics untouched
        assert np.allclose(got, want[rows], rtol=1e-5, atol=1e-4)


def test_encode_sample_flag_mu_or_one_seeded_draw():
    vae = _build("vae", 3)
    _warm_batchnorm(vae)
    x = _pixels(9, seed=6)
    vae.eval()
    with torch.no_grad():
        h = vae.encoder(x)                                   # (mu, log_sigma), eval mode
    mu, sigma = h[:, :3], torch.exp(h[:, 3:])
    # sample=False: the mean, with no noise at all (the "converged (mu)" probe's features)
    got_mu = tasks.encode(vae.train(), x.numpy(), sample=False)
    assert np.allclose(got_mu, mu.numpy(), rtol=1e-5, atol=1e-5)
    # sample=True: one draw mu + sigma * eps, eps from the global generator the caller seeded
    torch.manual_seed(3)
    eps = torch.randn(9, 3)
    torch.manual_seed(3)
    got = tasks.encode(vae.train(), x.numpy(), sample=True)
    assert np.allclose(got, (mu + sigma * eps).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, got_mu, atol=1e-2)          # precondition: the draw is not the mean


def test_label_budget_indices_exact_per_class_and_only_seed_decides():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), np.arange(5, 15)))   # 5..14 of each class
    per_class = 4
    draws = []
    for global_seed in (0, 1):
        np.random.seed(global_seed)         # the global generators must not matter
        torch.manual_seed(global_seed)
        np.random.random(global_seed + 3)
        draws.append(tasks.label_budget_indices(labels, per_class, seed=42))
    idx = draws[0]
    assert np.array_equal(draws[0], draws[1])
    assert len(np.unique(idx)) == len(idx) == 10 * per_class
    assert np.array_equal(np.bincount(labels[idx], minlength=10), np.full(10, per_class))
    assert np.array_equal(idx, np.sort(idx))
    others = {tuple(tasks.label_budget_indices(labels, per_class, seed=s)) for s in range(43, 48)}
    assert tuple(idx) not in others and len(others) > 1


def _two_gaussians(n, seed):
    """n points of a known 2-D mixture: weights (0.3, 0.7), means (-3, 0) and (3, 1)."""
    rng = np.random.default_rng(seed)
    weights, means = np.array([0.3, 0.7]), np.array([[-3.0, 0.0], [3.0, 1.0]])
    chols = np.array([[[1.0, 0.0], [0.5, 0.6]], [[0.7, 0.0], [-0.3, 1.2]]])
    k = rng.choice(2, size=n, p=weights)
    return means[k] + np.einsum("nij,nj->ni", chols[k], rng.standard_normal((n, 2))), weights, means, chols


def _blob_codes(n_per_blob=150, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(c, 1 + i, (n_per_blob, 3)) for i, c in enumerate((-4.0, 0.0, 5.0))])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_gmm_em_never_lowers_the_training_log_likelihood(k, seed):
    z = _blob_codes(seed=seed)
    history = tasks.fit_gmm(z, k, seed, max_iter=40, tol=-np.inf)["log_likelihood"]   # no early stop
    assert len(history) == 40
    assert np.diff(history).min() >= -1e-9          # float rounding only
    assert history[-1] > history[0] + (0.1 if k > 1 else -1)


def test_gmm_recovers_the_weights_and_means_of_a_known_mixture():
    # 4,000 points: the standard error of a mean is ~0.03 and of a weight ~0.007; tolerances are
    # about three of them
    z, weights, means, chols = _two_gaussians(4000, seed=0)
    gmm = tasks.fit_gmm(z, 2, seed=0)
    order = np.argsort(gmm["means"][:, 0])                # the component on the left first
    np.testing.assert_allclose(gmm["weights"][order], weights, atol=0.02)
    np.testing.assert_allclose(gmm["means"][order], means, atol=0.1)
    np.testing.assert_allclose(gmm["covs"][order], chols @ chols.transpose(0, 2, 1), atol=0.15)


def test_gmm_log_density_matches_the_formula_with_the_covariance_inverse():
    rng = np.random.default_rng(1)
    k, d = 3, 4
    a = rng.normal(size=(k, d, d))
    gmm = {"weights": np.array([0.2, 0.5, 0.3]), "means": rng.normal(size=(k, d)) * 2,
           "covs": a @ a.transpose(0, 2, 1) + 0.5 * np.eye(d)}
    z = rng.normal(size=(50, d)) * 2
    direct = np.zeros(len(z))
    for w, mu, cov in zip(gmm["weights"], gmm["means"], gmm["covs"]):
        diff = z - mu
        # p(z) = sum_k pi_k (2 pi)^(-d/2) det(S_k)^(-1/2) exp(-1/2 (z - mu_k)^T S_k^-1 (z - mu_k))
        quad = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        direct += w * (2 * np.pi) ** (-d / 2) / np.sqrt(np.linalg.det(cov)) * np.exp(-quad / 2)
    np.testing.assert_allclose(tasks.gmm_log_density(gmm, z), np.log(direct), rtol=1e-10)


def test_sample_gmm_has_the_mixtures_weights_and_moments():
    _, weights, means, chols = _two_gaussians(1, seed=0)
    gmm = {"weights": weights, "means": means, "covs": chols @ chols.transpose(0, 2, 1)}
    z = tasks.sample_gmm(gmm, 20000, seed=3)
    left = z[:, 0] < 0                                   # the two components barely overlap
    assert abs(left.mean() - 0.3) < 0.015
    np.testing.assert_allclose(z[left].mean(0), means[0], atol=0.05)
    np.testing.assert_allclose(np.cov(z[~left].T), gmm["covs"][1], atol=0.06)
    np.testing.assert_array_equal(z, tasks.sample_gmm(gmm, 20000, seed=3))   # the seed decides


@pytest.mark.parametrize("val, expected", [("blobs", 2), ("between", 1)])
def test_choose_gmm_picks_k_by_validation_log_likelihood(val, expected):
    # Two far-apart blobs train. Validation points from the blobs favour K = 2; validation points
    # midway between them favour the one broad Gaussian of K = 1: the validation codes decide.
    rng = np.random.default_rng(0)
    blobs = lambda n: np.concatenate([rng.normal(-4, 0.5, (n, 2)), rng.normal(4, 0.5, (n, 2))])
    z_train = blobs(200)
    z_val = blobs(50) if val == "blobs" else rng.normal(0, 0.5, (100, 2))
    gmm, scores = tasks.choose_gmm(z_train, z_val, seed=0, k_grid=(1, 2))
    by_hand = {k: tasks.gmm_log_density(tasks.fit_gmm(z_train, k, 0), z_val).mean() for k in (1, 2)}
    assert scores == pytest.approx(by_hand)
    assert len(gmm["weights"]) == expected == max(by_hand, key=by_hand.get)


def test_gmm_of_one_component_is_the_sample_mean_and_covariance_plus_the_ridge():
    # K = 1 needs no EM: mu = mean, S = biased sample covariance + GMM_RIDGE * mean variance * I.
    # Codes of large spread (variance ~ 1e4) show whether the ridge scales with it
    z = np.random.default_rng(4).normal(size=(300, 3)) * np.array([150.0, 80.0, 100.0]) + 7.0
    gmm = tasks.fit_gmm(z, 1, seed=0)
    want = np.cov(z.T, bias=True) + tasks.GMM_RIDGE * z.var(0).mean() * np.eye(3)
    np.testing.assert_allclose(gmm["means"][0], z.mean(0), rtol=1e-10)
    np.testing.assert_allclose(gmm["covs"][0], want, rtol=1e-9)


def test_gmm_keeps_the_start_whose_last_log_likelihood_is_highest(monkeypatch):
    finals = iter([[0.0, 1.0, 5.0], [0.0, 9.0, 1.0], [0.0, 2.0, 7.0]])   # best last: the third
    monkeypatch.setattr(tasks, "_em", lambda z, means, *a: {
        "weights": np.ones(1), "means": np.zeros((1, z.shape[1])), "covs": np.eye(z.shape[1])[None],
        "log_likelihood": next(finals)})
    gmm = tasks.fit_gmm(np.random.default_rng(0).normal(size=(30, 2)), 1, seed=0, starts=3)
    assert gmm["log_likelihood"] == [0.0, 2.0, 7.0]


def test_gmm_log_density_of_points_far_apart_is_finite_and_exact():
    # one point at a component's centre, one 60 sds away (log density ~ -1800): exp() underflows
    # unless each point's log-sum-exp is shifted by its own maximum
    gmm = {"weights": np.array([0.4, 0.6]), "means": np.array([[0.0], [1.0]]), "covs": np.ones((2, 1, 1))}
    z = np.array([[0.0], [60.0]])
    log_n = lambda x, mu: -0.5 * np.log(2 * np.pi) - 0.5 * (x - mu) ** 2
    want = np.logaddexp(np.log(0.4) + log_n(z[:, 0], 0.0), np.log(0.6) + log_n(z[:, 0], 1.0))
    np.testing.assert_allclose(tasks.gmm_log_density(gmm, z), want, rtol=1e-12)
    assert tasks.gmm_log_density(gmm, z[:1]).shape == (1,)          # a single point is enough
    with pytest.raises(ValueError, match="2-D array"):
        tasks.gmm_log_density(gmm, z[:, 0])


def test_kmeans_plus_plus_seeds_are_points_drawn_by_squared_distance():
    # three tight clusters 0.01 apart (all squared distances < 1): each seed lands in a cluster
    # no earlier seed is in, because a point's chance is its D^2 to the nearest seed so far, and
    # the points of a cluster that has a seed have ~0
    cluster = np.array([[0.0, 0.0], [1e-6, 0.0], [0.0, 1e-6]])
    z = np.r_[cluster, cluster + [0.01, 0.0], cluster + [0.0, 0.01]]
    for seed in range(40):
        seeds = tasks._kmeans_plus_plus(z, 3, np.random.default_rng(seed))
        assert all((z == s).all(1).any() for s in seeds)            # seeds are data points
        assert len({tuple(np.round(s, 3)) for s in seeds}) == 3, seed
    same = tasks._kmeans_plus_plus(np.ones((5, 2)), 3, np.random.default_rng(0))   # no spread at all
    assert (same == 1).all()


def test_choose_gmm_tie_goes_to_the_smaller_k(monkeypatch):
    monkeypatch.setattr(tasks, "gmm_log_density", lambda gmm, z: np.zeros(len(z)))   # every K ties
    gmm, scores = tasks.choose_gmm(_blob_codes(), _blob_codes(seed=1), seed=0, k_grid=(3, 1, 2))
    assert len(gmm["weights"]) == 1 and scores == {1: 0.0, 2: 0.0, 3: 0.0}


def test_categorical_prior_checks_its_indices():
    assert np.array_equal(tasks.categorical_prior(np.array([[1, 0]]), 2), [[0.0, 1.0], [1.0, 0.0]])
    for bad in (np.array([1, 0]), np.array([[1.0, 0.0]]), np.zeros((0, 2), int)):
        with pytest.raises(ValueError, match="non-empty 2-D integer"):
            tasks.categorical_prior(bad, 2)


def test_gmm_degenerate_input():
    z = _blob_codes()
    with pytest.raises(ValueError, match="NaN"):
        tasks.fit_gmm(np.r_[z, [[np.nan, 0, 0]]], 2, 0)
    with pytest.raises(ValueError, match="K <= the number of points"):
        tasks.fit_gmm(z[:3], 4, 0)
    assert len(tasks.fit_gmm(z[:4], 4, 0)["weights"]) == 4          # as many points as components
    with pytest.raises(ValueError, match="every dimension"):
        tasks.fit_gmm(np.ones((20, 3)), 2, 0)
    with pytest.raises(ValueError, match="dimensions"):
        tasks.gmm_log_density(tasks.fit_gmm(z, 2, 0), z[:, :2])
    dead = z.copy()
    dead[:, 1] = 0.5                                     # a dead unit: one dimension never moves
    with pytest.warns(RuntimeWarning, match=r"dimension\(s\) \[1\] are constant"):
        gmm = tasks.fit_gmm(dead, 3, 0)
    assert np.isfinite(gmm["log_likelihood"]).all() and np.isfinite(tasks.gmm_log_density(gmm, dead)).all()
    assert np.ptp(tasks.sample_gmm(gmm, 500, 0)[:, 1]) < 0.05   # samples keep it (almost) constant
    dead[0, 1] = 0.5 + 1e-6                              # barely alive: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tasks.fit_gmm(dead, 3, 0)


def test_vq_learned_prior_frequencies_and_samples():
    rng = np.random.default_rng(0)
    n_codes, z_dim = 8, 3
    idx = np.stack([rng.integers(0, 3, 400), rng.choice([1, 5], 400, p=[0.25, 0.75]),
                    np.full(400, 7)], axis=1)              # (400, 3): each dimension its own usage
    freqs = tasks.categorical_prior(idx, n_codes)
    assert freqs.shape == (z_dim, n_codes)
    np.testing.assert_allclose(freqs.sum(1), 1.0)
    assert freqs[1, 5] == np.mean(idx[:, 1] == 5) and freqs[2, 7] == 1.0
    codebook = rng.normal(size=(z_dim, n_codes))
    codes = tasks.sample_categorical(freqs, codebook, 4000, seed=1)
    assert codes.shape == (4000, z_dim)
    for j in range(z_dim):
        values, counts = np.unique(codes[:, j], return_counts=True)
        used = codebook[j, freqs[j] > 0]
        assert set(values) <= set(used)                  # only codebook values the training codes used
        for v, c in zip(values, counts):
            assert abs(c / 4000 - freqs[j, codebook[j] == v][0]) < 0.03
    with pytest.raises(ValueError, match="codebook indices"):
        tasks.categorical_prior(idx + 1, n_codes)


def _low_rank_pixels(n=300, rank=4, seed=0):
    """Images in [0, 1] near a rank-4 subspace, so the top axes are well separated."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, ae.INPUT_DIM)) * np.array([4.0, 3.0, 2.0, 1.0])[:rank, None]
    x = 0.5 + 0.02 * rng.normal(size=(n, rank)) @ basis + 0.002 * rng.normal(size=(n, ae.INPUT_DIM))
    return np.clip(x, 0, 1).astype(np.float32)


def test_pca_axes_codes_and_reconstruction_match_an_svd():
    x = _low_rank_pixels()
    model = ae.build("pca", 3)
    history = ae.fit(model, x, x[:50], progress=False)
    assert len(history["val_loss"]) == 1 and history["seconds"] >= 0
    # independent: the right singular vectors of the centred data (NumPy SVD, not an eigh of C)
    xd = x.astype(np.float64)
    mean = xd.mean(0)
    _, sing, vt = np.linalg.svd(xd - mean, full_matrices=False)
    axes = model.encoder.weight.detach().double().numpy()                       # (Z, D)
    assert np.allclose(np.abs(np.sum(axes * vt[:3], axis=1)), 1, atol=1e-4)    # same axes up to sign
    assert np.allclose(model.bottleneck.variance.numpy(), sing[:3] ** 2 / len(x), rtol=1e-4)
    z = tasks.encode(model, x)
    assert np.allclose(z, (xd - mean) @ axes.T, atol=1e-4)                      # z = V^T (x - m)
    want = np.clip(mean + (xd - mean) @ vt[:3].T @ vt[:3], ae.PCA_EPS, 1 - ae.PCA_EPS)
    assert np.allclose(tasks.batched(model, x), want, atol=1e-4)
    bce = -(xd * np.log(want) + (1 - xd) * np.log(1 - want)).sum(1)             # by hand, clipped
    assert np.allclose(tasks.per_image_bce(model, x), bce, rtol=1e-4)
    # the sign convention makes the fit reproducible: each axis's largest entry is positive
    assert (axes[np.arange(3), np.abs(axes).argmax(1)] > 0).all()


def test_pca_axes_do_not_depend_on_the_eigensolvers_signs(monkeypatch):
    x = _low_rank_pixels()
    model = ae.build("pca", 3)
    ae.fit(model, x, x[:50], progress=False)
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda c: (real(c)[0], -real(c)[1]))   # every sign flipped
    flipped = ae.build("pca", 3)
    ae.fit(flipped, x, x[:50], progress=False)
    assert torch.allclose(flipped.encoder.weight, model.encoder.weight, atol=1e-6)


def test_pca_eps_keeps_bce_finite_and_is_half_a_grey_level():
    model = ae.build("pca", 2)
    x = _low_rank_pixels(n=100)
    ae.fit(model, x, x, progress=False)
    far = torch.zeros(1, 2) + 1e3                          # a code far outside: reconstruction saturates
    out = model.decode(far)
    assert out.min() == pytest.approx(0.5 / 255) and out.max() == pytest.approx(1 - 0.5 / 255)


def test_pca_fit_reports_its_one_epoch_like_the_training_loop():
    # run.py's status line reads epoch / epochs of every report, pca's included
    x, reports, loop = _low_rank_pixels(), [], []
    start = time.perf_counter()
    history = ae.fit(ae.build("pca", 3), x, x[:50], progress=reports.append)
    ae.fit(_build("shallow", latent_dim=2), x, x[:50], epochs=1, batch_size=50, progress=loop.append)
    assert len(reports) == 1 and reports[0]["epoch"] == reports[0]["epochs"] == 1
    assert 0 < reports[0]["seconds"] <= history["seconds"] < time.perf_counter() - start
    assert reports[0].keys() == loop[0].keys()


def test_every_generative_model_samples_on_the_device_of_its_weights():
    # "meta" tensors have a device but no data: the device flow is checked without a GPU
    for name in [n for n, c in ae.CONTESTANTS.items() if c.samples]:     # pca too
        model = ae.build(name, 2).to("meta").eval()
        assert model.sample(3).device.type == "meta", name


def test_pca_loss_is_the_summed_bce_per_image_like_every_contestant():
    # fit's history (train and val loss) compares pca with the nine: the same unit, nats per image
    x = torch.from_numpy(_low_rank_pixels())
    model = ae.build("pca", 3)
    ae.fit(model, x, x[:50], progress=False)
    with torch.no_grad():
        by_hand = np.mean([float(F.binary_cross_entropy(model(x[i:i + 1]), x[i:i + 1], reduction="sum"))
                           for i in range(len(x))])
    loss = ae.evaluate(model, x)
    assert loss["loss"] == pytest.approx(by_hand, rel=1e-5) and loss["recon"] == pytest.approx(by_hand, rel=1e-5)


def test_pca_needs_more_images_than_axes():
    with pytest.raises(ValueError, match="more than 3 training images"):
        ae.fit(ae.build("pca", 3), _low_rank_pixels(n=3), _low_rank_pixels(n=3), progress=False)
    ae.fit(ae.build("pca", 3), _low_rank_pixels(n=4), _low_rank_pixels(n=4), progress=False)


def _brute_ranks(x):
    """rank_i = 1 + #(x_j < x_i) + (#(x_j == x_i) - 1) / 2, pair by pair."""
    x = np.asarray(x, dtype=float)
    return np.array([1 + (x < v).sum() + ((x == v).sum() - 1) / 2 for v in x])


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_against_brute_force_ranks(ties):
    rng = np.random.default_rng(3)
    a = rng.integers(0, 6, 80) if ties else rng.normal(size=80)
    b = a + rng.normal(size=80) * 2
    ra, rb = _brute_ranks(a), _brute_ranks(b)
    assert np.array_equal(tasks._average_ranks(a), ra)
    assert tasks.spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1], abs=1e-12)
    if not ties:     # the classic formula holds without ties: 1 - 6 sum d^2 / (n (n^2 - 1))
        n = len(a)
        assert tasks.spearman(a, b) == pytest.approx(1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1)))
    assert tasks.spearman(a, -np.exp(a)) == pytest.approx(-1)     # any decreasing map: exactly -1


def test_spearman_degenerate_inputs():
    with pytest.warns(RuntimeWarning, match="constant"):
        assert math.isnan(tasks.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="finite"):
        tasks.spearman([1, np.nan, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="same length"):
        tasks.spearman([1, 2, 3], [1, 2])


def test_ink_is_the_summed_intensity():
    x = np.zeros((3, ae.INPUT_DIM), np.float32)
    x[1, :10], x[2, :] = 0.5, 1.0
    assert np.array_equal(tasks.ink(x), [0.0, 5.0, 1024.0])


class _ScoreStub(nn.Module):
    """Stands in for an anomaly model: reconstructs x_hat = x * gain, so both scores are known."""

    def __init__(self, gain):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(gain), requires_grad=False)

    def forward(self, x):
        return (x * self.gain).clamp(1e-6, 1 - 1e-6)

    bottleneck = type("Plain", (), {"stochastic": False})()   # no likelihood bounds, no codebook

    def encode(self, x, sample=True):
        return x[:, 500:502] * self.gain                       # a 2-d code for the code density


def test_task_anomaly_positives_keys_ink_and_correlations():
    rng = np.random.default_rng(0)
    y = np.arange(300) % 10
    x = (rng.random((300, ae.INPUT_DIM)) * (0.2 + 0.06 * y[:, None])).astype(np.float32)
    data = {"x_test": x, "y_test": y, "x_all": x, "y_all": y, "train_idx": np.arange(200), "val_idx": np.arange(200, 300)}
    anomaly = {(2, 1): {"a": _ScoreStub(0.9), "pca": _ScoreStub(0.5)},
               (2, 3): {"a": _ScoreStub(0.7), "pca": _ScoreStub(0.5)},
               (20, 1): {"a": _ScoreStub(0.3), "pca": _ScoreStub(0.5)}}
    m, figs = run.task_anomaly(anomaly, data, seed=42)
    curves = figs["roc"]
    ink = x.astype(np.float64).sum(1)
    for (latent, digit), models in anomaly.items():
        suffix = f"_digit_{digit}" + ("" if latent == 2 else f"_z{latent}")
        for name, model in models.items():
            x_hat = model(torch.from_numpy(x)).double().numpy()
            bce = -(x * np.log(x_hat) + (1 - x) * np.log(1 - x_hat)).sum(1)
            signed = (x_hat - x).sum(1)
            assert m["anomaly_auc" + suffix][name] == pytest.approx(_pairwise_auc(y == digit, bce), abs=1e-6)
            assert m["anomaly_auc_signed_score" + suffix][name] == pytest.approx(
                _pairwise_auc(y == digit, signed), abs=1e-6)
            assert m["anomaly_ink_spearman" + suffix][name] == pytest.approx(tasks.spearman(bce, ink), abs=1e-6)
            assert m["anomaly_ink_spearman_signed_score" + suffix][name] == pytest.approx(
                tasks.spearman(signed, ink), abs=1e-6)
            if (latent, digit) == (2, 1):   # the summed BCE in bits (nats / ln 2), beside L(x)'s bits
                assert m["anomaly_bce_bits_mean"][name] == pytest.approx(bce.mean() / math.log(2))
                assert m["anomaly_bce_bits_std"][name] == pytest.approx(bce.std() / math.log(2))
        # ink ranks low ink as anomalous, whatever the model, under both scores' names
        assert m["anomaly_auc" + suffix]["ink"] == pytest.approx(_pairwise_auc(y == digit, -ink))
        assert m["anomaly_auc_signed_score" + suffix]["ink"] == m["anomaly_auc" + suffix]["ink"]
        assert "anomaly_ink_spearman" + suffix not in m or "ink" not in m["anomaly_ink_spearman" + suffix]
    # the images' own lengths in bits: H(x) in nats / ln 2, and the PNG files
    h_bits, png = tasks.entropy(x) / math.log(2), tasks.png_bits(x)
    assert m["anomaly_bce_bits_mean"]["entropy"] == pytest.approx(h_bits.mean())
    assert m["anomaly_bce_bits_std"]["entropy"] == pytest.approx(h_bits.std())
    assert m["anomaly_bce_bits_mean"]["png"] == pytest.approx(png.mean())
    assert m["anomaly_bce_bits_std"]["png"] == pytest.approx(png.std())
    # the headline keys are the article's setting: digit 1 at latent 2, never latent 20 or digit 3
    for metric in ("anomaly_auc", "anomaly_auc_signed_score", "anomaly_auprc", "anomaly_ink_spearman"):
        assert m[metric] == m[metric + "_digit_1"]
    assert set(curves) == {"a", "pca", "ink"} and len(curves["ink"]) == 1
    # the ROC figure's curves: (legend, fpr, tpr, AUROC) of the article's setting
    for name, model in anomaly[2, 1].items():
        x_hat = model(torch.from_numpy(x)).double().numpy()
        bce = -(x * np.log(x_hat) + (1 - x) * np.log(1 - x_hat)).sum(1)
        (label, fpr, tpr, auc), (label2, fpr2, tpr2, auc2) = curves[name]
        want_fpr, want_tpr, _ = tasks.roc_curve(y == 1, bce)
        assert (label, label2) == ("summed BCE", "signed (article)") and auc == m["anomaly_auc"][name]
        np.testing.assert_allclose(fpr, want_fpr)
        np.testing.assert_allclose(tpr, want_tpr)
        assert auc2 == m["anomaly_auc_signed_score"][name] and len(fpr2) == len(tpr2)
    (label, fpr, tpr, auc), = curves["ink"]
    assert label == "low ink" and auc == m["anomaly_auc"]["ink"]
    np.testing.assert_allclose(tpr, tasks.roc_curve(y == 1, -ink)[1])


def test_dead_units_counts_units_below_a_millionth_of_the_widest_span():
    z = np.zeros((10, 4))
    z[:, 0] = np.linspace(0, 1e3, 10)          # the widest unit spans 1,000
    z[:, 1] = np.linspace(0, 1e-4, 10)         # 1e-7 of it: constant
    z[:, 2] = np.linspace(0, 1e-3, 10)         # exactly DEAD_SPAN of it: constant (<=)
    z[:, 3] = np.linspace(0, 2e-3, 10)         # twice that: alive
    assert tasks.dead_units(z) == 2 and tasks.dead_units(z[:, [0, 3]]) == 0
    assert tasks.dead_units(np.zeros((10, 3), np.float32)) == 3     # nothing varies: all dead


def _exact_newton_reference(z_tr, y_tr, lam):
    """(W, loss) of the probe's problem on all d standardised features, by plain Newton with torch
    autograd's full Hessian and step halving: no span, no CG, nothing of tasks.py's solver."""
    std = z_tr.std(0)
    std[std == 0] = 1.0
    x = torch.tensor(np.c_[(z_tr - z_tr.mean(0)) / std, np.ones(len(z_tr))])
    y = torch.tensor(y_tr)
    ridge = torch.full((x.shape[1], 1), lam, dtype=torch.float64)
    ridge[-1] = tasks.BIAS_RIDGE
    loss = lambda w: F.cross_entropy(x @ w, y) + 0.5 * (ridge * w ** 2).sum()
    gradient = lambda w: torch.autograd.grad(loss(w.requires_grad_()), w)[0]
    w = torch.zeros(x.shape[1], tasks.N_CLASSES, dtype=torch.float64)
    for _ in range(100):
        grad = gradient(w)
        if grad.abs().max() < 1e-11:
            break
        hess = torch.autograd.functional.hessian(loss, w, vectorize=True).reshape(w.numel(), w.numel())
        step = torch.linalg.solve(hess, grad.reshape(-1)).reshape(w.shape)
        t = 1.0
        while loss(w - t * step) > loss(w) and t > 1e-8:
            t /= 2
        w = (w - t * step).detach()
    assert gradient(w).abs().max() < 1e-9                       # precondition: the reference converged
    return w.detach().numpy(), loss


@pytest.mark.parametrize("n, d", [(20, 30), (300, 8)], ids=["d>n", "d<n"])
@pytest.mark.parametrize("lam", [1e-1, 1e-3])
def test_span_probe_matches_exact_newton_on_all_features(n, d, lam):
    rng = np.random.default_rng(7)
    y = np.r_[np.arange(n) % tasks.N_CLASSES, rng.integers(0, tasks.N_CLASSES, 400)]   # all classes train
    z = 3 * rng.normal(size=(tasks.N_CLASSES, d))[y] + 2 * rng.normal(size=(len(y), d))
    (z_tr, z_va, z_te), (y_tr, y_va, y_te) = np.split(z, [n, n + 200]), np.split(y, [n, n + 200])
    w_ref, loss = _exact_newton_reference(z_tr, y_tr, lam)
    design, w = tasks._probe_weights(z_tr, y_tr, z_va, y_va, [lam])
    assert w.shape == (d + 1, tasks.N_CLASSES)                  # weights of all d features, and the bias
    wt = torch.tensor(w, requires_grad=True)
    loss(wt).backward()
    assert wt.grad.abs().max() < tasks.NEWTON_TOL               # converged, in the d features' gradient
    # both stop at a gradient of ~1e-7, which leaves ~1e-11 in the objective and, with the weak
    # penalty, up to ~1e-5 in a probability
    assert loss(wt).item() == pytest.approx(loss(torch.tensor(w_ref)).item(), abs=1e-10)
    softmax = lambda logits: np.exp(logits - logits.max(1, keepdims=True)) / np.exp(
        logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)
    x_te = np.c_[(z_te - z_tr.mean(0)) / z_tr.std(0), np.ones(len(z_te))]
    np.testing.assert_allclose(softmax(design(z_te) @ w), softmax(x_te @ w_ref), atol=1e-4)
    ref_accuracy = np.mean((x_te @ w_ref).argmax(1) == y_te)
    assert tasks.linear_probe(z_tr, y_tr, z_va, y_va, z_te, y_te, l2_grid=[lam]) == ref_accuracy




def test_boundary_legible_means_more_than_0_9():
    def legibility(top):
        probs = np.full((1, 10), (1 - top) / 9)
        probs[0, 3] = top
        return tasks.sample_quality(probs, np.eye(3), np.eye(3)[::-1])["legibility"]
    assert [legibility(t) for t in (0.8999, 0.9, 0.9001)] == [0.0, 0.0, 1.0]


def test_boundary_early_stopping_patience_3_and_a_tie_is_no_improvement():
    lr, epochs = 0.1, 20
    th = _ThresholdNet().thresholds(epochs, lr)
    flip = lambda e: (th[e - 1] + th[e]) / 2       # x here is predicted 1 from epoch e on
    # validation accuracy after epochs 1..5: 3, 3 (a tie), 2, 2, 4 of 6, then constant
    x_val, y_val = np.c_[[flip(1), flip(2), flip(2), flip(3), flip(5), flip(5)]], np.array([1, 0, 1, 0, 1, 1])
    # test accuracy of the weights after epoch 1, 2, 5 and 20: 1, 2, 3 and 4 of 4
    x_test, y_test = np.c_[[flip(1), flip(2), flip(5), flip(10)]], np.ones(4, int)
    x_train, y_train = np.c_[np.full(32, 10.0)], np.ones(32, int)
    got = lambda **kw: tasks.train_classifier(_ThresholdNet(), x_train, y_train, x_val, y_val, x_test, y_test,
                                              seed=0, epochs=epochs, batch_size=32, lr=lr, **kw)
    assert tasks.ARTICLES_PROBE_PATIENCE == 3
    assert got() == 0.25                 # stops after epoch 4 (ties and falls), keeps epoch 1
    assert got(patience=4) == 0.75       # one more epoch reaches the rise at epoch 5


def test_science_denoising_noise_std_is_0_5_not_the_variance():
    # a grey image: x' = clip(0.5 + s eps, 0, 1) is clipped where |eps| > 0.5 / s, which happens
    # to 2 Phi(-1) = 0.317 of the pixels for s = 0.5, 0.480 for the variance reading s = sqrt(0.5)
    # and 0.046 for s = 0.25
    model = _build("denoising").train()
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model(torch.full((64, ae.INPUT_DIM), 0.5))
    clipped = float(((seen[0] == 0) | (seen[0] == 1)).float().mean())
    want = math.erfc(0.5 / ae.DENOISING_STD / math.sqrt(2))
    assert ae.DENOISING_STD == 0.5 and abs(clipped - want) < 0.01       # 65,536 pixels: SE 0.002
    assert abs(float(seen[0].mean()) - 0.5) < 0.01


def test_science_frechet_non_commuting_covariances():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3)) @ np.array([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [0.0, 0.3, 1.0]])
    b = rng.normal(size=(300, 3)) @ np.array([[0.5, 1.0, 0.0], [0.0, 1.0, 0.8], [0.7, 0.0, 0.4]]) + 1.0
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert not np.allclose(c1 @ c2, c2 @ c1, atol=0.1)         # precondition: they do not commute
    # independent reference: tr sqrt(C1 C2) = sum of the square roots of C1 C2's eigenvalues
    root_trace = np.sqrt(np.linalg.eigvals(c1 @ c2).real.clip(0)).sum()
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1 + c2) - 2 * root_trace
    sqrt_psd = lambda c: (lambda w, v: (v * np.sqrt(w)) @ v.T)(*np.linalg.eigh(c))
    wrong = want + 2 * root_trace - 2 * np.trace(sqrt_psd(c1) @ sqrt_psd(c2))   # commuting formula
    assert abs(wrong - want) > 0.1                              # the test can tell them apart
    assert tasks.frechet_distance(a, b) == pytest.approx(want, abs=1e-8)


def test_science_vq_each_loss_term_reaches_only_its_parameters():
    torch.manual_seed(0)
    beta = 0.25                          # != 1, so swapped stop-gradients change the gradients
    vq = ae.VectorQuantised(4, n_codes=8, beta=beta)
    h = torch.randn(6, 4, requires_grad=True)
    z, penalty, parts = vq.regularised(h, None)
    q = vq.quantise(h).detach()
    penalty.backward()
    # d/dh [L_vq + beta L_c] = beta 2 (h - q) / B: only the commitment term reaches the encoder
    assert torch.allclose(h.grad, beta * 2 * (h - q).detach() / 6, atol=1e-6)
    # d/de [L_vq] = -2 (h - e) / B summed over the elements that chose e: only L_vq moves the codebook
    idx = (h.detach().unsqueeze(2) - vq.codebook.detach()).abs().argmin(dim=2)
    want = torch.zeros_like(vq.codebook)
    for i in range(6):
        for j in range(4):
            want[j, idx[i, j]] += -2 * (h[i, j] - q[i, j]).detach() / 6
    assert torch.allclose(vq.codebook.grad, want, atol=1e-6)
    assert parts["vq"] == pytest.approx(parts["commitment"].item()) == pytest.approx(((h - q) ** 2).sum().item() / 6)
    # the code passes the decoder's gradient to h unchanged, and none to the codebook
    h.grad, vq.codebook.grad = None, None
    w = torch.randn(6, 4)
    (z * w).sum().backward()
    assert torch.equal(h.grad, w) and (vq.codebook.grad is None or not vq.codebook.grad.any())


def test_science_umap_pca_init_takes_the_two_largest_axes():
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    x = (rng.normal(size=(300, 6)) * [5.0, 2.0, 0.5, 0.4, 0.3, 0.2]) @ rotation.T + 3.0
    y = umap_lite.pca_init(x, np.random.default_rng(1))
    # independent reference: the SVD of the centred data; each axis up to sign, shift and scale
    xc = x - x.mean(0)
    u = np.linalg.svd(xc, full_matrices=False)[2][:2]
    for axis in range(2):
        assert abs(np.corrcoef(y[:, axis], xc @ u[axis])[0, 1]) > 0.9999
    assert np.allclose(y.min(0), 0, atol=1e-5) and np.allclose(y.max(0), umap_lite.INIT_SCALE, atol=1e-5)


class _FixedRng:
    """Stands in for np.random.Generator in _sgd_step: the negative samples are the points `k`, in turn."""

    def __init__(self, k):
        self.k = np.atleast_1d(k)

    def integers(self, low, high, size):
        return np.resize(self.k, size)


# each end of an edge or a negative sample at distance exactly 1 from point 0 (a rule keyed to
# d^2 == 1 would show), and points at no special distance (a power of d^2 that is wrong shows)
_SGD_STARTS = {"unit": [[0.25, 0.25, 1.25, -0.75], [-0.5, 0.5, -0.5, 0.5]],
               "generic": [[0.1, 0.4, 1.2, -0.5], [-0.2, 0.05, -0.6, 0.7]]}


@pytest.mark.parametrize("start", _SGD_STARTS)
@pytest.mark.parametrize("n_neg", [0, 1, 2])
def test_science_umap_sgd_step_is_the_gradient_of_log_v(n_neg, start):
    # two points joined by an edge, and points 2 and 3 as the negative samples of point 0 (the
    # first n_neg of them); off the origin (a gather along the wrong axis would read x for y),
    # and close enough that nothing is clipped
    a, b, alpha = 1.58, 0.9, 0.5
    start = np.array(_SGD_STARTS[start], np.float32)                      # (2, n)
    pos = start.copy()
    umap_lite._sgd_step(pos, np.array([0]), np.array([1]), np.array([n_neg]), a, b, alpha, _FixedRng([2, 3]))
    y = torch.tensor(start.T, dtype=torch.float64, requires_grad=True)    # (n, 2)
    d2 = lambda i, j: ((y[i] - y[j]) ** 2).sum()
    log_v = lambda i, j: -torch.log1p(a * d2(i, j) ** b)
    # ascent on log v_01 moves both ends; on log(1 - v_0k) (eps 1e-3 beside d^2 aside) only y_0
    objective = log_v(0, 1) + sum(torch.log(1 - torch.exp(log_v(0, k))) for k in (2, 3)[:n_neg])
    grad = torch.autograd.grad(objective, y)[0]
    grad[2:] = 0.0                                  # the negative samples stay put
    np.testing.assert_allclose(pos - start, alpha * grad.numpy().T, rtol=3e-3, atol=1e-6)


def test_umap_knn_takes_the_k_nearest_of_many_points_at_k_1_and_k_30():
    # 1,500 points: enough that a partition at the wrong position (k or k - 2) shows in some row
    x = np.random.default_rng(2).normal(size=(1500, 2))
    for k in (1, 30):                           # k = 1 is allowed (the smallest neighbourhood)
        np.testing.assert_array_equal(umap_lite.knn(x, k)[0], _brute_knn(x, k)[0])


def test_umap_smooth_knn_is_scale_equivariant_and_works_in_float64():
    _, dist = umap_lite.knn(np.random.default_rng(1).normal(size=(200, 5)), 9)
    rho, sigma = umap_lite.smooth_knn(dist, 10)
    for c in (1e-3, 1e3):          # sigma's search starts at 1: it must shrink, and grow, to fit
        rho_c, sigma_c = umap_lite.smooth_knn(c * dist, 10)
        np.testing.assert_allclose(rho_c, c * rho, rtol=1e-12)
        np.testing.assert_allclose(sigma_c, c * sigma, rtol=1e-9)
    rho32, sigma32 = umap_lite.smooth_knn(dist.astype(np.float32), 10)
    assert rho32.dtype == sigma32.dtype == np.float64
    rho64, sigma64 = umap_lite.smooth_knn(dist.astype(np.float32).astype(np.float64), 10)
    np.testing.assert_array_equal(sigma32, sigma64)


def _duplicated_points():
    """60 random points in 3-D, then 4 more copies of the first and 20 of the second."""
    x = np.random.default_rng(2).normal(size=(60, 3))
    return np.concatenate([x, np.repeat(x[:1], 4, axis=0), np.repeat(x[1:2], 20, axis=0)])


def test_umap_sigma_floor_is_a_fraction_of_the_points_mean_distance_or_the_global_one():
    x = _duplicated_points()
    _, dist = umap_lite.knn(x, 9)
    rho, sigma = umap_lite.smooth_knn(dist, 10)
    # 5 copies: 4 zero distances and the nearest other point (excess 0) already sum past
    # log2(10) at any sigma, so bisection runs to 0 and the floor holds: the point's own mean
    five = np.flatnonzero((x == x[0]).all(axis=1))
    assert len(five) == 5 and np.all(rho[five] > 0)
    np.testing.assert_allclose(sigma[five], umap_lite.MIN_SIGMA_SCALE * dist[five].mean(axis=1), rtol=1e-12)
    # 21 copies: every neighbour at 0, rho = 0, and its own mean is 0: the global mean instead
    clump = np.flatnonzero((x == x[1]).all(axis=1))
    assert np.all(rho[clump] == 0)
    np.testing.assert_allclose(sigma[clump], umap_lite.MIN_SIGMA_SCALE * dist.mean(), rtol=1e-12)
    assert np.median(sigma) > 100 * umap_lite.MIN_SIGMA_SCALE * dist.mean()    # a floor, not the rule


def test_umap_fuzzy_graph_drops_edges_whose_weight_underflows_to_zero():
    x = _duplicated_points()
    idx, dist = umap_lite.knn(x, 9)
    rho, sigma = umap_lite.smooth_knn(dist, 10)
    n = len(x)
    p = np.zeros((n, n))
    p[np.repeat(np.arange(n), 9), idx.ravel()] = np.exp(-np.maximum(dist - rho[:, None], 0) / sigma[:, None]).ravel()
    union = 1 - (1 - p) * (1 - p.T)                         # 0 for pairs that are not listed
    listed = np.zeros((n, n), bool)
    listed[np.repeat(np.arange(n), 9), idx.ravel()] = True
    assert np.any((listed | listed.T) & (union == 0))     # the tiny floored sigmas underflow some
    head, tail, weight = umap_lite.fuzzy_graph(idx, dist, rho, sigma)
    assert np.all(weight > 0) and len(weight) == np.count_nonzero(union)


def _fit_ab_by_lbfgs(min_dist, spread):
    """a, b by torch's L-BFGS on the same least-squares problem: an independent minimiser."""
    x = torch.linspace(0, 3 * spread, 300, dtype=torch.float64)[1:]
    psi = torch.where(x < min_dist, 1.0, torch.exp(-(x - min_dist) / spread))
    p = torch.ones(2, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], max_iter=1000, tolerance_grad=1e-15, tolerance_change=1e-20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((1 / (1 + p[0] * x ** (2 * p[1])) - psi) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return p.detach().numpy()


@pytest.mark.parametrize("min_dist, spread", [(0.1, 1.0), (0.0, 1.0), (1.0, 1.0), (0.3, 0.5), (0.1, 2.0)])
def test_umap_fit_ab_agrees_with_an_independent_minimiser(min_dist, spread):
    np.testing.assert_allclose(umap_lite.fit_ab(min_dist, spread), _fit_ab_by_lbfgs(min_dist, spread), rtol=1e-7)


def test_umap_pca_init_is_the_signed_top_two_projection_scaled_plus_the_seeded_jitter():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        rotation = np.linalg.qr(rng.normal(size=(5, 5)))[0]
        shift = [3.0, -7.0, 1.0, 20.0, 0.0]                 # unequal column means
        x = (rng.normal(size=(200, 5)) * [6.0, 3.0, 1.0, 0.5, 0.2]) @ rotation.T + shift
        y = umap_lite.pca_init(x, np.random.default_rng(1))
        # reference: the SVD of the column-centred data, each axis signed so that its largest
        # loading is positive, y / max|y| + N(0, 1e-4) jitter, each axis mapped onto [0, 10]
        xc = x - x.mean(axis=0)
        axes = np.linalg.svd(xc, full_matrices=False)[2][:2]                 # (2, d)
        axes *= np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])[:, None]
        p = xc @ axes.T
        p = p / np.abs(p).max() + np.random.default_rng(1).normal(scale=1e-4, size=p.shape)
        np.testing.assert_allclose(y, 10 * (p - p.min(0)) / (p.max(0) - p.min(0)), atol=1e-5)
    x32 = x.astype(np.float32)                              # computed in float64 whatever comes in
    np.testing.assert_array_equal(umap_lite.pca_init(x32, np.random.default_rng(1)),
                                  umap_lite.pca_init(x32.astype(np.float64), np.random.default_rng(1)))


def test_umap_optimize_samples_an_edge_every_w_max_over_w_epochs_with_five_negatives_each(monkeypatch):
    n_epochs, seen = 9, []
    def spy(pos, i, j, n_neg, a, b, alpha, rng):     # the epoch from the learning rate 1 - t / T
        epoch = round((1 - float(alpha)) * n_epochs)
        seen.extend((epoch, int(h), int(nn)) for h, nn in zip(i, n_neg))
    monkeypatch.setattr(umap_lite, "_sgd_step", spy)
    head, tail = np.array([0, 1, 2]), np.array([1, 2, 3])
    y = np.zeros((4, 2), np.float32)
    out = umap_lite.optimize(y, head, tail, np.array([1.0, 0.5, 0.25]), 1.58, 0.9, n_epochs,
                             np.random.default_rng(0))
    assert out is y and out.dtype == np.float32
    epochs = {h: [e for e, hh, _ in seen if hh == h] for h in range(3)}
    # weight w is sampled at epochs w_max / w, 2 w_max / w, ... up to the last epoch
    assert epochs == {0: [1, 2, 3, 4, 5, 6, 7, 8], 1: [2, 4, 6, 8], 2: [4, 8]}
    for h in range(3):                               # NEG_RATE negatives per sample on average
        negatives = sum(nn for _, hh, nn in seen if hh == h)
        assert abs(negatives - umap_lite.NEG_RATE * len(epochs[h])) <= 1


def test_umap_sgd_step_clips_every_component_at_plus_and_minus_four():
    # a huge a makes both forces far stronger than 4 at this short distance; point 0's pull
    # (towards 1) and push (away from 2, its negative sample) both point +x and -y
    a, b, alpha = 1e12, 3.0, 0.5
    start = np.array([[0.0, 0.007, -0.007], [0.0, -0.007, 0.007]], np.float32)
    pos = start.copy()
    umap_lite._sgd_step(pos, np.array([0]), np.array([1]), np.array([1]), a, b, alpha, _FixedRng(2))
    clip = umap_lite.GRAD_CLIP
    np.testing.assert_allclose(pos - start, alpha * np.array([[2 * clip, -clip, 0], [-2 * clip, clip, 0]]),
                               rtol=1e-6)


def test_umap_sgd_step_leaves_coincident_points_in_place_without_warnings():
    pos = np.array([[0.5, 0.5, 2.0], [1.0, 1.0, 3.0]], np.float32)     # points 0 and 1 coincide
    before = pos.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # 0 ** (b - 1) must not warn
        umap_lite._sgd_step(pos, np.array([0]), np.array([1]), np.array([1]), 1.58, 0.9, 1.0, _FixedRng(1))
    np.testing.assert_array_equal(pos, before)


def test_umap_sgd_step_draws_negative_samples_from_all_points():
    asked = []
    class Recording:
        def integers(self, low, high, size):
            asked.append((low, high))
            return np.zeros(size, np.int64)
    pos = np.random.default_rng(0).random((2, 7)).astype(np.float32)
    umap_lite._sgd_step(pos, np.array([0, 3]), np.array([1, 4]), np.array([2, 1]), 1.58, 0.9, 1.0, Recording())
    assert asked == [(0, 7)]


def test_umap_embed_accepts_every_parameter_at_its_bounds():
    x = np.random.default_rng(0).normal(size=(16, 3))
    for kwargs in ({"n_neighbors": 2}, {"n_neighbors": 15}, {"min_dist": 0.0}, {"min_dist": 1.0},
                   {"n_epochs": 1}):
        y = umap_lite.embed(x, **{"n_epochs": 5, **kwargs})
        assert y.shape == (16, 2) and np.all(np.isfinite(y))
    with pytest.raises(ValueError, match="more than n_neighbors"):
        umap_lite.embed(x, n_neighbors=16, n_epochs=5)
    import inspect
    defaults = {k: p.default for k, p in inspect.signature(umap_lite.embed).parameters.items()}
    assert defaults == {"x": inspect.Parameter.empty, "n_neighbors": 15, "min_dist": 0.1, "n_epochs": None,
                        "seed": 0}
    assert inspect.signature(umap_lite.trustworthiness).parameters["k"].default == 15


def test_umap_embed_wiring_neighbours_default_epochs_and_the_weakest_edge_kept(monkeypatch):
    seen = {}
    real_knn = umap_lite.knn
    monkeypatch.setattr(umap_lite, "knn", lambda x, k: seen.update(k=k) or real_knn(x, k))
    monkeypatch.setattr(umap_lite, "optimize", lambda y, head, tail, weight, a, b, n_epochs, rng:
                        seen.update(weight=weight, n_epochs=n_epochs) or y)
    monkeypatch.setattr(umap_lite, "SMALL_N", 20)
    rng = np.random.default_rng(0)
    umap_lite.embed(rng.normal(size=(20, 3)), n_neighbors=5)
    assert seen["k"] == 4 and seen["n_epochs"] == umap_lite.EPOCHS_SMALL   # the point itself counts
    umap_lite.embed(rng.normal(size=(21, 3)), n_neighbors=5)
    assert seen["n_epochs"] == umap_lite.EPOCHS_LARGE
    # an edge is kept when it would be sampled at least once: weight >= max / n_epochs
    monkeypatch.setattr(umap_lite, "fuzzy_graph", lambda *a: (np.arange(3), np.array([1, 2, 0]),
                                                             np.array([1.0, 0.25, 0.2499])))
    umap_lite.embed(rng.normal(size=(21, 3)), n_neighbors=5, n_epochs=4)
    np.testing.assert_array_equal(seen["weight"], [1.0, 0.25])


def test_umap_trustworthiness_at_the_ends_of_k_and_across_blocks(monkeypatch):
    rng = np.random.default_rng(7)
    x_high, x_low = rng.normal(size=(20, 4)), rng.normal(size=(20, 2))
    for k in (1, 9):                                        # 1 <= k < n / 2 = 10
        want = _slow_trustworthiness(x_high, x_low, k)
        assert umap_lite.trustworthiness(x_high, x_low, k=k) == pytest.approx(want, abs=1e-12)
    monkeypatch.setattr(umap_lite, "TRUST_BLOCK_CELLS", 3 * 3 * 20)      # blocks of 3 rows
    want = _slow_trustworthiness(x_high, x_low, 3)
    assert umap_lite.trustworthiness(x_high, x_low, k=3) == pytest.approx(want, abs=1e-12)


def test_umap_integer_points_are_floats_and_bad_rows_are_counted_and_named():
    xi = np.random.default_rng(0).integers(0, 50, size=(40, 3))
    np.testing.assert_array_equal(umap_lite.knn(xi, 3)[1], umap_lite.knn(xi.astype(np.float64), 3)[1])
    np.testing.assert_array_equal(umap_lite.knn(xi > 25, 3)[1], umap_lite.knn((xi > 25).astype(float), 3)[1])
    x = np.zeros((10, 2))
    x[[1, 3, 4, 5, 6, 8, 9], 1] = np.nan
    with pytest.raises(ValueError, match=r"x has NaN or infinite values in 7 rows \(first: \[1, 3, 4, 5, 6\]\)"):
        umap_lite.knn(x, 2)


def test_fit_defaults_are_the_protocols():
    import inspect
    defaults = {k: p.default for k, p in inspect.signature(ae.fit).parameters.items()}
    assert (defaults["epochs"], defaults["batch_size"], defaults["lr"], defaults["seed"]) == (60, 256, 1e-3, 42)
    assert defaults["progress"] is True


def test_fit_train_loss_is_the_mean_over_images_of_uneven_batches():
    # shallow has no BatchNorm and no noise: with lr 0 every batch sees the same weights, so the
    # epoch's training loss is the mean per-image loss over all 10 images (batches of 4, 4, 2)
    model, x = _build("shallow", latent_dim=3), _pixels(10, seed=3)
    history = ae.fit(model, x, _pixels(4), epochs=1, batch_size=4, lr=0.0, progress=False)
    with torch.no_grad():
        want = float(torch.stack([_hand_bce(model(x[i:i + 1]), x[i:i + 1]) for i in range(10)]).mean())
    assert history["train_loss"][0] == pytest.approx(want, rel=1e-5)
    assert 0 < history["seconds"] < 60


@pytest.mark.parametrize("epochs, batch_size, ok", [(1, 2, True), (0, 16, False), (1, 1, False),
                                                    (1.0, 16, False), (1, 2.0, False)])
def test_fit_epochs_and_batch_size_each_checked_at_their_edge(epochs, batch_size, ok):
    run_fit = lambda: ae.fit(_build("shallow", latent_dim=2), _pixels(4), _pixels(2), epochs=epochs,
                             batch_size=batch_size, progress=False)
    if ok:
        assert len(run_fit()["val_loss"]) == 1
    else:
        with pytest.raises(ValueError, match="epochs >= 1 and batch_size >= 2"):
            run_fit()


@pytest.mark.parametrize("train, ok", [
    (np.ones((2, ae.INPUT_DIM)), True),                               # float64, exactly 1, 2 rows
    (np.ones((1, ae.INPUT_DIM)), False),                              # one row
    (np.full((4, ae.INPUT_DIM), 1.0001), False),
    (np.r_[np.full((1, ae.INPUT_DIM), np.nan), np.zeros((3, ae.INPUT_DIM))], False),
    (np.full((4, ae.INPUT_DIM), -0.0001), False),
])
def test_fit_pixels_checked_at_their_edges(train, ok):
    run_fit = lambda: ae.fit(_build("shallow", latent_dim=2), train, _pixels(2), epochs=1, batch_size=2,
                             progress=False)
    if ok:
        assert np.isfinite(run_fit()["train_loss"][0])
    else:
        with pytest.raises(ValueError, match="train_x"):
            run_fit()


def test_stacked_train_mode_reaches_the_trainable_layers_only():
    model = _build("stacked", latent_dim=4)
    model.set_stage(2)
    model.train()
    assert model.training
    assert all(m.training for m in model.encoder[1].modules())            # stage 2 trains layer 2
    assert not any(m.training for m in model.encoder[0].modules())        # layer 1 is frozen
    model.set_stage(None)
    assert all(m.training for m in model.modules())


def test_vq_codebook_starts_uniform_in_plus_minus_one_over_k_and_mu_of_a_plain_code_is_the_code():
    codebook = _build("vq", latent_dim=20).bottleneck.codebook.detach()
    k = ae.VQ_CODES
    assert codebook.shape == (20, k) and codebook.abs().max() <= 1 / k
    assert codebook.min() < -0.9 / k and codebook.max() > 0.9 / k      # both signs, the whole range
    model, x = _build("vanilla", latent_dim=4).eval(), _pixels(3)
    assert torch.equal(model.encode(x, sample=False), model.encode(x))   # no noise, no mean to take


def test_dead_latent_unit_is_noted_on_its_panel():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 2)).astype(np.float32)
    assert run._dead_units_note(z) == ""
    z[:, 0] = 0.0                                           # a ReLU unit that never fires
    assert run._dead_units_note(z) == " | 1 of 2 units constant"
    z[:, 0] = 1e-5 * rng.normal(size=500)                   # small, but more than DEAD_SPAN: alive
    assert run._dead_units_note(z) == ""


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The tests run on one torch thread: their tiny steps gain nothing from a second, and on a
    busy machine threads that wait for each other make the suite crawl (151 s instead of 16)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ================================================================================================
# ---- the smoke run: python run.py end to end on tiny data, in seconds
# ================================================================================================

def test_smoke_run_py_end_to_end_on_tiny_data(tmp_path):
    # one contestant and pca, one epoch, on 600 random IDX images: every stage of the recipe
    # runs, and results.json and REPORT.md come out with the numbers of every task
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    arrays = (rng.integers(0, 256, (600, 28, 28), dtype=np.uint8), np.arange(600, dtype=np.uint8) % 10,
              rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), np.arange(200, dtype=np.uint8) % 10)
    for stem, a in zip(_STEMS, arrays):
        _write(folder / stem, _idx_bytes(a, 8))
    done = subprocess.run([sys.executable, "run.py", "--data-dir", str(folder), "--no-download", "--quick",
                           "--epochs", "1", "--models", "vanilla", "--jobs", "1", "--out", str(tmp_path / "out")],
                          cwd=os.path.dirname(os.path.abspath(run.__file__)), capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "mnist" / "results.json").read_text())
    m = results["metrics"]
    for metric in ("reconstruction_bce", "probe_accuracy", "anomaly_auc", "sample_legibility_gmm",
                   "interpolation_confidence", "umap_trustworthiness"):
        assert set(m[metric]) >= {"vanilla", "pca"}, metric
    assert m["probe_accuracy"]["pixels"]["mean"] > 0 and "ink" in m["anomaly_auc"]
    steps = ("reconstruction", "classification", "pixels", "baselines", "anomaly", "generation", "latent")
    assert {f"task seed 42: {step}" for step in steps} <= set(results["stages_seconds"])   # each task's seconds
    assert (tmp_path / "out" / "mnist" / "REPORT.md").read_text().startswith("# Autoencoder Bake-Off: mnist")
