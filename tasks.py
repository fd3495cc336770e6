"""The gauntlet: every task the bake-off puts a trained autoencoder through.

Each task takes a trained model (any of ae.py's nine) and arrays, and returns numbers or arrays.
run.py calls them in order; nothing here touches files (harness/figures.py draws the arrays).

    from tasks import roc_auc, linear_probe
    roc_auc(labels, scores)                      # exact AUROC, ties count 1/2
    linear_probe(z_tr, y_tr, z_va, y_va, z_te, y_te)   # test accuracy of a converged probe

Sections: metrics (ROC, AUROC, average precision, rank correlation, k-NN, Frechet distance);
probes (a converged logistic regression by Newton-CG, the article's Adam-trained probe); samplers
(a Gaussian mixture by EM, the vq-VAE's categorical prior); model tasks (reconstruction error,
anomaly scores, interpolation, samples under every sampler, dead units, samples as numbers).

References: Fawcett (2006) "An introduction to ROC analysis" for the curve and the tie rule;
Heusel et al. (2017) for the Frechet distance; Dempster, Laird & Rubin (1977) and Bishop (2006,
section 9.2) for EM on a Gaussian mixture; Arthur & Vassilvitskii (2007) for k-means++; Ghosh et
al. (2020) and Chadebec et al. (2022, Pythae) for sampling any autoencoder from a mixture fitted
to its codes after training; the protocol is PROTOCOL.md.
Simplified: the probe's Newton steps come from conjugate gradients with a diagonal preconditioner
only; that is enough for latent codes and for the 1,024 pixels (seconds per fit), not a general
large-scale solver.

First read: one task at a time, beside the run.py function that calls it; roc_auc, knn_predict and
linear_probe first. Skip the Newton-CG internals and EM's numerics.
"""

import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- constants

N_CLASSES = 10
EVAL_BATCH = 2000            # rows per forward pass when only evaluating; bounds memory, not results
L2_GRID = np.logspace(-6, 1, 15)   # probe L2 strengths (mean-loss scale); the validation set picks one
NEWTON_TOL = 1e-7            # max |gradient| at which the probe counts as converged
NEWTON_MAX_ITER = 100        # Newton converges in ~10-30 steps here; this only stops pathologies
BIAS_RIDGE = 1e-8           # pins the softmax's free shift of the bias without penalising it
CG_FORCING = 0.1            # CG residual of early Newton steps: far from the optimum a rough step does
# the article's probe: at most 20 epochs of Adam (lr 1e-3) on batches of 32, early stop with patience 3
ARTICLES_PROBE_EPOCHS, ARTICLES_PROBE_BATCH, ARTICLES_PROBE_LR, ARTICLES_PROBE_PATIENCE = 20, 32, 1e-3, 3
INTERP_STEPS = 128           # interior points between the two test images, as the companion code did
CONFIDENT = 0.9              # "legible": the judge classifier is at least this sure
# Mixture sizes tried; the validation codes pick one. Pythae's default of 10 lies inside; 20 caps
# the time (harness/bench.py gmm), although the validation likelihood of real codes still rises there.
GMM_K_GRID = (1, 2, 5, 10, 20)
GMM_STARTS = 1               # k-means++ starts per K (the best training fit is kept); each costs a fit
GMM_MAX_ITER = 100           # EM meets GMM_TOL in 20 to 30 iterations here; this stops pathologies
# Stop when the mean log-likelihood per point gains less than this (nats) in one iteration: on
# harness/bench.py gmm's codes, 120 more iterations add only 0.14 (K = 10) and 0.21 (K = 20) nats,
# well below the 1.3 to 2.5 nats between neighbouring sizes of GMM_K_GRID, which is the choice.
GMM_TOL = 1e-2
# Added to every covariance's diagonal, times the codes' mean variance (scale-free): a component
# on a few points, or a dimension that never moves (a dead unit, a vq dimension with one codebook
# value), would otherwise have a singular covariance. 1e-6 of the spread is below any real variance.
GMM_RIDGE = 1e-6
IWAE_K = 128                 # draws per image for the VAEs' likelihood bounds (Burda et al.'s k)
IWAE_BATCH = 64              # images per pass of those bounds: 128 x 64 decoded images at a time
DEAD_SPAN = 1e-6                # a latent unit spanning less than this of the widest one's range is
                                # constant: far below one pixel of any latent map


# ---- metrics: ROC, AUROC, average precision

