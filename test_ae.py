"""Tests of the Autoencoder Bake-Off: run with `pytest test_ae.py` (about a minute on 2 cores).

Every test makes its own tiny data (IDX files, random images, Gaussian blobs); nothing needs the
real data sets or the network beyond a server the tests start on 127.0.0.1. Where possible a
result is checked against an independent slow reference: a hand-built IDX file, a loss computed
by hand, a brute-force nearest-neighbour search, the pairwise definition of AUC.
"""

import contextlib
import gzip
import hashlib
import http.server
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
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


# ================================================================================================
# ---- mnist.py: the IDX reader, the downloader, the splits
# ================================================================================================

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
        # a truncating server promises more than it sends, then closes the connection
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

    def start(files, truncate=False):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.files, server.truncate = files, truncate
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


# ---- read_idx

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


# ---- load from local folders

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


# ---- downloads (from 127.0.0.1 only)

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


# ---- splits

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


def test_split_permutation_is_the_companion_codes():
    # The companion code's split: torch.randperm(60000) on a CPU generator seeded 42. Pinned so that
    # a change of seed, generator or library shows up here, not as different training images.
    perm = run.split_permutation(60000)
    np.testing.assert_array_equal(perm[:8], [37542, 43087, 2992, 25810, 39634, 6425, 55768, 11034])
    train, val = mnist.split_indices(perm)
    assert (len(train), len(val), len(mnist.probe_indices(train))) == (55000, 5000, 550)
    np.testing.assert_array_equal(val, perm[55000:])
    np.testing.assert_array_equal(mnist.probe_indices(train), perm[:550])


# ================================================================================================
# ---- ae.py: the nine contestants and the training loop
# ================================================================================================

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


# ---- models

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


def test_model_unknown_name_error():
    with pytest.raises(ValueError, match="unknown model 'gan'.*vanilla.*vq"):
        ae.build("gan")
    with pytest.raises(ValueError, match="latent_dim"):
        ae.build("vae", latent_dim=0)


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
    for z in (model.encode(_pixels(8)), model.bottleneck.prior(8, 4, "cpu")):
        for j in range(4):
            assert torch.isin(z[:, j], codebook[j]).all()


# ---- losses


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


# ---- fit


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


# ---- ae.fit: exactly zero_grad, loss, backward, Adam step over the seeded order

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


# ---- ae.evaluate: eval mode, leaves state and mode as they were

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


# ---- stacked


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


# ---- checkpoints


