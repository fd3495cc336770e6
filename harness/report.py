"""The report of a bake-off run: the audit of the article's conclusions and REPORT.md, from results.json.

    python -m harness.report results/mnist        # re-render results/mnist/REPORT.md from its results.json

run.py calls `write_report` at the end of every run; this file renders the same report again from
the saved numbers alone, in seconds, e.g. after editing a claim or a table. Nothing here trains or
evaluates a model.

Two parts:
    the audit: each conclusion of the article (and a few of ours, marked "(ours)") is a check on
        one seed's numbers; a claim is *confirmed* if it holds in every seed, *not confirmed* if in
        none, *depends* otherwise, and *not run* (with the reason) if the run lacks the models or
        the settings it needs. A claim that reads a metric results.json lacks is a bug, and stops
        the report with the claim's name.
    the report: one function per section of REPORT.md, each a few tables in Markdown.

Every list of models comes from the run (results.json), never from a count in the code: the
contestants are config["models"], and any other row of a metric (pca, pixels, ink) is a
reference. The article's own claims range over the article's nine contestants present in the run
(ARTICLE_MODELS), so that a contestant you add does not change what the article is held to.

First read: `audit` and CLAIMS, then `write_report`; skip the evidence helpers and the sections.
"""

import json
import os
import pathlib
import sys
import time
from functools import partial

import numpy as np

import mnist
import tasks
from harness import figures, workers
from harness.protocol import (ANOMALY_DIGIT, BUDGET_DRAWS, EPOCHS, FIRST_SEED, LABEL_BUDGETS, LATENT_ANOMALY,
                              N_GENERATED, PIXELS, QUICK, SAMPLERS)

# ---- constants

CLEAR_MARGIN = 0.02             # a lead in confidence or AUROC smaller than this is no lead
INK_FREE = 0.3                  # |rank correlation| with ink below which a score is free of it (rho^2 < 0.1)
INK_STRONG = 0.7                # |rank correlation| with ink from which a score "measures ink":
                                # rho^2 ~ 0.5, ink alone orders half the variance of the score's ranks
SIMPLE_FOLLOWS = 0.8            # |rank correlation over the held-out digits| with H(x)'s or L(x)'s
                                # AUROC from which a score finds the digits that simplicity finds
SAME_TIME_RATIO = 1.25          # training times within this factor count as "about equal"
EVIDENCE_MAX_DIGITS = 6         # evidence: decimals enough for any two float32-derived values
# the settings a report stands for: one made with others is replaced only with --replace
REPORT_SETTINGS = ("dataset", "models", "seeds", "epochs", "batch_size", "lr", "anomaly_digits",
                   "anomaly_latents", "quick")
PUBLISHED = {   # the article's MNIST table (single runs); its AUCs come from the signed score
    "reconstruction_bce": {"shallow": 123.2, "vanilla": 63.92, "stacked": 87.87, "sparse": 64.27,
                           "denoising": 75.15, "vae": 76.12, "beta_vae_strict": 86.12,
                           "beta_vae_loose": 69.51, "vq": 64.49},
    "probe_accuracy_articles_probe": {
        "shallow": 0.4511, "vanilla": 0.7835, "stacked": 0.6107, "sparse": 0.2221,
        "denoising": 0.8049, "vae": 0.6016, "beta_vae_strict": 0.4536, "beta_vae_loose": 0.6311,
        "vq": 0.7717},
    "anomaly_auc_signed_score": {
        "shallow": 0.9126, "vanilla": 0.7972, "stacked": 0.8659, "sparse": 0.8284,
        "denoising": 0.7811, "vae": 0.7823, "beta_vae_strict": 0.8098, "beta_vae_loose": 0.8202,
        "vq": 0.8180},
    "probe_accuracy_baseline_as_published": {"vanilla": 0.4364},
    "training_seconds": {"shallow": 638, "vanilla": 675, "stacked": 665, "sparse": 687,
                         "denoising": 678, "vae": 690, "beta_vae_strict": 689,
                         "beta_vae_loose": 688, "vq": 687},
}
# The article's contestants, and the groups its conclusions speak of: what the article is held
# to. Which models a *run* has, samples with or encodes stochastically comes from the run itself.
ARTICLE_MODELS = tuple(PUBLISHED["reconstruction_bce"])
ARTICLE_VAES = ("vae", "beta_vae_strict", "beta_vae_loose")
ARTICLE_GENERATIVE = ARTICLE_VAES + ("vq",)
# results.json keys renamed since earlier runs: old name -> today's (read_results maps them)
RENAMED = {"probe_accuracy_reference_protocol": "probe_accuracy_articles_probe"}


# ---- over seeds: the metrics as results.json keeps them

def summarise(per_seed):
    """[{metric: {model: v}}] over seeds -> {metric: {model: {mean, std, runs}}}."""
    out = {}
    for metric in per_seed[0]:
        out[metric] = {}
        for name in per_seed[0][metric]:
            runs = [r[metric][name] for r in per_seed if name in r.get(metric, {})]
            out[metric][name] = {"mean": float(np.mean(runs)),
                                 "std": float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0,
                                 "runs": runs}
    return out


# ---- the audit: the article's conclusions, each checked in every seed

def audit(m, names, digits):
    """[claim, verdict, evidence] rows for every claim of CLAIMS.

    m: results.json's metrics; names: the run's contestants; digits: its held-out digits.
    Verdicts: confirmed (holds in every seed), not confirmed (in none), depends, or not run (the
    evidence says what the run lacks). A check that reads a missing metric raises KeyError.
    """
    per_seed = _per_seed(m, names)
    n_seeds = len(per_seed)
    present = set(names) | {n for by_model in m.values() for n in by_model}   # and the references
    rows = []
    for claim, needed, needs, check in CLAIMS:
        # the article is held to its own contestants; our claims speak of every contestant run
        scope = names if claim.startswith("(ours)") else [n for n in names if n in ARTICLE_MODELS]
        missing = [n for n in needed if n not in present]
        lacking = needs(per_seed[0], digits) if needs else None
        if missing or lacking:
            rows.append([claim, "not run", lacking or f"needs {', '.join(missing)}, not in this run"])
            continue
        try:
            outcomes = [check(s, scope, digits) for s in per_seed]
        except KeyError as err:
            raise KeyError(f"claim {claim!r} reads {err}, which results.json lacks") from None
        k = sum(holds for holds, _ in outcomes)
        verdict = "confirmed" if k == n_seeds else "not confirmed" if k == 0 else "depends"
        evidence = ("one run: " + outcomes[0][1] if n_seeds == 1 else
                    f"holds in {k} of {n_seeds} seeds; " +
                    " / ".join(f"{FIRST_SEED + i}: {ev}" for i, (_, ev) in enumerate(outcomes)))
        rows.append([claim, verdict, evidence])
    return rows


def several_digits(s, digits):
    """What a claim about every held-out digit lacks: None if the run held out several."""
    return None if len(digits) > 1 else "one held-out digit; run with --anomaly-digits all"


def three_digits(s, digits):
    """What a rank correlation over the held-out digits lacks: None from three digits on."""
    return None if len(digits) > 2 else "fewer than three held-out digits; run with --anomaly-digits all"


def has(*metrics):
    """What a claim that reads these metrics lacks: None if the run has them all. A run made before
    a task existed lacks its metrics: its claims are *not run*, while a misspelt metric in a check
    still raises KeyError."""
    def lacking(s, digits):
        absent = [k for k in metrics if k not in s]
        return f"needs {', '.join(absent)}, which this run's results.json lacks (an older run)" if absent else None
    return lacking


def several_latents(s, digits):
    """What a claim about every latent size lacks: None if the anomaly models had several."""
    return None if len(_anomaly_latents(s)) > 1 else "one latent size; run with --anomaly-latents 2,20"



def claim_shallow_worst(s, names, digits):
    worst = _ranked(s, "reconstruction_bce", names)[-1]
    return worst == "shallow", f"worst {worst} {s['reconstruction_bce'][worst]:.1f}"


def claim_top_three(s, names, digits):
    best = _ranked(s, "reconstruction_bce", names)[:3]
    return set(best) == {"vanilla", "sparse", "vq"}, _listed(s["reconstruction_bce"], best, 1)


def claim_vaes_reconstruct_worse(s, names, digits):
    bce, vaes = s["reconstruction_bce"], [v for v in ARTICLE_VAES if v in names]
    holds = all(bce[v] > bce["vanilla"] for v in vaes) and max(vaes, key=bce.get) == "beta_vae_strict"
    return holds, _listed(bce, ["vanilla"] + vaes, 1)


def claim_denoising_best(s, names, digits, metric):
    best = _ranked(s, metric, names)[-1]
    return best == "denoising", f"best {best} {s[metric][best]:.3f}"


def claim_sparse_below_baseline(s, names, digits):
    sparse, base = s["probe_accuracy_articles_probe"]["sparse"], _baseline(s)
    return sparse < base, _listed({"sparse": sparse, "baseline": base}, ["sparse", "baseline"], 3)


def claim_sparse_below_median(s, names, digits):
    sparse = s["probe_accuracy"]["sparse"]
    median = float(np.median([s["probe_accuracy"][n] for n in names if n != "sparse"]))
    return sparse < median, _listed({"sparse": sparse, "others' median": median},
                                    ["sparse", "others' median"], 3)