def _check_binary(labels, scores):
    """Validate and convert (labels, scores) to (bool array, float64 array)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must be 1-D and the same length, got {labels.shape} "
                         f"and {scores.shape}")
    if labels.dtype != bool:
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("labels must be boolean (True = positive) or 0/1")
        labels = labels.astype(bool)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values; fix the model or drop those rows")
    return labels, scores


def _counts_by_threshold(labels, scores):
    """Cumulative true and false positives when every distinct score is used as a threshold.

    Sorting once makes this O(n log n). Tied scores share a threshold, so they enter the counts
    together: that is what makes the trapezoid AUC count a tied (positive, negative) pair as 1/2.
    """
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    tps = np.cumsum(labels)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, scores[last_of_tie]


def roc_curve(labels, scores):
    """ROC curve of scores (n,) where higher means "more likely positive" (labels (n,), True = positive).

    Returns fpr, tpr, thresholds, each (m + 1,): from (0, 0) at threshold +inf (nothing flagged) to
    (1, 1), thresholds decreasing. With one class only, its rate is NaN, with a RuntimeWarning.
    """
    labels, scores = _check_binary(labels, scores)
    tps, fps, thresholds = _counts_by_threshold(labels, scores)
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    n_pos, n_neg = tps[-1], fps[-1]
    if n_pos == 0 or n_neg == 0:
        warnings.warn(f"ROC is undefined with only one class present ({n_pos} positives, "
                      f"{n_neg} negatives)", RuntimeWarning, stacklevel=2)
    with np.errstate(invalid="ignore"):     # one class: its rate is 0 / 0 = NaN, warned about above
        fpr, tpr = fps / n_neg, tps / n_pos     # fpr = FP / N, tpr = TP / P
    return fpr, tpr, np.r_[np.inf, thresholds]


def roc_auc(labels, scores):
    """Area under the ROC curve: P(score of a random positive > random negative), ties as 1/2.

    labels (n,) bool or 0/1, True = positive; scores (n,), higher = more anomalous. NaN, with a
    RuntimeWarning, when only one class is present.
    """
    labels, scores = _check_binary(labels, scores)
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        warnings.warn(f"AUC is undefined with only one class present ({n_pos} positives, "
                      f"{len(labels) - n_pos} negatives); AUC is NaN", RuntimeWarning, stacklevel=2)
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    # trapezoid rule: AUC = sum (fpr_k - fpr_{k-1}) * (tpr_k + tpr_{k-1}) / 2
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(labels, scores):
    """Area under the precision-recall curve as a step sum (AUPRC).

    AP = sum_k (R_k - R_{k-1}) * P_k over the distinct thresholds; tied scores form one step.
    Arguments as roc_auc's; NaN, with a RuntimeWarning, when there is no positive.
    """
    labels, scores = _check_binary(labels, scores)
    tps, fps, _ = _counts_by_threshold(labels, scores)
    if tps[-1] == 0:
        warnings.warn("average precision is undefined without positives; returning NaN",
                      RuntimeWarning, stacklevel=2)
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ---- metrics: rank correlation, and ink as the baseline anomaly score

def ink(x):
    """The stroke mass of each image, (N,): ink_i = sum_j x_ij (pixel intensities in [0, 1])."""
    return np.asarray(x, dtype=np.float64).sum(1)


def spearman(a, b):
    """Spearman's rank correlation: the Pearson correlation of the two average-rank vectors.

    rho = cov(rank(a), rank(b)) / (std(rank(a)) std(rank(b))); tied values share the mean of the
    ranks they span, so rho is +1 / -1 exactly when one ordering determines the other.
    Returns NaN, with a RuntimeWarning, when either input is constant (no ordering to compare).
    """
    ra, rb = _average_ranks(a), _average_ranks(b)
    if len(ra) != len(rb) or len(ra) < 2:
        raise ValueError(f"spearman needs two 1-D arrays of the same length >= 2, got {len(ra)} and {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    if denominator == 0:
        warnings.warn("rank correlation is undefined for a constant input; returning NaN",
                      RuntimeWarning, stacklevel=2)
        return float("nan")
    return float((ra * rb).sum() / denominator)


def _average_ranks(x):
    """Ranks 1..n of x; a run of t tied values gets the mean of its t ranks."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or not np.isfinite(x).all():
        raise ValueError("rank correlation needs 1-D finite values; fix the scores (NaN/inf?)")
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # each run of equal values: [start, end) in sorted order gets rank (start + 1 + end) / 2
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


# ---- metrics: nearest neighbours and Frechet distance

def knn_predict(z_ref, y_ref, z_query, k=10, exclude_self=False, block=1024):
    """Labels (n,) of z_query (n, d): the majority vote of the k nearest rows of z_ref (m, d), whose
    labels are y_ref (m,), by Euclidean distance, in blocks of queries. A tied vote goes to the tied
    class of the nearest neighbour. exclude_self: the query set *is* the reference set (leave-one-out).
    """
    z_ref, z_query = np.asarray(z_ref, np.float64), np.asarray(z_query, np.float64)
    if len(z_ref) <= k:
        raise ValueError(f"k-NN needs more than k={k} reference points, got {len(z_ref)}")
    ref_sq = (z_ref ** 2).sum(1)
    out = np.empty(len(z_query), dtype=np.int64)
    for start in range(0, len(z_query), block):
        q = z_query[start:start + block]
        # d^2(a, b) = |a|^2 + |b|^2 - 2 a.b ; the |a|^2 term does not change the ranking
        d2 = ref_sq[None, :] - 2 * q @ z_ref.T
        if exclude_self:
            d2[np.arange(len(q)), np.arange(start, start + len(q))] = np.inf
        nearest = np.argpartition(d2, k, axis=1)[:, :k]
        nearest = np.take_along_axis(nearest, np.argsort(
            np.take_along_axis(d2, nearest, 1), axis=1), 1)
        neighbour_class = y_ref[nearest]                                   # (b, k), nearest first
        rows = np.arange(len(q))[:, None]
        votes = np.zeros((len(q), N_CLASSES), dtype=np.int64)
        np.add.at(votes, (rows, neighbour_class), 1)
        # majority vote; among tied classes, the one of the nearest neighbour wins
        is_top = votes[rows, neighbour_class] == votes.max(1, keepdims=True)
        out[start:start + block] = neighbour_class[rows[:, 0], is_top.argmax(1)]
    return out


def frechet_distance(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets (the "FID" formula).

    FD = |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^(1/2) C2 C1^(1/2))^(1/2))

    The symmetric form C1^(1/2) C2 C1^(1/2) has the same trace of square root as (C1 C2)^(1/2)
    and is symmetric, so eigh gives its square root stably, with no SciPy. f1 (n1, d), f2 (n2, d).
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if min(len(f1), len(f2)) < 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError("Frechet distance needs two feature sets of >= 2 rows and equal width")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    c1_half = _sqrtm_psd(c1)
    cross = _sqrtm_psd(c1_half @ c2 @ c1_half)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(cross))


