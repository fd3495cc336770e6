"""umap_lite.py: UMAP in plain NumPy, for the latent-space figure.

UMAP (McInnes, Healy & Melville 2018, arXiv:1802.03426) turns a point cloud into a weighted
k-nearest-neighbour graph, then lays the graph out in 2-D so that neighbours attract and random
pairs repel. This file does it in six steps, one function each, read top to bottom:

    1. knn            exact k nearest neighbours, computed in blocks of rows
    2. smooth_knn     per point rho (nearest distance) and sigma (a kernel width, by bisection)
    3. fuzzy_graph    directed edge weights, then their fuzzy union P + P^T - P*P^T
    4. fit_ab         the curve 1 / (1 + a d^2b) that plays the role of the weights in 2-D
    5. pca_init       the starting layout
    6. optimize       stochastic gradient descent with negative sampling, in batches

Use:
    import umap_lite
    y = umap_lite.embed(codes)                      # (n, d) -> (n, 2) float32
    t = umap_lite.trustworthiness(codes, y, k=15)   # 1.0 = every map neighbour is a true one
    python umap_lite.py                             # a small demo on Gaussian blobs

Simplified against umap-learn (whose defaults are used everywhere else):
  - Exact neighbours by brute force (O(n^2 d) time, O(block * n) memory) instead of approximate
    NN-descent: slower beyond ~100k points, but exact and short.
  - Euclidean metric only, 2-D output only, spread = 1, local_connectivity = 1, gamma = 1.
  - PCA initialisation instead of umap-learn's default spectral one (which needs a sparse
    eigensolver). Measured on 20-d autoencoder codes of the MNIST test set (3 seeds each):
    trustworthiness 0.9765 / 10-NN accuracy 0.942 from PCA, 0.9726 / 0.925 from a spectral
    start (by subspace iteration), 0.9729 / 0.928 from a random one; PCA also kept the digit
    clusters' global arrangement best (rank correlation of class-centroid distances 0.84-0.86,
    against 0.72-0.83). umap-learn itself scores like our PCA run when given init="pca".
  - umap-learn updates the layout one edge at a time (Hogwild-style SGD: each step sees the
    positions the previous one left). Here an epoch's sampled edges are split into 8 random
    batches; each batch computes all its gradients from the same positions and adds them at once
    with np.bincount, which is what makes it fast in NumPy. With one batch per epoch the maps of
    MNIST codes lost 0.002-0.003 trustworthiness; with 4 to 16 batches they match umap-learn's
    (trustworthiness and 10-NN accuracy equal within seed noise when both start from PCA).
  - n_neighbors counts the point itself, as in umap-learn: each point gets n_neighbors - 1
    neighbours and its kernel is tuned to a total weight of log2(n_neighbors).

First read: embed and the six steps it calls, in order. Skip the nearest-neighbour blocking and
trustworthiness until you need them.
"""

import numbers

import numpy as np

# ---- constants

KNN_BLOCK_CELLS = 2**20  # distances held at once by knn (8 MB): a cache-sized block was 2x
                         # faster at 60k points than 256 full rows (123 MB)
TRUST_BLOCK_CELLS = 2**22  # comparisons per block in trustworthiness (4 MB of booleans)
BISECT_ITERS = 64        # bisection steps for sigma: more than enough for float64 precision
MIN_SIGMA_SCALE = 1e-3   # sigma is kept above this fraction of the mean neighbour distance
AB_POINTS = 300          # grid for the a, b fit: 300 points on (0, 3 * spread], as umap-learn
AB_ITERS = 100           # Gauss-Newton steps for a, b (converges in ~10)
SPREAD = 1.0             # scale of the embedded points; umap-learn's default
NEG_RATE = 5             # negative samples per positive one (umap-learn: negative_sample_rate)
GRAD_CLIP = 4.0          # each gradient component is clipped to [-4, 4], as umap-learn
REPULSE_EPS = 1e-3       # keeps the repulsive force finite at distance 0
BATCHES_PER_EPOCH = 8    # 1 batch per epoch cost 0.002-0.003 trustworthiness on MNIST codes;
                         # 4 to 16 all match umap-learn's edge-by-edge updates
