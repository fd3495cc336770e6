"""MNIST-family data: a checked IDX reader, a local-first loader with verified downloads, and splits.

Use:
    import mnist
    train_x, train_y, test_x, test_y = mnist.load("mnist", root="data")   # uint8, (N, 28, 28), (N,)
    x = mnist.to_vectors(train_x)                                         # float32 (N, 1024) in [0, 1]
    perm = torch.randperm(60000, generator=torch.Generator().manual_seed(42)).numpy()  # or any permutation
    train_idx, val_idx = mnist.split_indices(perm)                        # 55,000 / 5,000
    python mnist.py [mnist|fashion|kmnist] [--root DIR] [--no-download]   # load and summarise

`load` looks for the four files (raw or .gz) in `root`, `root/<name>`, torchvision's
`root/<MNIST|FashionMNIST|KMNIST>/raw` and, for Fashion-MNIST, Debian's
/usr/share/datasets/fashion-mnist.
Only files that are missing are downloaded, mirror after mirror, each checked against its published
.gz MD5 before it is put in place; a failed or interrupted download leaves nothing behind.
Local files are checked structurally only (re-gzipped copies have other MD5s but the same content).

Errors: IDXError (a ValueError) for a malformed or inconsistent file, DownloadError (an OSError) when no
mirror delivers a file, FileNotFoundError when the files are missing and downloading is off.

References:
    IDX format and MNIST: Y. LeCun, C. Cortes, C. J. C. Burges, http://yann.lecun.com/exdb/mnist/
    Fashion-MNIST: H. Xiao, K. Rasul, R. Vollgraf, 2017, arXiv:1708.07747
    Kuzushiji-MNIST: T. Clanuwat et al., 2018, arXiv:1812.01718
    Split, padding and probe set: PROTOCOL.md, "Data".

Simplified: a flat folder holds one data set (MNIST and Fashion-MNIST share file names, so a folder with
the wrong set's files loads as that set); no resuming of half-finished downloads; no EMNIST/QMNIST.

First read: load, to_vectors and the split functions. Skip the downloader and the checks of a
damaged IDX file (sizes, magic numbers, checksums) until you need them.
"""

import argparse
import contextlib
import gzip
import hashlib
import http.client
import math
import os
import struct
import sys
import time
import urllib.error
import urllib.request
import warnings
import zlib

import numpy as np

# ---- constants

IMAGE_SIDE = 28     # every MNIST-family image is 28 x 28
N_CLASSES = 10      # labels are 0-9
PAD = 2             # zero border that turns 28 x 28 into 32 x 32, i.e. 1024 inputs (PROTOCOL.md)
N_VAL = 5000        # the last 5,000 of the seeded permutation of the 60k training images validate
N_PROBE = 550       # the linear probe learns from the first 550 training indices only
FASHION_CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                   "sneaker", "bag", "boot")   # Fashion-MNIST's labels 0-9, shortened for figures

# The four files of every data set, in the order load() returns them.
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# IDX type code -> element type; IDX data is always big-endian.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"
MAX_IDX_BYTES = 2**31       # a header claiming more is corrupt: EMNIST, the largest IDX set, is 0.55 GB
MAX_DEFLATE_RATIO = 1032    # deflate expands data at most ~1032-fold: bounds what a .gz can hold

TIMEOUT_S = 30              # per connect/read; a dead mirror costs at most this
CHUNK_BYTES = 1 << 16
PROGRESS_MIN_BYTES = 1 << 20  # show a progress line for files at least this big

