"""Face identification on embeddings: closed-set rank-k and open-set DIR at a FAR (NumPy only).

FaceNet (Section 1) names identification ("who is this person?") as one of the three tasks a good
embedding reduces to k-NN in the embedding space; the paper reports no identification protocol, so
this module follows the usual gallery/probe one (e.g. IJB-A, MegaFace):

* Identities are split, with the seed, into *enrolled* identities and *impostor* identities
  (``impostor_fraction`` of them, at least one when open-set evaluation is possible).
* Each enrolled identity puts one image in the gallery (its first image in dataset order, or a
  seeded random one with ``gallery="random"``); its other images are *genuine probes*. An enrolled
  identity with a single image is gallery-only (a distractor for the others) and counted.
* Every image of an impostor identity is an *impostor probe*: nobody in the gallery.

Distances are squared L2 (Section 4). For a genuine probe, the rank of its identity is
1 + the number of gallery identities strictly closer than its own gallery image (ties favour the
correct identity).

* ``rank_k`` (closed set): fraction of genuine probes whose identity has rank <= k.
* ``dir_at_far`` (open set, detection and identification rate): the threshold is set so that the
  fraction of impostor probes whose nearest gallery distance is <= threshold equals the target FAR
  (:func:`evaluation.verification.threshold_at_far`); DIR is the fraction of genuine probes that
  are rank-1 correct *and* within the threshold. With M impostor probes the reachable FAR values
  are multiples of 1/M, so FAR = 1e-2 needs M >= 100 to mean anything: ``num_impostor_probes``
  and the FAR achieved on the impostors are reported beside it.
"""
import numpy as np

from evaluation.verification import far_key, threshold_at_far

__all__ = ["split_gallery_probes", "rank_of_true_identity", "evaluate_identification"]


def split_gallery_probes(labels, impostor_fraction=0.2, gallery="first", seed=0):
    """Split image indices into gallery, genuine probes and impostor probes.

    Args:
      labels: int [N] identity per image.
      impostor_fraction: fraction of identities held out as impostors (0 disables open-set).
      gallery: "first" (first image of each enrolled identity, in dataset order) or "random".
      seed: seed of the impostor choice (and of the gallery choice for "random").

    Returns:
      dict of int64 index arrays ``gallery``, ``probes``, ``impostors`` and int
      ``num_gallery_only_identities``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    ids = np.unique(labels)
    if ids.size < 2:
        raise ValueError(f"identification needs at least 2 identities, got {ids.size}")
    if gallery not in ("first", "random"):
        raise ValueError(f"gallery must be 'first' or 'random', got {gallery!r}")
    rng = np.random.default_rng(seed)
    num_imp = int(round(impostor_fraction * ids.size))
    if impostor_fraction > 0:
        num_imp = max(1, num_imp)
    num_imp = min(num_imp, ids.size - 2)  # keep at least 2 enrolled identities
    num_imp = max(num_imp, 0)
    impostor_ids = set(rng.choice(ids, num_imp, replace=False).tolist()) if num_imp else set()
    gal, probes, imps, gallery_only = [], [], [], 0
    for c in ids:
        members = np.flatnonzero(labels == c)
        if c in impostor_ids:
            imps.extend(members.tolist())
            continue
        g = members[0] if gallery == "first" else rng.choice(members)
        gal.append(g)
        rest = members[members != g]
        if rest.size == 0:
            gallery_only += 1
        probes.extend(rest.tolist())
    as_idx = lambda x: np.asarray(sorted(x), dtype=np.int64)  # noqa: E731
    return {"gallery": as_idx(gal), "probes": as_idx(probes), "impostors": as_idx(imps),
            "num_gallery_only_identities": gallery_only}


def squared_distances(a, b):
    """Squared L2 distance (FaceNet's D, the threshold's units), float64 [len(a), len(b)],
    clipped at 0."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    d = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def rank_of_true_identity(probe_emb, probe_labels, gallery_emb, gallery_labels, chunk=4096):
    """For each probe: (rank of its identity in the gallery, int [P]; nearest distance, float [P];
    label of the nearest gallery image, [P]). One gallery image per identity is assumed."""
    probe_emb = np.asarray(probe_emb)
    gallery_labels = np.asarray(gallery_labels)
    if np.unique(gallery_labels).size != gallery_labels.size:
        raise ValueError("the gallery must hold one image per identity")
    col = {c: i for i, c in enumerate(gallery_labels.tolist())}
    ranks = np.empty(len(probe_emb), dtype=np.int64)
    nearest = np.empty(len(probe_emb), dtype=np.float64)
    nearest_label = np.empty(len(probe_emb), dtype=gallery_labels.dtype)
    for s in range(0, len(probe_emb), chunk):
        d = squared_distances(probe_emb[s:s + chunk], gallery_emb)
        arg = np.argmin(d, axis=1)
        nearest[s:s + chunk] = d[np.arange(len(d)), arg]
        nearest_label[s:s + chunk] = gallery_labels[arg]
        if probe_labels is not None:
            true_col = np.array([col.get(c, -1) for c in np.asarray(probe_labels[s:s + chunk]).tolist()])
            if np.any(true_col < 0):
                raise ValueError("a probe's identity is not in the gallery")
            own = d[np.arange(len(d)), true_col]
            ranks[s:s + chunk] = 1 + np.sum(d < own[:, None], axis=1)
    return ranks, nearest, nearest_label


