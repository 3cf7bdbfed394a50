"""Face-verification metrics on pair distances (FaceNet Section 4, NumPy only).

Every function takes ``distances`` (float [N], the squared L2 distance between the two embeddings of
each pair, Section 4 "D(x_i, x_j)") and ``issame`` (bool [N], True for a same-identity pair).
A pair is *accepted* (predicted "same") when ``distance <= threshold``, exactly as in the paper:

* TA(d) = {(i, j) in P_same : D(x_i, x_j) <= d},  FA(d) = {(i, j) in P_diff : D(x_i, x_j) <= d}
* VAL(d) = |TA(d)| / |P_same|,  FAR(d) = |FA(d)| / |P_diff|

Cross-validation follows the LFW protocol of Section 5.7 ("nine splits are used to select the
L2-distance threshold, the tenth is tested"). ``folds`` is an int [N] fold index per pair; when it is
None the pairs are split into ``num_folds`` deterministic, stratified folds (:func:`make_folds`: the
same pairs are dealt round-robin over the folds, then the different pairs), so that a pair list
sorted by label, or alternating, still gives folds that hold both classes in equal shares. With a
single fold (e.g. LFW's View 1 dev file) the threshold is chosen and tested on the same pairs: that
accuracy is optimistic.

Conventions for degenerate input (no NaN is ever returned by the rate functions): VAL is 0 when
there is no same pair and FAR is 0 when there is no different pair, as in davidsandberg/facenet's
``calculate_val_far``. Metrics that are undefined for one class only (AUC, EER) raise ValueError;
:func:`evaluate_verification` reports them as None instead.
"""
import numpy as np

__all__ = [
    "check_pairs",
    "make_folds",
    "best_accuracy_threshold",
    "accuracy_at",
    "kfold_accuracy",
    "val_far",
    "threshold_at_far",
    "val_at_far",
    "roc_curve",
    "auc",
    "eer",
    "evaluate_verification",
    "far_key",
]


def check_pairs(distances, issame):
    """Validate and convert: returns (float64 [N] distances, bool [N] issame).

    Raises ValueError on empty input, mismatched or non 1-D shapes, or non-finite distances.
    """
    d = np.asarray(distances, dtype=np.float64)
    s = np.asarray(issame)
    if d.ndim != 1 or s.ndim != 1:
        raise ValueError(f"distances and issame must be 1-D, got shapes {d.shape} and {s.shape}")
    if d.shape[0] != s.shape[0]:
        raise ValueError(f"distances ({d.shape[0]}) and issame ({s.shape[0]}) differ in length")
    if d.shape[0] == 0:
        raise ValueError("no pairs to evaluate")
    if not np.all(np.isfinite(d)):
        bad = int(np.sum(~np.isfinite(d)))
        raise ValueError(f"{bad} distance(s) are NaN or infinite (diverged model or bad input?)")
    if s.dtype != bool:
        if not np.all(np.isin(s, (0, 1))):
            raise ValueError("issame must be boolean (or 0/1)")
        s = s.astype(bool)
    return d, s


def make_folds(num_pairs, num_folds=10, issame=None):
    """Deterministic stratified fold index, int [num_pairs].

    Without ``issame``, pair i goes to fold ``i % k``. With ``issame`` (bool [num_pairs]) the same
    pairs are dealt round-robin over the folds in their order, then the different pairs, so every
    fold gets the same share of each class whatever the order of the list (sorted by label, or
    alternating). ``k = min(num_folds, num_pairs)`` so that no fold is empty.
    """
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    k = max(1, min(int(num_folds), int(num_pairs)))
    if issame is None:
        return np.arange(num_pairs, dtype=np.int64) % k
    s = np.asarray(issame, dtype=bool)
    if s.shape != (num_pairs,):
        raise ValueError(f"issame must have shape ({num_pairs},), got {s.shape}")
    n_same = int(s.sum())
    folds = np.empty(num_pairs, dtype=np.int64)
    folds[s] = np.arange(n_same) % k
    # continue the deal where the same pairs stopped, so small folds stay balanced in size
    folds[~s] = (n_same + np.arange(num_pairs - n_same)) % k
    return folds


