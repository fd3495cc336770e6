"""Run the Autoencoder Bake-Off: train the contestants, put them through the gauntlet, report.

    python run.py                                  # full protocol on MNIST (downloads it if needed)
    python run.py --quick                          # reduced settings, a complete report in minutes
    python run.py --dataset fashion                # Fashion-MNIST (data/fashion, or --data-dir)
    python run.py --seeds 3 --anomaly-digits all   # error bars and the one-vs-rest anomaly sweep
    python run.py --jobs 1                         # one training at a time (default: one per core)

Writes <out>/<dataset>/results.json, REPORT.md and the figures beside it (<out>: runs, or
runs/quick with --quick; the committed reports are in results). Finished trainings are kept as
checkpoints and reused when run.py runs again with the same settings, so an interrupted run
continues where it stopped.

The recipe, as `main` follows it (PROTOCOL.md has every detail):
    1. load the data and split it as the companion code did
    2. train every contestant at latent 20 (all tasks) and at latent 2 without the anomaly class
       (anomaly detection), 60 epochs each, several trainings at once
    3. per seed, run the gauntlet: reconstruction, classification, the raw-pixel and baseline
       references, anomaly detection, samples and interpolation, latent structure
    4. summarise over seeds (mean, std, the runs), write results.json, and write REPORT.md,
       which audits the article's claims seed by seed

This file is the recipe: the models are ae.py's, the measurements tasks.py's and umap_lite.py's,
the data mnist.py's. The experiment's machinery (the command line, checkpoints, worker
processes, the sweep's kept scores, provenance, the report) is in harness/, called here and
never needed to learn from the rest.

First read: `main`, then the task functions (`task_*`, in the order `run_gauntlet` calls them).
"""

import datetime
import json
import os
import pathlib
import time

import numpy as np
import torch

import ae
import mnist
import tasks
import umap_lite
from harness import cells, cli, figures, report, trainings, workers
from harness.protocol import (ANOMALY_DIGIT, BUDGET_DRAWS, LABEL_BUDGETS, LATENT, LATENT_ANOMALY,
                              N_GENERATED, N_SHOWN, PIXELS, QUICK, SAMPLERS, TASK_THREADS, anomaly_suffix)


# ---- the recipe

def main(argv=None):
    args = cli.parse_args(argv)
    t_start, stages = time.time(), {}
    out_dir = os.path.join(args.out, args.dataset)
    device = cli.preflight(args)            # one-line errors before any work
    env = workers.environment(device, out_dir)     # its git_dirty: changes outside out_dir
    # 1. the data: 55,000 training and 5,000 validation images (one seeded split), 10,000 test
    data = trainings.load_data(args)
    seeds = trainings.seeds_of(args)
    print(f"{args.dataset}: {len(data['train_idx'])} train / {len(data['val_idx'])} val / "
          f"{len(data['x_test'])} test images; models: {', '.join(args.models)}; "
          f"seeds: {', '.join(map(str, seeds))}", flush=True)
    stages["data"] = time.time() - t_start
    # 2. every training, reused from a checkpoint (or the sweep's kept scores) where one exists
    jobs = trainings.training_jobs(args, data, out_dir)
    t = time.time()
    trained, kept, parallel = trainings.train_all(jobs, data, args, device, os.path.join(out_dir, cells.CELLS), env)
    stages["training"] = time.time() - t
    # 3. the gauntlet, once per seed
    torch.set_num_threads(TASK_THREADS)
    t, workers.STATUS.seconds = time.time(), {}
    with workers.STATUS.step("judge (the digit classifier that scores samples)"):
        judge = trainings.get_judge(data, args, device, out_dir)
    per_seed = []
    for i, seed in enumerate(seeds):
        m, figs = run_gauntlet(trained, data, args, seed, judge, device, out_dir, first=i == 0)
        cells.add_kept_scores(m, kept, seed)   # the sweep's kept cells, scored as task_anomaly scores
        if i == 0:
            figures.write_figures(figs, data, args, out_dir)     # the figures show the first seed
        per_seed.append(m)
    stages["tasks"] = time.time() - t
    stages.update({f"task {step}": s for step, s in workers.STATUS.seconds.items()})   # each task's seconds
    stages["total"] = time.time() - t_start
    # 4. results.json and REPORT.md
    results = {"config": cli.config(args, data, argv), "environment": {**env, **parallel},
               "stages_seconds": stages, "trainings": trainings.training_records(jobs, trained, kept),
               "finished": datetime.datetime.now().isoformat(timespec="seconds"),
               "metrics": report.summarise(per_seed)}
    path = os.path.join(out_dir, "results.json")
    figures.write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(results, indent=1)))
    report_path = report.write_report(results, out_dir)
    figures.remove_stale_figures(out_dir, t_start)
    print(f"done in {workers.hms(stages['total'])}: {report_path} (results: {path})")
    return results


