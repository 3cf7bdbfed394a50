"""Verification plots as PNG files (matplotlib, Agg backend: no display needed).

* :func:`plot_roc`: VAL (true accept rate) against FAR on a log FAR axis, the view of the paper's
  VAL@FAR=1e-3 operating point (Section 5.1), with that point marked.
* :func:`plot_roc_curves`: several ROC curves on one such plot, e.g. FaceNet's appendix Figure 9
  (new vs new, old vs old, new vs old model), each with its VAL@FAR=1e-3 point marked.
* :func:`plot_distance_histogram`: histograms of squared L2 distances of same and different pairs,
  with the chosen threshold drawn as a vertical line.
"""
import os

import numpy as np

__all__ = ["plot_roc", "plot_roc_curves", "plot_distance_histogram"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _far_floor(*fars):
    """Where FAR = 0 is drawn on the log axis: half the smallest non-zero FAR of all curves."""
    positive = [f[f > 0] for f in fars]
    positive = np.concatenate(positive) if positive else np.zeros(0)
    return positive.min() / 2 if positive.size else 1e-6


def _draw_roc(ax, curves, floor, title, mark_far):
    """Draw ``curves`` [(label, far, tar)] on ``ax`` with the log-FAR axis set-up."""
    for i, (label, far, tar) in enumerate(curves):
        colour = f"C{i}"
        ax.plot(np.maximum(far, floor), tar, lw=1.8, color=colour, label=label)
        if mark_far is not None and far.size and far.max() >= mark_far:
            val = float(np.interp(mark_far, far, tar))
            ax.plot([mark_far], [val], "o", color="C3" if len(curves) == 1 else colour)
            if len(curves) == 1:
                ax.annotate(f"VAL {val:.3f} @ FAR {mark_far:g}", (mark_far, val),
                            textcoords="offset points", xytext=(8, -14))
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.005)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("VAL (true accept rate)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if any(label for label, _, _ in curves):
        ax.legend(loc="lower right")


def plot_roc(far, tar, path, title="ROC", mark_far=1e-3, label=None):
    """ROC curve on a log-FAR axis, saved as PNG at ``path``.

    Args:
      far, tar: float [T] from :func:`evaluation.verification.roc_curve`.
      mark_far: FAR at which to mark the interpolated VAL (None: no marker).
    FAR = 0 cannot be drawn on a log axis; those points are drawn at half the smallest non-zero FAR.
    """
    far = np.asarray(far, dtype=np.float64)
    tar = np.asarray(tar, dtype=np.float64)
    return _plot_curves([(label, far, tar)], path, title, mark_far)


def plot_roc_curves(curves, path, title="ROC", mark_far=1e-3):
    """Several ROC curves on one log-FAR plot (as :func:`plot_roc`), saved as PNG at ``path``.

    Args:
      curves: ``[(label, far, tar)]``, far and tar float [T] from
        :func:`evaluation.verification.roc_curve`; the legend shows the labels (with VAL at
        ``mark_far`` when the curve reaches it), and each curve's VAL at ``mark_far`` is marked.
    """
    shown = []
    for label, far, tar in curves:
        far = np.asarray(far, dtype=np.float64)
        tar = np.asarray(tar, dtype=np.float64)
        if mark_far is not None and far.size and far.max() >= mark_far:
            label = f"{label} (VAL {float(np.interp(mark_far, far, tar)):.3f} @ FAR {mark_far:g})"
        shown.append((label, far, tar))
    if not shown:
        raise ValueError("plot_roc_curves: no curve to draw")
    return _plot_curves(shown, path, title, mark_far)


def _plot_curves(curves, path, title, mark_far):
    plt = _pyplot()
    floor = _far_floor(*(far for _, far, _ in curves))
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    try:
        _draw_roc(ax, curves, floor, title, mark_far)
        _save(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_distance_histogram(distances, issame, threshold, path, title="Pair distances", bins=60):
    """Overlaid histograms of same / different pair distances (squared L2) with the threshold."""
    plt = _pyplot()
    d = np.asarray(distances, dtype=np.float64)
    s = np.asarray(issame, dtype=bool)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    try:
        lo, hi = (float(d.min()), float(d.max())) if d.size else (0.0, 4.0)
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, bins + 1)
        if s.any():
            ax.hist(d[s], bins=edges, alpha=0.6, density=True, label=f"same ({int(s.sum())})")
        if (~s).any():
            ax.hist(d[~s], bins=edges, alpha=0.6, density=True,
                    label=f"different ({int((~s).sum())})")
        if threshold is not None:
            ax.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold {threshold:.4g}")
        ax.set_xlabel("squared L2 distance")
        ax.set_ylabel("density")
        ax.set_title(title)
        ax.legend(loc="upper right")
        _save(fig, path)
    finally:
        plt.close(fig)
    return path