def _fold_ids(n, folds, num_folds, issame=None):
    if folds is None:
        folds = make_folds(n, num_folds, issame)
    folds = np.asarray(folds)
    if folds.shape != (n,):
        raise ValueError(f"folds must have shape ({n},), got {folds.shape}")
    return folds, np.unique(folds)


def _best_threshold_sorted(ds, ss):
    """:func:`best_accuracy_threshold` on distances already sorted ascending (ss aligned)."""
    n = ds.size
    ends = np.flatnonzero(np.r_[ds[1:] != ds[:-1], True])  # last index of each run of equal values
    u = ds[ends]
    below = u[0] - (0.5 * (u[1] - u[0]) if u.size > 1 else 1.0)
    # candidate thresholds: below all, midpoints of consecutive unique values, the largest value
    cand = np.concatenate([[below], 0.5 * (u[:-1] + u[1:]), [u[-1]]])
    cum_pos = np.cumsum(ss)
    accepted = np.concatenate([[0], ends + 1])  # pairs with distance <= candidate
    tp = np.concatenate([[0], cum_pos[ends]])
    n_neg = n - int(cum_pos[-1])
    correct = tp + (n_neg - (accepted - tp))
    best = int(np.argmax(correct))
    return float(cand[best]), float(correct[best]) / n


def best_accuracy_threshold(distances, issame):
    """Threshold maximising accuracy on these pairs; exact, O(N log N).

    Searches one threshold below the smallest distance (reject all), the midpoints between
    consecutive sorted unique distances, and the largest distance (accept all). Ties are broken
    towards the smallest threshold (the first maximum, as davidsandberg/facenet's argmax over its
    threshold grid). Returns (threshold, accuracy).
    """
    d, s = check_pairs(distances, issame)
    order = np.argsort(d, kind="stable")
    return _best_threshold_sorted(d[order], s[order])


def accuracy_at(distances, issame, threshold):
    """Fraction of pairs classified correctly by ``distance <= threshold``."""
    d, s = check_pairs(distances, issame)
    return float(np.mean((d <= threshold) == s))


def kfold_accuracy(distances, issame, folds=None, num_folds=10):
    """Cross-validated verification accuracy (Section 5.7, LFW protocol).

    For each fold, the accuracy-maximising threshold (:func:`best_accuracy_threshold`) is chosen on
    the other folds and tested on that fold. With a single fold the threshold is chosen and tested
    on the same pairs (optimistic).

    Returns (mean accuracy, std accuracy over folds, thresholds: list of float, one per fold).
    """
    accs, thresholds = [], []
    for d_sorted, s_sorted, d_test, s_test in _cross_validation_folds(distances, issame, folds,
                                                                      num_folds):
        t, _ = _best_threshold_sorted(d_sorted, s_sorted)
        thresholds.append(t)
        accs.append(np.mean((d_test <= t) == s_test))
    return float(np.mean(accs)), float(np.std(accs)), thresholds


def _cross_validation_folds(distances, issame, folds, num_folds):
    """Yield, per fold: (train distances sorted ascending, their issame, test distances, test issame).

    The pairs are sorted once, so every training subset is already sorted. With a single fold the
    training and test sets are the same pairs.
    """
    d, s = check_pairs(distances, issame)
    folds, ids = _fold_ids(d.size, folds, num_folds, s)
    order = np.argsort(d, kind="stable")
    ds, ss, fs = d[order], s[order], folds[order]
    for k in ids:
        test = folds == k
        train = (fs != k) if ids.size > 1 else (fs == k)
        yield ds[train], ss[train], d[test], s[test]