# ---- the gauntlet: one function per task, each over every model of one seed

def run_gauntlet(trained, data, args, seed, judge, device, out_dir, first):
    """All tasks for one seed: ({metric: {model: value}}, {task: what its figures show})."""
    names = args.models + list(ae.REFERENCES)      # the contestants, then the references
    models = workers.Announced({n: trained[(n, LATENT, seed, None)][0] for n in names})
    # the anomaly models, by (latent, held-out digit); the sweep's kept cells are not among them
    anomaly = {(z, d): workers.Announced({n: trained[(n, z, seed, d)][0] for n in names if (n, z, seed, d) in trained})
               for z, d in trainings.anomaly_trainings(args)}
    m = {"training_seconds": {n: trained[(n, LATENT, seed, None)][1]["history"]["seconds"]
                              for n in names}}
    figs = {}
    steps = [("reconstruction", lambda: task_reconstruction(models, data, seed)),
             ("classification", lambda: task_classification(models, data, seed, args.quick)),
             ("pixels", lambda: task_pixel_references(data, seed, args.quick, device)),
             ("baselines", lambda: (task_baselines(data, seed, device), None)),
             ("anomaly", lambda: task_anomaly(anomaly, data, seed, args.quick)),
             ("generation", lambda: task_generation(models, data, judge, seed)),
             ("latent", lambda: task_latent_structure(models, anomaly[LATENT_ANOMALY, ANOMALY_DIGIT], data, seed,
                                                      args.quick, out_dir if first else None))]
    for step, task in steps:
        with workers.STATUS.step(f"seed {seed}: {step}"):
            metrics, figs[step] = task()
        for metric, by_model in metrics.items():      # the pixels join the contestants' metrics
            m.setdefault(metric, {}).update(by_model)
    return m, figs


def task_reconstruction(models, data, seed):
    """Mean over the test images of the BCE summed over the pixels; 16 reconstructions to show."""
    bce, shown = {}, {}
    for name, model in models.items():
        ae.set_seed(seed)       # the VAEs sample in evaluation too, as in the companion code
        bce[name] = float(tasks.per_image_bce(model, data["x_test"]).mean())
        ae.set_seed(seed)
        shown[name] = tasks.batched(model, data["x_test"][:N_SHOWN])
    return {"reconstruction_bce": bce}, shown


def task_classification(models, data, seed, quick):
    """Codes of the frozen encoders -> the converged probe, the article's probe, 10-NN, label budgets.

    Only the 550 labelled training images train; the validation images choose every setting
    (the L2 strength, the early-stopping epoch); the test images are only ever scored.
    """
    m, curves = {}, {}
    for name, model in models.items():
        z_all, z_test = _codes(model, data, seed, sample=True)
        ae.set_seed(seed)
        net = tasks.FrozenEncoderProbe(model).to(next(model.parameters()).device)
        scores, curves[name] = _classify(z_all, z_test, net, data, seed, quick)
        if model.bottleneck.stochastic:         # the VAEs: their mean code too
            mu_all, mu_test = _codes(model, data, seed, sample=False)
            scores["probe_accuracy_mu"] = _converged_probe(mu_all, mu_test, data["probe_idx"], data)
        for metric, value in scores.items():
            m.setdefault(metric, {})[name] = value
    return m, curves


