"""Mining and distances checked against brute-force NumPy loops over all (a, p, n) triplets.

The references (`brute_force`, `random_batch`, ...) are in tests/helpers.py.
"""
import functools

import numpy as np
import pytest
import tensorflow as tf

import losses
from losses import mining
from tests.helpers import _pairs, brute_force, paper_window, random_batch, semi_hard_choice


# ----------------------------------------------------------------------------- distances
def _np_distances(x, distance):
    x = x.astype(np.float64)
    b = len(x)
    out = np.zeros((b, b))
    for i in range(b):
        for j in range(b):
            if distance == "squared_l2":
                out[i, j] = np.sum((x[i] - x[j]) ** 2)
            elif distance == "l2":
                out[i, j] = np.sqrt(np.sum((x[i] - x[j]) ** 2))
            else:
                out[i, j] = 1 - x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j])
    return out


@pytest.mark.parametrize("distance", losses.DISTANCES)
def test_pairwise_distances_match_numpy(distance):
    x = np.random.default_rng(0).normal(size=(9, 5)).astype(np.float32)
    got = losses.pairwise_distances(x, distance).numpy()
    assert got.dtype == np.float32 and got.shape == (9, 9)
    np.testing.assert_allclose(got, _np_distances(x, distance), atol=2e-5, rtol=1e-5)
    assert np.all(np.diag(got) == 0.0)
    assert np.all(got >= 0.0)