def claim_beat_baseline(s, names, digits):
    others, base = [n for n in names if n != "sparse"], _baseline(s)
    acc = s["probe_accuracy_articles_probe"]
    above = [n for n in others if acc[n] > base]
    d = _apart([base] + [acc[n] for n in others], 3)
    return len(above) >= len(others) - 1, f"{len(above)} of {len(others)} above {base:.{d}f}"


def claim_loose_best_vae(s, names, digits):
    acc = s["probe_accuracy_articles_probe"]
    best = max(ARTICLE_VAES, key=acc.get)
    return best == "beta_vae_loose", _listed(acc, ARTICLE_VAES, 3)


def claim_anomaly_order(s, names, digits, metric):
    order = _ranked(s, metric, names)[::-1]
    return _articles_order(s, metric, names), _listed(s[metric], order[:3], 3)


def claim_anomaly_order_every_digit(s, names, digits, metric):
    held = [d for d in digits if _articles_order(s, f"{metric}_digit_{d}", names)]
    firsts = ", ".join(f"{d}: {_ranked(s, f'{metric}_digit_{d}', names)[-1]}" for d in digits)
    return len(held) == len(digits), f"holds for {len(held)} of {len(digits)} digits (best: {firsts})"


def claim_anomaly_order_every_latent(s, names, digits, metric):
    latents = _anomaly_latents(s)
    key = lambda z: f"{metric}_digit_{ANOMALY_DIGIT}" + ("" if z == LATENT_ANOMALY else f"_z{z}")
    tops = {z: _ranked(s, key(z), names)[::-1][:2] for z in latents}
    rho = tasks.spearman([s[key(latents[0])][n] for n in names], [s[key(latents[-1])][n] for n in names])
    return (all(_articles_order(s, key(z), names) for z in latents),
            "; ".join(f"z={z}: {', '.join(f'{n} {s[key(z)][n]:.3f}' for n in t)}" for z, t in tops.items())
            + f"; rank correlation z={latents[0]} vs z={latents[-1]} {rho:.2f}")


def claim_pca_first_try(s, names, digits, metric):
    """PCA within CLEAR_MARGIN of the best contestant, at the article's digit or (sweep) on the
    mean over the held-out digits: a first try that is hardly worse than the best autoencoder."""
    keys = [metric] if len(digits) < 2 else [f"{metric}_digit_{d}" for d in digits]
    mean = lambda n: float(np.mean([s[k][n] for k in keys]))
    best = max(names, key=mean)
    close = sum(s[k]["pca"] >= max(s[k][n] for n in names) - CLEAR_MARGIN for k in keys)
    return (mean("pca") >= mean(best) - CLEAR_MARGIN,
            f"pca {mean('pca'):.3f}, shallow {mean('shallow'):.3f}, best {best} {mean(best):.3f}"
            + (f" (means over {len(keys)} digits; pca close to the best for {close})" if len(keys) > 1 else ""))


def claim_signed_score_is_ink(s, names, digits):
    rho = {n: s["anomaly_ink_spearman_signed_score"][n] for n in names}
    strong = [n for n in names if abs(rho[n]) >= INK_STRONG]
    median = float(np.median(list(rho.values())))
    return (len(strong) > len(names) / 2,
            f"|ρ| >= {INK_STRONG} for {len(strong)} of {len(names)}; median ρ {median:.3f}")


def claim_beat_pixels(s, names, digits, metric):
    pixels = s[metric][PIXELS]
    above = [n for n in names if s[metric][n] > pixels]
    return len(above) > len(names) / 2, f"{len(above)} of {len(names)} above pixels {pixels:.3f}"


def claim_strict_most_legible(s, names, digits, suffix):
    """Among the contestants in `names` that have this sampler (never a reference model)."""
    legible = {n: v for n, v in s[f"sample_legibility{suffix}"].items() if n in names}
    best = max(legible, key=legible.get)
    return best == "beta_vae_strict", _listed(legible, list(legible), 2)


def claim_loose_diverse_less_legible(s, names, digits):
    div, leg = s["sample_diversity"], s["sample_legibility"]
    strict, loose = "beta_vae_strict", "beta_vae_loose"
    dd, dl = _apart([div[loose], div[strict]], 2), _apart([leg[loose], leg[strict]], 2)
    return (div[loose] > div[strict] and leg[loose] < leg[strict],
            f"diversity {div[loose]:.{dd}f} vs {div[strict]:.{dd}f}, "
            f"legible {leg[loose]:.{dl}f} vs {leg[strict]:.{dl}f}")


def claim_vq_samples_worst(s, names, digits):
    legible = {n: v for n, v in s["sample_legibility"].items() if n in names}   # own priors, contestants
    least = sorted(legible, key=legible.get)[:2]
    return least[0] == "vq", "least legible: " + _listed(legible, least, 2)


def claim_vq_needs_learned_prior(s, names, digits, suffix):
    """The learned prior's vq-VAE samples beat uniform codes: more legible and a lower FD."""
    leg, fd = s[f"sample_legibility{suffix}"]["vq"], s[f"sample_frechet{suffix}"]["vq"]
    leg0, fd0 = s["sample_legibility"]["vq"], s["sample_frechet"]["vq"]
    return leg > leg0 and fd < fd0, f"legible {leg:.2f} vs {leg0:.2f} uniform, FD {fd:.0f} vs {fd0:.0f}"


def claim_only_vaes_sample(s, names, digits):
    """No deterministic contestant with the ex-post mixture reaches the VAEs' mean legibility with
    their own N(0, I) prior."""
    mixture, own = s["sample_legibility_gmm"], s["sample_legibility"]
    deterministic = [n for n in names if n not in own]   # no prior of their own
    vaes = float(np.mean([own[n] for n in ARTICLE_VAES]))
    best = max(deterministic, key=mixture.get)
    return mixture[best] < vaes, (f"best deterministic with the mixture: {best} {mixture[best]:.2f}; "
                                  f"VAEs with their own prior: mean {vaes:.2f}")


def claim_vae_interpolations(s, names, digits):
    conf = s["interpolation_confidence"]
    vaes = np.mean([conf[n] for n in names if n in ARTICLE_VAES])
    others = np.mean([conf[n] for n in names if n not in ARTICLE_VAES])
    d = _apart([vaes - others, CLEAR_MARGIN], 3)
    return vaes - others > CLEAR_MARGIN, f"VAEs {vaes:.{d}f}, others {others:.{d}f} (lead {vaes - others:.{d}f})"


def claim_same_training_time(s, names, digits):
    seconds = [s["training_seconds"][n] for n in names]
    ratio = max(seconds) / min(seconds)
    return ratio <= SAME_TIME_RATIO, (f"{min(seconds):.0f} to {max(seconds):.0f} s "
                                     f"(x{ratio:.{_apart([ratio, SAME_TIME_RATIO], 2)}f})")


# (the claim, the contestants it names, what else it needs (None, or a function that says what
# the run lacks), its check on one seed's numbers -> (holds, evidence))
def _score_keys(digits, latent=None):
    """Key suffixes a claim about the anomaly scores averages over: every held-out digit (or the
    article's), or the article's digit at another latent size."""
    if latent:
        return [f"_digit_{ANOMALY_DIGIT}_z{latent}"]
    return [f"_digit_{d}" for d in digits] if len(digits) > 1 else [""]


def _auc(s, score, n, keys):
    return float(np.mean([s[tasks.metric_names(score)[0] + k][n] for k in keys]))


def claim_score_beats_bce(s, names, digits, score, latent=None, scope=None):
    """The score's mean AUROC over the digits is above the summed BCE's for most of the models
    (for every one of `scope`, when given)."""
    keys = _score_keys(digits, latent)
    have = [n for n in (scope or names) if n in s[tasks.metric_names(score)[0] + keys[0]]]
    ahead = [n for n in have if _auc(s, score, n, keys) > _auc(s, "bce", n, keys)]
    pairs = sum(s[tasks.metric_names(score)[0] + k][n] > s["anomaly_auc" + k][n] for n in have for k in keys)
    holds = len(ahead) == len(have) if scope else len(ahead) > len(have) / 2
    return holds, (f"ahead for {len(ahead)} of {len(have)} ({', '.join(ahead) or 'none'}); on {pairs} of "
                   f"{len(have) * len(keys)} (model, digit) pairs")


def ink_and_simplicity(s, names, digits):
    """{score: (median |rho with ink|, rho_H, rho_L)} of one seed's numbers (or the seeds' means).

    The first: over the contestants and held-out digits, |rank correlation of the score with ink|
    per image (a constant score, e.g. -log p(z) of dead codes, has none and is left out). rho_H
    and rho_L: over the held-out digits, the rank correlation of the score's AUROC (mean over the
    contestants) with the AUROC of H(x) alone and of L(x) alone (NaN below three digits): near 1,
    the score finds exactly the digits that the image's simplicity finds.
    """
    keys, out = _score_keys(digits), {}
    for sc in ANOMALY_SCORES:
        auc, _, rho = tasks.metric_names(sc)
        have = [n for n in names if all(n in s.get(rho + k, {}) for k in keys)]
        values = [abs(s[rho + k][n]) for n in have for k in keys if np.isfinite(s[rho + k][n])]
        if not values:
            continue
        follows = [np.nan, np.nan]
        if len(keys) > 2:
            profile = [np.mean([s[auc + k][n] for n in have]) for k in keys]
            follows = [tasks.spearman(profile, [s["anomaly_auc" + k][r] for k in keys]) for r in ("entropy", "png")]
        out[sc] = (float(np.median(values)), *follows)
    return out