def task_pixel_references(data, seed, quick=False, device="cpu"):
    """The contestants' classification metrics on the raw 1,024 pixels, as model "pixels".

    What an encoder must beat: the same labelled, validation and test images, label-budget
    draws and seeds as `task_classification`; the article's probe is a Linear(1024, 10) on the
    pixels, initialised from the run seed and trained as on a frozen encoder.
    """
    ae.set_seed(seed)
    net = torch.nn.Linear(data["x_all"].shape[1], tasks.N_CLASSES).to(device)
    scores, curve = _classify(data["x_all"], data["x_test"], net, data, seed, quick)
    return {metric: {PIXELS: value} for metric, value in scores.items()}, curve


def _classify(z_all, z_test, net, data, seed, quick):
    """{metric: value} and the label-budget curve {budget: (mean, std)} of one set of features.

    z_all, z_test: features of all training images and of the test images; net: images -> logits
    for the article's probe.
    """
    y_all, probe = data["y_all"], data["probe_idx"]
    knn = tasks.knn_predict(z_all[probe], y_all[probe], z_test, k=10)
    scores = {"probe_accuracy": _converged_probe(z_all, z_test, probe, data),
              "probe_accuracy_articles_probe": _articles_probe(net, data, seed),
              "knn_probe_accuracy": float(np.mean(knn == data["y_test"]))}
    curve = {}
    for budget in LABEL_BUDGETS:
        per_class = budget // tasks.N_CLASSES
        if per_class * 2 > np.bincount(y_all[data["train_idx"]]).min():
            continue    # the data set is too small for this budget (tiny test data)
        draws = QUICK["budget_draws"] if quick else BUDGET_DRAWS
        accs = [_converged_probe(z_all, z_test, _budget_draw(data, per_class, seed + i), data)
                for i in range(draws)]
        scores[f"probe_accuracy_{budget}_labels"] = float(np.mean(accs))
        curve[budget] = (float(np.mean(accs)), float(np.std(accs)))
    return scores, curve


def task_baselines(data, seed, device):
    """The article's probe without a trained autoencoder: three readings of "the baseline".

    baseline_as_published: what the companion code's baseline really was. Its Classifier hands
    Adam only the linear head's parameters (src/downstream/classification.py,
    configure_optimizers), so the random vanilla encoder never changes, but its BatchNorm layers
    follow the classifier into training mode (batch statistics, running averages updated).
    from_scratch: the vanilla encoder and the linear layer both trained, as the article describes.
    random_encoder: the random encoder frozen with BatchNorm in eval mode, only the layer trained;
    what the probe gets from the architecture alone.
    """
    m = {}
    for kind in ("baseline_as_published", "from_scratch", "random_encoder"):
        ae.set_seed(seed)
        model = ae.build("vanilla", LATENT).to(device)
        if kind == "random_encoder":
            net = tasks.FrozenEncoderProbe(model).to(device)
        else:
            if kind == "baseline_as_published":
                model.encoder.requires_grad_(False)   # no update, but .train() still reaches BatchNorm
            net = torch.nn.Sequential(model.encoder, torch.nn.Linear(LATENT, tasks.N_CLASSES)).to(device)
        m[f"probe_accuracy_{kind}"] = {"vanilla": _articles_probe(net, data, seed)}
    return m


