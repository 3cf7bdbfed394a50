"""Verification metrics (evaluation/verification.py) against hand-computed and brute-force values."""
import itertools

import numpy as np
import pytest

from evaluation import verification as V


def _brute_best(d, s):
    """Best accuracy over every threshold in a dense superset of the candidates (explicit loop)."""
    u = sorted(set(d.tolist()))
    cands = [u[0] - 1.0] + [(a + b) / 2 for a, b in zip(u[:-1], u[1:])] + [u[-1]] + u
    best = -1.0
    for t in cands:
        correct = 0
        for di, si in zip(d, s):
            correct += int((di <= t) == si)
        best = max(best, correct / len(d))
    return best


def test_val_far_hand_computed():
    d = np.array([0.1, 0.5, 0.9, 0.2, 0.6, 1.5, 2.0])
    s = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    # threshold 0.55: TA = {0.1, 0.5} -> 2/3; FA = {0.2} -> 1/4.
    assert V.val_far(d, s, 0.55) == pytest.approx((2 / 3, 1 / 4))
    # D <= d is inclusive.
    assert V.val_far(d, s, 0.6) == pytest.approx((2 / 3, 2 / 4))
    assert V.val_far(d, s, -1.0) == (0.0, 0.0)
    assert V.val_far(d, s, 10.0) == (1.0, 1.0)
    # One class only: the missing rate is 0, never NaN.
    assert V.val_far(d[:3], s[:3], 0.55) == pytest.approx((2 / 3, 0.0))


def test_best_threshold_hand_example():
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    s = np.array([1, 1, 0, 1, 0], bool)
    t, acc = V.best_accuracy_threshold(d, s)
    # Accept <= 0.2 -> 4/5 correct; accept <= 0.4 -> 4/5 correct; first maximum is 0.25.
    assert acc == pytest.approx(0.8)
    assert t == pytest.approx(0.25)


@pytest.mark.parametrize("seed", range(6))
def test_best_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 40
    s = rng.random(n) < 0.5
    d = np.round(rng.normal(1.0 + s * -0.6, 0.4), 1)  # rounded: many ties
    t, acc = V.best_accuracy_threshold(d, s)
    assert acc == pytest.approx(_brute_best(d, s))
    assert V.accuracy_at(d, s, t) == pytest.approx(acc)


def test_kfold_accuracy_brute_force():
    rng = np.random.default_rng(3)
    n = 60
    s = rng.random(n) < 0.5
    d = rng.normal(1.0 - 0.5 * s, 0.4)
    folds = np.arange(n) % 3
    mean, std, thresholds = V.kfold_accuracy(d, s, folds)
    accs = []
    for k in range(3):
        tr, te = folds != k, folds == k
        # the chosen threshold achieves the brute-force optimum on the training folds
        assert V.accuracy_at(d[tr], s[tr], thresholds[k]) == pytest.approx(_brute_best(d[tr], s[tr]))
        accs.append(np.mean((d[te] <= thresholds[k]) == s[te]))
    assert mean == pytest.approx(np.mean(accs))
    assert std == pytest.approx(np.std(accs))


def test_kfold_tiny_by_hand():
    # fold 0: pairs 0..3, fold 1: pairs 4..7
    d = np.array([0.1, 0.3, 0.8, 0.9, 0.2, 0.6, 0.7, 1.0])
    s = np.array([1, 1, 0, 0, 1, 0, 1, 0], bool)
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    mean, std, th = V.kfold_accuracy(d, s, folds)
    # train on fold 1 (0.2 S, 0.6 D, 0.7 S, 1.0 D): best is accept <= 0.4 or <= 0.85 (3/4); first: 0.4
    # -> test fold 0 at 0.4: 4/4. Train on fold 0: perfect split at 0.55 -> fold 1: 0.2 ok, 0.6 ok,
    # 0.7 wrong, 1.0 ok = 3/4.
    assert th == pytest.approx([0.4, 0.55])
    assert mean == pytest.approx(0.875)
    assert std == pytest.approx(0.125)