def _sqrtm_psd(c):
    """Square root of a symmetric positive semi-definite matrix via eigh (negatives clipped)."""
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ---- probes: converged logistic regression

def linear_probe(z_train, y_train, z_val, y_val, z_test, y_test, l2_grid=L2_GRID):
    """Test accuracy of a multinomial logistic regression on frozen features, trained to convergence.

    Features (n, d), labels (n,) int in [0, 10). Features are standardised with the training set's
    mean and std; the L2 strength is the one in `l2_grid` with the best validation accuracy (ties
    go to the stronger penalty). Returns the accuracy on the test set.
    """
    return fit_probe(z_train, y_train, z_val, y_val, l2_grid)(z_test, y_test)


def fit_probe(z_train, y_train, z_val, y_val, l2_grid=L2_GRID):
    """Fit the probe of `linear_probe`; returns `accuracy(z, y)` for the chosen model."""
    design, w = _probe_weights(z_train, y_train, z_val, y_val, l2_grid)
    return lambda z, y: float(np.mean((design(z) @ w).argmax(1) == np.asarray(y)))


def _probe_weights(z_train, y_train, z_val, y_val, l2_grid):
    """(design, W) of the chosen probe: its logits on codes z are design(z) @ W, W (d + 1, K).

    Solved exactly in the span of the training codes. With X the (n, d) standardised training
    codes and V a (d, r) orthonormal basis of its rows, split W = V B + W_perp, V^T W_perp = 0.
    X W = X V B, while ||W||^2 = ||B||^2 + ||W_perp||^2: the penalised optimum has W_perp = 0, and
    B solves the same problem on the r features X V (dL/dW = V dL/dB is what is tested against
    NEWTON_TOL). On 550 labelled 1,024-pixel images this turns 10,250 weights into 5,500.
    """
    z_train = _finite_2d(z_train, "z_train")
    mean, std = z_train.mean(0), z_train.std(0)
    std[std == 0] = 1.0   # a constant feature carries no information; leave it at zero
    design = lambda z: np.c_[(_finite_2d(z, "features") - mean) / std, np.ones(len(z))]
    x_tr, x_va = design(z_train), design(z_val)                               # (n, d + 1), (m, d + 1)
    basis = _row_space(x_tr[:, :-1])                                          # (d, r)
    x_span = np.c_[x_tr[:, :-1] @ basis, x_tr[:, -1]]                         # (n, r + 1)
    weights = lambda b: np.r_[basis @ b[:-1], b[-1:]]                         # W = V B; bias as it is
    y_tr = np.asarray(y_train)
    if len(np.unique(y_tr)) < 2:
        raise ValueError("the probe needs at least two classes in its training labels")
    best_acc, best_w, b = -1.0, None, np.zeros((x_span.shape[1], N_CLASSES))
    for lam in sorted(l2_grid, reverse=True):       # strong to weak penalty, warm-started
        b = _newton_logistic(x_span, y_tr, lam, b, basis)
        acc = np.mean((x_va @ weights(b)).argmax(1) == y_val)
        if acc > best_acc:
            best_acc, best_w = acc, weights(b)
    return design, best_w


def _row_space(x):
    """(d, r) orthonormal basis of the span of x's rows; r is np.linalg.matrix_rank's numerical rank
    (smaller singular values are rounding noise, their directions carry nothing)."""
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    return vt[s > s.max(initial=0.0) * max(x.shape) * np.finfo(float).eps].T


def logistic_objective(x, y, w, lam):
    """Mean cross-entropy of softmax(x w) plus the L2 penalty; returns (value, gradient, probs).

    x : (n, d) with a last column of ones (the bias), y : (n,) int, w : (d, K).
    The bias row gets only BIAS_RIDGE: the softmax ignores a shift shared by all classes, and
    that tiny ridge pins it down without biasing the fit.
    """
    n = len(x)
    penalty = _penalty(len(w), lam)
    logits = x @ w
    logits -= logits.max(1, keepdims=True)          # softmax is shift-invariant; avoids overflow
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    p = np.exp(log_p)
    # L = -1/n sum_i log p_{i, y_i} + 1/2 sum lam W^2
    value = -log_p[np.arange(n), y].mean() + 0.5 * (penalty * w ** 2).sum()
    # dL/dW = X^T (P - Y) / n + lam W
    residual = p.copy()
    residual[np.arange(n), y] -= 1
    return value, x.T @ residual / n + penalty * w, p


def _penalty(d, lam):
    """(d, 1) L2 strength of each weight row: lam for the features, BIAS_RIDGE for the bias (last)."""
    penalty = np.full((d, 1), lam)
    penalty[-1] = BIAS_RIDGE
    return penalty