EPOCHS_SMALL, EPOCHS_LARGE = 500, 200  # default epochs up to / above SMALL_N points, as
SMALL_N = 10_000                        # umap-learn: small data sets can afford more
INIT_SCALE = 10.0        # initial layout spans [0, 10] per axis, as umap-learn
INIT_NOISE = 1e-4        # tiny jitter so duplicate points do not start on top of each other


# ---- 1. exact nearest neighbours


def knn(x, k, block=None):
    """Exact k nearest neighbours of every row of x, excluding the row itself.

    Parameters
    ----------
    x : array (n, d)
    k : int, 1 <= k < n
    block : int or None, rows of the (n, n) distance matrix computed at once;
        None = as many as fit in KNN_BLOCK_CELLS

    Returns
    -------
    indices : int64 array (n, k), nearest first
    distances : float64 array (n, k), Euclidean, ascending
    """
    x = _check_points(x, "x").astype(np.float64, copy=False)
    n = len(x)
    if not (isinstance(k, (int, np.integer)) and 1 <= k < n):
        raise ValueError(f"knn: need an integer 1 <= k < n, got k={k} for n={n} points")
    block = block or max(1, KNN_BLOCK_CELLS // n)
    sq = np.einsum("ij,ij->i", x, x)                                  # |x_i|^2, (n,)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        d2 = _block_sq_dists(x, sq, start, stop)                      # (B, n)
        # argpartition finds the k smallest in O(n) per row; only those k get sorted
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]              # (B, k), unordered
        part_d2 = np.take_along_axis(d2, part, axis=1)
        order = np.argsort(part_d2, axis=1, kind="stable")
        indices[start:stop] = np.take_along_axis(part, order, axis=1)
        distances[start:stop] = np.sqrt(np.take_along_axis(part_d2, order, axis=1))
    return indices, distances


# ---- 2. local scale: rho and sigma


def smooth_knn(distances, n_neighbors):
    """Per point rho and sigma, the offset and width of its neighbour kernel.

    rho_i is the distance to the nearest neighbour that is not a duplicate (0 if all are), so
    every point is fully connected to at least one other. sigma_i solves, by bisection,
        sum_j exp(-max(d_ij - rho_i, 0) / sigma_i) = log2(n_neighbors)
    so every point has the same total edge weight however dense its neighbourhood is.

    Parameters
    ----------
    distances : array (n, k), ascending per row (as knn returns them)
    n_neighbors : int, sets the target log2(n_neighbors)

    Returns
    -------
    rho, sigma : float64 arrays (n,)
    """
    d = np.asarray(distances, dtype=np.float64)
    n = len(d)
    nonzero = d > 0
    first = nonzero.argmax(axis=1)                    # column of the nearest non-zero distance
    rho = np.where(nonzero.any(axis=1), d[np.arange(n), first], 0.0)
    excess = np.maximum(d - rho[:, None], 0.0)        # max(d_ij - rho_i, 0), (n, k)
    target = np.log2(n_neighbors)
    # bisection on every point at once: lo < sigma < hi, hi = inf until an upper bound is found
    lo, hi, sigma = np.zeros(n), np.full(n, np.inf), np.ones(n)
    for _ in range(BISECT_ITERS):
        total = np.exp(-excess / sigma[:, None]).sum(axis=1)
        too_wide = total > target                     # the sum grows with sigma
        hi = np.where(too_wide, sigma, hi)
        lo = np.where(too_wide, lo, sigma)
        sigma = np.where(np.isinf(hi), 2.0 * sigma, 0.5 * (lo + hi))
    # Floor, as umap-learn: with many duplicates no sigma reaches the target and bisection runs
    # to 0. The floor uses the point's own mean distance, or the global one if all are zero.
    floor = MIN_SIGMA_SCALE * np.where(rho > 0, d.mean(axis=1), d.mean())
    sigma = np.maximum(sigma, np.maximum(floor, np.finfo(np.float64).tiny))
    return rho, sigma