def ink_reading(median_rho, rho_h, rho_l):
    """ink_and_simplicity's numbers of one score in words."""
    if median_rho >= INK_STRONG:
        return "counts ink"
    if median_rho >= INK_FREE:
        return "partly ink"
    if not (np.isfinite(rho_h) and np.isfinite(rho_l)):
        return "free of ink; simplicity needs 3 or more digits"
    return "simplicity" if max(abs(rho_h), abs(rho_l)) >= SIMPLE_FOLLOWS else "free of both"


def claim_some_score_free_of_ink(s, names, digits):
    median = {sc: v[0] for sc, v in ink_and_simplicity(s, names, digits).items()}
    free = [sc for sc, v in median.items() if sc != "bce" and v < INK_FREE]
    return bool(free), "median |ρ|: " + ", ".join(f"{sc} {v:.2f}" for sc, v in median.items())


def claim_free_of_ink_and_of_simplicity(s, names, digits):
    reading = {sc: ink_reading(*v) for sc, v in ink_and_simplicity(s, names, digits).items() if sc != "bce"}
    free = [sc for sc, r in reading.items() if r not in ("counts ink", "partly ink")]
    simple = [sc for sc in free if reading[sc] != "free of both"]      # NaN: can't tell, so not clean
    clean = [sc for sc in free if sc not in simple]
    return bool(clean), (f"free of ink: {', '.join(free) or 'none'}; of these, following H(x) or L(x) over the "
                         f"digits: {', '.join(simple) or 'none'}; free of both: {', '.join(clean) or 'none'}")


def claim_best_pair_beats_references(s, names, digits):
    keys = _score_keys(digits)
    pairs = {(n, sc): _auc(s, sc, n, keys) for sc in ANOMALY_SCORES for n in names
             if all(n in s.get(tasks.metric_names(sc)[0] + k, {}) for k in keys)}
    refs = {r: _auc(s, "bce", r, keys) for r in ("ink", "entropy", "png") if r in s["anomaly_auc" + keys[0]]}
    refs.update({f"pca ({sc})": _auc(s, sc, "pca", keys) for sc in ANOMALY_SCORES
                 if all("pca" in s.get(tasks.metric_names(sc)[0] + k, {}) for k in keys)})
    (n, sc), best = max(pairs.items(), key=lambda kv: kv[1])
    ref = max(refs, key=refs.get)
    return (best - refs[ref] > CLEAR_MARGIN,
            f"best {n} with {sc} {best:.3f}; best reference {ref} {refs[ref]:.3f}; lead {best - refs[ref]:+.3f}")


def _both(*lacks):
    """What a claim lacks under several conditions: the first that is not met, else None."""
    return lambda s, digits: next((w for w in (lack(s, digits) for lack in lacks) if w), None)


CLAIMS = [
    ("The shallow AE reconstructs worst.", ("shallow",), None, claim_shallow_worst),
    ("Vanilla, sparse and vq-VAE share first place in reconstruction.",
     ("vanilla", "sparse", "vq"), None, claim_top_three),
    ("The VAEs reconstruct worse than vanilla; strict beta-VAE worst of them.",
     ("vanilla",) + ARTICLE_VAES, None, claim_vaes_reconstruct_worse),
    ("Denoising features classify best (the article's probe).", ("denoising",), None,
     partial(claim_denoising_best, metric="probe_accuracy_articles_probe")),
    ("Denoising features classify best (converged probe).", ("denoising",), None,
     partial(claim_denoising_best, metric="probe_accuracy")),
    ("Sparse features are not suited for classification: below the baseline (the article's probe).",
     ("sparse",), None, claim_sparse_below_baseline),
    ("Sparse features are not suited for classification: below the others' median (converged probe).",
     ("sparse",), None, claim_sparse_below_median),
    ("Nearly all autoencoders (sparse aside) beat the baseline (the article's probe).", (), None,
     claim_beat_baseline),
    ("Among the VAEs, the loose beta-VAE classifies best (the article's probe).", ARTICLE_VAES, None,
     claim_loose_best_vae),
    ("Shallow is best at anomaly detection, stacked second (summed BCE score).",
     ("shallow", "stacked"), None, partial(claim_anomaly_order, metric="anomaly_auc")),
    ("Shallow is best at anomaly detection, stacked second (the article's signed score).",
     ("shallow", "stacked"), None, partial(claim_anomaly_order, metric="anomaly_auc_signed_score")),
    ("The anomaly order (shallow best, stacked second) is stable for every held-out digit (summed BCE).",
     ("shallow", "stacked"), several_digits, partial(claim_anomaly_order_every_digit, metric="anomaly_auc")),
    ("The anomaly order (shallow best, stacked second) is stable for every held-out digit (signed score).",
     ("shallow", "stacked"), several_digits,
     partial(claim_anomaly_order_every_digit, metric="anomaly_auc_signed_score")),
    ("The anomaly order is stable across latent sizes (held-out 1; summed BCE).", ("shallow", "stacked"),
     several_latents, partial(claim_anomaly_order_every_latent, metric="anomaly_auc")),
    ("The anomaly order is stable across latent sizes (held-out 1; signed score).", ("shallow", "stacked"),
     several_latents, partial(claim_anomaly_order_every_latent, metric="anomaly_auc_signed_score")),
    (f"PCA is a good first try for anomaly detection: within {CLEAR_MARGIN} of the best contestant "
     "(summed BCE).", ("shallow", "pca"), None, partial(claim_pca_first_try, metric="anomaly_auc")),
    (f"PCA is a good first try for anomaly detection: within {CLEAR_MARGIN} of the best contestant "
     "(signed score).", ("shallow", "pca"), None,
     partial(claim_pca_first_try, metric="anomaly_auc_signed_score")),
    (f"(ours) The signed score mostly measures ink: |rank correlation| >= {INK_STRONG} for most "
     "contestants.", (), has("anomaly_ink_spearman_signed_score"), claim_signed_score_is_ink),
    ("(ours) Autoencoder features beat raw pixels with 550 labels: most contestants above them "
     "(converged probe).", (PIXELS,), None, partial(claim_beat_pixels, metric="probe_accuracy")),
    ("(ours) Autoencoder features beat raw pixels with 550 labels: most contestants above them "
     "(the article's probe).", (PIXELS,), None,
     partial(claim_beat_pixels, metric="probe_accuracy_articles_probe")),
    ("The strict beta-VAE gives the most meaningful samples (own priors: the four generative "
     "contestants).", ARTICLE_GENERATIVE, None, partial(claim_strict_most_legible, suffix="")),
    ("The strict beta-VAE gives the most meaningful samples (ex-post mixture: all contestants).",
     ARTICLE_GENERATIVE, has("sample_legibility_gmm"), partial(claim_strict_most_legible, suffix="_gmm")),
    ("The loose beta-VAE's samples are more diverse but less legible than the strict one's.",
     ("beta_vae_strict", "beta_vae_loose"), None, claim_loose_diverse_less_legible),
    ("vq-VAE samples (uniform codes) do not resemble digits.", ARTICLE_GENERATIVE, None,
     claim_vq_samples_worst),
    ("vq-VAE samples need a learned prior: a learned categorical prior beats uniform codes (more "
     "legible, lower FD).", ("vq",), has("sample_legibility_categorical", "sample_frechet_categorical"),
     partial(claim_vq_needs_learned_prior, suffix="_categorical")),
    ("vq-VAE samples need a learned prior: an ex-post mixture on the codes beats uniform codes.",
     ("vq",), has("sample_legibility_gmm", "sample_frechet_gmm"),
     partial(claim_vq_needs_learned_prior, suffix="_gmm")),
    ("vq-VAE samples need a learned prior: a mixture before the quantiser beats uniform codes.",
     ("vq",), has("sample_legibility_gmm_prequant", "sample_frechet_gmm_prequant"),
     partial(claim_vq_needs_learned_prior, suffix="_gmm_prequant")),
    ("Only the VAEs can sample: no deterministic model with an ex-post mixture is as legible as the "
     "VAEs' own prior (their mean).", ("vanilla",) + ARTICLE_VAES, has("sample_legibility_gmm"),
     claim_only_vaes_sample),
    (f"VAE interpolations stay digit-like; the others fade (VAEs lead the judge's confidence by "
     f"more than {CLEAR_MARGIN}).", ("vae", "vanilla"), None, claim_vae_interpolations),
    (f"Training time is about the same for every model (within x{SAME_TIME_RATIO}).", ("shallow", "vanilla"),
     None, claim_same_training_time),
    ("(ours) Removing the BCE's floor beats the summed BCE: BCE - H(x) has the higher mean AUROC over "
     "the held-out digits for most contestants.", (), has("anomaly_auc_bce_excess"),
     partial(claim_score_beats_bce, score="bce_excess")),
    ("(ours) Code density beats the summed BCE at latent 2: -log p(z) has the higher mean AUROC over "
     "the held-out digits for most contestants.", (), has("anomaly_auc_code_nll"),
     partial(claim_score_beats_bce, score="code_nll")),
    ("(ours) Code density beats the summed BCE at latent 20 (held-out 1) for most contestants.", (),
     _both(several_latents, has("anomaly_auc_code_nll")), partial(claim_score_beats_bce, score="code_nll", latent=20)),
    ("(ours) A VAE's likelihood bound beats its reconstruction error: -IWAE above the summed BCE for "
     "every VAE (mean AUROC over the held-out digits).", ARTICLE_VAES, has("anomaly_auc_neg_iwae"),
     partial(claim_score_beats_bce, score="neg_iwae", scope=ARTICLE_VAES)),
    (f"(ours) Some score beyond the summed BCE is free of ink: median |ρ with ink| below {INK_FREE} "
     "over the contestants and digits.", (), has("anomaly_ink_spearman_bce_excess"), claim_some_score_free_of_ink),
    (f"(ours) Some score is free of ink without being the images' simplicity instead: median |ρ with ink| "
     f"below {INK_FREE}, and its AUROC over the held-out digits not rank-correlated with H(x)'s or L(x)'s "
     f"(|ρ| below {SIMPLE_FOLLOWS}).", (), _both(three_digits, has("anomaly_ink_spearman_bce_excess")),
     claim_free_of_ink_and_of_simplicity),
    (f"(ours) The best (model, score) pair beats every reference (ink, H(x), L(x), pca with any score) "
     f"by more than {CLEAR_MARGIN} (mean AUROC over the held-out digits).", ("pca",),
     has("anomaly_auc_bce_excess"), claim_best_pair_beats_references),
]