def test_single_fold_chooses_and_tests_on_itself():
    d = np.array([0.1, 0.2, 0.9, 1.0])
    s = np.array([1, 1, 0, 0], bool)
    mean, std, th = V.kfold_accuracy(d, s, np.zeros(4, int))
    assert mean == 1.0 and std == 0.0 and th == pytest.approx([0.55])


def test_default_folds_are_stratified():
    f = V.make_folds(7, 3)
    assert f.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert V.make_folds(2, 10).tolist() == [0, 1]
    s = np.array([1, 0, 1, 0, 1, 0], bool)
    assert V.make_folds(6, 3, s).tolist() == [0, 0, 1, 1, 2, 2]
    for s in (np.arange(100) % 2 == 0, np.arange(100) < 50):
        f = V.make_folds(100, 10, s)
        for k in range(10):
            assert np.sum(s[f == k]) == 5 and np.sum(~s[f == k]) == 5
    # positives first, negatives after: every default fold still holds both classes
    d = np.concatenate([np.full(50, 0.2), np.full(50, 1.5)])
    s = np.arange(100) < 50
    mean, _, _ = V.kfold_accuracy(d, s)
    assert mean == 1.0


def test_threshold_at_far_exact_and_interpolated():
    d = np.array([0.1, 0.2, 1.0, 2.0, 3.0, 4.0])
    s = np.array([1, 1, 0, 0, 0, 0], bool)
    # negatives 1,2,3,4: FAR steps 0.25 at 1, 0.5 at 2 ...; target 0.5 -> exactly 2
    assert V.threshold_at_far(d, s, 0.5) == pytest.approx(2.0)
    # target 0.375: halfway between the points (2, .5)... (1, .25) and (2, .5) -> 1.5
    t = V.threshold_at_far(d, s, 0.375)
    assert t == pytest.approx(1.5)
    assert V.val_far(d, s, t)[1] == 0.25  # achieved FAR never exceeds the target
    # below the first step: FAR 0, threshold below the smallest negative
    t0 = V.threshold_at_far(d, s, 0.1)
    assert t0 < 1.0 and V.val_far(d, s, t0) == (1.0, 0.0)
    assert V.threshold_at_far(d, s, 1.0) == 4.0


@pytest.mark.parametrize("seed", range(4))
def test_threshold_at_far_never_exceeds_target(seed):
    rng = np.random.default_rng(seed)
    s = rng.random(300) < 0.5
    d = np.round(rng.normal(1.2 - 0.6 * s, 0.3), 2)
    for target in (1e-3, 1e-2, 0.05, 0.1, 0.5):
        t = V.threshold_at_far(d, s, target)
        far = V.val_far(d, s, t)[1]
        assert far <= target + 1e-12
        # and it is the largest achievable FAR not above the target
        negs = np.sort(d[~s])
        achievable = [np.mean(negs <= x) for x in negs]
        assert far == pytest.approx(max([0.0] + [a for a in achievable if a <= target]))


def test_val_at_far_folds():
    rng = np.random.default_rng(0)
    n = 2000
    s = np.arange(n) % 2 == 0
    d = rng.normal(1.0 - 0.6 * s, 0.25)
    val, val_std, far = V.val_at_far(d, s, 1e-2, num_folds=10)
    folds = V.make_folds(n, 10, s)
    vals = []
    for k in range(10):
        tr, te = folds != k, folds == k
        t = V.threshold_at_far(d[tr], s[tr], 1e-2)
        vals.append(V.val_far(d[te], s[te], t)[0])
    assert val == pytest.approx(np.mean(vals)) and val_std == pytest.approx(np.std(vals))
    assert 0 < far < 0.05 and 0.5 < val < 1.0


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_sklearn(seed):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    s = rng.random(200) < 0.4
    d = np.round(rng.normal(1.0 - 0.5 * s, 0.5), 1)  # ties
    assert V.auc(d, s) == pytest.approx(roc_auc_score(s, -d))