# ---- 3. the fuzzy graph


def fuzzy_graph(indices, distances, rho, sigma):
    """Symmetric weighted graph, as edge lists (head, tail, weight), both directions listed.

    Directed weights  w_ij = exp(-max(d_ij - rho_i, 0) / sigma_i)  form a sparse matrix P. Its
    fuzzy union with the transpose,  P + P^T - P*P^T = 1 - (1 - P)(1 - P^T)  elementwise, is the
    probability that at least one of the two directed edges exists.

    Parameters
    ----------
    indices, distances : arrays (n, k) from knn
    rho, sigma : arrays (n,) from smooth_knn

    Returns
    -------
    head, tail : int64 arrays (m,)
    weight : float64 array (m,), in (0, 1]
    """
    n, k = indices.shape
    w = np.exp(-np.maximum(distances - rho[:, None], 0.0) / sigma[:, None])    # (n, k)
    i = np.repeat(np.arange(n), k)                                            # (n * k,)
    j = indices.ravel()
    # Each entry P_ij is listed under key i*n + j, and again as (P^T)_ji under key j*n + i.
    # After sorting, a key occurs once (edge in one direction only) or twice (both directions).
    key = np.concatenate([i * n + j, j * n + i])
    val = np.concatenate([w.ravel(), w.ravel()])
    order = np.argsort(key, kind="stable")
    key, val = key[order], val[order]
    unique_key, first = np.unique(key, return_index=True)
    # union = 1 - prod(1 - w) over the one or two copies of each key
    weight = 1.0 - np.multiply.reduceat(1.0 - val, first)
    head, tail = np.divmod(unique_key, n)
    keep = weight > 0                                  # exp can underflow for far neighbours
    return head[keep], tail[keep], weight[keep]


# ---- 4. the low-dimensional similarity curve


def fit_ab(min_dist, spread=SPREAD):
    """Fit a, b so that 1 / (1 + a x^2b) follows the target similarity in the embedding,
        psi(x) = 1 if x < min_dist else exp(-(x - min_dist) / spread),
    by least squares on x in (0, 3 * spread], with damped Gauss-Newton steps.
    The defaults (min_dist = 0.1, spread = 1) give a = 1.577, b = 0.895.
    """
    x = np.linspace(0.0, 3.0 * spread, AB_POINTS)[1:]   # at x = 0 every curve fits exactly
    psi = np.where(x < min_dist, 1.0, np.exp(-(x - min_dist) / spread))

    def squared_error(a, b):
        return np.sum((1.0 / (1.0 + a * x ** (2.0 * b)) - psi) ** 2)

    a, b = 1.0, 1.0
    for _ in range(AB_ITERS):
        x2b = x ** (2.0 * b)
        f = 1.0 / (1.0 + a * x2b)
        # df/da = -x^2b f^2,  df/db = -2 a x^2b ln(x) f^2
        jac = np.stack([-x2b * f**2, -2.0 * a * x2b * np.log(x) * f**2], axis=1)  # (299, 2)
        da, db = np.linalg.lstsq(jac, psi - f, rcond=None)[0]
        # halve the step until the error drops: keeps a > 0 and avoids overshooting
        scale = 1.0
        while not (a + scale * da > 0 and squared_error(a + scale * da, b + scale * db)
                   < squared_error(a, b)):
            scale /= 2
            if scale < 1e-9:
                return float(a), float(b)                # no step helps: converged
        a, b = a + scale * da, b + scale * db
    return float(a), float(b)


# ---- 5. initial layout