def _newton_logistic(x, y, lam, w0, basis=None):
    """Minimise `logistic_objective` by Newton's method with a backtracking line search.

    Each step s solves H s = g by conjugate gradients on products H v (`_hessian_times`), never
    forming the (d K, d K) Hessian (1,481 s for one fit on 1,024 pixels). CG stops at |H s - g| <=
    eta |g|, eta = min(CG_FORCING, sqrt |g|): loose far from the optimum, near-exact close to it,
    so Newton still converges superlinearly (line-search Newton-CG, Nocedal & Wright, alg. 7.1).

    Everything stays in the sum-zero subspace S = {W : W 1 = 0}: the cross-entropy ignores a
    shift W + u 1^T and the penalty does not, so the optimum is in S, and so are the gradient and
    H v there. The preconditioned residual is projected back on S, or CG would wander into the
    shift directions, where H is only lam and converges slowest.

    basis : (d0, d - 1) or None: the feature rows of w are coordinates in it (`_probe_weights`),
    and the gradient of the d0 original weights, basis @ g, is what is tested.
    """
    penalty = _penalty(x.shape[1], lam)
    sum_zero = lambda v: v - v.mean(1, keepdims=True)          # the orthogonal projection on S
    w = sum_zero(w0)
    for _ in range(NEWTON_MAX_ITER):
        value, grad, p = logistic_objective(x, y, w, lam)
        full = grad if basis is None else np.r_[basis @ grad[:-1], grad[-1:]]
        if np.abs(full).max() < NEWTON_TOL:
            break
        # diag(H)[a, c] = 1/n sum_i x_ia^2 p_ic (1 - p_ic) + penalty_a: the CG preconditioner
        diag = (x ** 2).T @ (p * (1 - p)) / len(x) + penalty
        norm = np.linalg.norm(grad)
        step = _conjugate_gradient(lambda v: _hessian_times(x, p, penalty, v), grad,
                                   lambda r: sum_zero(r / diag), min(CG_FORCING, np.sqrt(norm)) * norm)
        t = 1.0
        while t > 1e-10:   # Armijo backtracking: a full Newton step can overshoot far from the optimum
            if logistic_objective(x, y, w - t * step, lam)[0] <= value - 1e-4 * t * (grad * step).sum():
                break
            t /= 2
        w = w - t * step
    return w


def _hessian_times(x, p, penalty, v):
    """H v for the Hessian H of `logistic_objective` at probabilities p (n, K); v : (d, K).

    H = 1/n sum_i (diag(p_i) - p_i p_i^T) kron x_i x_i^T + diag(penalty), so with a_i = v^T x_i:
    (H v)[b, c] = 1/n sum_i x_ib p_ic (a_ic - sum_e p_ie a_ie) + penalty_b v[b, c]
    """
    a = x @ v                                                  # (n, K)
    return x.T @ (p * (a - (p * a).sum(1, keepdims=True))) / len(x) + penalty * v


def _conjugate_gradient(times, b, precondition, tol):
    """Solve A s = b, A symmetric positive definite given as s -> A s, with r -> M^-1 r given.

    Stops once |b - A s| <= tol (Frobenius norm), or after b.size steps, where exact arithmetic
    would have solved it (preconditioned CG, Nocedal & Wright, Numerical Optimization, alg. 5.3).
    """
    s, r = np.zeros_like(b), b.copy()
    z = precondition(r)
    d, rz = z.copy(), (r * z).sum()
    for _ in range(b.size):
        if np.linalg.norm(r) <= tol:
            break
        ad = times(d)
        alpha = rz / (d * ad).sum()              # exact minimiser along d
        s += alpha * d
        r -= alpha * ad
        z = precondition(r)
        rz, rz_old = (r * z).sum(), rz
        d = z + (rz / rz_old) * d                # A-conjugate to every earlier direction
    return s


