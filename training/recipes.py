"""Named sets of training defaults (``train.py --recipe``), chosen by measurement.

A recipe only fills in flags the user did not give on the command line, so any part of it can be
overridden (``--recipe=paper --model=nn2``). ``auto`` picks ``synthetic`` for the built-in data and
``real`` when ``--data_dir`` is given. What each one was measured on is in the README ("Real
faces"); ``bench/real_faces.py`` reproduces the curves.

- ``synthetic``: the built-in main job (the flag defaults of flags.py): ``tiny`` at 64 px, Adagrad
  0.05, semi-hard mining, P=16 x K=8.
- ``paper``: FaceNet's own setup (Section 4): Adagrad at 0.05, constant rate, triplet loss with
  margin 0.2 on squared L2 distances, semi-hard negatives, ~1,800-image batches (P=45 x K=40); NN4,
  the paper's smallest Inception at 96 px.
- ``real``: the recipe for in-the-wild aligned crops on a CPU: ``tiny`` at 64 px, batch-all triplets,
  P=16 x K=8, Adam 1e-3 after a 100-step warm-up. On pins_aligned (70 training people, 20 held
  out) it reaches 70% held-out accuracy in 7 minutes on 2 cores and ~74% after 20-60 minutes;
  variants of the loss, head, augmentation, learning rate and network did not beat it in short
  exploratory runs (issue #13), nor did a cosine over the time budget with weight averaging, or
  CosFace pre-training, run through bench/real_faces.py (72.3% and 72.7% at 20 minutes).
"""
from choices import RECIPES as RECIPE_CHOICES  # defined once (TF-free); flags.py offers them

RECIPES = {
    "synthetic": {},
    "paper": {
        "model": "nn4", "loss": "triplet", "mining": "semi_hard", "triplet_margin": 0.2,
        "distance": "squared_l2", "optimizer": "adagrad", "learning_rate": 0.05,
        "lr_schedule": "constant", "warmup_steps": 0,
        "identities_per_batch": 45, "images_per_identity": 40,
    },
    "real": {
        "model": "tiny", "loss": "triplet", "mining": "all", "triplet_margin": 0.2,
        "distance": "squared_l2", "optimizer": "adam", "learning_rate": 1e-3,
        "lr_schedule": "constant", "warmup_steps": 100,
        "identities_per_batch": 16, "images_per_identity": 8,
    },
}


def resolve_recipe(name, data_dir):
    """The recipe a run uses: ``auto`` -> ``real`` with a --data_dir, else ``synthetic``."""
    if name not in RECIPE_CHOICES:
        raise ValueError(f"unknown recipe {name!r}; choose from {RECIPE_CHOICES}")
    if name == "auto":
        return "real" if data_dir else "synthetic"
    return name


def apply_recipe(flag_values, name):
    """Set the recipe's values on every flag not given on the command line.

    Args:
      flag_values: absl ``FLAGS`` (parsed).
      name: a resolved recipe name (not ``auto``).
    Returns:
      dict of the flags the recipe set, name -> value.
    """
    applied = {}
    for flag, value in RECIPES[name].items():
        if not flag_values[flag].present:
            flag_values[flag].value = value
            applied[flag] = value
    return applied
