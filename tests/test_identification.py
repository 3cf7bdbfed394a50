"""Identification protocol (evaluation/identification.py) on synthetic Gaussian clusters."""
import numpy as np
import pytest
from tests.helpers import gaussian_clusters

from evaluation.identification import (evaluate_identification, rank_of_true_identity,
                                       split_gallery_probes)


def _clusters(num_ids=30, per_id=6, dim=16, spread=0.01, seed=0):
    return gaussian_clusters(num_ids, per_id, dim, spread, seed)


def test_split_is_a_partition():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 4, 4, 4, 4])
    s = split_gallery_probes(labels, impostor_fraction=0.2, seed=0)
    allidx = np.concatenate([s["gallery"], s["probes"], s["impostors"]])
    assert sorted(allidx.tolist()) == list(range(labels.size))
    # one gallery image per enrolled identity, first in dataset order
    gl = labels[s["gallery"]]
    assert np.unique(gl).size == gl.size
    for g in s["gallery"]:
        assert g == np.flatnonzero(labels == labels[g])[0]
    # impostor identities are absent from the gallery and probes
    imp_ids = set(labels[s["impostors"]].tolist())
    assert len(imp_ids) == 1 and not imp_ids & set(gl.tolist())
    assert not imp_ids & set(labels[s["probes"]].tolist())
    # identity 2 (single image), if enrolled, is gallery-only
    assert s["num_gallery_only_identities"] == (0 if 2 in imp_ids else 1)


def test_split_bad_input():
    with pytest.raises(ValueError, match="2 identities"):
        split_gallery_probes(np.zeros(5, int))
    with pytest.raises(ValueError, match="gallery"):
        split_gallery_probes(np.array([0, 1]), gallery="best")


def test_rank_matches_brute_force():
    rng = np.random.default_rng(1)
    gal = rng.normal(size=(12, 8))
    gal_labels = np.arange(12) * 3
    probes = rng.normal(size=(40, 8))
    probe_labels = gal_labels[rng.integers(0, 12, 40)]
    ranks, nearest, nearest_label = rank_of_true_identity(probes, probe_labels, gal, gal_labels,
                                                          chunk=7)
    for i in range(40):
        d = [float(np.sum((probes[i] - g) ** 2)) for g in gal]
        own = d[list(gal_labels).index(probe_labels[i])]
        assert ranks[i] == 1 + sum(x < own for x in d)
        assert nearest[i] == pytest.approx(min(d))
        assert nearest_label[i] == gal_labels[int(np.argmin(d))]


def test_perfect_separation():
    emb, labels = _clusters(spread=0.01)
    r = evaluate_identification(emb, labels, impostor_fraction=0.2, seed=0)
    assert r["rank_1"] == 1.0 and r["rank_5"] == 1.0
    assert r["num_impostor_identities"] == 6 and r["num_impostor_probes"] == 36
    assert r["num_gallery"] == 24 and r["num_probes"] == 24 * 5
    d = r["dir_at_far"]["0.01"]
    # 36 impostors: the only reachable FAR <= 1e-2 is 0; tight clusters are still all detected
    assert d["far"] == 0.0 and d["dir"] == 1.0


def test_random_embeddings_are_near_chance():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(50), 4)
    emb = rng.normal(size=(200, 32))
    r = evaluate_identification(emb, labels, impostor_fraction=0.2, seed=0)
    # 40 enrolled identities: chance rank-1 is 1/40, rank-5 is 1/8
    assert r["rank_1"] < 0.15 and r["rank_5"] < 0.35 and r["rank_1"] <= r["rank_5"]
    assert r["dir_at_far"]["0.01"]["dir"] < 0.15


def test_dir_brute_force():
    emb, labels = _clusters(num_ids=40, per_id=5, spread=0.6, seed=2)
    r = evaluate_identification(emb, labels, far_targets=(0.1,), impostor_fraction=0.5, seed=3)
    s = split_gallery_probes(labels, 0.5, seed=3)
    g, p, imp = s["gallery"], s["probes"], s["impostors"]
    t = r["dir_at_far"]["0.1"]["threshold"]
    imp_near = [min(np.sum((emb[i] - emb[j]) ** 2) for j in g) for i in imp]
    assert r["dir_at_far"]["0.1"]["far"] == pytest.approx(np.mean(np.array(imp_near) <= t))
    assert r["dir_at_far"]["0.1"]["far"] <= 0.1
    hits = 0
    for i in p:
        d = [np.sum((emb[i] - emb[j]) ** 2) for j in g]
        k = int(np.argmin(d))
        hits += labels[g[k]] == labels[i] and d[k] <= t
    assert r["dir_at_far"]["0.1"]["dir"] == pytest.approx(hits / len(p))


def test_bad_input():
    emb, labels = _clusters()
    with pytest.raises(ValueError):
        evaluate_identification(emb[:-1], labels)
    bad = emb.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_identification(bad, labels)
    with pytest.raises(ValueError, match="single image"):
        evaluate_identification(emb[:3], np.array([0, 1, 2]))