def label_budget_indices(labels, per_class, seed):
    """Stratified draw of `per_class` indices of each class (without replacement)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picked = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
              for c in range(N_CLASSES) if (labels == c).any()]
    return np.sort(np.concatenate(picked))


# ---- probes: the article's probe (a linear layer trained with Adam)

class FrozenEncoderProbe(nn.Module):
    """Linear(latent, 10) on top of a frozen autoencoder's `encode` (bottleneck included).

    The autoencoder is kept in a plain list, outside this module's tree, so that `.train()` and
    `.parameters()` never reach it: its weights stay fixed and its BatchNorm stays in eval mode.
    The variational bottleneck still samples on every call, as in the companion code.
    """

    def __init__(self, model, sample=True):
        super().__init__()
        self._frozen = [model.eval()]
        self.sample = sample
        self.linear = nn.Linear(model.latent_dim, N_CLASSES)

    def forward(self, x):
        with torch.no_grad():
            z = self._frozen[0].encode(x, sample=self.sample)
        return self.linear(z)


def train_classifier(net, x_train, y_train, x_val, y_val, x_test, y_test, seed=42,
                     epochs=ARTICLES_PROBE_EPOCHS, batch_size=ARTICLES_PROBE_BATCH, lr=ARTICLES_PROBE_LR,
                     patience=ARTICLES_PROBE_PATIENCE):
    """The article's probe: Adam on cross-entropy, early stop on validation accuracy.

    `net` maps images (B, 1024) to logits (B, 10); only its trainable parameters are updated.
    Returns the test accuracy of the epoch with the best validation accuracy.
    """
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = _tensor(x_train, device), torch.as_tensor(y_train, device=device).long()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    accuracy = lambda x, y: float((batched(net, x).argmax(1) == np.asarray(y)).mean())   # leaves net in eval mode
    best_val, best_state, waited = -1.0, None, 0
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_train), generator=gen).split(batch_size):
            opt.zero_grad()
            loss = F.cross_entropy(net(x_train[idx.to(device)]), y_train[idx.to(device)])
            loss.backward()
            opt.step()
        val_acc = accuracy(x_val, y_val)
        if val_acc > best_val:
            best_val, waited = val_acc, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    net.load_state_dict(best_state)
    return accuracy(x_test, y_test)


# ---- Gaussian mixture (EM)
# An ex-post density for any autoencoder: fitted to its training codes after training, sampled,
# decoded. Shapes: n points, d dimensions, K components. A mixture is a plain dict:
# {"weights": (K,), "means": (K, d), "covs": (K, d, d), "log_likelihood": [per iteration]}.

def fit_gmm(z, k, seed, starts=GMM_STARTS, ridge=GMM_RIDGE, max_iter=GMM_MAX_ITER, tol=GMM_TOL):
    """A K-component Gaussian mixture with full covariances fitted to z (n, d) by EM.

    Each start takes K initial means by k-means++, the data's covariance and weights 1/K; the
    start with the highest training log-likelihood is kept. "log_likelihood": the mean per point
    after each E step (EM never lowers it). Raises ValueError for NaN or inf, fewer points than
    components, or codes without any spread; warns when some dimensions are constant.
    """
    z = _finite_2d(z, "codes")
    n, d = z.shape
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"a {k}-component mixture needs 1 <= K <= the number of points ({n}); "
                         f"use a smaller K or more codes")
    spread = z.var(0)
    if not spread.any():
        raise ValueError("every dimension of the codes is constant: there is no distribution to fit")
    if not spread.all():
        warnings.warn(f"code dimension(s) {np.flatnonzero(spread == 0).tolist()} are constant (a dead "
                      f"unit?); the ridge keeps the covariances invertible and samples keep them "
                      f"(almost) constant", RuntimeWarning, stacklevel=2)
    rng = np.random.default_rng(seed)
    centred = z - z.mean(0)           # both EM steps expand squares (_outer_products): keep z near 0
    fits = [_em(centred, _kmeans_plus_plus(centred, k, rng), ridge * spread.mean(), max_iter, tol)
            for _ in range(starts)]
    best = max(fits, key=lambda gmm: gmm["log_likelihood"][-1])
    return {**best, "means": best["means"] + z.mean(0)}


def _em(z, means, ridge, max_iter, tol):
    """EM on centred codes z from the given initial means; `ridge`: the amount added to each diagonal."""
    n, d = z.shape
    k = len(means)
    outer = _outer_products(z)                             # (n, d*d), used by every E and M step
    covs = np.repeat((z.T @ z / n + ridge * np.eye(d))[None], k, axis=0)   # z is centred, (K, d, d)
    weights, history = np.full(k, 1 / k), []
    for _ in range(max_iter):
        # E step: r_ik = pi_k N(z_i | mu_k, S_k) / sum_j pi_j N(z_i | mu_j, S_j), in logs
        log_joint = np.log(weights) + _component_log_densities(z, means, covs, outer)   # (n, K)
        log_p = _logsumexp(log_joint)                                            # log p(z_i), (n,)
        history.append(float(log_p.mean()))
        if len(history) > 1 and history[-1] - history[-2] < tol:
            break
        r = np.exp(log_joint - log_p[:, None])                                   # (n, K), rows sum to 1
        weights, means, covs = _m_step(z, outer, r, ridge)
    return {"weights": weights, "means": means, "covs": covs, "log_likelihood": history}


def _outer_products(z):
    """z_i z_i^T of every point, flattened: (n, d) -> (n, d, d) -> (n, d*d).

    With them, both EM steps are single matrix products over all components: the M step's
    second moments sum_i r_ik z_i z_i^T, and the E step's z_i^T P_k z_i = <z_i z_i^T, P_k>.
    """
    return np.einsum("ni,nj->nij", z, z).reshape(len(z), -1)


def _m_step(z, outer, r, ridge):
    """Weights, means and covariances that maximise the expected log-likelihood under r (n, K)."""
    d = z.shape[1]
    # N_k = sum_i r_ik; the floor keeps a component that lost every point finite (weight ~0)
    n_k = r.sum(0) + 10 * np.finfo(np.float64).eps
    weights = n_k / n_k.sum()                              # pi_k = N_k / n
    means = r.T @ z / n_k[:, None]                         # mu_k = sum_i r_ik z_i / N_k, (K, d)
    # S_k = sum_i r_ik (z_i - mu_k)(z_i - mu_k)^T / N_k + ridge I
    #     = sum_i r_ik z_i z_i^T / N_k - mu_k mu_k^T + ridge I
    second = (r.T @ outer).reshape(-1, d, d) / n_k[:, None, None]                # (K, d, d)
    return weights, means, second - means[:, :, None] * means[:, None, :] + ridge * np.eye(d)


def _component_log_densities(z, means, covs, outer=None):
    """log N(z_i | mu_k, S_k) for every point and component, (n, K).

    log N(z | mu, S) = -1/2 (d log 2 pi + log det S + (z - mu)^T P (z - mu)), P = S^-1, where
    (z - mu)^T P (z - mu) = <z z^T, P> - 2 z^T P mu + mu^T P mu. `outer`: _outer_products(z).
    """
    n, d = z.shape
    try:
        chols = np.linalg.cholesky(covs)                   # S_k = L_k L_k^T, (K, d, d)
    except np.linalg.LinAlgError:
        raise FloatingPointError("a mixture covariance is not positive definite; raise GMM_RIDGE") from None
    inv_chols = np.linalg.inv(chols)
    precisions = inv_chols.transpose(0, 2, 1) @ inv_chols  # P_k = L_k^-T L_k^-1, (K, d, d)
    p_mu = np.einsum("kab,kb->ka", precisions, means)      # P_k mu_k, (K, d)
    log_det = 2 * np.log(np.diagonal(chols, axis1=1, axis2=2)).sum(1)   # log det S_k, (K,)
    outer = _outer_products(z) if outer is None else outer
    quadratic = outer @ precisions.reshape(len(means), d * d).T - 2 * z @ p_mu.T + (means * p_mu).sum(1)
    return -0.5 * (d * np.log(2 * np.pi) + log_det + quadratic)


def _logsumexp(a):
    """log sum_k exp(a_ik) per row, (n, K) -> (n,), shifted by the row's maximum so nothing overflows."""
    top = a.max(1, keepdims=True)
    return top[:, 0] + np.log(np.exp(a - top).sum(1))


