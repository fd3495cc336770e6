"""Checkpoints: a trained model with the settings and history that produced it, one file each.

    from harness import checkpoints
    checkpoints.save(model, "vae.pt", meta={"settings": ..., "history": ...})
    model, meta = checkpoints.load("vae.pt")      # rebuilt with ae.build, in eval mode

The file holds the model's name, latent and input sizes, weights and `meta` (plain types only),
written atomically (figures.write_atomically: temp file + rename), so an interrupted save never
leaves half a checkpoint.
"""

import os

import torch

import ae
from harness.figures import write_atomically


def save(model, path, meta=None):
    """Write name, latent_dim, weights and `meta` (plain types only) atomically to `path`."""
    meta = {} if meta is None else meta
    _check_plain(meta, "meta")
    payload = {"name": model.name, "latent_dim": model.latent_dim, "input_dim": model.input_dim, "meta": meta,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    # the temporary file's name never ends in .pt: nothing that lists checkpoints takes a save in
    # progress for one
    write_atomically(path, lambda tmp: torch.save(payload, tmp), suffix=".part")


def load(path, device=None):
    """(model, meta) from a file written by save; the model comes back in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train the model first (run.py)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        # checkpoints written before input_dim was saved are all of 32x32 MNIST-family images
        model = ae.build(payload["name"], payload["latent_dim"], payload.get("input_dim", 1024))
        model.load_state_dict(payload["state_dict"])
    except Exception as err:
        raise ValueError(f"{path} is not a checkpoint written by save ({err}); delete it and retrain") from err
    if device is not None:
        model.to(device)
    return model.eval(), payload["meta"]


def _check_plain(value, where):
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} keys must be strings, got {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise ValueError(f"{where} is a {type(value).__name__}; save only str, int, float, bool, None, "
                         f"lists and dicts (convert with float() or .tolist())")