# Per data set: the folder name torchvision uses, system-wide install folders, mirrors (tried in order;
# load(mirrors=...) replaces them) and the published MD5 of each .gz file (tests substitute their own).
DATASETS = {
    "mnist": {
        "title": "MNIST",
        "torchvision": "MNIST",
        "system_dirs": [],
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
                    "http://yann.lecun.com/exdb/mnist/",
                    "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        "md5": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    },
    "fashion": {
        "title": "Fashion-MNIST",
        "torchvision": "FashionMNIST",
        "system_dirs": ["/usr/share/datasets/fashion-mnist"],  # apt-get install dataset-fashion-mnist
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    },
    "kmnist": {
        "title": "Kuzushiji-MNIST",
        "torchvision": "KMNIST",
        "system_dirs": [],
        "mirrors": ["http://codh.rois.ac.jp/kmnist/dataset/kmnist/"],
        "md5": {"train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
                "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
                "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
                "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134"},
    },
}


class IDXError(ValueError):
    """A file that is not valid IDX, or four files that do not form a data set."""


class DownloadError(OSError):
    """No mirror delivered a file intact."""


# ---- reading IDX files

def read_idx(path):
    """Read one IDX file, gzip-compressed or not (told by its first bytes, not its name).

    Layout: two zero bytes, a type code, the number of dimensions, each dimension as a big-endian
    uint32, then the items, big-endian, row-major. Every part is checked; any defect raises IDXError
    naming the file. Returns a native-endian array of the declared shape.
    """
    with open(path, "rb") as f:
        compressed = f.read(2) == GZIP_MAGIC
        f.seek(0)
        size = os.fstat(f.fileno()).st_size
        if not compressed:
            return _parse_idx(f, path, size, compressed)
        try:
            with gzip.GzipFile(fileobj=f) as g:
                return _parse_idx(g, path, size, compressed)
        except (OSError, EOFError, zlib.error) as e:  # bad header, bad CRC, cut-off stream
            raise _bad(path, f"corrupt gzip data ({e})") from None


def _parse_idx(f, path, size, compressed):
    """Check and decode the IDX stream f; size is the file's size on disk (compressed or not)."""
    head = f.read(4)
    if not head:
        raise _bad(path, "empty file")
    if len(head) < 4:
        raise _bad(path, f"header cut short ({len(head)} of 4 bytes)")
    if head[:2] != b"\0\0":
        raise _bad(path, f"magic number starts with {head[:2].hex()}, not 0000: not an IDX file")
    code, ndim = head[2], head[3]
    if code not in IDX_DTYPES:
        raise _bad(path, f"unknown type code 0x{code:02X} (known: 08, 09, 0B, 0C, 0D, 0E)")
    if ndim == 0:
        raise _bad(path, "header declares 0 dimensions")
    dims_bytes = f.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise _bad(path, f"header cut short: {ndim} dimensions need {4 * ndim} bytes, "
                         f"found {len(dims_bytes)}")
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    dtype = np.dtype(IDX_DTYPES[code])
    shape = " x ".join(map(str, dims)) + f" {dtype.name}"
    if 0 in dims:
        raise _bad(path, f"header declares an empty dimension ({shape})")
    expected = math.prod(dims) * dtype.itemsize  # Python ints: cannot overflow
    if expected > MAX_IDX_BYTES:
        raise _bad(path, f"header declares {shape} = {expected:,} bytes, "
                         f"over the {MAX_IDX_BYTES:,}-byte limit")
    if compressed and expected > MAX_DEFLATE_RATIO * size:
        raise _bad(path, f"header declares {shape} = {expected:,} bytes, "
                         f"more than a {size:,}-byte gzip file can hold")
    if not compressed and size - 4 - 4 * ndim != expected:  # checked before anything is allocated
        raise _bad(path, _payload_problem(size - 4 - 4 * ndim, expected, shape))
    payload = f.read(expected + 1)  # one byte more reveals trailing data
    if len(payload) != expected:
        raise _bad(path, _payload_problem(len(payload), expected, shape))
    # big-endian bytes -> native-endian (and writable) array of the declared shape
    return np.frombuffer(payload, dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _payload_problem(got, expected, shape):
    if got < expected:
        return f"payload too short: {got:,} bytes, but the header's {shape} takes {expected:,}"
    return f"payload too long: the header's {shape} takes {expected:,} bytes, but more follow"


def _bad(path, problem):
    return IDXError(f"bad IDX file {os.fspath(path)}: {problem} (delete or replace the file)")


# ---- loading a data set

def load(name="mnist", root="data", download=True, mirrors=None):
    """Return (train_images, train_labels, test_images, test_labels) of an MNIST-family data set.

    name: "mnist", "fashion" (Fashion-MNIST) or "kmnist" (Kuzushiji-MNIST).
    root: where to look first (see the module docstring for the layouts) and where downloads go.
    download: fetch missing files; if False, missing files raise FileNotFoundError.
    mirrors: base URLs to which the file names are appended, replacing the built-in list.

    Images are uint8 (N, 28, 28), labels uint8 (N,) in 0-9.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(map(repr, DATASETS))}")
    spec = DATASETS[name]
    root = os.fspath(root)
    folders = [root, os.path.join(root, name), os.path.join(root, spec["torchvision"], "raw"),
               *spec["system_dirs"]]
    found = {folder: _find_files(folder) for folder in folders}
    complete = [folder for folder in folders if len(found[folder]) == len(FILES)]
    if complete:
        paths = found[complete[0]]
    else:
        # fill up the folder under root that holds the most files already (root itself if none)
        target = max(folders[:3], key=lambda folder: len(found[folder]))
        missing = [stem for stem in FILES if stem not in found[target]]
        if mirrors is None:
            mirrors = spec["mirrors"]
        elif isinstance(mirrors, str):  # one URL, not a list of characters
            mirrors = [mirrors]
        if not download:
            raise FileNotFoundError(
                f"{spec['title']} not found: looked for {', '.join(FILES)} (each raw or .gz) in "
                f"{', '.join(folders)}. Put the files into {target} by hand "
                f"(e.g. from {mirrors[0] if mirrors else 'a mirror'}) or let load() download them.")
        _download_missing(name, target, missing, mirrors)
        paths = _find_files(target)
    arrays = [read_idx(paths[stem]) for stem in FILES]
    _check_dataset(arrays, [paths[stem] for stem in FILES])
    return tuple(arrays)


def _find_files(folder):
    """Map each file stem found in folder to its path, raw preferred to .gz (faster to read)."""
    found = {}
    for stem in FILES:
        for path in (os.path.join(folder, stem), os.path.join(folder, stem + ".gz")):
            if os.path.isfile(path):
                found[stem] = path
                break
    return found


def _check_dataset(arrays, paths):
    """Raise IDXError unless the arrays are uint8 image/label pairs that fit together."""
    for array, path in zip(arrays, paths):
        if array.dtype != np.uint8:
            raise IDXError(f"{path}: items are {array.dtype}, expected uint8")
    for images, labels, image_path, label_path in ((arrays[0], arrays[1], paths[0], paths[1]),
                                                    (arrays[2], arrays[3], paths[2], paths[3])):
        if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise IDXError(f"{image_path}: shape {images.shape}, "
                           f"expected (N, {IMAGE_SIDE}, {IMAGE_SIDE})")
        if labels.ndim != 1:
            raise IDXError(f"{label_path}: shape {labels.shape}, expected (N,) labels")
        if len(images) != len(labels):
            raise IDXError(f"{label_path}: {len(labels):,} labels for the {len(images):,} images "
                           f"of {image_path}")
        if labels.max() >= N_CLASSES:
            raise IDXError(f"{label_path}: label {labels.max()} outside 0-{N_CLASSES - 1}")


# ---- downloading

def _download_missing(name, folder, stems, mirrors):
    """Download stem + ".gz" for each stem into folder, all or nothing.

    Each file goes to a temp file beside its final place and is renamed only once every file has
    passed its MD5 check. On any failure, Ctrl-C included, the files and folders made here are removed.
    """
    created = []  # folders this call creates, innermost first
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    made = []     # temp files, then renamed files
    try:
        os.makedirs(folder, exist_ok=True)
        parts = []
        for stem in stems:
            filename = stem + ".gz"
            # a plain name, not mkstemp, whose mode 0600 would stick to the downloaded file
            tmp = os.path.join(folder, f".{filename}.{os.getpid()}.part")
            made.append(tmp)
            good = _fetch_from_mirrors(filename, tmp, folder, mirrors, DATASETS[name]["md5"][filename])
            mirrors = [good] + [m for m in mirrors if m != good]  # try the mirror that worked first
            parts.append((tmp, os.path.join(folder, filename)))
        for tmp, final in parts:
            os.replace(tmp, final)
            made.append(final)
    except BaseException:
        for path in made:
            with contextlib.suppress(OSError):
                os.remove(path)
        for path in created:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise


def _fetch_from_mirrors(filename, tmp, folder, mirrors, md5):
    """Download filename into tmp from the first mirror that delivers it intact; return that mirror."""
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        try:
            _fetch(url, tmp, md5)
            return base
        except (OSError, http.client.HTTPException, ValueError) as e:
            failures.append(f"\n  {url}: {_reason(e)}")
    raise DownloadError(
        f"could not download {filename}; tried{''.join(failures) or ' no mirrors'}\n"
        f"To work offline, download the files by hand into {folder} (or pass --data-dir "
        f"pointing to a folder that holds them).")


def _fetch(url, tmp, md5):
    """Write url's content into tmp; raise OSError if it arrives incomplete or its MD5 is not md5."""
    digest, done = hashlib.md5(), 0
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
        total = response.headers.get("Content-Length")
        total = None if total is None else int(total)
        show = total is not None and total >= PROGRESS_MIN_BYTES
        try:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if show:
                    _progress(url, done, total)
        finally:
            if show:
                sys.stderr.write("\n")
    if total is not None and done != total:
        raise OSError(f"connection closed after {done:,} of {total:,} bytes")
    if digest.hexdigest() != md5:
        raise OSError(f"MD5 {digest.hexdigest()} differs from the published {md5}")


def _progress(url, done, total):
    """Redraw one stderr line with how much of url has arrived."""
    sys.stderr.write(f"\rdownloading {url}: {done / 2**20:.1f} of {total / 2**20:.1f} MiB "
                     f"({100 * done // total}%)")
    sys.stderr.flush()


def _reason(e):
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    return str(getattr(e, "reason", e)) or type(e).__name__


# ---- splits and model inputs

def to_vectors(images):
    """Zero-pad by PAD pixels on each side, scale to [0, 1] and flatten.

    images: uint8 (N, H, W). Returns float32 (N, (H + 2 PAD) * (W + 2 PAD)); (N, 1024) for MNIST.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"to_vectors expects uint8 images (N, H, W), got {images.dtype} {images.shape}")
    n, h, w = images.shape
    out = np.zeros((n, h + 2 * PAD, w + 2 * PAD), np.float32)
    out[:, PAD:PAD + h, PAD:PAD + w] = images
    out /= 255  # x = pixel / 255
    return out.reshape(n, -1)  # (N, 32, 32) -> (N, 1024)


def split_indices(perm, n_val=N_VAL):
    """Split a permutation of range(n): its first n - n_val indices train, its last n_val validate.

    The caller draws the permutation. The companion code draws it with
    torch.randperm(60000, generator=torch.Generator().manual_seed(42)); run.py does the same, so
    our training, validation and probe images are the article's. Kept out of this module so that
    it needs NumPy only.
    """
    perm = np.asarray(perm)
    n = len(perm)
    if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(n)):
        raise ValueError(f"split_indices: expected a permutation of range(n), got {perm.dtype} {perm.shape}")
    if not 0 <= n_val < n:
        raise ValueError(f"split_indices: n_val must be in [0, n), got n_val={n_val}, n={n}")
    return perm[:n - n_val], perm[n - n_val:]


def drop_class(idx, labels, digit):
    """Return idx without the indices whose label is digit (anomaly runs train without class 1)."""
    keep = np.asarray(labels)[idx] != digit
    if keep.all():
        warnings.warn(f"drop_class: no label {digit!r} among the {len(idx)} indices; nothing removed")
    return idx[keep]


def probe_indices(train_idx, n=N_PROBE):
    """The labelled subset for the linear probe: the first n training indices of the permutation."""
    if n > len(train_idx):
        raise ValueError(f"probe_indices: asked for {n} of only {len(train_idx)} training indices")
    return train_idx[:n]


# ---- command line

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Load an MNIST-family data set and summarise it.")
    parser.add_argument("name", nargs="?", default="mnist", choices=list(DATASETS))
    parser.add_argument("--root", default="data", help="folder to look in and download to")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        data = load(args.name, args.root, download=not args.no_download)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"loaded {DATASETS[args.name]['title']} in {time.perf_counter() - start:.2f} s")
    for part, images, labels in (("train", *data[:2]), ("test", *data[2:])):
        print(f"{part}: images {images.shape} {images.dtype}, labels per class "
              f"{np.bincount(labels, minlength=N_CLASSES).tolist()}")