def test_roc_endpoints_and_monotone():
    rng = np.random.default_rng(1)
    s = rng.random(100) < 0.5
    d = rng.random(100)
    far, tar, th = V.roc_curve(d, s)
    assert (far[0], tar[0]) == (0, 0) and (far[-1], tar[-1]) == (1, 1)
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0) and np.all(np.diff(th) > 0)


def test_eer_sanity():
    # perfect separation -> 0
    d = np.array([0.1, 0.2, 0.3, 1.0, 1.1, 1.2])
    s = np.array([1, 1, 1, 0, 0, 0], bool)
    assert V.eer(d, s) == 0.0
    assert V.auc(d, s) == 1.0
    # fully inverted -> 1
    assert V.eer(d, ~s) == 1.0
    # symmetric overlap of 1 of 4 on each side: FAR = FRR = 0.25 at the crossing
    d = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9])
    s = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    assert V.eer(d, s) == pytest.approx(0.25)
    # random scores: EER near 0.5
    rng = np.random.default_rng(0)
    s = rng.random(4000) < 0.5
    assert abs(V.eer(rng.random(4000), s) - 0.5) < 0.05


def test_eer_brute_force_crossing():
    rng = np.random.default_rng(5)
    s = rng.random(500) < 0.5
    d = rng.normal(1.0 - 0.5 * s, 0.4)
    e = V.eer(d, s)
    # brute force: min over thresholds of max(FAR, FRR) brackets the EER
    lo = min(max(V.val_far(d, s, t)[1], 1 - V.val_far(d, s, t)[0]) for t in np.unique(d))
    assert e <= lo + 1e-12 and e >= lo - 2.0 / 250


def test_evaluate_verification_keys_and_degenerate():
    rng = np.random.default_rng(0)
    s = np.arange(600) % 2 == 0
    d = rng.normal(1.0 - 0.8 * s, 0.2)
    r = V.evaluate_verification(d, s)
    for k in ("accuracy_mean", "accuracy_std", "thresholds", "threshold", "val_at_far", "auc",
              "eer", "num_pairs"):
        assert k in r
    assert set(r["val_at_far"]) == {"0.001", "0.01"}
    assert len(r["thresholds"]) == 10 and r["num_pairs"] == 600
    assert r["accuracy_mean"] > 0.95
    one = V.evaluate_verification(d[s], s[s])
    assert one["auc"] is None and one["eer"] is None and one["accuracy_mean"] > 0.99
    import json

    json.dumps(r)


@pytest.mark.parametrize("bad", [
    (np.array([]), np.array([], bool)),
    (np.array([0.1, np.nan]), np.array([1, 0], bool)),
    (np.array([0.1, 0.2]), np.array([1], bool)),
    (np.zeros((2, 2)), np.zeros((2, 2), bool)),
])
def test_bad_input_raises(bad):
    with pytest.raises(ValueError):
        V.kfold_accuracy(*bad)


def test_no_tensorflow_import():
    import subprocess
    import sys

    code = "import sys, evaluation.verification; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- hold-out pairs (make_pairs)
from evaluation.holdout_pairs import count_pairs, make_pairs  # noqa: E402


def _labels():
    # 6 identities with 1..6 images, interleaved order; identity 0 has a single image
    counts = [1, 2, 3, 4, 5, 6]
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    return np.random.default_rng(0).permutation(labels)