@pytest.mark.parametrize("distance", losses.DISTANCES)
def test_distance_gradient_finite_for_duplicates(distance):
    x = tf.constant(np.repeat(np.random.default_rng(1).normal(size=(3, 4)), 2, axis=0),
                    tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        d = losses.pairwise_distances(x, distance)
        total = tf.reduce_sum(d)
    g = tape.gradient(total, x).numpy()
    assert np.all(np.isfinite(g))
    assert float(d[0, 1]) == pytest.approx(0.0, abs=1e-6)


def test_pairwise_distances_rejects_unknown_name():
    with pytest.raises(ValueError, match="Unknown distance"):
        losses.pairwise_distances(np.zeros((2, 2), np.float32), "manhattan")


def test_masks():
    labels = tf.constant([3, 1, 3, 3])
    pos = losses.positive_mask(labels).numpy()
    neg = losses.negative_mask(labels).numpy()
    expected_pos = np.array([[0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 0, 1], [1, 0, 1, 0]], bool)
    np.testing.assert_array_equal(pos, expected_pos)
    np.testing.assert_array_equal(neg, [[0, 1, 0, 0], [1, 0, 1, 1], [0, 1, 0, 0], [0, 1, 0, 0]])
    values = tf.constant([[1.0, 5.0, 2.0], [4.0, 3.0, 9.0]])
    mask = tf.constant([[True, False, True], [False, False, False]])
    mx, any_mx = losses.masked_maximum(values, mask)
    mn, _ = losses.masked_minimum(values, mask)
    np.testing.assert_array_equal(mx.numpy(), [2.0, 0.0])
    np.testing.assert_array_equal(any_mx.numpy(), [True, False])
    np.testing.assert_array_equal(mn.numpy(), [1.0, 0.0])


# ----------------------------------------------------------------------------- mining
def _dist(seed, distance="squared_l2", **kw):
    emb, labels = random_batch(seed, **kw)
    return losses.pairwise_distances(emb, distance).numpy(), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("distance", losses.DISTANCES)
def test_semi_hard_negatives_match_brute_force(seed, distance):
    dist, labels = _dist(seed, distance, clustered=seed != 1)
    mined = mining.mine_semi_hard(tf.constant(dist), tf.constant(labels))
    idx, valid, found = (t.numpy() for t in mined)
    expected_valid = np.zeros_like(valid)
    for a, p, negs in _pairs(labels):
        n, ok = semi_hard_choice(dist, a, p, negs)
        expected_valid[a, p] = True
        assert idx[a, p] == n and found[a, p] == ok, (a, p)
    np.testing.assert_array_equal(valid, expected_valid)
    assert not found[~valid].any()


def test_semi_hard_ties_and_fallback_on_handmade_matrix():
    # Anchor 0, positive 1 at 0.5; negatives 2..5. Tie at 0.5 (not farther), two at 0.7.
    dist = np.full((6, 6), 9.0, np.float32)
    dist[0, 1:] = [0.5, 0.5, 0.7, 0.7, 0.3]
    dist[1, [0, 2, 3, 4, 5]] = [0.5, 0.1, 0.2, 0.2, 0.15]  # anchor 1: none farther than 0.5
    labels = tf.constant([0, 0, 1, 1, 2, 2])
    mined = mining.mine_semi_hard(tf.constant(dist), labels)
    assert int(mined.negative_index[0, 1]) == 3  # lowest column among the 0.7 tie
    assert bool(mined.found[0, 1])
    assert int(mined.negative_index[1, 0]) == 4  # fallback: farthest (0.2, highest column)
    assert not bool(mined.found[1, 0])


@pytest.mark.parametrize("seed", [0, 3])
def test_hard_mining_matches_brute_force(seed):
    dist, labels = _dist(seed)
    mined = mining.mine_hard(tf.constant(dist), tf.constant(labels))
    _, _, chosen = brute_force(dist, labels, 0.2, "hard")
    valid = mined.valid.numpy()
    assert set(np.flatnonzero(valid)) == set(chosen)
    for a, (p, n) in chosen.items():
        assert (int(mined.positive_index[a]), int(mined.negative_index[a])) == (p, n)


@pytest.mark.parametrize("seed", [0, 4])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_batch_all_sums_match_brute_force(seed, margin):
    dist, labels = _dist(seed, clustered=seed == 0)
    got = mining.AllMining(*(t.numpy() for t in mining.mine_all(
        tf.constant(dist), tf.constant(labels), margin)))
    m = np.float32(margin)
    for a, p, negs in _pairs(labels):
        act = [n for n in negs if dist[a, n] < np.float32(dist[a, p] + m)]
        assert got.active_count[a, p] == len(act)
        np.testing.assert_allclose(got.active_loss_sum[a, p],
                                   sum(dist[a, p] - dist[a, n] + m for n in act), atol=1e-5)
        np.testing.assert_allclose(got.active_negative_sum[a, p],
                                   sum(dist[a, n] for n in act), atol=1e-5)
    for a in range(len(labels)):
        negs = labels != labels[a]
        assert got.negative_count[a] == negs.sum()
        np.testing.assert_allclose(got.negative_sum[a], dist[a, negs].sum(), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_paper_window_choice_is_inside_window_or_falls_back(seed):
    dist, labels = _dist(seed, clustered=seed != 1)
    for margin in (0.2, 0.6):
        mined = mining.mine_semi_hard_paper(tf.constant(dist), tf.constant(labels), margin,
                                            seed=seed)
        idx, found = mined.negative_index.numpy(), mined.found.numpy()
        for a, p, negs in _pairs(labels):
            window = paper_window(dist, a, p, negs, margin)
            assert found[a, p] == bool(window)
            if window:
                assert idx[a, p] in window
            else:
                assert idx[a, p] == semi_hard_choice(dist, a, p, negs)[0]


def test_paper_window_draw_is_uniform_and_seeded():
    # Anchor 0 with 120 positives all at 0.5; negatives at 0.55, 0.6, 0.65 (in window) and 0.9.
    b = 125
    labels = np.zeros(b, np.int32)
    labels[121:] = 1
    dist = np.full((b, b), 0.5, np.float32)
    dist[0, 121:] = [0.55, 0.6, 0.65, 0.9]
    np.fill_diagonal(dist, 0.0)
    args = (tf.constant(dist), tf.constant(labels), 0.2)
    picks = mining.mine_semi_hard_paper(*args, seed=7).negative_index.numpy()[0, 1:121]
    counts = np.bincount(picks, minlength=b)[121:]
    assert counts[3] == 0 and counts[:3].sum() == 120
    assert counts[:3].min() >= 20, counts  # each of 3 has expectation 40
    again = mining.mine_semi_hard_paper(*args, seed=7).negative_index.numpy()[0, 1:121]
    np.testing.assert_array_equal(picks, again)
    unseeded = [mining.mine_semi_hard_paper(*args).negative_index.numpy()[0, 1:121]
                for _ in range(2)]
    assert not np.array_equal(*unseeded)


@pytest.mark.slow
def test_mining_in_graph_mode_matches_eager():
    dist, labels = _dist(2)
    dist, labels = tf.constant(dist), tf.constant(labels)
    for fn in (mining.mine_semi_hard, mining.mine_hard):
        eager = fn(dist, labels)
        graph = tf.function(fn)(dist, labels)
        for e, g in zip(eager, graph):
            np.testing.assert_array_equal(e.numpy(), g.numpy())
    eager = mining.mine_all(dist, labels, 0.2)
    graph = tf.function(mining.mine_all)(dist, labels, 0.2)
    for e, g in zip(eager, graph):
        np.testing.assert_allclose(e.numpy(), g.numpy(), rtol=1e-6)


def test_mining_handles_unknown_batch_size_in_graph():
    fn = tf.function(mining.mine_semi_hard, input_signature=[
        tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32)])
    dist, labels = _dist(0)
    out = fn(tf.constant(dist), tf.constant(labels))
    np.testing.assert_array_equal(
        out.negative_index.numpy(),
        mining.mine_semi_hard(tf.constant(dist), tf.constant(labels)).negative_index.numpy())


def _tied_matrix(seed, b=23):
    """Symmetric matrix of few distinct values (many exact ties, -0.0 and negative entries, as a
    callable distance may give), zero diagonal, and uneven labels."""
    rng = np.random.default_rng(seed)
    values = np.array([-0.5, -0.0, 0.0, 0.25, 0.5, 0.75, 1.0], np.float32)
    dist = values[rng.integers(0, len(values), size=(b, b))]
    dist = np.triu(dist, 1)
    dist = dist + dist.T
    np.fill_diagonal(dist, 0.0)
    labels = rng.integers(0, 4, size=b).astype(np.int32)
    return dist.astype(np.float32), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mining_with_ties_and_negative_distances_matches_brute_force(seed):
    dist, labels = _tied_matrix(seed)
    d, l = tf.constant(dist), tf.constant(labels)
    semi = mining.mine_semi_hard(d, l)
    got_all = mining.mine_all(d, l, 0.25)
    for a, p, negs in _pairs(labels):
        n, ok = semi_hard_choice(dist, a, p, negs)
        assert (int(semi.negative_index[a, p]), bool(semi.found[a, p])) == (n, ok), (a, p)
        act = [m for m in negs if dist[a, m] < np.float32(dist[a, p] + np.float32(0.25))]
        assert float(got_all.active_count[a, p]) == len(act)
        np.testing.assert_allclose(float(got_all.active_negative_sum[a, p]),
                                   sum(float(dist[a, m]) for m in act), atol=1e-5)
    paper = mining.mine_semi_hard_paper(d, l, 0.5, seed=seed)
    for a, p, negs in _pairs(labels):
        window = paper_window(dist, a, p, negs, 0.5)
        assert bool(paper.found[a, p]) == bool(window)
        fallback = [semi_hard_choice(dist, a, p, negs)[0]]
        assert int(paper.negative_index[a, p]) in (window or fallback)


def test_sparse_triplets_match_dense_mining():
    dist, labels = _dist(3)
    d, l = tf.constant(dist), tf.constant(labels)
    for sparse, dense in [(mining.semi_hard_triplets(d, l), mining.mine_semi_hard(d, l)),
                          (mining.semi_hard_paper_triplets(d, l, 0.3, seed=4),
                           mining.mine_semi_hard_paper(d, l, 0.3, seed=4))]:
        a, p = sparse.anchor.numpy(), sparse.positive.numpy()
        np.testing.assert_array_equal(np.stack([a, p], 1), np.argwhere(dense.valid.numpy()))
        np.testing.assert_array_equal(sparse.negative.numpy(), dense.negative_index.numpy()[a, p])
        np.testing.assert_array_equal(sparse.found.numpy(), dense.found.numpy()[a, p])
    totals = mining.batch_all_totals(d, l, 0.2)
    full = mining.mine_all(d, l, 0.2)
    valid = full.valid.numpy()
    np.testing.assert_allclose(float(totals.active_count), full.active_count.numpy().sum())
    np.testing.assert_allclose(float(totals.active_loss_sum), full.active_loss_sum.numpy().sum(),
                               rtol=1e-5)
    np.testing.assert_allclose(float(totals.num_triplets),
                               (valid * full.negative_count.numpy()[:, None]).sum())
    # Pairs given explicitly (tfa's rule: every positive pair) are mined the same way.
    pos = losses.positive_mask(l)
    explicit = mining.semi_hard_triplets(d, l, pair_mask=pos)
    dense = mining.mine_semi_hard(d, l)
    np.testing.assert_array_equal(
        explicit.negative.numpy(),
        dense.negative_index.numpy()[explicit.anchor.numpy(), explicit.positive.numpy()])


@pytest.mark.parametrize("strategy", ["semi_hard_paper", "all"])
def test_other_strategies_handle_unknown_batch_size_in_graph(strategy):
    fn = mining.mine_all if strategy == "all" else functools.partial(
        mining.mine_semi_hard_paper, seed=1)
    graph = tf.function(lambda d, l: fn(d, l, 0.2), input_signature=[
        tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int32)])
    dist, labels = _dist(1)
    for g, e in zip(graph(tf.constant(dist), tf.constant(labels)),
                    fn(tf.constant(dist), tf.constant(labels), 0.2)):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-6)