def _apart(values, digits):
    """Decimals, at least `digits`, at which the unequal ones among `values` print unequal (at
    most EVIDENCE_MAX_DIGITS): evidence rounded into a tie would contradict its verdict."""
    for d in range(digits, EVIDENCE_MAX_DIGITS):
        if len({f"{v:.{d}f}" for v in values}) == len(set(values)):
            return d
    return EVIDENCE_MAX_DIGITS


def _listed(values, names, digits):
    """'name value, name value' with enough decimals to tell the values apart."""
    d = _apart([values[n] for n in names], digits)
    return ", ".join(f"{n} {values[n]:.{d}f}" for n in names)


def _ranked(s, metric, names):
    """names sorted by one seed's value of metric, lowest first."""
    return sorted(names, key=lambda n: s[metric][n])


def _articles_order(s, metric, names):
    """The article's anomaly order in one seed's numbers: shallow best, stacked second."""
    return _ranked(s, metric, names)[::-1][:2] == ["shallow", "stacked"]


def _per_seed(m, names):
    """results.json's metrics -> one {metric: {model: value}} per seed."""
    n_seeds = len(m["reconstruction_bce"][names[0]]["runs"])
    return [{metric: {n: v["runs"][i] for n, v in by_model.items() if len(v["runs"]) > i}
             for metric, by_model in m.items()} for i in range(n_seeds)]


def _anomaly_latents(s):
    """The latent sizes whose anomaly models this seed's numbers hold."""
    prefix = f"anomaly_auc_digit_{ANOMALY_DIGIT}_z"
    return [LATENT_ANOMALY] + sorted(int(k[len(prefix):]) for k in s if k.startswith(prefix))


def _baseline(s):
    """The article's baseline as the companion code really ran it (see task_baselines)."""
    return s["probe_accuracy_baseline_as_published"]["vanilla"]


# ---- the report, one section at a time

def write_report(results, out_dir):
    """REPORT.md beside results.json: every table, every figure, the settings and the audit."""
    cfg, m = results["config"], results["metrics"]
    names = list(cfg["models"])
    article = cfg["dataset"] == "mnist"          # the article published MNIST numbers only
    sections = [report_header(results, article), report_verdicts(m, names, cfg), report_summary(m, names),
                report_reconstruction(m, names, article), report_training_time(results, names, article),
                report_samples(m, names), report_interpolation(m, names), report_latent(m, names),
                report_classification(m, names, cfg, article), report_anomaly(m, names, cfg, article, out_dir),
                report_published(m, names) if article else "",
                report_audit(m, names, cfg), report_settings(results)]
    path = os.path.join(out_dir, "REPORT.md")
    figures.write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text("\n".join(s for s in sections if s)))
    return path


def report_header(results, article):
    cfg, env, trained = results["config"], results["environment"], results["trainings"]
    lines = [f"# Autoencoder Bake-Off: {cfg['dataset']}\n"]
    if cfg["quick"]:
        lines.append(f"> **Quick run: NOT the full protocol.** {cfg['n_train']} training images, "
                     f"{cfg['epochs']} epochs, reduced map and judge settings. Numbers are for checking "
                     "the pipeline only; run `python run.py` for the real comparison.\n")
    elif cfg["epochs"] != EPOCHS:
        lines.append(f"> **Shortened run: {cfg['epochs']} epochs instead of the article's {EPOCHS}.** "
                     "Differences from the published numbers are expected.\n")
    n_seeds, reused = len(cfg["seeds"]), sum(t["reused"] for t in trained)
    cells = [t for t in trained if "scored" in t]
    from_checkpoints = sum(t["reused"] for t in trained if "scored" not in t)
    scorers = sorted({f"{c['scored']['git_commit'][:7]}{' (dirty)' if c['scored']['git_dirty'] else ''} on "
                      f"{c['scored']['gpu'] or c['scored']['cpu']}" for c in cells if c["scored"]["git_commit"]})
    lines.append(
        f"`{cfg['command']}` finished {results['finished']} in {workers.hms(results['stages_seconds']['total'])} "
        f"on {env['gpu'] or env['cpu']} ({env['device']}); its {len(trained)} trainings took "
        f"{workers.hms(sum(t['seconds'] for t in trained))} of training time in all. "
        + (f"{from_checkpoints} of them were reused from checkpoints saved with the same settings. "
           if from_checkpoints else "")
        + (f"The sweep's {len(cells)} anomaly-only trainings enter as their scores in "
           f"`anomaly_cells.json`, each made right after its training (scored by "
           f"{'; '.join(scorers) or 'an unknown commit'}). " if cells else "")
        + (f"This run trained {len(trained) - reused}, {env['jobs']} at a time with "
           f"{env['threads_per_job']} torch thread(s) each. " if reused < len(trained) else "")
        + f"{n_seeds} run(s) per training (seeds {', '.join(map(str, cfg['seeds']))}); "
        + ("tables show mean ± std over the runs. " if n_seeds > 1 else "tables show single runs (no error bars). ")
        + "Figures and GIFs show the first seed."
        + (" *Published* numbers are the article's single MNIST runs (PROTOCOL.md); *diff* is ours minus "
           "published; *within 2 std* says whether the published value lies within our mean ± 2 std."
           if article else "") + "\n")
    return "\n".join(lines)


# ---- the answer first: which autoencoder for which job

ANOMALY_SCORES = ("bce", "bce_excess", "sse", "code_nll", "neg_elbo", "neg_iwae", "neg_elbo_excess", "bce_png")
VERDICT_SIGMAS = 2      # a lead counts when it exceeds this many standard deviations (ddof = 1)
# job -> (metric, higher is better, what the row says); the anomaly row is computed (_anomaly_runs)
JOBS = [("reconstruction", "reconstruction_bce", False, "summed BCE of the test images"),
        ("features for a classifier", "probe_accuracy", True, "converged probe, 550 labels"),
        ("anomaly detection", None, True, "AUROC"),
        ("unconditional samples", "sample_legibility", True, "legible samples, better sampler"),
        ("interpolation", "interpolation_confidence", True, "judge's mean confidence"),
        ("2-d map", "umap_trustworthiness", True, "trustworthiness(15) of the umap_lite map")]


def verdicts(m, names, digits):
    """One row per job: [job, metric, best, runner-up, best reference, verdict], from results.json.

    Each model's per-seed values of the job's metric (_job_runs) are ranked by their mean. The
    verdict: "no autoencoder beats R" when the best reference R is ahead of the best contestant by
    more than VERDICT_SIGMAS of the contestant's seed standard deviations, "on par with R" when it
    is ahead by less; otherwise "<best> best" when the lead over the runner-up exceeds
    VERDICT_SIGMAS standard deviations of the paired per-seed differences, "tie" when it does not.
    A single seed has no spread: its leads are reported as "one seed".
    """
    rows = []
    for job, metric, higher, what in JOBS:
        runs, how = _job_runs(m, metric, names, digits)
        if not runs:
            continue
        sign = 1 if higher else -1
        mean = lambda n: sign * float(np.mean(runs[n]))
        ranked = sorted((n for n in runs if n in names), key=mean, reverse=True)
        refs = sorted((n for n in runs if n not in names), key=mean, reverse=True)
        if not ranked:
            continue
        best, second = ranked[0], (ranked[1] if len(ranked) > 1 else None)
        show = lambda n: f"{n}{how.get(n, '')} {np.mean(runs[n]):.3f}" if n else ""
        verdict = _verdict(runs, best, second, refs[0] if refs else None, sign)
        rows.append([job, what + (" ↑" if higher else " ↓"), show(best), show(second),
                     show(refs[0]) if refs else "", verdict])
    return rows