def pca_init(x, rng):
    """First two principal components, scaled to [0, 10] per axis (umap-learn's scaling).

    Parameters
    ----------
    x : array (n, d)
    rng : np.random.Generator, for the 1e-4 jitter

    Returns
    -------
    y : float32 array (n, 2)
    """
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0)
    # principal axes = eigenvectors of the d x d scatter matrix X^T X with the largest eigenvalues
    _, vecs = np.linalg.eigh(xc.T @ xc)                 # ascending eigenvalues
    axes = vecs[:, [-1, -2]]                            # (d, 2)
    # an eigenvector's sign is arbitrary: make each axis's largest loading positive, so the map
    # does not come out mirrored on another LAPACK build
    axes = axes * np.sign(axes[np.abs(axes).argmax(axis=0), [0, 1]])
    y = xc @ axes                                       # (n, d) -> (n, 2)
    # y / max|y| + noise, then each axis mapped to [0, 10]: 10 (y - min) / (max - min)
    y = y / np.abs(y).max() + rng.normal(scale=INIT_NOISE, size=y.shape)
    return (INIT_SCALE * (y - y.min(axis=0)) / (y.max(axis=0) - y.min(axis=0))).astype(np.float32)


# ---- 6. layout optimisation


def optimize(y, head, tail, weight, a, b, n_epochs, rng):
    """Move the 2-D points by SGD on UMAP's fuzzy cross-entropy between graph and map,
        CE = sum_ij  w_ij log(w_ij / v_ij) + (1 - w_ij) log((1 - w_ij) / (1 - v_ij)),
        v_ij = 1 / (1 + a |y_i - y_j|^2b).
    Edge (i, j) with weight w is sampled every w_max / w epochs (the strongest every epoch).
    Each sample pulls i and j together and pushes i away from NEG_RATE random points (see
    _sgd_step). The learning rate falls linearly from 1 to 0 over the epochs. An epoch's
    sampled edges are processed in BATCHES_PER_EPOCH random batches, each one vectorised.

    Parameters
    ----------
    y : float32 array (n, 2), the initial layout (updated in place and returned)
    head, tail, weight : arrays (m,), the graph from fuzzy_graph (both directions listed)
    a, b : floats from fit_ab
    n_epochs : int
    rng : np.random.Generator, for the batch order and the negative samples

    Returns
    -------
    y : float32 array (n, 2)
    """
    # a random edge order once, so that consecutive slices of an epoch's edges are random batches
    order = rng.permutation(len(weight))
    head, tail, weight = head[order], tail[order], weight[order]
    epochs_per_sample = weight.max() / weight                  # (m,)
    epochs_per_negative = epochs_per_sample / NEG_RATE
    next_sample = epochs_per_sample.copy()
    next_negative = epochs_per_negative.copy()
    pos = np.ascontiguousarray(y.T)                            # (n, 2) -> (2, n): fast gathers
    for epoch in range(n_epochs):
        alpha = np.float32(1.0 - epoch / n_epochs)
        due = np.flatnonzero(next_sample <= epoch)             # edges sampled this epoch
        # negative samples each due edge has earned since it was last sampled (NEG_RATE on average)
        n_neg = ((epoch - next_negative[due]) / epochs_per_negative[due]).astype(np.int64)
        next_sample[due] += epochs_per_sample[due]
        next_negative[due] += n_neg * epochs_per_negative[due]
        for batch in np.array_split(np.arange(len(due)), BATCHES_PER_EPOCH):
            edges = due[batch]
            _sgd_step(pos, head[edges], tail[edges], n_neg[batch], a, b, alpha, rng)
    y[:] = pos.T
    return y


