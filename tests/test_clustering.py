"""Clustering protocol (evaluation/clustering.py) on synthetic Gaussian clusters."""
import itertools

import numpy as np
import pytest
from tests.helpers import gaussian_clusters

from evaluation.clustering import cluster_embeddings, evaluate_clustering, pairwise_prf


def _clusters(num_ids=12, per_id=8, dim=16, spread=0.02, seed=0):
    return gaussian_clusters(num_ids, per_id, dim, spread, seed)


def _brute_prf(t, p):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(t)), 2):
        same_t, same_p = t[i] == t[j], p[i] == p[j]
        tp += same_t and same_p
        fp += same_p and not same_t
        fn += same_t and not same_p
    prec = tp / (tp + fp) if tp + fp else 1.0
    rec = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return prec, rec, f1


@pytest.mark.parametrize("seed", range(5))
def test_pairwise_prf_brute_force(seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 5, 40)
    p = rng.integers(0, 7, 40) * 10 - 3  # arbitrary cluster ids
    assert pairwise_prf(t, p) == pytest.approx(_brute_prf(t, p))


def test_pairwise_prf_edge_cases():
    t = np.array([0, 0, 1, 1])
    assert pairwise_prf(t, t) == (1.0, 1.0, 1.0)
    assert pairwise_prf(t, np.arange(4)) == (1.0, 0.0, 0.0)  # all singletons
    assert pairwise_prf(t, np.zeros(4)) == pytest.approx((1 / 3, 1.0, 0.5))  # one big cluster
    with pytest.raises(ValueError):
        pairwise_prf(t, t[:3])


def test_agglomerative_perfect_separation():
    emb, labels = _clusters()
    r = evaluate_clustering(emb, labels, distance_threshold=0.5)
    assert r["pairwise_f1"] == 1.0 and r["nmi"] == pytest.approx(1.0)
    assert r["num_clusters"] == r["num_identities"] == 12
    assert r["method"] == "agglomerative" and r["linkage"] == "average"


def test_complete_linkage_threshold_units_are_squared_l2():
    # points on a line at 0, 1, 2: squared distances 1, 1, 4
    emb = np.array([[0.0], [1.0], [2.0]])
    # complete linkage: {0,1} at 1, then max squared distance to 2 is 4
    assert np.unique(cluster_embeddings(emb, 1.5, linkage="complete")).size == 2
    assert np.unique(cluster_embeddings(emb, 4.5, linkage="complete")).size == 1
    # average linkage: mean of {4, 1} = 2.5
    assert np.unique(cluster_embeddings(emb, 2.4, linkage="average")).size == 2
    assert np.unique(cluster_embeddings(emb, 2.6, linkage="average")).size == 1


def test_kmeans_perfect_and_random():
    emb, labels = _clusters()
    r = evaluate_clustering(emb, labels, num_clusters=12)
    assert r["method"] == "kmeans" and r["pairwise_f1"] == 1.0 and r["num_clusters"] == 12
    rng = np.random.default_rng(0)
    rand = rng.normal(size=emb.shape)
    r = evaluate_clustering(rand, labels, num_clusters=12)
    assert r["pairwise_f1"] < 0.3 and r["nmi"] < 0.5
    r = evaluate_clustering(rand / np.linalg.norm(rand, axis=1, keepdims=True), labels,
                            distance_threshold=1.0)
    assert r["pairwise_f1"] < 0.3


def test_subsampling_is_reported():
    emb, labels = _clusters()
    r = evaluate_clustering(emb, labels, distance_threshold=0.5, max_images=50)
    assert r["num_images"] == 96 and r["num_images_clustered"] == 50
    assert r["pairwise_f1"] == 1.0


def test_bad_input():
    emb, labels = _clusters()
    with pytest.raises(ValueError, match="distance_threshold"):
        evaluate_clustering(emb, labels)
    with pytest.raises(ValueError):
        evaluate_clustering(emb, labels[:-1], distance_threshold=1.0)
    bad = emb.copy()
    bad[3, 3] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        evaluate_clustering(bad, labels, distance_threshold=1.0)
    with pytest.raises(ValueError, match="num_clusters"):
        evaluate_clustering(emb, labels, num_clusters=0)