@pytest.mark.parametrize("name", ["vq", "stacked"])
def test_model_save_load_round_trip(tmp_path, name):
    model = _build(name, latent_dim=3)
    ae.fit(model, _pixels(32), _pixels(8), epochs=3, batch_size=16, progress=False)
    path = tmp_path / "model.pt"
    ae.save(model, path, meta={"epochs": 3, "history": {"val_loss": [1.5, 1.25]}})
    loaded, meta = ae.load(path)
    assert meta == {"epochs": 3, "history": {"val_loss": [1.5, 1.25]}}
    assert loaded.name == name and loaded.latent_dim == 3 and not loaded.training
    assert _same(_snapshot(model), _snapshot(loaded))
    x = _pixels(8)
    assert torch.equal(model.eval()(x), loaded(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left


def test_model_save_rejects_non_plain_meta_and_load_reports_missing(tmp_path):
    with pytest.raises(ValueError, match="meta\\['auc'\\]"):
        ae.save(ae.build("shallow", 2), tmp_path / "m.pt", meta={"auc": torch.tensor(0.9)})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ae.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint"):
        ae.load(tmp_path / "junk.pt")


def test_model_pick_device(capsys):
    assert ae.pick_device("cpu") == torch.device("cpu")
    assert "device: cpu" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            ae.pick_device("cuda")


# ================================================================================================
# ---- umap_lite.py: neighbours, rho and sigma, the a/b fit, the layout
# ================================================================================================

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


# ---- tests


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


# ================================================================================================
# ---- tasks.py: metrics, probes, model tasks, figures
# ================================================================================================

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


# ---- metrics: k-NN and Frechet distance

def test_knn_predict_matches_brute_force():
    rng = np.random.default_rng(1)
    z_ref, y_ref = rng.normal(size=(300, 5)), rng.integers(0, 10, 300)
    z_q = rng.normal(size=(70, 5))
    d = ((z_q[:, None] - z_ref[None]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1)[:, :7]
    # majority vote; a tie goes to the tied class that has the nearest neighbour
    want = []
    for row in nearest:
        counts = np.bincount(y_ref[row], minlength=10)
        want.append(next(c for c in y_ref[row] if counts[c] == counts.max()))
    got = tasks.knn_predict(z_ref, y_ref, z_q, k=7, block=16)
    assert np.array_equal(got, want)


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


# ---- probes

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


def test_reference_protocol_probe_learns_and_keeps_encoder_frozen():
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


# ---- model tasks

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
    bce_in, signed_in = tasks.anomaly_scores(model, x_in)
    bce_out, _ = tasks.anomaly_scores(model, x_out.reshape(1, 1024))
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
    assert np.allclose(frames[[0, -1]], tasks.reconstruct(model, x), atol=1e-5)
    vae = ae.build("vae", 20).eval()
    a = tasks.interpolate(vae, x[0], x[0], steps=4, fixed_noise=True)    # same point, same noise
    b = tasks.interpolate(vae, x[0], x[0], steps=4, fixed_noise=False)   # same point, fresh noise
    assert np.allclose(a, a[0], atol=1e-6) and not np.allclose(b, b[0], atol=1e-3)


def test_save_gif_loops_forth_and_back(tmp_path):
    from PIL import Image
    frames = np.linspace(0, 1, 5)[:, None] * np.ones((5, 1024))
    path = tmp_path / "interp.gif"
    tasks.save_gif(frames, str(path))
    gif = Image.open(path)
    assert gif.n_frames == 8 and gif.info.get("loop") == 0
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert durations[0] == durations[4] == tasks.GIF_PAUSE_MS
    assert durations[1] == tasks.GIF_FRAME_MS


def test_sample_quality_numbers():
    probs = np.eye(10)[np.arange(100) % 10] * 0.95 + 0.005
    feats = np.random.default_rng(0).normal(size=(100, 4))
    q = tasks.sample_quality(probs, feats, feats)
    assert q["legibility"] == 1.0 and q["diversity"] == pytest.approx(np.log(10))
    assert abs(q["frechet"]) < 1e-6
    pq = tasks.path_quality(probs[[7, 3, 2]], 7, 2)
    assert pq["third_class"] and pq["classes_passed"] == [3]


# ---- converged probe: the validation set chooses, the test set only measures

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


# ---- the article's probe: early stopping reports the best-validation epoch

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
            if waited >= tasks.REF_PATIENCE:
                break
    assert best_e == 2 and last_e == 5                          # precondition: early peak
    want = acc_after(best_e, x_test, y_test)
    assert want != acc_after(last_e, x_test, y_test)           # last epoch would differ
    assert want != max(acc_after(e, x_test, y_test) for e in range(1, last_e + 1))  # so would test's pick
    got = tasks.train_classifier(net, x_train, y_train, x_val, y_val, x_test, y_test, seed=0,
                                 epochs=epochs, batch_size=32, lr=lr)
    assert got == pytest.approx(want, abs=1e-12)


# ---- k-NN leave-one-out

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


# ---- anomaly scores: (summed BCE, signed), both from one reconstruction

def _hand_scores(x_hat, x):
    x_hat, x = np.asarray(x_hat, np.float64), np.asarray(x, np.float64)
    correct = -(x * np.log(x_hat) + (1 - x) * np.log(1 - x_hat)).sum(1)
    signed = (x_hat - x).sum(1)
    return correct, signed


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
    assert len(got) == 2
    assert np.allclose(got[0], correct, rtol=1e-5, atol=1e-3)
    assert np.allclose(got[1], signed, rtol=1e-5, atol=1e-3)
    # a VAE: one sampled reconstruction must give both scores
    vae = _build("vae", 2).eval()
    torch.manual_seed(7)
    got = tasks.anomaly_scores(vae, x)
    torch.manual_seed(8)
    other = tasks.anomaly_scores(vae, x)
    assert not np.allclose(got[1], other[1], atol=1e-3)      # precondition: samples differ
    torch.manual_seed(7)
    with torch.no_grad():
        x_hat = vae.eval()(torch.from_numpy(x)).numpy()      # the same draw of eps
    correct, signed = _hand_scores(x_hat, x)
    assert np.allclose(got[0], correct, rtol=1e-5, atol=1e-3)
    assert np.allclose(got[1], signed, rtol=1e-5, atol=1e-3)


# ---- model tasks evaluate in eval mode, row by row

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


@pytest.mark.parametrize("what", ["per_image_bce", "encode", "reconstruct"])
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


# ---- label budgets: exact counts, the seed alone decides

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


# ================================================================================================
# ---- run.py: the pipeline end to end on tiny synthetic IDX data, its protocol, parallel training
# ================================================================================================

def _idx(array):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _digit_like(labels, rng):
    """28x28 images whose class decides which bar is lit: learnable in one epoch."""
    images = rng.integers(0, 40, (len(labels), 28, 28))
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c: 5 + 2 * c, 4:24] = 255
    return images


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    y_train, y_test = np.arange(600) % 10, np.arange(200) % 10
    for stem, arr in [("train-images-idx3-ubyte", _digit_like(y_train, rng)),
                      ("train-labels-idx1-ubyte", y_train),
                      ("t10k-images-idx3-ubyte", _digit_like(y_test, rng)),
                      ("t10k-labels-idx1-ubyte", y_test)]:
        (folder / f"{stem}.gz").write_bytes(_idx(arr))
    return folder


def _run_args(data, out, *extra):
    return ["--data-dir", str(data), "--no-download", "--out", str(out), "--epochs", "1",
            "--models", "vanilla,vae", "--quick", "--jobs", "1", *extra]


@pytest.mark.slow
def test_run_end_to_end_schema_report_figures(tiny_data, tmp_path, capsys):
    from PIL import Image
    run.main(_run_args(tiny_data, tmp_path))
    out = tmp_path / "mnist"
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"config", "environment", "metrics"}
    for metric in ("reconstruction_bce", "probe_accuracy", "probe_accuracy_reference_protocol",
                   "anomaly_auc", "anomaly_auc_signed_score", "training_seconds"):
        for name in ("vanilla", "vae"):
            entry = results["metrics"][metric][name]
            assert set(entry) == {"mean", "std", "runs"} and len(entry["runs"]) == 1
            assert np.isfinite(entry["mean"])
    report = (out / "REPORT.md").read_text()
    assert "NOT the full protocol" in report
    figures = [line.split("](")[1].split(")")[0] for line in report.replace(") ", ")\n").splitlines()
               if "![" in line]
    assert len(figures) >= 8
    for name in figures:
        with Image.open(out / name) as img:
            img.verify()
    assert "reused checkpoint" not in capsys.readouterr().out


@pytest.mark.slow
def test_run_resumes_after_interruption(tiny_data, tmp_path, monkeypatch, capsys):
    real_fit, calls = ae.fit, []

    def fit_then_interrupt(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(ae, "fit", fit_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run.main(_run_args(tiny_data, tmp_path))
    monkeypatch.setattr(ae, "fit", real_fit)
    capsys.readouterr()
    run.main(_run_args(tiny_data, tmp_path))
    printed = capsys.readouterr().out
    assert printed.count("reused checkpoint") == 2          # the two finished before the kill
    run.main(_run_args(tiny_data, tmp_path))
    assert capsys.readouterr().out.count("reused checkpoint") == 4   # nothing is trained again


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "cifar"], "unknown dataset"),
    (["--models", "vanilla,gan"], "unknown model"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--anomaly-digits", "12"], "anomaly-digits"),
])
def test_run_bad_arguments_one_line(argv, match, capsys):
    with pytest.raises(SystemExit) as err:
        run.parse_args(argv)
    message = str(err.value.code)
    assert match in message and "\n" not in message