def _sgd_step(pos, i, j, n_neg, a, b, alpha, rng):
    """One batched SGD step on the edges (i, j), changing pos (2, n) in place.

    The descent directions of the two halves of CE (d = the distance in the map):
        attraction, -d/dy_i log v_ij:        -2ab d^(2b-2) / (1 + a d^2b) * (y_i - y_j)
        repulsion, -d/dy_i log(1 - v_ik):    2b / ((0.001 + d^2)(1 + a d^2b)) * (y_i - y_k)
    with k a random point. Each component is clipped to [-4, 4]. y_i takes both steps times
    alpha, y_j the opposite of its attraction step, y_k stays put (as in umap-learn).
    """
    n = pos.shape[1]
    a, b = np.float32(a), np.float32(b)
    # attraction between the two ends of each edge
    diff = np.take(pos, i, axis=1) - np.take(pos, j, axis=1)          # (2, E)
    d2 = (diff * diff).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):               # d2 = 0: handled below
        coeff = -2.0 * a * b * d2 ** (b - 1) / (1.0 + a * d2**b)
    coeff[d2 == 0] = 0.0
    pull = np.clip(coeff * diff, -GRAD_CLIP, GRAD_CLIP)               # (2, E)
    # repulsion from random points: edge e pushes its head away from n_neg[e] of them
    i_neg = np.repeat(i, n_neg)                                       # (N,)
    k_neg = rng.integers(0, n, size=len(i_neg))
    diff = np.take(pos, i_neg, axis=1) - np.take(pos, k_neg, axis=1)  # (2, N)
    d2 = (diff * diff).sum(axis=0)
    coeff = 2.0 * b / ((REPULSE_EPS + d2) * (1.0 + a * d2**b))       # finite, even at d2 = 0
    push = np.clip(coeff * diff, -GRAD_CLIP, GRAD_CLIP)               # (2, N); a twin: diff 0, no push
    # sum the moves per point: the head gets +pull and +push, the tail -pull
    for c in range(2):
        step = (np.bincount(i, pull[c], n) - np.bincount(j, pull[c], n)
                + np.bincount(i_neg, push[c], n))
        pos[c] += alpha * step.astype(np.float32)


# ---- the whole pipeline


def embed(x, n_neighbors=15, min_dist=0.1, n_epochs=None, seed=0):
    """UMAP embedding of the rows of x into 2-D.

    Parameters
    ----------
    x : array (n, d), finite, n > n_neighbors; duplicate rows are allowed
    n_neighbors : int >= 2, neighbourhood size, counting the point itself (as umap-learn)
    min_dist : float in [0, 1], how tightly points may pack in the map
    n_epochs : int or None; None = 500 up to 10,000 points, 200 above (as umap-learn)
    seed : int, the same seed gives the same output

    Returns
    -------
    y : float32 array (n, 2)
    """
    x = _check_points(x, "x")
    n = len(x)
    if not (isinstance(n_neighbors, (int, np.integer)) and n_neighbors >= 2):
        raise ValueError(f"n_neighbors must be an integer >= 2, got {n_neighbors!r}")
    if n <= n_neighbors:
        raise ValueError(f"x has {n} points, need more than n_neighbors={n_neighbors}; "
                         "pass more points or a smaller n_neighbors")
    if not (isinstance(min_dist, numbers.Real) and 0.0 <= min_dist <= SPREAD):
        raise ValueError(f"min_dist must lie in [0, {SPREAD}], got {min_dist!r}")
    if n_epochs is None:
        n_epochs = EPOCHS_SMALL if n <= SMALL_N else EPOCHS_LARGE
    if not (isinstance(n_epochs, (int, np.integer)) and n_epochs >= 1):
        raise ValueError(f"n_epochs must be a positive integer or None, got {n_epochs!r}")
    if np.all(x == x[0]):
        raise ValueError("x: all points are identical, there is no structure to embed")
    rng = np.random.default_rng(seed)

    indices, distances = knn(x, n_neighbors - 1)
    rho, sigma = smooth_knn(distances, n_neighbors)
    head, tail, weight = fuzzy_graph(indices, distances, rho, sigma)
    # edges too weak to be sampled even once in n_epochs are dropped, as umap-learn
    keep = weight >= weight.max() / n_epochs
    head, tail, weight = head[keep], tail[keep], weight[keep]
    a, b = fit_ab(min_dist)
    y = pca_init(x, rng)
    return optimize(y, head, tail, weight, a, b, n_epochs, rng)


