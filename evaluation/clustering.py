"""Clustering of embeddings and its scores (FaceNet Section 5.7, "Face Clustering").

The paper clusters a personal photo collection "using agglomerative clustering" on the embedding
(Fig. 7) and gives no other detail. Here:

* **Agglomerative** (default): scikit-learn ``AgglomerativeClustering`` on the precomputed matrix of
  *squared* L2 distances (the paper's D, Section 4), ``linkage="average"`` by default, cut at
  ``distance_threshold`` in the same squared-L2 units as the verification threshold: two clusters
  are merged while the mean squared distance between their members is <= threshold.
  ``linkage="complete"`` instead merges only while *every* cross pair is <= threshold, i.e. every
  pair inside a cluster would be verified "same". ("ward" is not offered: it needs raw features.)
  The full N x N matrix is built, so sets above ``max_images`` are subsampled with the seed and the
  number actually clustered is reported.
* **k-means** when ``num_clusters`` is given (``KMeans(n_init=10)``, seeded) on the embeddings.

Scores, against the identity labels:

* pairwise precision / recall / F1 over all pairs of images (i < j): a pair is predicted "same" when
  both images share a cluster. Precision = same-identity pairs among same-cluster pairs (1.0 when
  no pair is in a common cluster, i.e. all singletons); recall = same-cluster pairs among
  same-identity pairs (1.0 when no two images share an identity).
* NMI (``sklearn.metrics.normalized_mutual_info_score``) and adjusted Rand index.
* number of clusters found vs number of identities.
"""
import numpy as np

__all__ = ["pairwise_prf", "cluster_embeddings", "evaluate_clustering"]


def _pairs(n):
    return n * (n - 1) // 2


def pairwise_prf(labels_true, labels_pred):
    """Pairwise (precision, recall, F1) over all image pairs, from the contingency table, O(N)."""
    t = np.asarray(labels_true)
    p = np.asarray(labels_pred)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"labels must be two 1-D arrays of one length, got {t.shape} and {p.shape}")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    joint = np.unique(ti.astype(np.int64) * (pi.max() + 1) + pi, return_counts=True)[1]
    tp = int(np.sum(_pairs(joint)))
    pred_pos = int(np.sum(_pairs(np.bincount(pi))))
    true_pos = int(np.sum(_pairs(np.bincount(ti))))
    precision = tp / pred_pos if pred_pos else 1.0
    recall = tp / true_pos if true_pos else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)


def cluster_embeddings(embeddings, distance_threshold=None, num_clusters=None, linkage="average",
                       seed=0):
    """Cluster ids, int [N]: k-means when ``num_clusters`` is set, else agglomerative with a cut at
    ``distance_threshold`` (squared L2; see the module docstring)."""
    from sklearn.cluster import AgglomerativeClustering, KMeans

    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] array, got {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or infinite values")
    n = emb.shape[0]
    if num_clusters is not None:
        if not 1 <= num_clusters <= n:
            raise ValueError(f"num_clusters must be in 1..{n}, got {num_clusters}")
        km = KMeans(n_clusters=int(num_clusters), n_init=10, random_state=seed)
        return km.fit_predict(emb).astype(np.int64)
    if distance_threshold is None:
        raise ValueError("give distance_threshold (agglomerative) or num_clusters (k-means)")
    if linkage not in ("average", "complete", "single"):
        raise ValueError(f"linkage must be average, complete or single, got {linkage!r}")
    if n == 1:
        return np.zeros(1, dtype=np.int64)
    sq = np.sum(emb * emb, 1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T, 0.0)
    np.fill_diagonal(dist, 0.0)
    agg = AgglomerativeClustering(n_clusters=None, distance_threshold=float(distance_threshold),
                                  metric="precomputed", linkage=linkage)
    return agg.fit_predict(dist).astype(np.int64)


def evaluate_clustering(embeddings, labels, distance_threshold=None, num_clusters=None,
                        linkage="average", max_images=10000, seed=0):
    """Cluster and score against ``labels``.

    Returns dict: ``method`` ("agglomerative" or "kmeans"), ``linkage``, ``distance_threshold``
    (squared L2, None for k-means), ``num_clusters``, ``num_identities``, ``pairwise_precision``,
    ``pairwise_recall``, ``pairwise_f1``, ``nmi``, ``ari``, ``num_images``, ``num_images_clustered``.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    emb = np.asarray(embeddings)
    labels = np.asarray(labels)
    if emb.ndim != 2 or emb.shape[0] != labels.shape[0]:
        raise ValueError(f"embeddings [N, D] and labels [N] disagree: {emb.shape} vs {labels.shape}")
    n = emb.shape[0]
    idx = np.arange(n)
    if n > max_images:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_images, replace=False))
    emb, labels = emb[idx], labels[idx]
    pred = cluster_embeddings(emb, distance_threshold, num_clusters, linkage, seed)
    precision, recall, f1 = pairwise_prf(labels, pred)
    kmeans = num_clusters is not None
    return {
        "method": "kmeans" if kmeans else "agglomerative",
        "linkage": None if kmeans else linkage,
        "distance_threshold": None if kmeans else float(distance_threshold),
        "num_clusters": int(np.unique(pred).size),
        "num_identities": int(np.unique(labels).size),
        "pairwise_precision": precision,
        "pairwise_recall": recall,
        "pairwise_f1": f1,
        "nmi": float(normalized_mutual_info_score(labels, pred)),
        "ari": float(adjusted_rand_score(labels, pred)),
        "num_images": int(n),
        "num_images_clustered": int(idx.size),
    }