def _verdict(runs, best, second, ref, sign):
    """The rule of `verdicts`, for one job: sign = +1 where higher is better, -1 where lower is."""
    b = sign * np.asarray(runs[best], dtype=float)
    if ref is not None:
        lead = sign * float(np.mean(runs[ref])) - float(b.mean())
        spread = float(np.std(b, ddof=1)) if len(b) > 1 else 0.0
        if lead > VERDICT_SIGMAS * spread:
            return f"no autoencoder beats {ref}"
        if lead > 0:
            return f"on par with {ref}"
    if second is None:
        return f"{best} best"
    d = b[:len(runs[second])] - sign * np.asarray(runs[second], dtype=float)[:len(b)]
    if len(d) < 2:
        return f"{best} ahead (one seed)"
    return f"{best} best" if d.mean() > VERDICT_SIGMAS * np.std(d, ddof=1) else f"tie: {best}, {second}"


def _job_runs(m, metric, names, digits):
    """({model: per-seed values}, {model: " (how)"}) of one job's metric; for the anomaly row (metric
    None) the mean AUROC over the held-out digits of each model's best score, and for samples each
    model's best sampler. References: every row that is not a contestant (pca, pixels, ink, ...)."""
    if metric == "sample_legibility":
        runs, how = {}, {}
        for suffix, sampler in SAMPLERS.items():
            for n, v in m.get(metric + suffix, {}).items():
                if n not in runs or np.mean(v["runs"]) > np.mean(runs[n]):
                    runs[n], how[n] = v["runs"], f" ({sampler})"
        return runs, how
    if metric is not None:
        return {n: v["runs"] for n, v in m.get(metric, {}).items()}, {}
    keys = [f"_digit_{d}" for d in digits] if len(digits) > 1 else [""]
    runs, how, n_scores = {}, {}, {}
    for score in ANOMALY_SCORES:        # the signed score is not an error: kept for comparison only
        at = [m.get(tasks.metric_names(score)[0] + k, {}) for k in keys]
        for n in set.intersection(*(set(a) for a in at)):
            per_seed = np.mean([a[n]["runs"] for a in at], axis=0).tolist()
            n_scores[n] = n_scores.get(n, 0) + 1
            if n not in runs or np.mean(per_seed) > np.mean(runs[n]):
                runs[n], how[n] = per_seed, f" ({score})"
    return runs, {n: h for n, h in how.items() if n_scores[n] > 1}    # named where there was a choice


def report_verdicts(m, names, cfg):
    digits = cfg.get("anomaly_digits", [ANOMALY_DIGIT])
    rows = verdicts(m, names, digits)
    n_digits = len(digits) if len(digits) > 1 else 1
    return ("## Which autoencoder for which job?\n\n" + _table(
        ["job", "metric", "best contestant", "runner-up", "best reference", "verdict"], rows)
        + f"\nEach number is the mean over the seeds. Anomaly detection: the mean AUROC over "
          f"{n_digits} held-out digit(s), each model with its best score (in brackets where more than "
          "the summed BCE was measured); samples: each model's better sampler. References (pca, raw "
          "pixels, ink, the input's complexity) are rows that are not contestants. The rule: *no "
          f"autoencoder beats R* when reference R is ahead of the best contestant by more than "
          f"{VERDICT_SIGMAS} of that contestant's seed standard deviations (ddof = 1), *on par with R* "
          f"when ahead by less; otherwise *best* when the lead over the runner-up exceeds {VERDICT_SIGMAS} "
          "standard deviations of their paired per-seed differences, *tie* when it does not.\n")


def report_summary(m, names):
    return "## Summary\n\n" + _table(
        ["model", "recon BCE ↓", "probe acc (converged) ↑", "probe acc (article's probe) ↑",
         "anomaly AUROC ↑", "training s"],
        [[_label(n, names), _fmt(m, "reconstruction_bce", n, 2), _fmt(m, "probe_accuracy", n, 4),
          _fmt(m, "probe_accuracy_articles_probe", n, 4), _fmt(m, "anomaly_auc", n, 4),
          _fmt(m, "training_seconds", n, 0)]
         for n in _rows(m, ["reconstruction_bce", "probe_accuracy", "anomaly_auc"], names)])


def _finding(m, metric, names, higher=True, digits=3, what=""):
    """A section's first line: the best and the worst contestant by their mean, and whether the best
    reference (a row that is not a contestant) is ahead of the best contestant."""
    runs, how = _job_runs(m, metric, names, [ANOMALY_DIGIT])
    mean = {n: float(np.mean(v)) for n, v in runs.items()}
    ranked = sorted((n for n in mean if n in names), key=mean.get, reverse=higher)
    if len(ranked) < 2:
        return ""
    show = lambda n: f"{n} ({mean[n]:.{digits}f}" + (f"; {how[n].strip(' ()')})" if n in how else ")")
    text = f"**Finding{what}:** {show(ranked[0])} is best, {show(ranked[-1])} worst"
    refs = sorted((n for n in mean if n not in names), key=mean.get, reverse=higher)
    if refs:
        ahead = mean[refs[0]] > mean[ranked[0]] if higher else mean[refs[0]] < mean[ranked[0]]
        text += f"; the best reference, {show(refs[0])}, is {'ahead of' if ahead else 'behind'} the best contestant"
    return text + ".\n\n"


def report_reconstruction(m, names, article):
    return ("## Reconstruction\n\n" + _finding(m, "reconstruction_bce", names, higher=False, digits=2)
            + "Mean over the test images of the BCE summed over the 1024 pixels. "
            "The VAEs sample in evaluation too, as the companion code did.\n\n"
            + _compare_table(m, "reconstruction_bce", names, article, 2, relative=True)
            + "\nFirst 16 test images (top) and their reconstructions:\n\n"
              "![reconstructions](reconstructions.png)\n")


def report_training_time(results, names, article):
    env, m = results["environment"], results["metrics"]
    return ("## Training time\n\n" + _finding(m, "training_seconds", names, higher=False, digits=0, what=" (fastest first)")
            + f"Wall time of {results['config']['epochs']} epochs incl. per-epoch "
            f"validation, latent 20, on {env['gpu'] or env['cpu']}, as timed when each model was trained"
            + (" (published: one GPU, data loading dominated)." if article else ".") + "\n\n"
            + _compare_table(m, "training_seconds", names, article, 0, spread=False))


def report_samples(m, names):
    shown = _rows(m, ["sample_legibility", "sample_legibility_gmm"], names)   # + reference models
    rows = [[_label(n, names), SAMPLERS[suffix], _fmt(m, f"sample_legibility{suffix}", n, 3),
             _fmt(m, f"sample_diversity{suffix}", n, 2), _fmt(m, f"sample_frechet{suffix}", n, 1),
             _fmt(m, f"sample_components{suffix}", n, 1)]
            for n in shown for suffix in SAMPLERS if n in m.get(f"sample_legibility{suffix}", {})]
    if not rows:
        return ""
    return ("## Samples\n\n" + _finding(m, "sample_legibility", names, what=" (legible share, better sampler)")
            + f"{N_GENERATED} unconditional samples per model and sampler, scored by a small MLP digit "
            "classifier (the *judge*, trained once on the training split): *legible* = share the judge "
            "classifies with confidence > 0.9; *diversity* = entropy of the predicted-class "
            "histogram (max ln 10 = 2.30); *FD* = Frechet distance between the judge's penultimate "
            f"features of samples and of {N_GENERATED} test images (lower is closer).\n\n"
            "Samplers: *own prior* = the model's own (N(0, I) for the VAEs, a uniform codebook index "
            "per dimension for the vq-VAE, a reference model's own Gaussian); *ex-post mixture* = a "
            "Gaussian mixture with full covariances fitted by EM to the model's training codes (the "
            f"VAEs: sampled z), its size K from {{{', '.join(map(str, tasks.GMM_K_GRID))}}} chosen by "
            "validation log-likelihood, decoded; *learned categorical* = each latent dimension's "
            "codebook index drawn independently with its frequency among the training codes; "
            "*mixture before the quantiser* = the mixture fitted to the vq-VAE's encoder outputs, its "
            "samples quantised, then decoded. *K* = the chosen mixture size.\n\n"
            + _table(["model", "sampler", "legible ↑", "diversity ↑", "FD ↓", "K"], rows)
            + "\n![samples: one row per model, one column block per sampler](samples.png)\n")


def report_interpolation(m, names):
    shown = _rows(m, ["interpolation_confidence"], names)
    fixed = [n for n in shown if n in m.get("interpolation_confidence_fixed_noise", {})]
    rows = [[_label(n, names), _fmt(m, "interpolation_confidence", n, 3), _fmt(m, "interpolation_third_class", n, 2),
             _fmt(m, "interpolation_confidence_fixed_noise", n, 3),
             _fmt(m, "interpolation_third_class_fixed_noise", n, 2)]
            for n in shown]
    text = ("## Interpolation\n\n" + _finding(m, "interpolation_confidence", names)
            + "Between the first two test images, through the encoder outputs before "
            f"the bottleneck ({tasks.INTERP_STEPS} steps). *Confidence* = the judge's mean top-class "
            "probability along the path; *third class* = share of runs whose path is classified as a "
            "digit other than its two ends somewhere. *Fixed noise*: the VAE's noise drawn once for "
            "the whole path.\n\n"
            + _table(["model", "confidence", "third class", "confidence (fixed noise)",
                      "third class (fixed noise)"], rows)
            + "\n" + " ".join(f"![{n}](interp_{n}.gif)" for n in shown) + "\n")
    if fixed:
        text += ("\nFixed noise: " + " ".join(f"![{n} fixed](interp_{n}_fixed_noise.gif)" for n in fixed)
                 + "\n\nGIF order: " + ", ".join(shown) + "; then " + ", ".join(fixed) + " with fixed noise.\n")
    return text


