"""The protocol's numbers, named once: run.py, the harness and the report all read them here.

PROTOCOL.md says where each comes from. They live below run.py, not in it, so that the report
(which renders from results.json alone) can read them without importing the recipe.
"""

DATASETS = ("mnist", "fashion", "kmnist")
FIRST_SEED = 42                 # the companion code's seed; further runs use 43, 44, ...
SPLIT_SEED = 42                 # the companion code's split: torch.randperm on a CPU generator seeded 42
SPLIT = f"torch.randperm seed {SPLIT_SEED}"   # recorded with every checkpoint: a new split retrains
EPOCHS = 60                     # the article's training length
LATENT, LATENT_ANOMALY = 20, 2  # the two trainings per contestant
ANOMALY_DIGIT = 1               # the article's held-out class
PIXELS = "pixels"               # the row of the raw-pixel references: not a contestant
N_PROBE = 550                   # labelled images for the classification probes
LABEL_BUDGETS = (10, 100, 550, 5500)
BUDGET_DRAWS = 3                # stratified draws per label budget
N_GENERATED = 1000              # samples per model and sampler judged by the classifier
SAMPLERS = {"": "own prior",    # metric-key suffix -> name; "" keeps the keys of the own priors
            "_gmm": "ex-post mixture", "_categorical": "learned categorical (vq)",
            "_gmm_prequant": "mixture before the quantiser (vq)"}
N_SHOWN = 16                    # images per reconstruction row and per sample grid
JUDGE_EPOCHS = 5
# --quick, a first look in under a minute: a few thousand images and the cheapest settings
QUICK = {"epochs": 3, "n_train": 8000, "n_val": 2000, "n_test": 2000, "map_points": 2000, "umap_epochs": 100,
         "judge_epochs": 1, "budget_draws": 1, "iwae_k": 16}
# The tasks run on one torch thread: their small steps (the article's probe trains on batches of
# 32) gain little from a second one, and where anything else runs, threads that wait for each
# other at every operation make torch crawl (a busy 2-core machine: 10x). Trainings: workers.plan_jobs.
TASK_THREADS = 1


def anomaly_suffix(latent, digit):
    """The key suffix of an anomaly metric: _digit_<d>, and _z<latent> beyond the latent-2 models."""
    return f"_digit_{digit}" + ("" if latent == LATENT_ANOMALY else f"_z{latent}")
