"""Validation during training: embed a fixed set of held-out images and score verification pairs.

A validation set is a list of unique image paths, the identity of each, and pairs given as index
arrays into that list, with a fold per pair. It comes from an LFW pairs file (the paper's protocol)
or from a folder-per-identity hold-out set.
"""
import dataclasses
import os

import numpy as np
from absl import logging


@dataclasses.dataclass
class ValidationSet:
    paths: list           # unique image paths, [M]
    names: list           # identity name of each path, [M]
    idx_a: np.ndarray     # int [N], first image of each pair
    idx_b: np.ndarray     # int [N], second image of each pair
    issame: np.ndarray    # bool [N]
    folds: np.ndarray     # int [N]
    num_failed_pairs: int = 0  # pairs dropped because an image is missing
    source: str = ""

    @property
    def num_pairs(self):
        return int(len(self.issame))


def from_lfw_pairs(pairs_file, lfw_dir):
    """Build a ValidationSet from an LFW-format pairs file; pairs with a missing image are counted."""
    from data.pairs import read_pairs

    pair_set = read_pairs(pairs_file, lfw_dir)
    index, paths, names = {}, [], []
    a, b, same, folds = [], [], [], []
    failed = 0
    for p in pair_set.pairs:
        if not (os.path.exists(p.path_a) and os.path.exists(p.path_b)):
            failed += 1
            continue
        ids = []
        for path in (p.path_a, p.path_b):
            if path not in index:
                index[path] = len(paths)
                paths.append(path)
                names.append(os.path.basename(os.path.dirname(path)))
            ids.append(index[path])
        a.append(ids[0])
        b.append(ids[1])
        same.append(p.issame)
        folds.append(p.fold)
    if failed:
        logging.warning("validation: %d of %d pairs have a missing image and are not scored",
                        failed, len(pair_set.pairs))
    if not a:
        raise ValueError(f"no usable pairs in {pairs_file} under {lfw_dir}")
    return ValidationSet(paths, names, np.asarray(a), np.asarray(b), np.asarray(same, bool),
                         np.asarray(folds), failed, source=pairs_file)


def from_identity_dataset(dataset, num_pairs=6000, num_folds=10, seed=0):
    """Build a ValidationSet from a folder-per-identity hold-out set with balanced sampled pairs."""
    from evaluation.holdout_pairs import make_pairs

    idx_a, idx_b, issame, folds = make_pairs(dataset.labels, mode="balanced", num_pairs=num_pairs,
                                             num_folds=num_folds, seed=seed)
    names = [dataset.class_names[int(l)] for l in dataset.labels]
    return ValidationSet(list(dataset.paths), names, np.asarray(idx_a), np.asarray(idx_b),
                         np.asarray(issame, bool), np.asarray(folds), 0, source="holdout")


def embed_paths(backbone, paths, image_size, batch_size=128):
    """Unit embeddings of images on disk, float32 [M, D], in order (no augmentation)."""
    from data.pipeline import eval_dataset

    ds = eval_dataset(list(paths), image_size, batch_size)
    return np.asarray(backbone.predict(ds, verbose=0), dtype=np.float32)


def score(embeddings, vset, far_targets=(1e-3,)):
    """Verification metrics for embeddings [M, D] of vset.paths (squared L2, Section 4)."""
    from evaluation.verification import evaluate_verification

    diff = embeddings[vset.idx_a] - embeddings[vset.idx_b]
    dist = np.sum(diff * diff, axis=1)
    return evaluate_verification(dist, vset.issame, folds=vset.folds, far_targets=far_targets)