def _kmeans_plus_plus(z, k, rng):
    """K initial means: a random point, then each next one a point drawn with probability
    proportional to D(z)^2, its squared distance to the nearest mean picked so far."""
    means = [z[rng.integers(len(z))]]
    d2 = ((z - means[0]) ** 2).sum(1)
    for _ in range(k - 1):
        total = d2.sum()
        i = rng.choice(len(z), p=d2 / total) if total > 0 else rng.integers(len(z))
        means.append(z[i])
        d2 = np.minimum(d2, ((z - z[i]) ** 2).sum(1))
    return np.array(means)                                 # (K, d)


def gmm_log_density(gmm, z):
    """log p(z_i) = log sum_k pi_k N(z_i | mu_k, S_k) for each row of z, (n,)."""
    z = _finite_2d(z, "codes")
    if z.shape[1] != gmm["means"].shape[1]:
        raise ValueError(f"codes have {z.shape[1]} dimensions, the mixture {gmm['means'].shape[1]}; "
                         f"score codes of the model the mixture was fitted to")
    centre = gmm["weights"] @ gmm["means"]     # shifting z and every mu alike keeps each density
    return _logsumexp(np.log(gmm["weights"])
                      + _component_log_densities(z - centre, gmm["means"] - centre, gmm["covs"]))


def sample_gmm(gmm, n, seed):
    """n draws, (n, d): a component k ~ Categorical(pi), then z = mu_k + L_k eps, eps ~ N(0, I)."""
    rng = np.random.default_rng(seed)
    weights, means = gmm["weights"], gmm["means"]
    component = rng.choice(len(weights), size=n, p=weights / weights.sum())
    eps = rng.standard_normal((n, means.shape[1]))
    chols = np.linalg.cholesky(gmm["covs"])                # (K, d, d)
    return means[component] + np.einsum("nij,nj->ni", chols[component], eps)


def choose_gmm(z_train, z_val, seed, k_grid=GMM_K_GRID):
    """The mixture, fitted on z_train, whose K in k_grid gives z_val the highest mean log-likelihood.

    Returns (gmm, {K: mean validation log-likelihood}); ties go to the smaller K. Only z_train
    fits and only z_val chooses: pass no test codes here.
    """
    z_val = _finite_2d(z_val, "validation codes")
    best, scores = None, {}
    for k in sorted(k_grid):
        gmm = fit_gmm(z_train, k, seed)
        scores[k] = float(gmm_log_density(gmm, z_val).mean())
        if best is None or scores[k] > scores[len(best["weights"])]:
            best = gmm
    return best, scores


def _finite_2d(z, what):
    """z as a float64 (points, dimensions) array; a ValueError for another shape, no rows, NaN or inf."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or len(z) == 0:
        raise ValueError(f"{what} must be a 2-D array (points, dimensions), got shape {z.shape}")
    if not np.isfinite(z).all():
        raise ValueError(f"{what} contain NaN or infinite values; fix the model or drop those rows")
    return z


# ---- learned categorical prior (vq-VAE)

def categorical_prior(indices, n_codes):
    """Per latent dimension j, the share of training codes that use each codebook value: (Z, K).

    p_jk = #{i : k_ij = k} / n, so every row sums to one; indices (n, Z) int in [0, n_codes).
    """
    indices = np.asarray(indices)
    if indices.ndim != 2 or len(indices) == 0 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a non-empty 2-D integer array, got {indices.dtype} {indices.shape}")
    if indices.min() < 0 or indices.max() >= n_codes:
        raise ValueError(f"codebook indices must lie in [0, {n_codes}); got {indices.min()} to {indices.max()}")
    counts = np.stack([np.bincount(column, minlength=n_codes) for column in indices.T])   # (Z, K)
    return counts / len(indices)


def sample_categorical(freqs, codebook, n, seed):
    """n codes (n, Z): per dimension j independently an index k ~ p_j, then its value codebook[j, k]."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(freqs.shape[1], size=n, p=row) for row in freqs], axis=1)  # (n, Z)
    return np.asarray(codebook)[np.arange(freqs.shape[0]), idx]


# ---- model tasks

def batched(fn, x, batch_size=EVAL_BATCH, model=None):
    """fn applied to x in batches under no_grad, as a NumPy array; `model` (default: fn itself, if a
    module) is put in eval mode and gives the device."""
    model = fn if model is None else model
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return np.concatenate([fn(_tensor(x[i:i + batch_size], device)).cpu().numpy()
                               for i in range(0, len(x), batch_size)])


def encode(model, x, sample=True):
    """Latent codes (N, latent_dim) after the bottleneck (sampled or mean for the VAEs)."""
    return batched(lambda b: model.encode(b, sample=sample), x, model=model)


def decode(model, z, through_bottleneck=False):
    """Decoded probabilities (N, 1024) of codes z; through_bottleneck: z are encoder outputs h
    and pass the bottleneck first (the vq-VAE's quantiser)."""
    step = (lambda b: model.decode(model.bottleneck(b))) if through_bottleneck else model.decode
    return batched(step, z, model=model)


def per_image_bce(model, x):
    """Summed binary cross-entropy per image, (N,): the reconstruction error and anomaly score.

    BCE(x, x_hat) = -sum_j [x_j log x_hat_j + (1 - x_j) log(1 - x_hat_j)]
    """
    return batched(lambda b: F.binary_cross_entropy(model(b), b, reduction="none").sum(1), x, model=model)