def report_latent(m, names):
    text = "## Latent structure\n\n" + (_finding(m, "latent_knn_accuracy", names, what=" (10-NN accuracy of the 20-d codes)")
                                           or _finding(m, "umap_trustworthiness", names, what=" (trustworthiness of the map)"))
    if "umap_trustworthiness" in m:
        text += ("20-d test codes mapped to 2-D by `umap_lite` (15 neighbours, min_dist 0.1), first "
                 "seed. *Trust* = trustworthiness (k = 15) of the map; *10-NN* = leave-one-out 10-NN "
                 "accuracy of the 20-d codes on the test images.\n\n"
                 + _table(["model", "trust(15) ↑", "10-NN acc ↑"],
                          [[_label(n, names), _fmt(m, "umap_trustworthiness", n, 3),
                            _fmt(m, "latent_knn_accuracy", n, 3)]
                           for n in _rows(m, ["latent_knn_accuracy"], names)])
                 + "\n![latent maps, 20-d codes through umap_lite](latent_umap.png)\n\n")
    return text + ("The raw codes of the latent-2 models (trained without the anomaly digit). A panel "
                   "notes latent units that are constant over the test images (a dead ReLU unit "
                   "draws the map as a line):\n\n"
                   "![latent-2 codes](latent_2d.png)\n")


def report_classification(m, names, cfg, article):
    rows = [[_label(n, names), _fmt(m, "probe_accuracy", n, 4), _fmt(m, "probe_accuracy_mu", n, 4),
             _fmt(m, "probe_accuracy_articles_probe", n, 4)]
            + (_published_cells(m, "probe_accuracy_articles_probe", n, 4) if article else [])
            + [_fmt(m, "knn_probe_accuracy", n, 4)] for n in _rows(m, ["probe_accuracy"], names)]
    pixels = PIXELS in m.get("probe_accuracy", {})    # the raw-pixel reference row
    text = ("## Classification\n\n" + _finding(m, "probe_accuracy", names, digits=4, what=" (converged probe)")
            + f"Frozen encoder (+ bottleneck), {cfg['probe_labels']} labelled training images. *Converged*: "
            "multinomial logistic regression on standardised codes, trained to convergence, L2 "
            "strength picked on the validation set. *Article's probe*: a linear layer, Adam lr 1e-3, "
            "batch 32, at most 20 epochs, early stop on validation accuracy, patience 3. *mu*: the "
            "VAEs' mean code instead of a sample. *10-NN*: k-NN (k = 10) on the same labels."
            + (" The last row, *pixels*, is no contestant: the same probes on the raw 1,024 pixels of "
               "the same images (the article's probe: a linear layer on the pixels), the reference an "
               "encoder must beat." if pixels else "") + "\n\n"
            + _table(["model", "converged", "converged (mu)", "article's probe"]
                     + (["published", "diff", "within 2 std"] if article else []) + ["10-NN"], rows)
            + "\n" + report_baselines(m, article))
    budgets = [b for b in LABEL_BUDGETS if f"probe_accuracy_{b}_labels" in m]
    if budgets:
        text += ("\nLabel budgets: converged probe trained on a stratified draw of N labels "
                 f"({QUICK['budget_draws'] if cfg['quick'] else BUDGET_DRAWS} draw(s) per budget and "
                 "seed, averaged):\n\n"
                 + _table(["model"] + [f"{b} labels" for b in budgets],
                          [[_label(n, names)] + [_fmt(m, f"probe_accuracy_{b}_labels", n, 3) for b in budgets]
                           for n in _rows(m, [f"probe_accuracy_{budgets[0]}_labels"], names)])
                 + "\n![accuracy vs labels](label_budgets.png)\n")
    return text


def report_baselines(m, article):
    rows = [["as published: random encoder, weights fixed, BatchNorm in training mode, head trained",
             "probe_accuracy_baseline_as_published"],
            ["from scratch: encoder and head trained", "probe_accuracy_from_scratch"],
            ["random encoder frozen, BatchNorm in eval mode, head trained", "probe_accuracy_random_encoder"]]
    return ("Three baselines without a trained autoencoder: the vanilla encoder's architecture + a "
            "linear layer, the article's probe on the same labels. The article's 0.436 is the first: "
            "the companion code handed Adam only the head's parameters. The audit judges against it.\n\n"
            + _table(["baseline", "accuracy"] + (["published", "diff", "within 2 std"] if article else []),
                     [[label, _fmt(m, metric, "vanilla", 4)]
                      + (_published_cells(m, metric, "vanilla", 4) if article else []) for label, metric in rows]))


def report_anomaly(m, names, cfg, article, out_dir):
    held_out = (f"class {ANOMALY_DIGIT} ({mnist.FASHION_CLASSES[ANOMALY_DIGIT]})"
                if cfg["dataset"] == "fashion" else f"digit {ANOMALY_DIGIT}")
    rows = [[_label(n, names), _fmt(m, "anomaly_auc", n, 4), _fmt(m, "anomaly_auprc", n, 4),
             _fmt(m, "anomaly_auc_signed_score", n, 4)]
            + (_published_cells(m, "anomaly_auc_signed_score", n, 4) if article else [])
            + [_fmt(m, "anomaly_ink_spearman", n, 2), _fmt(m, "anomaly_ink_spearman_signed_score", n, 2)]
            for n in _rows(m, ["anomaly_auc"], names)]
    text = ("## Anomaly detection\n\n" + _finding(m, None, names, what=f" (AUROC, held-out {held_out})")
            + f"Latent-{LATENT_ANOMALY} models trained without {held_out}; score = summed BCE of the "
            f"reconstruction; positives = test images of {held_out}. *Signed* is the score behind the "
            "article's published AUCs: the signed sum of (reconstruction - input), which is not an "
            "error. *ink* needs no model: it ranks the test images by low summed intensity, the "
            "direction the signed score leans to (sum of the reconstruction minus the ink); ranking by "
            "high ink gives 1 minus its AUROC. *ρ ink*: Spearman rank correlation of a score with the "
            "ink of the test images; near ±1, the score orders images by their stroke mass.\n\n"
            + _table(["model", "AUROC", "AUPRC", "AUROC signed score"]
                     + (["published (signed)", "diff", "within 2 std"] if article else [])
                     + ["ρ ink (BCE)", "ρ ink (signed)"], rows)
            + _below_chance_note(m, names, held_out)
            + "\n![ROC curves](anomaly_roc.png)\n")
    return (text + report_anomaly_sweep(m, names, cfg, out_dir) + report_anomaly_latents(m, names, cfg)
            + report_anomaly_scores(m, names, cfg, out_dir))


SCORE_TITLES = {"bce": "summed BCE", "bce_excess": "BCE - H(x)", "sse": "squared error", "code_nll": "-log p(z)",
                "neg_elbo": "-ELBO", "neg_iwae": "-IWAE (k=128)", "neg_elbo_excess": "-ELBO - H(x)",
                "bce_png": "BCE bits - L(x)"}
REFERENCES = {"ink": "ink (low)", "entropy": "H(x)", "png": "L(x), PNG bits"}


def _digit_means(m, score, n, keys):
    """Per-seed means over the held-out digits' keys of one score's AUROC (None if not measured)."""
    at = [m.get(tasks.metric_names(score)[0] + k, {}).get(n) for k in keys]
    return None if any(a is None for a in at) else np.mean([a["runs"] for a in at], axis=0)