def val_far(distances, issame, threshold):
    """(VAL, FAR) at ``threshold``, exactly per Section 4.

    VAL = |{same pairs with D <= threshold}| / |P_same| (0 when there is no same pair);
    FAR = |{different pairs with D <= threshold}| / |P_diff| (0 when there is no different pair).
    """
    d, s = check_pairs(distances, issame)
    accept = d <= threshold
    n_same = int(s.sum())
    n_diff = s.size - n_same
    val = float(np.sum(accept & s)) / n_same if n_same else 0.0
    far = float(np.sum(accept & ~s)) / n_diff if n_diff else 0.0
    return val, far


def threshold_at_far(distances, issame, far_target):
    """Threshold whose FAR on these pairs equals ``far_target``, interpolating between steps.

    FAR(d) is a step function of d that jumps to k/M at the k-th smallest different-pair distance
    n_(k) (M different pairs). Like davidsandberg/facenet's ``calculate_val`` (which inverts FAR
    with ``interp1d``), the threshold is read off the piecewise-linear curve through the points
    (n_(k), k/M), starting from (n_(1) - (n_(2) - n_(1)), 0). Because the curve is interpolated
    *between* steps, the FAR actually achieved on these pairs is floor(target * M) / M <= target.
    A target >= 1 gives the largest different-pair distance; with no different pair at all the
    largest distance is returned (everything accepted, FAR is 0 by convention).
    """
    d, s = check_pairs(distances, issame)
    neg = np.sort(d[~s])
    if neg.size == 0:
        return float(d.max())
    return _threshold_at_far_sorted(neg, far_target)


def _threshold_at_far_sorted(neg, far_target):
    """:func:`threshold_at_far` from the different-pair distances sorted ascending (non-empty)."""
    ends = np.flatnonzero(np.r_[neg[1:] != neg[:-1], True])
    u = neg[ends]
    far_at_u = (ends + 1) / neg.size  # FAR(u_j), right-closed
    if far_target >= far_at_u[-1]:
        return float(u[-1])
    gap = (u[1] - u[0]) if u.size > 1 else 1.0
    xs = np.concatenate([[u[0] - gap], u])
    ys = np.concatenate([[0.0], far_at_u])
    t = float(np.interp(far_target, ys, xs))
    # Interpolation lands in [u_(k), u_(k+1)); if it hits a step exactly above the target, step back.
    j = np.searchsorted(u, t, side="right")  # FAR(t) = far_at_u[j - 1]
    if j > 0 and far_at_u[j - 1] > far_target:
        t = float(np.nextafter(u[j - 1], -np.inf))
    return t


def val_at_far(distances, issame, far_target, folds=None, num_folds=10):
    """VAL at a target FAR, cross-validated (Section 5.7 reports VAL at FAR = 1e-3).

    For each fold the threshold is chosen on the other folds with :func:`threshold_at_far`, and
    VAL and FAR are measured on the held-out fold (a single fold: chosen and tested on itself).

    Returns (mean VAL, std VAL over folds, mean FAR over folds).
    """
    vals, fars = [], []
    for d_sorted, s_sorted, d_test, s_test in _cross_validation_folds(distances, issame, folds,
                                                                      num_folds):
        neg = d_sorted[~s_sorted]
        t = _threshold_at_far_sorted(neg, far_target) if neg.size else float(d_sorted.max())
        v, f = val_far(d_test, s_test, t)
        vals.append(v)
        fars.append(f)
    return float(np.mean(vals)), float(np.std(vals)), float(np.mean(fars))


