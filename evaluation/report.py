"""Scoring pair protocols with failed images accounted for, and the one-screen text summary.

A pair is *failed* when either of its images is missing, unreadable or got a non-finite embedding
(its embedding row is NaN, see :mod:`evaluation.embedder`). Failed pairs are never dropped
silently: ``num_failed_pairs`` is always reported, and

* default: they are excluded from the metrics (which then cover ``num_evaluated_pairs``);
* ``strict=True``: they are scored as wrong. A failed same pair gets a distance far above every
  real one (always rejected) and a failed different pair one far below (always accepted), so it is
  an error at any sensible threshold and counts in accuracy, VAL/FAR, AUC and EER alike. The
  exported ``threshold`` and the plots use the real distances only.
"""
import collections

import numpy as np

from evaluation.verification import (best_accuracy_threshold, check_pairs, evaluate_verification)

__all__ = ["pair_distances", "score_pairs", "summarize_failures", "format_summary",
           "CROSS_MODEL_MODES"]

#: The modes of a ``cross_model`` result (evaluation/cross_model.py), in report order.
CROSS_MODEL_MODES = (("new_new", "new-new"), ("old_old", "old-old"), ("new_old", "new-old"))


def pair_distances(emb_a, emb_b):
    """Squared L2 distance per pair, float64 [P]; NaN where either embedding is NaN."""
    a = np.asarray(emb_a, dtype=np.float64)
    b = np.asarray(emb_b, dtype=np.float64)
    return np.sum((a - b) ** 2, axis=1)


def score_pairs(distances, issame, folds=None, num_folds=10, strict=False,
                far_targets=(1e-3, 1e-2)):
    """Verification metrics over pairs, some of which may have failed (NaN distance).

    Args:
      distances: float [P], squared L2; NaN marks a failed pair.
      issame: bool [P]. folds: int [P] or None (see :func:`evaluate_verification`).
      strict: score failed pairs as wrong instead of excluding them.

    Returns:
      the dict of :func:`evaluation.verification.evaluate_verification` plus ``num_pairs`` (all
      pairs of the protocol), ``num_failed_pairs``, ``num_evaluated_pairs``, ``strict``; and the
      arrays used for plots under the private key ``_valid`` = (distances, issame) of the real
      (non-failed) pairs, which callers must pop before writing JSON.

    Raises:
      ValueError: when no pair can be scored.
    """
    d = np.asarray(distances, dtype=np.float64)
    s = np.asarray(issame, dtype=bool)
    if d.shape != s.shape or d.ndim != 1:
        raise ValueError(f"distances and issame must be 1-D of one length: {d.shape}, {s.shape}")
    failed = ~np.isfinite(d)
    valid = ~failed
    n_failed = int(failed.sum())
    if folds is not None:
        folds = np.asarray(folds)
    if strict and n_failed:
        big = 1e3 * (float(np.max(np.abs(d[valid]))) + 1.0) if valid.any() else 1e3
        used = d.copy()
        used[failed & s] = big
        used[failed & ~s] = -big
        result = evaluate_verification(used, s, folds, num_folds, far_targets)
        evaluated = d.size
    else:
        if not valid.any():
            raise ValueError(f"none of the {d.size} pairs could be evaluated (every pair has a "
                             "missing or unreadable image)")
        result = evaluate_verification(d[valid], s[valid], None if folds is None else folds[valid],
                                       num_folds, far_targets)
        evaluated = int(valid.sum())
    if valid.any():
        result["threshold"] = best_accuracy_threshold(*check_pairs(d[valid], s[valid]))[0]
    else:
        result["threshold"] = None
    result.update({
        "num_pairs": int(d.size),
        "num_failed_pairs": n_failed,
        "num_evaluated_pairs": int(evaluated),
        "strict": bool(strict),
        "_valid": (d[valid], s[valid]),
    })
    return result


def summarize_failures(failed, max_examples=20):
    """{"count", "by_reason": {reason: n}, "examples": [[path, reason], ...]} for JSON."""
    by_reason = collections.Counter(reason for _, reason in failed)
    return {"count": len(failed), "by_reason": dict(sorted(by_reason.items())),
            "examples": [[p, r] for p, r in failed[:max_examples]]}


def _fmt(x, spec=".4f"):
    return "n/a" if x is None else format(x, spec)