def task_anomaly(anomaly, data, seed, quick=False):
    """Each anomaly model, trained without digit d, scores every test image; positives are the d's.

    The scores (tasks.anomaly_row, PROTOCOL.md 6.5): the summed BCE and the article's signed score
    sum(x_hat - x); the BCE less its floor H(x) and the squared error; the code density (a mixture
    fitted to the model's training codes, its size chosen on validation codes, neither holding d);
    the VAEs' likelihood bounds; the BCE in bits less the PNG length L(x). Beside them, the
    references that need no model: low ink, H(x) and L(x). Each score's rank correlation with ink
    says how much of it is ink. Keys: `<metric>_digit_<d>` for every (latent 2) digit,
    `..._z<latent>` for the other latent sizes, and the plain `<metric>` for the article's digit
    at latent 2. Returns the ROC curves of the article's setting to plot.
    """
    y_test, refs = data["y_test"], tasks.anomaly_references(data["x_test"])
    m, curves, density = {}, {}, None
    k = QUICK["iwae_k"] if quick else tasks.IWAE_K      # the VAEs' draws per image
    put = lambda metric, name, value: m.setdefault(metric, {}).update({name: value})
    for (latent, digit), models in anomaly.items():
        is_anomaly = y_test == digit
        headline = latent == LATENT_ANOMALY and digit == ANOMALY_DIGIT
        fit, val = (data["x_all"][mnist.drop_class(data[idx], data["y_all"], digit)] for idx in ("train_idx", "val_idx"))
        rows = {}
        for name, model in models.items():
            rows[name], s = tasks.anomaly_row(model, data["x_test"], is_anomaly, seed, fit, val, refs, k)
            if headline:       # the summed BCE in bits, for the report's word on L(x)
                put("anomaly_bce_bits_mean", name, float(s["bce"].mean() / np.log(2)))
                put("anomaly_bce_bits_std", name, float(s["bce"].std() / np.log(2)))
                curves[name] = [("summed BCE", *tasks.roc_curve(is_anomaly, s["bce"])[:2], rows[name]["anomaly_auc"]),
                                ("signed (article)", *tasks.roc_curve(is_anomaly, s["signed"])[:2],
                                 rows[name]["anomaly_auc_signed_score"])]
        rows["ink"] = tasks.anomaly_metrics(is_anomaly, {"bce": refs["ink"], "signed": refs["ink"]})  # one ranking
        for reference in ("entropy", "png"):
            rows[reference] = tasks.anomaly_metrics(is_anomaly, {"bce": refs[reference]}, -refs["ink"])
        if headline:
            curves["ink"] = [("low ink", *tasks.roc_curve(is_anomaly, refs["ink"])[:2], rows["ink"]["anomaly_auc"])]
            for reference, bits in (("entropy", refs["entropy"] / np.log(2)), ("png", refs["png"])):
                put("anomaly_bce_bits_mean", reference, float(bits.mean()))
                put("anomaly_bce_bits_std", reference, float(bits.std()))
            shown = next((n for n in models if models[n].bottleneck.stochastic), next(iter(models), None))
            if shown is not None:
                density = figures.code_density_picture(models[shown], shown, fit, val, data["x_test"], is_anomaly, seed)
        for name, row in rows.items():
            for metric, value in row.items():
                put(metric + anomaly_suffix(latent, digit), name, value)
                if headline:
                    put(metric, name, value)
    return m, {"roc": curves, "density": density}


def task_generation(models, data, judge, seed):
    """Samples of every model under each of its samplers, and interpolations of all, scored by the judge."""
    x_test, y_test = data["x_test"], data["y_test"]
    _, test_features = tasks.judge_images(judge, x_test[:N_GENERATED])
    m, figs = {}, {"samples": {}, "notes": {}, "gifs": {}}
    put = lambda metric, name, value: m.setdefault(metric, {}).update({name: value})
    for name, model in models.items():
        samples, components = tasks.draw_samples(model, data["x_all"], data["train_idx"], data["val_idx"],
                                                  N_GENERATED, seed)
        figs["samples"][name], figs["notes"][name] = {}, {}
        for suffix, generated in samples.items():
            quality = tasks.sample_quality(*tasks.judge_images(judge, generated), test_features)
            for k, v in quality.items():
                put(f"sample_{k}{suffix}", name, v)
            figs["samples"][name][SAMPLERS[suffix]] = generated[:N_SHOWN]
            figs["notes"][name][SAMPLERS[suffix]] = (f"legible {quality['legibility']:.2f} | diversity "
                                                     f"{quality['diversity']:.2f} | FD {quality['frechet']:.0f}")
        for suffix, k in components.items():
            put(f"sample_components{suffix}", name, k)
        # between the first two test images; the VAEs also with their noise drawn once per path
        for suffix, fixed in [("", False)] + ([("_fixed_noise", True)] if model.bottleneck.stochastic else []):
            ae.set_seed(seed)
            frames = tasks.interpolate(model, x_test[0], x_test[1], fixed_noise=fixed, seed=seed)
            path = tasks.path_quality(tasks.judge_images(judge, frames)[0], int(y_test[0]), int(y_test[1]))
            put(f"interpolation_confidence{suffix}", name, path["mean_confidence"])
            put(f"interpolation_third_class{suffix}", name, float(path["third_class"]))
            figs["gifs"][f"interp_{name}{suffix}.gif"] = frames
    return m, figs