def report_anomaly_scores(m, names, cfg, out_dir):
    """Every anomaly score, every model: the mean AUROC over the held-out digits, what each score
    shares with ink and with the images' simplicity, the best pair digit by digit, then
    `_anomaly_scores_by_digit`."""
    if "anomaly_auc_bce_excess" not in m:
        return ""           # a run from before these scores
    digits = cfg["anomaly_digits"] if len(cfg["anomaly_digits"]) > 1 else [ANOMALY_DIGIT]
    keys = [f"_digit_{d}" for d in digits] if len(digits) > 1 else [""]
    scores = [s for s in ANOMALY_SCORES if any(tasks.metric_names(s)[0] + keys[0] in k for k in m)]
    rows_m = [n for n in _rows(m, ["anomaly_auc" + keys[0]], names) if n not in REFERENCES]
    cell = lambda v: "" if v is None else (f"{v.mean():.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}")
    table = [[_label(n, names), ""] + [cell(_digit_means(m, s, n, keys)) for s in scores] for n in rows_m]
    table += [[_label(REFERENCES[r], names), cell(_digit_means(m, "bce", r, keys))] + [""] * len(scores)
              for r in REFERENCES if r in m.get("anomaly_auc" + keys[0], {})]
    rho = lambda s, n: [m[tasks.metric_names(s)[2] + k][n]["mean"] for k in keys if n in m.get(tasks.metric_names(s)[2] + k, {})]
    mean_rho = lambda v: "" if not v else "n/a" if not np.isfinite(v).any() else (
        f"{np.nanmean(v):+.2f}" + ("*" if not np.isfinite(v).all() else ""))
    rho_rows = [[_label(n, names)] + [mean_rho(rho(s, n)) for s in scores] for n in rows_m]
    means = {metric: {n: v["mean"] for n, v in by_model.items()} for metric, by_model in m.items()}
    kinds = ink_and_simplicity(means, names, digits)
    signed = lambda v: f"{v:+.2f}" if np.isfinite(v) else ""     # no correlation over fewer than 3 digits
    kind_rows = [[SCORE_TITLES[sc], f"{v[0]:.2f}", signed(v[1]), signed(v[2]), ink_reading(*v)]
                 for sc, v in kinds.items()]
    text = (f"\n### Every anomaly score\n\nMean AUROC over the {len(keys)} held-out digit(s) (each seed's mean, "
            "then mean ± std over the seeds); higher = better; PROTOCOL.md 6.3 defines each score. The "
            "reference rows need no model: low ink, the BCE's floor H(x), and the PNG length L(x).\n\n"
            + _table(["model", "no model"] + [SCORE_TITLES[s] for s in scores], table)
            + f"\nRank correlation with ink, mean over the digits: near ±1 a score orders the images by "
              f"their stroke mass; |ρ| below {INK_FREE} is free of it. n/a: the score is the same for every "
              "image (every unit of the code dead), so it has no ranking; *: the mean over the digits where "
              "it has one.\n\n"
            + _table(["model"] + [SCORE_TITLES[s] for s in scores], rho_rows)
            + f"\nWhat each score shares with ink and with the images' simplicity (means over the seeds): the "
              f"median over the contestants and digits of |ρ with ink| per image, and, over the held-out "
              f"digits, the rank correlation of the score's AUROC (mean over the contestants) with the "
              f"AUROC of H(x) alone and of L(x) alone. A score free of ink (|ρ| below {INK_FREE}) whose "
              f"AUROC follows H(x)'s or L(x)'s (|ρ| at least {SIMPLE_FOLLOWS}) has replaced ink by "
              "simplicity.\n\n"
            + _table(["score", "median |ρ| with ink", "ρ with H(x) over digits", "ρ with L(x) over digits",
                      "reading"], kind_rows))
    return text + _best_pair_by_digit(m, names, digits, scores) + _anomaly_scores_by_digit(m, names, digits, scores, out_dir)


def _best_pair_by_digit(m, names, digits, scores):
    """The best (contestant, score) pair beyond the summed BCE, digit by digit, beside the same
    contestant's summed BCE, the best contestant by summed BCE, and low ink."""
    if len(digits) < 2:
        return ""
    keys = [f"_digit_{d}" for d in digits]
    mean = lambda sc, n: float(_digit_means(m, sc, n, keys).mean())
    pairs = [(n, sc) for sc in scores if sc != "bce" for n in names
             if all(n in m.get(tasks.metric_names(sc)[0] + k, {}) for k in keys)]
    if not pairs:
        return ""
    n, sc = max(pairs, key=lambda p: mean(p[1], p[0]))
    by_bce = max((c for c in names if all(c in m["anomaly_auc" + k] for k in keys)), key=lambda c: mean("bce", c))
    shown = [(n, sc), (n, "bce")] + ([(by_bce, "bce")] if by_bce != n else []) + [
        ("ink", "bce")] * all("ink" in m["anomaly_auc" + k] for k in keys)
    rows = [[REFERENCES["ink"] + " (reference)" if c == "ink" else f"{_label(c, names)}, {SCORE_TITLES[x]}"]
            + [_fmt(m, tasks.metric_names(x)[0] + k, c, 3) for k in keys] + [f"{mean(x, c):.3f}"] for c, x in shown]
    return (f"\nThe best pair beyond the summed BCE, {n} with {SCORE_TITLES[sc]}, digit by digit (AUROC, mean ± std "
            "over the seeds), beside its summed BCE, the best contestant by summed BCE, and low ink:\n\n"
            + _table(["model, score"] + [str(d) for d in digits] + ["mean"], rows))


def _anomaly_scores_by_digit(m, names, digits, scores, out_dir):
    """Per-digit tables and heatmaps of every score, the word on L(x), and the code density's picture."""
    text = ""
    if len(digits) > 1:
        shown = _rows(m, [f"anomaly_auc_digit_{digits[0]}"], names)
        value = lambda s, d, n: m.get(f"{tasks.metric_names(s)[0]}_digit_{d}", {}).get(n, {"mean": np.nan})["mean"]
        for s in scores[1:]:
            per_digit = [[_label(n, names)] + [f"{value(s, d, n):.3f}" for d in digits] for n in shown
                         if not np.isnan(value(s, digits[0], n))]
            text += f"\nAUROC by held-out digit, {SCORE_TITLES[s]} (mean over the seeds):\n\n" + _table(
                ["model"] + [str(d) for d in digits], per_digit)
        panels = {SCORE_TITLES[s]: np.array([[value(s, d, n) for d in digits] for n in shown]) for s in scores}
        figures.plot_heatmaps(panels, [n if n in names else f"{n} (ref)" for n in shown], [str(d) for d in digits],
                              os.path.join(out_dir, "anomaly_scores.png"))
        text += "\n![AUROC by held-out digit, every score](anomaly_scores.png)\n"
    if "anomaly_bce_bits_mean" in m and "png" in m["anomaly_bce_bits_mean"]:
        bits, spread = m["anomaly_bce_bits_mean"], m["anomaly_bce_bits_std"]
        models = [n for n in names if n in bits]
        text += (
            "\nWhy the complexity correction (BCE bits - L(x)) cannot work here. Serra et al. (ICLR 2020) "
            "subtract L(x), the compressed length of the image, from -log2 p(x) of a model of the *discrete* "
            "8-bit image: two code lengths of the same object, so the difference keeps what the model knows "
            "beyond a generic compressor. This decoder is a Bernoulli on [0, 1] intensities; its summed BCE is no "
            f"code length of the 8-bit image. On the test images (digit {ANOMALY_DIGIT} held out, first seed's "
            f"numbers averaged over the seeds) the summed BCE is {min(bits[n]['mean'] for n in models):.0f} to "
            f"{max(bits[n]['mean'] for n in models):.0f} bits on average with a spread of "
            f"{min(spread[n]['mean'] for n in models):.0f} to {max(spread[n]['mean'] for n in models):.0f} "
            f"across the images, while L(x) is {bits['png']['mean']:.0f} bits with a spread of "
            f"{spread['png']['mean']:.0f}: the difference is L(x) with a little noise, so it ranks the images "
            "by how simple they are. The exact version of the same idea for this decoder is H(x), "
            f"{bits['entropy']['mean']:.0f} ± {spread['entropy']['mean']:.0f} bits here: the summed BCE of a "
            "perfect reconstruction, the part of the score that the image's own complexity forces; BCE - H(x) "
            "removes exactly that and keeps the KL the model can be blamed for.\n")
    if os.path.exists(os.path.join(out_dir, "anomaly_code_density.png")):
        text += ("\nThe code density's picture (first seed, held-out digit 1): the mixture of the training "
                 "codes as contours, the test codes on top.\n\n![code density](anomaly_code_density.png)\n")
    return text


def report_anomaly_sweep(m, names, cfg, out_dir):
    """Every held-out digit: a table per score, mean ranks, and the heatmap (all from results.json)."""
    digits = cfg["anomaly_digits"]
    if len(digits) < 2:
        return ""
    shown = _rows(m, [f"anomaly_auc_digit_{d}" for d in digits], names)
    mean = lambda metric, d, n: m[f"{metric}_digit_{d}"].get(n, {"mean": np.nan})["mean"]   # a reference lacks some
    text = (f"\n### Every held-out digit\n\nFor each digit d, latent-{LATENT_ANOMALY} models "
            "trained without d (val and test keep it); positives = the test images of d. Mean ± std "
            "over the seeds; best contestant per column in bold. *Mean rank*: each row's rank among "
            f"the {len(shown)} rows by the mean value (1 = best), averaged over the digits.\n")
    for metric, title, higher in [("anomaly_auc", "AUROC, summed BCE", True),
                                  ("anomaly_auc_signed_score", "AUROC, signed score", True),
                                  ("anomaly_auprc", "AUPRC, summed BCE", True),
                                  ("anomaly_ink_spearman", "ρ with ink, summed BCE", None),
                                  ("anomaly_ink_spearman_signed_score", "ρ with ink, signed score", None)]:
        rows_here = [n for n in shown if n in m.get(f"{metric}_digit_{digits[0]}", {})]
        best = {d: max(names, key=lambda n: mean(metric, d, n)) for d in digits}
        ranks = {n: [] for n in rows_here}
        for d in digits:
            for r, n in enumerate(sorted(rows_here, key=lambda n: -mean(metric, d, n)), start=1):
                ranks[n].append(r)
        table = [[_label(n, names)] + [f"**{_fmt(m, f'{metric}_digit_{d}', n, 3)}**" if higher and best[d] == n
                                else _fmt(m, f"{metric}_digit_{d}", n, 3) for d in digits]
                 + ([f"{np.mean(ranks[n]):.1f}"] if higher else []) for n in rows_here]
        text += (f"\n{title}:\n\n"
                 + _table(["model"] + [str(d) for d in digits] + (["mean rank"] if higher else []), table))
    scope = [n for n in names if n in ARTICLE_MODELS]     # whom the article's claim ranks
    if {"shallow", "stacked"} <= set(scope):
        per_seed, rows = _per_seed(m, names), []
        for metric, label in [("anomaly_auc", "summed BCE"), ("anomaly_auc_signed_score", "signed score")]:
            holds = [[_articles_order(s, f"{metric}_digit_{d}", scope) for s in per_seed] for d in digits]
            rows.append([label] + [str(sum(h)) for h in holds] + [str(sum(map(all, holds)))])
        text += (f"\nThe article's order (shallow best, stacked second among its contestants): in how "
                 f"many of the {len(per_seed)} seeds it holds, per held-out digit.\n\n"
                 + _table(["score"] + [str(d) for d in digits] + ["digits, every seed"], rows))
    panels = {title: np.array([[mean(metric, d, n) for d in digits] for n in shown])
              for metric, title in [("anomaly_auc", "AUROC, summed BCE"),
                                    ("anomaly_auc_signed_score", "AUROC, signed score")]}
    figures.plot_heatmaps(panels, [n if n in names else f"{n} (ref)" for n in shown],
                        [str(d) for d in digits], os.path.join(out_dir, "anomaly_digits.png"))
    return text + "\n![AUROC by held-out digit, both scores](anomaly_digits.png)\n"