def _verification_lines(name, r):
    lines = [f"{name}: {r['num_pairs']} pairs ({r.get('num_same', '?')} same / "
             f"{r.get('num_diff', '?')} different), {r['num_folds']} fold(s), "
             f"{r['num_failed_pairs']} failed ({'scored as wrong' if r['strict'] else 'excluded'})"]
    lines.append(f"  accuracy   {r['accuracy_mean']:.4f} +- {r['accuracy_std']:.4f}   "
                 f"AUC {_fmt(r['auc'])}   EER {_fmt(r['eer'])}")
    for far, v in r["val_at_far"].items():
        lines.append(f"  VAL        {v['val']:.4f} +- {v['std']:.4f} @ FAR {far} "
                     f"(achieved {v['far']:.2g})")
    lines.append(f"  threshold  {_fmt(r['threshold'])} (squared L2, chosen on all pairs)")
    return lines


def _cross_model_lines(name, cross):
    """One line per mode of a ``cross_model`` dict (new_new, old_old, new_old)."""
    lines = []
    for key, label in CROSS_MODEL_MODES:
        r = cross.get(key)
        if not r:
            continue
        far, v = next(iter(r["val_at_far"].items()), (None, None))
        val = f"VAL {v['val']:.4f} @ FAR {far}   " if v else ""
        failed = (f"   {r['num_failed_pairs']} failed pairs "
                  f"({'scored as wrong' if r['strict'] else 'excluded'})"
                  if r["num_failed_pairs"] else "")
        lines.append(f"cross-model {name} {label}: accuracy {r['accuracy_mean']:.4f} +- "
                     f"{r['accuracy_std']:.4f}   {val}AUC {_fmt(r['auc'])}   "
                     f"threshold {_fmt(r['threshold'])}{failed}")
    return lines


def format_summary(results):
    """One-screen text summary of an evaluate.py results dict."""
    m = results.get("model", {})
    size = m.get("image_size")
    size = f"{size[0]}x{size[1]}" if size else "?"
    lines = [f"model: {m.get('model', '?')} ({size}, D={m.get('embedding_size', '?')}) "
             f"from {m.get('export_dir') or m.get('checkpoint') or '?'}; "
             f"flip={'on' if results.get('flip') else 'off'}"]
    old = results.get("compare_model")
    if old:
        size = old.get("image_size")
        size = f"{size[0]}x{size[1]}" if size else "?"
        lines.append(f"compared with (old): {old.get('model', '?')} ({size}, "
                     f"D={old.get('embedding_size', '?')}) from {old.get('export_dir', '?')}")
    if "accuracy_mean" in results:
        lines += _verification_lines(results.get("protocol", "verification"), results)
    if "cross_model" in results:
        lines += _cross_model_lines(results.get("protocol", "verification"),
                                    results["cross_model"])
    if "holdout" in results:
        lines += _verification_lines("holdout", results["holdout"])
        if "cross_model" in results["holdout"]:
            lines += _cross_model_lines("holdout", results["holdout"]["cross_model"])
    ident = results.get("identification")
    if ident:
        if "error" in ident:
            lines.append(f"identification: skipped ({ident['error']})")
        else:
            dirs = "  ".join(f"DIR {v['dir']:.4f} @ FAR {k} ({ident['num_impostor_probes']} "
                             f"impostor probes)" for k, v in ident["dir_at_far"].items())
            ranks = "  ".join(f"rank-{k.split('_')[1]} {v:.4f}" for k, v in ident.items()
                              if k.startswith("rank_"))
            lines.append(f"identification: {ident['num_gallery']} gallery, {ident['num_probes']} "
                         f"probes: {ranks}  {dirs}")
    clus = results.get("clustering")
    if clus:
        if "error" in clus:
            lines.append(f"clustering: skipped ({clus['error']})")
        else:
            how = (f"k-means k={clus['num_clusters']}" if clus["method"] == "kmeans" else
                   f"agglomerative {clus['linkage']} @ {clus['distance_threshold']:.4f}")
            lines.append(f"clustering ({how}): {clus['num_clusters']} clusters for "
                         f"{clus['num_identities']} identities; pairwise P {clus['pairwise_precision']:.4f} "
                         f"R {clus['pairwise_recall']:.4f} F1 {clus['pairwise_f1']:.4f}; "
                         f"NMI {clus['nmi']:.4f}")
    fails = results.get("failed_images")
    if fails and fails["count"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in fails["by_reason"].items())
        lines.append(f"failed images: {fails['count']} ({reasons})")
    return "\n".join(lines)