def test_count_pairs_brute_force():
    labels = _labels()
    same = sum(labels[i] == labels[j] for i, j in itertools.combinations(range(labels.size), 2))
    assert count_pairs(labels) == (same, labels.size * (labels.size - 1) // 2 - same)


def test_make_pairs_all_is_every_pair():
    labels = _labels()
    a, b, s, f = make_pairs(labels, mode="all", num_folds=4)
    assert set(zip(a.tolist(), b.tolist())) == set(itertools.combinations(range(labels.size), 2))
    assert a.size == labels.size * (labels.size - 1) // 2
    assert np.array_equal(s, labels[a] == labels[b])
    assert set(f.tolist()) == {0, 1, 2, 3}


def test_make_pairs_balanced_no_duplicates_and_correct_labels():
    labels = np.repeat(np.arange(30), 8)
    a, b, s, f = make_pairs(labels, num_pairs=600, num_folds=10, seed=1)
    assert a.size == 600 and s.sum() == 300
    assert np.all(a < b)
    assert len(set(zip(a.tolist(), b.tolist()))) == 600
    assert np.array_equal(s, labels[a] == labels[b])
    # disjoint, balanced folds: each pair in one fold; 30 same + 30 different per fold
    for k in range(10):
        assert np.sum(s[f == k]) == 30 and np.sum(~s[f == k]) == 30


def test_make_pairs_too_few_positives_warns(caplog):
    labels = _labels()  # 0+1+3+6+10+15 = 35 same pairs
    with caplog.at_level("WARNING"):
        a, b, s, f = make_pairs(labels, num_pairs=200, seed=0)
    assert s.sum() == 35 and (~s).sum() == 35  # still balanced
    assert "only 35 same pairs" in caplog.text
    # identity 0 (single image) appears only in different pairs
    single = np.flatnonzero(labels == 0)[0]
    involved = (a == single) | (b == single)
    assert involved.any() and not np.any(s[involved])


def test_make_pairs_deterministic_and_seeded():
    labels = np.repeat(np.arange(50), 5)
    r1 = make_pairs(labels, num_pairs=400, seed=7)
    r2 = make_pairs(labels, num_pairs=400, seed=7)
    r3 = make_pairs(labels, num_pairs=400, seed=8)
    for x, y in zip(r1, r2):
        assert np.array_equal(x, y)
    assert not all(np.array_equal(x, y) for x, y in zip(r1, r3))


def test_make_pairs_large_rejection_sampler():
    # 3000 images -> 4.5M candidate pairs: exercises the non-enumerating paths
    labels = np.repeat(np.arange(600), 5)
    a, b, s, f = make_pairs(labels, num_pairs=2000, seed=0)
    assert len(set(zip(a.tolist(), b.tolist()))) == 2000
    assert np.array_equal(s, labels[a] == labels[b]) and s.sum() == 1000 and np.all(a < b)


def test_same_pair_decoder_is_exhaustive():
    # asking for more same pairs than exist must return exactly the brute-force set
    from evaluation.holdout_pairs import _sample_same

    labels = _labels()
    a, b = _sample_same(labels, 10_000, np.random.default_rng(0))
    brute = {(i, j) for i, j in itertools.combinations(range(labels.size), 2) if labels[i] == labels[j]}
    assert set(zip(a.tolist(), b.tolist())) == brute and a.size == len(brute)


@pytest.mark.parametrize("labels,err", [
    ([], "at least 2"),
    ([3], "at least 2"),
    ([1, 1, 1], "one identity"),
    ([0, 1, 2], "no identity has two"),
])
def test_make_pairs_bad_input(labels, err):
    with pytest.raises(ValueError, match=err):
        make_pairs(np.array(labels, dtype=int))


def test_make_pairs_all_refuses_huge(monkeypatch):
    import evaluation.holdout_pairs as hp

    monkeypatch.setattr(hp, "MAX_ALL_PAIRS", 10)
    with pytest.raises(ValueError, match="balanced"):
        hp.make_pairs(np.repeat(np.arange(3), 3), mode="all")


# ---------------------------------------------------------------------------------- plots
def test_plots_write_decodable_pngs(tmp_path):
    from PIL import Image

    from evaluation.plots import plot_distance_histogram, plot_roc

    rng = np.random.default_rng(0)
    s = np.arange(400) % 2 == 0
    d = rng.normal(1.0 - 0.6 * s, 0.3)
    far, tar, _ = V.roc_curve(d, s)
    assert far[0] == 0  # FAR = 0 must not break the log axis
    paths = [plot_roc(far, tar, str(tmp_path / "a" / "roc.png")),
             plot_distance_histogram(d, s, 0.7, str(tmp_path / "hist.png")),
             plot_distance_histogram(d[s], s[s], None, str(tmp_path / "one_class.png"))]
    for p in paths:
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 100
            # not a blank canvas
            assert np.asarray(im.convert("L")).std() > 5
