"""Verification across two models: FaceNet's appendix "Harmonic Embedding" (Figure 9).

A new model is *compatible* with an old one when its embeddings can be compared directly with the
old model's, so a gallery embedded by the old model need not be re-embedded. The paper shows it
with three ROC curves over the same pairs (NN2 vs NN2, NN1 vs NN1, NN2 vs NN1); here:

* ``new_new``: both images of a pair embedded by the new model (what evaluate.py reports alone);
* ``old_old``: both by the old model;
* ``new_old``: the first image of each pair by the new model, the second by the old one.

Each mode gets the metrics of :func:`evaluation.report.score_pairs` (squared L2 distances, the same
folds, failed pairs excluded or, with ``strict``, scored as wrong), so the three are comparable.
"""
import numpy as np

from evaluation.report import CROSS_MODEL_MODES, pair_distances, score_pairs

__all__ = ["MODES", "MODE_LABELS", "output_size", "check_compatible", "cross_model_distances",
           "evaluate_cross_model", "roc_curves"]

#: The three modes, in the order they are reported and plotted.
MODES = tuple(key for key, _ in CROSS_MODEL_MODES)  # ("new_new", "old_old", "new_old")
#: Human-readable name of each mode (summary lines, plot legend).
MODE_LABELS = {"new_new": "new vs new", "old_old": "old vs old", "new_old": "new vs old"}


def output_size(embedder):
    """The embedding size ``embedder`` actually returns (one forward pass on a black image)."""
    h, w = embedder.image_size
    return int(embedder.embed_images(np.zeros((1, h, w, 3), np.float32)).shape[1])


def check_compatible(new, old):
    """Raise ValueError (one line) unless both embedders return embeddings of one size.

    Returns that size.
    """
    d_new, d_old = output_size(new), output_size(old)
    if d_new != d_old:
        raise ValueError(f"the compared model's embeddings have {d_old} dimensions, the evaluated "
                         f"model's {d_new}: models compared across must share one embedding space")
    return d_new


def _embed(embedder, paths, flip, batch_size, progress, embed_first=None):
    """float32 [len(paths), D] (NaN rows for failed images) and the failures, each unique path
    embedded once (the embedder also caches across calls); ``embed_first``: paths embedded
    before the others, in that order."""
    unique = list(dict.fromkeys(list(embed_first or []) + list(paths)))
    emb, failed = embedder.embed_paths(unique, batch_size=batch_size, flip=flip, progress=progress)
    row = {p: i for i, p in enumerate(unique)}
    return emb[[row[p] for p in paths]], failed


def cross_model_distances(new, old, paths_a, paths_b, flip=False, batch_size=64, progress=True,
                          embed_first=None):
    """Squared L2 distance of every pair (``paths_a[i]``, ``paths_b[i]``) in the three modes.

    ``embed_first``: image paths each model embeds first, in this order, e.g. the list the
    single-model protocol embeds: the batches are then the same as in a run of either model alone,
    so new_new and old_old reproduce those runs bit for bit (the embedders cache per path).

    Returns:
      ``({mode: float64 [P]}, failed)``: NaN marks a pair with an image one of the models could
      not embed; ``failed`` lists ``(path, reason)`` of both models (a path may repeat).
    """
    paths_a, paths_b = list(paths_a), list(paths_b)
    if len(paths_a) != len(paths_b):
        raise ValueError(f"{len(paths_a)} first images but {len(paths_b)} second images")
    both = paths_a + paths_b
    n = len(paths_a)
    e_new, failed_new = _embed(new, both, flip, batch_size, progress, embed_first)
    e_old, failed_old = _embed(old, both, flip, batch_size, progress, embed_first)
    if e_new.shape[1] != e_old.shape[1]:
        raise ValueError(f"embedding sizes differ: new {e_new.shape[1]}, old {e_old.shape[1]}")
    distances = {
        "new_new": pair_distances(e_new[:n], e_new[n:]),
        "old_old": pair_distances(e_old[:n], e_old[n:]),
        "new_old": pair_distances(e_new[:n], e_old[n:]),
    }
    return distances, failed_new + failed_old


def evaluate_cross_model(new, old, paths_a, paths_b, issame, folds=None, num_folds=10,
                         strict=False, flip=False, batch_size=64, progress=True, embed_first=None):
    """Score the pairs in the three modes with :func:`evaluation.report.score_pairs`.

    Args:
      new, old: :class:`evaluation.embedder.Embedder` of the new and the old model.
      paths_a, paths_b: the images of each pair; issame: bool [P]; folds: int [P] or None.
      strict, flip: as in evaluate.py, applied to every mode.
      embed_first: see :func:`cross_model_distances`.

    Returns:
      ``({mode: result}, failed)``; each result carries the private ``_valid`` arrays of
      :func:`score_pairs` (for the ROC plot), which callers pop before writing JSON.

    Raises:
      ValueError: different embedding sizes, or a mode with no pair that can be scored.
    """
    distances, failed = cross_model_distances(new, old, paths_a, paths_b, flip=flip,
                                              batch_size=batch_size, progress=progress,
                                              embed_first=embed_first)
    results = {}
    for mode in MODES:
        try:
            results[mode] = score_pairs(distances[mode], issame, folds, num_folds=num_folds,
                                        strict=strict)
        except ValueError as exc:
            raise ValueError(f"cross-model {mode}: {exc}") from None
    return results, failed


def roc_curves(results):
    """``[(label, far, tar)]`` of the modes in ``results`` whose pairs hold both classes."""
    from evaluation.verification import roc_curve

    curves = []
    for mode in MODES:
        if mode not in results or "_valid" not in results[mode]:
            continue
        d, s = results[mode]["_valid"]
        if s.any() and (~s).any():
            far, tar, _ = roc_curve(d, s)
            curves.append((MODE_LABELS[mode], far, tar))
    return curves