@pytest.mark.slow
def test_run_missing_data_no_download_exits_cleanly(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "--data-dir", str(tmp_path), "--no-download",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          cwd=str(__import__("pathlib").Path(run.__file__).parent), timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(tmp_path) in proc.stderr


# ---- run.py: the protocol (which data and which model state each number comes from)

def _tiny_run_data(tiny_data, *extra):
    args = run.parse_args(["--data-dir", str(tiny_data), "--no-download", "--epochs", "1", *extra])
    return args, run.load_data(args)


@pytest.mark.slow
def test_run_trainings_see_only_training_images_and_anomaly_runs_lack_their_class(
        tiny_data, tmp_path, monkeypatch):
    real_fit, seen = ae.fit, []

    def spy(model, train_x, *args, **kwargs):
        seen.append((model.latent_dim, np.asarray(train_x)))
        return real_fit(model, train_x, *args, **kwargs)

    monkeypatch.setattr(ae, "fit", spy)
    run.main(_run_args(tiny_data, tmp_path, "--models", "shallow", "--anomaly-digits", "1,3"))
    _, data = _tiny_run_data(tiny_data, "--quick")
    row_index = {row.tobytes(): i for i, row in enumerate(data["x_all"])}
    train = set(data["train_idx"].tolist())
    missing_per_anomaly_run = []
    for latent, x in seen:
        idx = [row_index[row.tobytes()] for row in x]
        assert set(idx) <= train                    # no validation image ever trains
        digits = set(data["y_all"][idx].tolist())
        if latent == run.LATENT:
            assert digits == set(range(10))
        else:
            missing_per_anomaly_run.append(set(range(10)) - digits)
    assert sorted(map(sorted, missing_per_anomaly_run)) == [[1], [3]]   # each lacks its own class


def test_run_judge_trains_on_the_training_split_only(tiny_data, tmp_path, monkeypatch):
    # the judge scores samples and interpolations; it must never have seen validation or test images
    args, data = _tiny_run_data(tiny_data, "--quick")
    seen, real = [], tasks.train_judge
    monkeypatch.setattr(tasks, "train_judge", lambda x, y, **kw: seen.append((x, y)) or real(x, y, **kw))
    run.get_judge(data, args, torch.device("cpu"), str(tmp_path))
    (x, y), = seen
    row_index = {row.tobytes(): i for i, row in enumerate(data["x_all"])}
    idx = [row_index.get(row.tobytes()) for row in x]
    assert None not in idx and set(idx) == set(data["train_idx"].tolist())
    np.testing.assert_array_equal(y, data["y_all"][idx])


def _spy_probes(monkeypatch, real):
    """Record the training and validation inputs of every probe fit; returns the list of calls."""
    calls = []
    for fn in ("linear_probe", "train_classifier"):
        def spy(*args, _fn=fn, **kwargs):
            calls.append((_fn, args[1:5] if _fn == "train_classifier" else args[:4]))
            return real[_fn](*args, **kwargs)

        monkeypatch.setattr(tasks, fn, spy)
    return calls


def test_run_test_labels_choose_nothing(tiny_data, monkeypatch):
    # The probes' training and validation inputs (which pick the L2 strength and the early-stopping
    # epoch) must be the same whatever the test labels are, and must not be the test images.
    args, data = _tiny_run_data(tiny_data, "--quick")
    torch.manual_seed(0)
    models = {"vanilla": ae.build("vanilla", 20).eval(), "vae": ae.build("vae", 20).eval()}
    runs, real = [], {"linear_probe": tasks.linear_probe, "train_classifier": tasks.train_classifier}
    for y_test in (data["y_test"], np.random.default_rng(1).permutation(data["y_test"])):
        calls = _spy_probes(monkeypatch, real)
        shuffled = {**data, "y_test": y_test}
        run.task_classification(models, shuffled, 42, quick=True)
        run.task_baselines(shuffled, 42, torch.device("cpu"))
        runs.append(calls)
    assert len(runs[0]) == len(runs[1]) > 0
    for (fn, inputs), (_, inputs_shuffled) in zip(*runs):
        for a, b in zip(inputs, inputs_shuffled):
            np.testing.assert_array_equal(a, b)
        assert len(inputs[3]) == len(data["val_idx"]) != len(data["y_test"])
        np.testing.assert_array_equal(inputs[3], data["y_all"][data["val_idx"]])


def test_run_baselines_as_published_trains_head_only_with_batchnorm_in_training_mode(tiny_data, monkeypatch):
    args, data = _tiny_run_data(tiny_data, "--quick")
    nets = []
    real = tasks.train_classifier
    monkeypatch.setattr(tasks, "train_classifier",
                        lambda net, *a, **k: nets.append((net, _snapshot(net))) or real(net, *a, **k))
    run.task_baselines(data, 42, torch.device("cpu"))
    (published, before), (scratch, before_scratch), (frozen, before_frozen) = nets
    changed = lambda net, before: {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    # as published: encoder weights fixed, BatchNorm statistics moved (training mode), head trained
    moved = changed(published, before)
    assert not any(k.endswith("weight") and k.startswith("0.") and "running" not in k
                   and published.state_dict()[k].dim() == 2 for k in moved)
    assert any("running_mean" in k for k in moved) and any(k.startswith("1.") for k in moved)
    # from scratch: the encoder's Linear weights train too
    assert any(k.startswith("0.") and scratch.state_dict()[k].dim() == 2 for k in changed(scratch, before_scratch))
    # random encoder: nothing of the encoder moves, BatchNorm statistics included
    assert changed(frozen, before_frozen) <= {"linear.weight", "linear.bias"}


# ---- the raw-pixel references: the span solver of the converged probe, what the pixel probes see

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


def test_pixel_references_see_only_the_labelled_images(tiny_data, monkeypatch):
    # the raw-pixel probes train on the labelled images only (a strict subset of the training
    # part here), the validation images only choose, the test images only score
    _, data = _tiny_run_data(tiny_data, "--quick")
    data = {**data, "probe_idx": data["probe_idx"][:100]}
    x, y, val, probe = data["x_all"], data["y_all"], data["val_idx"], data["probe_idx"]
    runs = []
    for y_test in (data["y_test"], np.random.default_rng(1).permutation(data["y_test"])):
        seen = {"linear_probe": [], "train_classifier": [], "knn_predict": []}
        for fn, calls in seen.items():
            monkeypatch.setattr(tasks, fn, lambda *a, _calls=calls, _real=getattr(tasks, fn), **k:
                                _calls.append(a) or _real(*a, **k))
        m, curve = run.task_pixel_references({**data, "y_test": y_test}, 42, quick=True)
        monkeypatch.undo()
        runs.append(seen)
        assert all(set(by_model) == {run.PIXELS} for by_model in m.values())
        assert set(m) == {"probe_accuracy", "probe_accuracy_reference_protocol", "knn_probe_accuracy"} | {
            f"probe_accuracy_{b}_labels" for b in curve} and sorted(curve) == [10, 100]
        train_sets = [probe] + [run._budget_draw(data, b // tasks.N_CLASSES, 42) for b in sorted(curve)]
        assert len(seen["linear_probe"]) == len(train_sets)
        for (z_tr, y_tr, z_va, y_va, z_te, _), idx in zip(seen["linear_probe"], train_sets):
            assert set(idx) <= set(data["train_idx"])
            for got, want in [(z_tr, x[idx]), (y_tr, y[idx]), (z_va, x[val]), (y_va, y[val]),
                              (z_te, data["x_test"])]:
                np.testing.assert_array_equal(got, want)
        (net, x_tr, y_tr, x_va, y_va, x_te, y_te, seed), = seen["train_classifier"]
        assert isinstance(net, nn.Linear) and (net.in_features, net.out_features) == (1024, 10)
        for got, want in [(x_tr, x[probe]), (y_tr, y[probe]), (x_va, x[val]), (y_va, y[val]),
                          (x_te, data["x_test"]), (y_te, y_test)]:
            np.testing.assert_array_equal(got, want)
        (z_ref, y_ref, z_query), = [a[:3] for a in seen["knn_predict"]]
        for got, want in [(z_ref, x[probe]), (y_ref, y[probe]), (z_query, data["x_test"])]:
            np.testing.assert_array_equal(got, want)
    # what trains and what chooses is the same whatever the test labels are
    for fn in ("linear_probe", "train_classifier"):
        for a, b in zip(runs[0][fn], runs[1][fn]):
            for u, v in zip(a[:5], b[:5]):
                if isinstance(u, np.ndarray):
                    np.testing.assert_array_equal(u, v)


def test_report_puts_the_pixels_row_after_the_contestants():
    cell = lambda v: {"mean": v, "std": 0.0, "runs": [v]}
    names = ["vanilla", "vae"]
    m = {metric: {n: cell(0.5) for n in names + [run.PIXELS]} for metric in (
        "probe_accuracy", "probe_accuracy_reference_protocol", "knn_probe_accuracy", "probe_accuracy_10_labels")}
    text = run.report_classification(m, names, {"probe_labels": 550, "quick": False}, article=True)
    first_cells = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    tables = " ".join(first_cells).split("model")[1:]          # the accuracy and the label-budget table
    assert len(tables) == 2
    for table in tables:
        assert table.split()[:2] == names and table.split()[2].startswith(f"*{run.PIXELS}")
    assert f"*{run.PIXELS}" not in run.report_classification(
        {k: {n: v for n, v in by.items() if n != run.PIXELS} for k, by in m.items()},
        names, {"probe_labels": 550, "quick": False}, article=True)


# ---- run.py: the audit counts seeds

def test_audit_verdicts_count_the_seeds():
    names = list(ae.MODELS)
    def seed(shallow_bce):
        return {"reconstruction_bce": {n: (shallow_bce if n == "shallow" else 100.0 + i)
                                       for i, n in enumerate(names)}}
    verdict = lambda rows: next(r for r in rows if r[0].startswith("The shallow AE"))
    for values, expected, count in [((300, 300, 300), "confirmed", "3 of 3"),
                                    ((300, 50, 300), "depends", "2 of 3"),
                                    ((50, 50, 50), "not confirmed", "0 of 3")]:
        row = verdict(run.audit(run.summarise([seed(v) for v in values]), names, [1]))
        assert row[1] == expected and f"holds in {count} seeds" in row[2]
    one = verdict(run.audit(run.summarise([seed(300)]), names, [1]))
    assert one[1] == "confirmed" and one[2].startswith("one run")


def test_published_within_two_std():
    m = run.summarise([{"reconstruction_bce": {"vanilla": v}} for v in (63.0, 65.0, 64.0)])  # mean 64, std 1
    assert run._within(m, "reconstruction_bce", "vanilla")            # published 63.92
    m = run.summarise([{"reconstruction_bce": {"vanilla": v}} for v in (70.0, 70.2, 70.1)])
    assert not run._within(m, "reconstruction_bce", "vanilla")
    assert not run._within(run.summarise([{"reconstruction_bce": {"vanilla": 63.92}}]),
                           "reconstruction_bce", "vanilla")           # one run has no spread


# ---- run.py: trainings in parallel worker processes

def test_plan_jobs_one_per_core_by_default(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    cpu = torch.device("cpu")
    assert run.plan_jobs(None, 18, cpu) == (8, 1)
    assert run.plan_jobs(None, 3, cpu) == (3, 2)      # fewer trainings left than cores
    assert run.plan_jobs(4, 18, cpu) == (4, 2)
    assert run.plan_jobs(1, 18, cpu)[0] == 1
    assert run.plan_jobs(None, 18, torch.device("mps"))[0] == 1


@contextlib.contextmanager
def _torch_threads(n):
    """torch runs on n threads inside the block, on its previous count after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ae.MODELS)
def test_thread_count_changes_a_training_step_only_by_rounding(name):
    # the initial weights are exact; reductions split across threads round differently, so one
    # step's loss and gradients agree to float32 rounding, not bitwise (60 epochs amplify that)
    x = (torch.rand(256, ae.INPUT_DIM, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    steps = []
    for t in (1, 2):
        with _torch_threads(t):
            ae.set_seed(0)
            model = ae.build(name)
            init = {k: v.clone() for k, v in model.state_dict().items()}
            ae.set_seed(1)
            loss, _ = model.loss(x)
            loss.backward()
            steps.append((init, loss.item(), {k: p.grad for k, p in model.named_parameters()}))
    (init1, loss1, grad1), (init2, loss2, grad2) = steps
    assert all(torch.equal(init1[k], init2[k]) for k in init1)
    assert loss1 == pytest.approx(loss2, rel=1e-6)
    for k in grad1:
        # rounding (float32 eps ~1e-7) grows where near-equal numbers are subtracted (BatchNorm's
        # x - mean over a small std, vq's h - e): seen up to 4e-5 of the gradient's scale
        assert (grad1[k] - grad2[k]).abs().max() <= 5e-4 * grad1[k].abs().max() + 1e-6, k


@pytest.mark.slow
def test_train_all_parallel_jobs_give_bitwise_identical_weights(tiny_data, tmp_path):
    models = ["--models", "shallow,vanilla,vae"]
    args, data = _tiny_run_data(tiny_data, "--quick", "--jobs", "2", *models)
    jobs = run.training_jobs(args, data, str(tmp_path / "parallel"))
    parallel, plan = run.train_all(jobs, data, args, torch.device("cpu"))
    assert plan["jobs"] == 2
    args1, _ = _tiny_run_data(tiny_data, "--quick", "--jobs", "1", *models)
    with _torch_threads(plan["threads_per_job"]):        # the same thread count as each worker
        alone, _ = run.train_all(run.training_jobs(args1, data, str(tmp_path / "alone")), data, args1,
                                 torch.device("cpu"))
    assert parallel.keys() == alone.keys() and len(alone) == 6
    for key, (model, meta) in alone.items():
        other = parallel[key][0].state_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, other[name]), (key, name)
        assert meta["history"]["val_loss"] == parallel[key][1]["history"]["val_loss"]
        assert meta["threads"] == parallel[key][1]["threads"] == plan["threads_per_job"]


@pytest.mark.slow
def test_train_all_parallel_failure_stops_with_one_line(tiny_data, tmp_path):
    args, data = _tiny_run_data(tiny_data, "--quick", "--jobs", "2", "--models", "shallow", "--lr", "1e30")
    with pytest.raises(SystemExit) as err:
        run.train_all(run.training_jobs(args, data, str(tmp_path)), data, args, torch.device("cpu"))
    message = str(err.value.code).strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("run.py: error: shallow") and "loss became nan" in message
    assert not list((tmp_path / "checkpoints").glob("*.pt")) if (tmp_path / "checkpoints").exists() else True


def _children(pid):
    """PIDs whose parent is pid, from /proc."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds worker processes through /proc")
@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])
def test_run_parallel_killed_stops_workers_and_resumes(tiny_data, tmp_path, how):
    import signal
    import time
    # batches of 2 make each training last seconds, so the workers still have work when run.py dies
    argv = ["--data-dir", str(tiny_data), "--no-download", "--out", str(tmp_path), "--quick",
            "--models", "shallow,vanilla", "--epochs", "20", "--batch-size", "2", "--jobs", "2"]
    proc = subprocess.Popen([sys.executable, "run.py", *argv], cwd=os.path.dirname(run.__file__),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    folder, deadline = tmp_path / "mnist" / "checkpoints", time.time() + 120
    while not (folder.exists() and list(folder.glob("*.pt"))) and time.time() < deadline:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert len(workers) >= 2                        # the two training processes (and a tracker)
    if how == "SIGKILL":
        proc.kill()
    else:
        os.killpg(proc.pid, signal.SIGINT)          # what the terminal does on Ctrl-C
    stderr = proc.communicate(timeout=60)[1]
    deadline = time.time() + 2                      # a worker checks on its parent every 0.5 s
    while not all(_gone(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert all(_gone(w) for w in workers)
    if how == "Ctrl-C":
        assert "interrupted" in stderr and "Traceback" not in stderr
    # every checkpoint left is whole, and a rerun reuses exactly those
    finished = sorted(str(p) for p in folder.glob("*.pt"))
    for path in finished:
        ae.load(path)
    args, data = _tiny_run_data(tiny_data, *argv[3:])
    jobs = run.training_jobs(args, data, str(tmp_path / "mnist"))
    assert 0 < len(finished) < len(jobs)
    assert sorted(job["path"] for job in jobs if run._finished(job)) == finished