def roc_curve(distances, issame):
    """ROC of the rule ``distance <= threshold``: (far [T], tar [T], thresholds [T]).

    Thresholds are the sorted unique distances preceded by one just below the smallest, so the
    curve runs from (FAR, TAR) = (0, 0) to (1, 1), non-decreasing. TAR is the paper's VAL.
    Raises ValueError when one class is absent.
    """
    d, s = check_pairs(distances, issame)
    n_same = int(s.sum())
    n_diff = s.size - n_same
    if n_same == 0 or n_diff == 0:
        raise ValueError("ROC needs both same and different pairs")
    u = np.unique(d)
    thresholds = np.concatenate([[np.nextafter(u[0], -np.inf)], u])
    order = np.argsort(d, kind="stable")
    ds, ss = d[order], s[order]
    accepted = np.searchsorted(ds, thresholds, side="right")
    cum_pos = np.concatenate([[0], np.cumsum(ss)])
    tp = cum_pos[accepted]
    fp = accepted - tp
    return fp / n_diff, tp / n_same, thresholds


def auc(distances, issame):
    """Area under the ROC curve (trapezoidal; ties count one half, as sklearn's roc_auc_score
    with score = -distance)."""
    far, tar, _ = roc_curve(distances, issame)
    return _auc_from_roc(far, tar)


def eer(distances, issame):
    """Equal error rate: the rate where FAR = 1 - TAR on the ROC, linearly interpolated."""
    far, tar, _ = roc_curve(distances, issame)
    return _eer_from_roc(far, tar)


def _auc_from_roc(far, tar):
    return float(np.sum(np.diff(far) * 0.5 * (tar[1:] + tar[:-1])))


def _eer_from_roc(far, tar):
    frr = 1.0 - tar
    diff = far - frr  # -1 at the start, +1 at the end, non-decreasing
    j = int(np.argmax(diff >= 0))
    if diff[j] == 0 or j == 0:
        return float(far[j])
    # Cross between points j-1 and j: solve far + a*dfar = frr + a*dfrr.
    d0, d1 = diff[j - 1], diff[j]
    a = d0 / (d0 - d1)
    return float(far[j - 1] + a * (far[j] - far[j - 1]))


def far_key(far):
    """JSON key of a FAR target: 1e-3 -> '0.001', 1e-2 -> '0.01'."""
    return format(float(far), "g")


def evaluate_verification(distances, issame, folds=None, num_folds=10, far_targets=(1e-3, 1e-2)):
    """All verification metrics as a JSON-ready dict.

    Keys:
      ``accuracy_mean``, ``accuracy_std``: k-fold accuracy (:func:`kfold_accuracy`);
      ``thresholds``: the threshold chosen for each fold (list of float);
      ``threshold``: one accuracy-maximising threshold chosen on all pairs (to store on export);
      ``val_at_far``: {far_key(target): {"val": mean VAL, "std": std VAL, "far": mean FAR
        achieved on the test folds}}, e.g. ``{"0.001": {"val": .., "std": .., "far": ..}}``;
      ``auc``, ``eer``: over all pairs (None when only one class is present);
      ``num_pairs``, ``num_same``, ``num_diff``, ``num_folds``.
    """
    d, s = check_pairs(distances, issame)
    folds, ids = _fold_ids(d.size, folds, num_folds, s)
    mean, std, thresholds = kfold_accuracy(d, s, folds)
    threshold, _ = best_accuracy_threshold(d, s)
    vaf = {}
    for target in far_targets:
        v, vs, f = val_at_far(d, s, target, folds)
        vaf[far_key(target)] = {"val": v, "std": vs, "far": f}
    auc_value = eer_value = None
    if 0 < int(s.sum()) < s.size:
        far, tar, _ = roc_curve(d, s)
        auc_value, eer_value = _auc_from_roc(far, tar), _eer_from_roc(far, tar)
    return {
        "accuracy_mean": mean,
        "accuracy_std": std,
        "thresholds": [float(t) for t in thresholds],
        "threshold": float(threshold),
        "val_at_far": vaf,
        "auc": auc_value,
        "eer": eer_value,
        "num_pairs": int(d.size),
        "num_same": int(s.sum()),
        "num_diff": int(d.size - s.sum()),
        "num_folds": int(ids.size),
    }