def anomaly_scores(model, x, k=IWAE_K):
    """{score: (N,)} per image, each oriented so that higher = more anomalous:

    bce        summed BCE of the reconstruction, -sum_j [x_j log x_hat_j + (1 - x_j) log(1 - x_hat_j)]
    signed     sum_j (x_hat_j - x_j), the score behind the article's published AUCs: not an error
               (over- and under-shooting pixels cancel), it can be negative
    bce_excess the summed BCE less its floor H(x) (see `entropy`): summed BCE = H(x) + sum_j
               KL(Bern(x_j) || Bern(x_hat_j)), and H(x) depends on the image alone, so this is the
               KL sum, >= 0 and 0 exactly when x_hat = x
    sse        sum_j (x_hat_j - x_j)^2, the error of an autoencoder with a Gaussian likelihood
    The VAEs add their likelihood bounds (ae.Autoencoder.likelihood_bounds, k draws each):
    neg_elbo, neg_iwae, and neg_elbo_excess = neg_elbo - H(x).
    """
    def per_image(b):   # one reconstruction serves every score (a VAE's would differ per forward)
        x_hat = model(b)
        p, q = x_hat.double(), b.double()
        # KL per pixel, with BCE's clamp of the logs at -100 (x_hat of exactly 0 or 1 stays finite)
        kl = (torch.xlogy(q, q) - q * p.log().clamp(min=-100)
              + torch.xlogy(1 - q, 1 - q) - (1 - q) * torch.log1p(-p).clamp(min=-100)).clamp(min=0)
        return torch.stack([F.binary_cross_entropy(x_hat, b, reduction="none").sum(1).double(),
                            (x_hat - b).sum(1).double(), kl.sum(1), ((p - q) ** 2).sum(1)], dim=1)

    scores = dict(zip(("bce", "signed", "bce_excess", "sse"), batched(per_image, x, model=model).T))
    if model.bottleneck.stochastic:   # a second pass: the first one's draws stay what they always were
        bounds = batched(lambda b: torch.stack(model.likelihood_bounds(b, k), 1), x, IWAE_BATCH, model)
        scores["neg_elbo"], scores["neg_iwae"] = bounds[:, 0].astype(np.float64), bounds[:, 1].astype(np.float64)
        scores["neg_elbo_excess"] = scores["neg_elbo"] - entropy(x)
    return scores


def entropy(x):
    """H(x) = -sum_j [x_j log x_j + (1 - x_j) log(1 - x_j)] per image, (N,), with 0 log 0 = 0:
    the summed BCE of a perfect reconstruction, the floor no model can go below on grey pixels."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    return -(torch.xlogy(x, x) + torch.xlogy(1 - x, 1 - x)).sum(1).numpy()


def png_bits(x, pad=2):
    """L(x): the length in bits of each image's lossless PNG file, (N,) (Serra et al., ICLR 2020).

    The 2-pixel pad is cropped back to 28x28, pixels become round(255 x) in an 8-bit grey image,
    and pillow writes it with compress_level=9; the whole file counts, header included.
    """
    x = np.asarray(x)
    side = int(round(np.sqrt(x.shape[1])))
    pixels = np.round(255 * x.reshape(-1, side, side)[:, pad:side - pad, pad:side - pad]).astype(np.uint8)
    return np.array([8 * len(png_file(image)) for image in pixels], dtype=np.float64)


def png_file(image):
    """The bytes of the lossless PNG file of one 8-bit grey image (H, W), compress_level=9."""
    import io
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def code_nll(model, x, x_train, x_val, seed):
    """-log p(z) of each image's code under a Gaussian mixture fitted to the training codes, (N,).

    z: the encoder's mean, or the vq-VAE's encoder output before the quantiser. The samplers'
    mixture (choose_gmm), fitted on the codes of x_train, K chosen on x_val's.
    """
    try:
        gmm, codes = code_density(model, x_train, x_val, seed)
    except ValueError as err:     # e.g. every unit dead (shallow's ReLU code): one code for all
        warnings.warn(f"{model.name}: no code density ({err}); every image scores the same", RuntimeWarning, stacklevel=2)
        return np.zeros(len(x))
    return -gmm_log_density(gmm, codes(x))


def code_density(model, x_train, x_val, seed):
    """(mixture, codes): code_nll's mixture, and the function that gives an image's code."""
    if hasattr(model.bottleneck, "codebook"):
        codes = lambda images: batched(model.encoder, images, model=model)   # before the quantiser
    else:
        codes = lambda images: encode(model, images, sample=False)
    gmm, _ = choose_gmm(codes(x_train), codes(x_val), seed)
    return gmm, codes


def anomaly_references(x):
    """The scores that need no model, higher = more anomalous: ink (its *low* values, as for the
    signed score), H(x) ("entropy") and the PNG length L(x) ("png"), the input's complexity."""
    return {"ink": -ink(x), "entropy": entropy(x), "png": png_bits(x)}


def metric_names(score):
    """(AUROC, AUPRC, rank correlation with ink) keys of one score; the article's signed score
    keeps its old keys and has no AUPRC (None)."""
    suffix = {"bce": "", "signed": "_signed_score"}.get(score, f"_{score}")
    return (f"anomaly_auc{suffix}", None if score == "signed" else f"anomaly_auprc{suffix}",
            f"anomaly_ink_spearman{suffix}")


def anomaly_metrics(is_anomaly, scores, ink=None):
    """{metric: value} of every score in {score: (N,)}: AUROC, AUPRC, and with ink (N,) each
    score's rank correlation with it."""
    row = {}
    for score, values in scores.items():
        auc, auprc, rho = metric_names(score)
        row[auc] = roc_auc(is_anomaly, values)
        if auprc:
            row[auprc] = average_precision(is_anomaly, values)
        if ink is not None:
            row[rho] = spearman(values, ink)
    return row