def task_latent_structure(models, models_z2, data, seed, quick, map_dir=None):
    """Leave-one-out 10-NN accuracy of the 20-d test codes; with map_dir, their umap_lite maps too.

    The maps (first seed only: they are the slowest task) come with their trustworthiness, and
    the latent-2 codes are plotted as they are.
    """
    n_map = min(len(data["x_test"]), QUICK["map_points"]) if quick else len(data["x_test"])
    y_map, m, figs = data["y_test"][:n_map], {"latent_knn_accuracy": {}}, {"maps20": {}, "maps2": {},
                                                                           "notes20": {}, "notes2": {}}
    for name, model in models.items():
        z_map = _codes(model, data, seed, sample=True)[1][:n_map]            # (n_map, 20)
        knn = np.mean(tasks.knn_predict(z_map, y_map, z_map, k=10, exclude_self=True) == y_map)
        m["latent_knn_accuracy"][name] = float(knn)
        if map_dir is None:
            continue
        emb = trainings.cached_embedding(map_dir, name, z_map, seed, QUICK["umap_epochs"] if quick else None)
        trust = float(umap_lite.trustworthiness(z_map, emb, k=15))
        m.setdefault("umap_trustworthiness", {})[name] = trust
        figs["maps20"][name] = emb
        figs["notes20"][name] = f"trust(15) {trust:.3f} | 10-NN 20-d {knn:.3f}" + _dead_units_note(z_map)
        ae.set_seed(seed)
        z2 = tasks.encode(models_z2[name], data["x_test"][:n_map])             # (n_map, 2)
        knn2 = np.mean(tasks.knn_predict(z2, y_map, z2, k=10, exclude_self=True) == y_map)
        figs["maps2"][name], figs["notes2"][name] = z2, f"10-NN {knn2:.3f}" + _dead_units_note(z2)
    return m, figs


def _dead_units_note(z):
    dead = tasks.dead_units(z)
    return f" | {dead} of {z.shape[1]} units constant" if dead else ""


def _codes(model, data, seed, sample):
    """Codes of all training images and of the test images, (60000, Z) and (10000, Z)."""
    ae.set_seed(seed)           # a VAE's sampled codes are the same in every task that asks
    return tasks.encode(model, data["x_all"], sample=sample), tasks.encode(model, data["x_test"], sample=sample)


def _converged_probe(z_all, z_test, train_idx, data):
    """Test accuracy of the converged probe trained on z_all[train_idx]; validation picks the L2."""
    y_all, val = data["y_all"], data["val_idx"]
    return tasks.linear_probe(z_all[train_idx], y_all[train_idx], z_all[val], y_all[val],
                              z_test, data["y_test"])


def _articles_probe(net, data, seed):
    """The article's probe on the 550 labelled images; early stopping on the validation images."""
    x_all, y_all, probe, val = data["x_all"], data["y_all"], data["probe_idx"], data["val_idx"]
    return tasks.train_classifier(net, x_all[probe], y_all[probe], x_all[val], y_all[val],
                                  data["x_test"], data["y_test"], seed)


def _budget_draw(data, per_class, seed):
    """A stratified draw of per_class labelled images per class from the training split."""
    train_idx = data["train_idx"]
    return train_idx[tasks.label_budget_indices(data["y_all"][train_idx], per_class, seed)]


if __name__ == "__main__":
    cli.run_cli(main)