def evaluate_identification(embeddings, labels, ranks=(1, 5), far_targets=(1e-2,),
                            impostor_fraction=0.2, gallery="first", seed=0):
    """Closed-set rank-k accuracy and open-set DIR at FAR on a labelled set.

    Args:
      embeddings: float [N, D].
      labels: int [N] identity per image.
      ranks: the k of the rank-k accuracies.
      far_targets: FARs for DIR (open set).
      impostor_fraction, gallery, seed: see :func:`split_gallery_probes`.

    Returns:
      dict: ``rank_1``, ``rank_5``, ... (closed set, over genuine probes), ``dir_at_far``
      ({far_key: {"dir": .., "far": FAR achieved on impostors, "threshold": squared L2}}, empty
      without impostors), ``num_identities``, ``num_gallery``, ``num_probes``,
      ``num_impostor_identities``, ``num_impostor_probes``, ``num_gallery_only_identities``.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if emb.ndim != 2 or emb.shape[0] != labels.shape[0]:
        raise ValueError(f"embeddings [N, D] and labels [N] disagree: {emb.shape} vs {labels.shape}")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or infinite values")
    split = split_gallery_probes(labels, impostor_fraction, gallery, seed)
    g, p, imp = split["gallery"], split["probes"], split["impostors"]
    if p.size == 0:
        raise ValueError("no genuine probe: every enrolled identity has a single image")
    r, nearest, _ = rank_of_true_identity(emb[p], labels[p], emb[g], labels[g])
    out = {f"rank_{k}": float(np.mean(r <= k)) for k in ranks}
    out["dir_at_far"] = {}
    if imp.size:
        _, imp_nearest, _ = rank_of_true_identity(emb[imp], None, emb[g], labels[g])
        for target in far_targets:
            # every impostor comparison is a "different" pair; threshold_at_far inverts its FAR
            t = threshold_at_far(imp_nearest, np.zeros(imp.size, bool), target)
            far = float(np.mean(imp_nearest <= t))
            dir_ = float(np.mean((r == 1) & (nearest <= t)))
            out["dir_at_far"][far_key(target)] = {"dir": dir_, "far": far, "threshold": float(t)}
    out.update({
        "num_identities": int(np.unique(labels).size),
        "num_gallery": int(g.size),
        "num_probes": int(p.size),
        "num_impostor_identities": int(np.unique(labels[imp]).size) if imp.size else 0,
        "num_impostor_probes": int(imp.size),
        "num_gallery_only_identities": int(split["num_gallery_only_identities"]),
    })
    return out