def report_anomaly_latents(m, names, cfg):
    """The article's digit at every latent size of the anomaly models."""
    latents = cfg.get("anomaly_latents", [LATENT_ANOMALY])
    if len(latents) < 2:
        return ""
    key = lambda metric, z: f"{metric}_digit_{ANOMALY_DIGIT}" + ("" if z == LATENT_ANOMALY else f"_z{z}")
    cols = [(metric, z) for metric in ("anomaly_auc", "anomaly_auc_signed_score") for z in latents]
    return (f"\n### Latent size\n\nHeld-out digit {ANOMALY_DIGIT}, the anomaly models trained at each "
            "latent size (a separate training from the latent-20 models of the other tasks).\n\n"
            + _table(["model"] + [f"{'AUROC' if metric == 'anomaly_auc' else 'AUROC signed'} z={z}"
                                  for metric, z in cols],
                     [[_label(n, names)] + [_fmt(m, key(metric, z), n, 3) for metric, z in cols]
                      for n in _rows(m, [key("anomaly_auc", latents[-1])], names)]))


def _below_chance_note(m, names, held_out):
    """A sentence on what an AUROC under 0.5 means, when the table has one."""
    aurocs = [m[k][n]["mean"] for k in ("anomaly_auc", "anomaly_auc_signed_score") for n in names
              if n in m.get(k, {})]
    if not aurocs or min(aurocs) >= 0.5:
        return ""
    return (f"\nAn AUROC below 0.5 means the score ranks the test images of {held_out} *below* the "
            "others more often than above: the model reconstructs them better than the images it was "
            "trained on (thin strokes, few lit pixels, a small summed error), so the score points "
            "the wrong way; 1 - AUROC is what the reversed score would reach.\n")


def report_published(m, names):
    """How many of the article's numbers lie within our mean ± 2 std, per kind of number."""
    if len(m["reconstruction_bce"][names[0]]["runs"]) == 1:
        return ("## The article's numbers against our seed spread\n\n"
                "This run has one seed, so there is no spread to hold the article's numbers against: "
                "none of them counts as within it or outside it (the tables above give the plain "
                "differences). Run with `--seeds 3` for this comparison.\n")
    rows = []
    for metric, label in [("reconstruction_bce", "reconstruction BCE"),
                          ("probe_accuracy_articles_probe", "the article's probe"),
                          ("anomaly_auc_signed_score", "anomaly AUROC, signed score"),
                          ("probe_accuracy_baseline_as_published", "baseline (as published)")]:
        inside = [n for n in PUBLISHED[metric] if n in m.get(metric, {}) and _within(m, metric, n)]
        outside = [n for n in PUBLISHED[metric] if n in m.get(metric, {}) and n not in inside]
        rows.append([label, f"{len(inside)} of {len(inside) + len(outside)}", ", ".join(outside) or "-"])
    return ("## The article's numbers against our seed spread\n\n"
            "Each published MNIST number counts as reproduced when it lies within our mean ± 2 std "
            "over seeds.\n\n"
            + _table(["number", "within 2 std", "outside"], rows))


def report_audit(m, names, cfg):
    n_seeds = len(cfg["seeds"])
    return ("## Audit of the article's conclusions\n\n"
            + (f"Each conclusion of the article, checked in each of the {n_seeds} seeds: *confirmed* "
               "if it holds in every seed, *not confirmed* if in none, *depends* otherwise.\n\n"
               if n_seeds > 1 else
               "Each conclusion of the article, checked against this run's numbers. **These verdicts "
               "are from one run**: run with `--seeds 3` to see which hold in every seed.\n\n")
            + _table(["the article says", "verdict", "our numbers"], audit(m, names, cfg["anomaly_digits"])))


def report_settings(results):
    cfg, env, stages = results["config"], results["environment"], results["stages_seconds"]
    both = set(cfg) & set(env)      # device, jobs: what the command asked for, what the run used
    asked = lambda k, v: [f"{k} (requested)", "automatic" if v is None else f"`{v}`"]
    return "## Settings and environment\n\n" + _table(
        ["setting", "value"], [asked(k, v) if k in both else [k, f"`{v}`"] for k, v in cfg.items()]
        + [[f"seconds: {k}", f"{v:.0f}"] for k, v in stages.items()]
        + [[f"{k} (used)" if k in both else k, f"`{v}`"] for k, v in env.items()])


# ---- helpers

def _rows(m, metrics, names):
    """The contestants, then the references (pca, pixels, ink: any other row of `metrics`)."""
    rows = list(names)
    for metric in metrics:
        rows += [r for r in m.get(metric, {}) if r not in rows]
    return rows


def _label(name, names):
    """A row's name; references (rows that are not among the contestants `names`) in italics."""
    return name if name in names else f"*{name} (reference)*"


def _fmt(m, metric, name, digits):
    """'mean ± std' (or 'mean' for one run) of a metric, blank when it was not measured."""
    if metric not in m or name not in m[metric]:
        return ""
    v = m[metric][name]
    if len(v["runs"]) > 1:
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"
    return f"{v['mean']:.{digits}f}"


def _within(m, metric, name):
    """Whether the published value lies within our mean ± 2 std (never, with a single run)."""
    v = m[metric][name]
    return len(v["runs"]) > 1 and abs(v["mean"] - PUBLISHED[metric][name]) <= 2 * v["std"]


def _published_cells(m, metric, name, digits, relative=False, spread=True):
    """[published, diff, within 2 std] cells for one model (blank when not published)."""
    pub = PUBLISHED.get(metric, {}).get(name)
    if pub is None or name not in m.get(metric, {}):
        return ["", ""] + ([""] if spread else [])
    diff = m[metric][name]["mean"] - pub
    cells = [f"{pub:.{digits}f}", f"{diff:+.{digits}f}" + (f" ({100 * diff / pub:+.0f}%)" if relative else "")]
    if spread:
        cells.append("yes" if _within(m, metric, name) else
                     "one run" if len(m[metric][name]["runs"]) == 1 else "**no**")
    return cells


def _compare_table(m, metric, names, article, digits, relative=False, spread=True):
    cols = ["model", "ours"] + (["published", "diff"] + (["within 2 std"] if spread else []) if article else [])
    return _table(cols, [[_label(n, names), _fmt(m, metric, n, digits)]
                         + (_published_cells(m, metric, n, digits, relative, spread) if article else [])
                         for n in _rows(m, [metric], names)])


def _table(header, rows):
    cells = lambda row: " | ".join(str(c).replace("|", "\\|") for c in row)   # a | inside a cell would end it
    lines = ["| " + cells(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + cells(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def replace_problem(out_dir, settings):
    """Why a new report made with `settings` may not replace the one in out_dir; None if it may.

    A folder without results.json holds no report; a report counts as the same when its settings
    agree on REPORT_SETTINGS (how a run ran, e.g. --jobs, is not what it reports).
    """
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return None
    try:
        before = json.loads(pathlib.Path(path).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} cannot be read as a report"
    show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)
    changed = [f"{k} {show(before.get(k))} -> {show(settings[k])}" for k in REPORT_SETTINGS
               if before.get(k) != settings[k]]
    return f"{out_dir} holds a report made with other settings ({'; '.join(changed)})" if changed else None


def read_results(folder):
    """results.json of a run folder, with keys renamed since older runs mapped to today's."""
    path = os.path.join(folder, "results.json")
    try:
        results = json.loads(pathlib.Path(path).read_text())
        m = results["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        sys.exit(f"report.py: error: cannot read {path} ({err}); give a folder that run.py wrote")
    for old, new in RENAMED.items():
        if old in m:
            m[new] = m.pop(old)
    return results


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m harness.report <folder with results.json>, e.g. python -m harness.report results/mnist")
    start = time.perf_counter()
    path = write_report(read_results(sys.argv[1]), sys.argv[1])
    print(f"{path} in {time.perf_counter() - start:.1f} s")