# ---- quality metric


def trustworthiness(x_high, x_low, k=15):
    """Trustworthiness (Venna & Kaski 2001): are the map's neighbours true neighbours?

        T(k) = 1 - 2 / (n k (2n - 3k - 1)) * sum_i sum_{j in U_i} (r(i, j) - k)

    U_i: the k nearest neighbours of i in x_low that are not among its k nearest in x_high;
    r(i, j): rank of j among i's neighbours in x_high (1 = nearest, i itself excluded). Ties
    are ranked in j's favour: r = 1 + the number of points strictly closer. Ranks are counted
    in blocks of rows, so memory stays O(block * k * n) instead of O(n^2).

    Parameters
    ----------
    x_high : array (n, d), the original points
    x_low : array (n, d'), their embedding
    k : int, 1 <= k < n / 2 (for larger k the normalisation no longer bounds T to [0, 1])

    Returns
    -------
    float in [0, 1]; 1 = every map neighbour is a true neighbour
    """
    x_high = _check_points(x_high, "x_high").astype(np.float64, copy=False)
    x_low = _check_points(x_low, "x_low")
    n = len(x_high)
    if len(x_low) != n:
        raise ValueError(f"x_high has {n} points but x_low has {len(x_low)}; pass the same points")
    if not (isinstance(k, (int, np.integer)) and 1 <= k < n / 2):
        raise ValueError(f"trustworthiness needs an integer 1 <= k < n/2, got k={k} for n={n}")
    low_nn, _ = knn(x_low, k)                                  # (n, k)
    sq = np.einsum("ij,ij->i", x_high, x_high)
    block = max(1, TRUST_BLOCK_CELLS // (k * n))
    total = 0
    for start in range(0, n, block):
        stop = min(start + block, n)
        d2 = _block_sq_dists(x_high, sq, start, stop)                 # (B, n)
        d2_low_nn = np.take_along_axis(d2, low_nn[start:stop], axis=1)             # (B, k)
        # r(i, j) = 1 + #{l : d(i, l) < d(i, j)};  (B, 1, n) < (B, k, 1) -> (B, k, n)
        rank = 1 + np.count_nonzero(d2[:, None, :] < d2_low_nn[:, :, None], axis=2)
        # j is in U_i exactly when its rank exceeds k, so the sum runs over max(r - k, 0)
        total += int(np.maximum(rank - k, 0).sum())
    return 1.0 - 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)) * total


# ---- helpers


def _block_sq_dists(x, sq, start, stop):
    """Squared distances from rows start:stop of x to all rows, (B, n); a point to itself: inf.

    sq holds |x_i|^2. Uses |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, built in place, clipped at 0.
    """
    d2 = x[start:stop] @ x.T                                          # (B, d) @ (d, n) -> (B, n)
    d2 *= -2.0
    d2 += sq[start:stop, None]
    d2 += sq[None, :]
    np.maximum(d2, 0.0, out=d2)            # round-off can make it slightly negative
    rows = np.arange(stop - start)
    d2[rows, start + rows] = np.inf        # a point is not its own neighbour
    return d2


def _check_points(x, name):
    """x as a 2-D float array with finite values, or a ValueError saying what is wrong."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (points x features), got shape {x.shape}")
    if np.issubdtype(x.dtype, np.integer) or x.dtype == bool:
        x = x.astype(np.float64)
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} has NaN or infinite values in {len(rows)} rows "
                         f"(first: {rows[:5].tolist()}); drop or impute them first")
    return x


if __name__ == "__main__":
    demo_rng = np.random.default_rng(0)
    centres = demo_rng.normal(scale=10.0, size=(5, 10))
    blobs = np.concatenate([c + demo_rng.normal(size=(200, 10)) for c in centres])
    emb = embed(blobs, n_epochs=200)
    print(f"5 blobs of 200 points in 10-D -> {emb.shape}, "
          f"trustworthiness {trustworthiness(blobs, emb):.4f}")