def anomaly_row(model, x, is_anomaly, seed, x_train=None, x_val=None, references=None, k=IWAE_K):
    """(metrics, scores) of one model on images x whose positives `is_anomaly` marks.

    A stochastic model draws from `seed`; k: the VAEs' draws per image. With the model's own
    training and validation images x_train and x_val, `code_nll` too. references:
    anomaly_references(x), if computed already. bce_png is Serra et al.'s complexity correction.
    """
    references = references if references is not None else anomaly_references(x)
    torch.manual_seed(seed)
    scores = anomaly_scores(model, x, k)
    if x_train is not None:
        scores["code_nll"] = code_nll(model, x, x_train, x_val, seed)
    scores["bce_png"] = scores["bce"] / np.log(2) - references["png"]
    return anomaly_metrics(is_anomaly, scores, -references["ink"]), scores


def interpolate(model, x_a, x_b, steps=INTERP_STEPS, fixed_noise=False, seed=0):
    """Decoded images along a straight line between two encoder outputs h (for the VAEs: mu and
    log_sigma), each point through the bottleneck and the decoder as in the companion code, (steps
    + 2, 1024). `fixed_noise` draws the VAE's eps once per path (the article's fix for the jitter).
    """
    device = next(model.parameters()).device
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        h = model.encoder(_tensor(np.stack([x_a, x_b]), device))
        t = torch.linspace(0, 1, steps + 2, device=device)[:, None]
        # h(t) = (1 - t) h_a + t h_b
        path = (1 - t) * h[0] + t * h[1]
        if fixed_noise and model.bottleneck.stochastic:
            eps = torch.randn(1, model.latent_dim, generator=gen).to(device).expand(len(path), -1)
            z = model.bottleneck(path, eps=eps)
        else:
            z = model.bottleneck(path)
        return model.decoder(z).cpu().numpy()


def draw_samples(model, x_all, train_idx, val_idx, n, seed):
    """({sampler: (n, 1024) images}, {sampler: mixture size K}) of one model, every sampler it has.

    Samplers, by their metric-key suffix: "" the model's own prior, where it has one
    (model.sample); "_gmm" the ex-post Gaussian mixture fitted to its training codes (the VAEs:
    sampled z, the codes their decoder was trained on), K chosen on the validation codes, decoded.
    The vq-VAE adds "_categorical" (per-dimension codebook frequencies of its training codes) and
    "_gmm_prequant" (a mixture on the encoder outputs before the quantiser, whose samples pass the
    quantiser). Only x_all[train_idx] fits and x_all[val_idx] chooses: test images never enter.
    """
    samples, components = {}, {}
    torch.manual_seed(seed)
    own = model.eval().sample(n)
    if own is not None:
        samples[""] = own.cpu().numpy()                                  # (n, 1024)
    torch.manual_seed(seed)     # the same sampled codes as every other task's
    mixtures = {"_gmm": (encode(model, x_all, sample=True), False)}     # (N, Z)
    if hasattr(model.bottleneck, "codebook"):                           # the vq-VAE
        codebook = model.bottleneck.codebook.detach().cpu().numpy()     # (Z, 512)
        indices = batched(lambda b: model.bottleneck.indices(model.encoder(b)), x_all, model=model)[train_idx]
        codes = sample_categorical(categorical_prior(indices, codebook.shape[1]), codebook, n, seed)
        samples["_categorical"] = decode(model, codes)                  # codes: (n, Z)
        mixtures["_gmm_prequant"] = (batched(model.encoder, x_all, model=model), True)   # before the quantiser
    for suffix, (codes, through_bottleneck) in mixtures.items():
        try:
            gmm, _ = choose_gmm(codes[train_idx], codes[val_idx], seed)
        except ValueError as err:     # codes that admit no mixture, e.g. every dimension dead
            warnings.warn(f"{model.name}: no ex-post mixture ({err})", RuntimeWarning, stacklevel=2)
            continue
        samples[suffix] = decode(model, sample_gmm(gmm, n, seed), through_bottleneck=through_bottleneck)
        components[suffix] = len(gmm["weights"])
    return samples, components


def dead_units(z):
    """How many latent units of the codes z (N, Z) never vary: a dead ReLU unit is always 0.

    A unit counts as constant when its range over the images is at most DEAD_SPAN of the widest
    unit's (a floor of float32's tiny keeps all-constant codes, widest range 0, counted as dead).
    """
    spans = np.ptp(z, axis=0)                                               # (Z,)
    return int(np.sum(spans <= DEAD_SPAN * max(float(spans.max()), np.finfo(np.float32).tiny)))


def judge_images(judge, images):
    """Predicted-class probabilities (N, 10) and penultimate features of a trained classifier."""
    probs = torch.softmax(torch.as_tensor(batched(judge, images)), 1).numpy()
    return probs, batched(judge.features, images, model=judge)


def sample_quality(probs, features, test_features):
    """Legibility, diversity and Frechet distance of generated images as the judge sees them.

    legibility = share of samples with max class probability > CONFIDENT
    diversity  = entropy (nats) of the histogram of predicted classes; max log 10 = 2.303
    """
    hist = np.bincount(probs.argmax(1), minlength=N_CLASSES) / len(probs)
    nonzero = hist[hist > 0]
    return {"legibility": float(np.mean(probs.max(1) > CONFIDENT)),
            "diversity": float(-(nonzero * np.log(nonzero)).sum()),
            "frechet": frechet_distance(features, test_features)}


def path_quality(probs, start_class, end_class):
    """Mean judge confidence along an interpolation and the classes it passes through."""
    predicted = probs.argmax(1)
    others = sorted(set(predicted.tolist()) - {start_class, end_class})
    return {"mean_confidence": float(probs.max(1).mean()),
            "third_class": bool(others), "classes_passed": others}


# ---- helpers

def _tensor(x, device):
    return torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
