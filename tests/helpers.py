"""Helpers shared by the test modules (test modules never import each other).

- The repository and the CLI subprocess environment: `REPO`, `subprocess_env`.
- Face folders for the evaluation tests: `write_colour_faces` (LFW-style folders of coloured
  patches, one colour per identity) and `write_two_fold_pairs` (a View 2 pairs.txt over them).
- Embeddings: `gaussian_clusters` (unit embeddings around random centres) and `random_batch`
  (float32 unit embeddings [B, D] and int32 labels [B] of uneven identities).
- References for the losses: `brute_force` (loss and stats of one batch by an explicit loop over
  every (a, p, n) triplet) for tests/test_losses.py; its per-pair choices (`semi_hard_choice`,
  `paper_window`) for tests/test_mining.py.
"""
import os

import numpy as np


#: The repository root (what the CLI subprocesses run in and import from).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra):
    """The environment for a CLI run in a subprocess: this process's, with TensorFlow quiet, the
    repository importable (PYTHONPATH), and ``extra`` variables (values turned into strings)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def gaussian_clusters(num_ids, per_id, dim=16, spread=0.01, seed=0):
    """Unit embeddings [num_ids * per_id, dim] around random unit centres, and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(num_ids), per_id)
    emb = centres[labels] + spread * rng.normal(size=(labels.size, dim))
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels



def write_colour_faces(root, rng, names, colours, per_id, jitter):
    """LFW-style ``root/<name>/<name>_000k.png``, 40 x 36 px: grey noise with a patch of the
    identity's colour, each channel moved by up to ``jitter`` per image."""
    from PIL import Image

    for name, colour in zip(names, colours):
        os.makedirs(os.path.join(root, name))
        for k in range(1, per_id + 1):
            img = rng.integers(100, 156, size=(40, 36, 3)).astype(np.uint8)
            img[6:34, 6:30] = np.clip(np.array(colour) + rng.integers(-jitter, jitter + 1, 3), 0, 255)
            Image.fromarray(img).save(os.path.join(root, name, f"{name}_{k:04d}.png"))


def write_two_fold_pairs(path, names):
    """A View 2 pairs.txt with 2 folds of 3 matched and 3 mismatched pairs over six ``names``."""
    from data.pairs import write_pairs

    folds = []
    for f in range(2):
        matched = [(names[(f * 3 + i) % 6], 1, 2 + i % 3) for i in range(3)]
        mismatched = [(names[i], 1 + f, names[(i + 1 + f) % 6], 3) for i in range(f, f + 3)]
        folds.append((matched, mismatched))
    write_pairs(path, folds)

# ----------------------------------------------------------------------------- reference
def _pairs(labels):
    b = len(labels)
    for a in range(b):
        negs = [n for n in range(b) if labels[n] != labels[a]]
        for p in range(b):
            if p != a and labels[p] == labels[a]:
                yield a, p, negs


def semi_hard_choice(dist, a, p, negs):
    """(negative, found) by the tfa/FaceNet rule, explicit loop. Ties: lowest column for the
    closest farther negative, highest column for the farthest-negative fallback."""
    farther = [n for n in negs if dist[a, n] > dist[a, p]]
    if farther:
        return min(farther, key=lambda n: (dist[a, n], n)), True
    return max(negs, key=lambda n: (dist[a, n], n)), False


def paper_window(dist, a, p, negs, margin):
    top = np.float32(dist[a, p] + np.float32(margin))
    return [n for n in negs if dist[a, p] < dist[a, n] < top]


def brute_force(dist, labels, margin, strategy, soft=False, paper_choice=None):
    """Loss and stats of one batch by explicit loops. dist: float32 [B, B] numpy.

    paper_choice: for "semi_hard_paper", the mined negative index [B, B] to score (random choice
    is checked separately); returns (loss, stats, chosen) with chosen {(a, p): n} or {a: (p, n)}.
    """
    labels = np.asarray(labels)
    m = np.float32(margin)
    def term(dap, dan):
        return np.log1p(np.exp(dap - dan)) if soft else max(dap - dan + m, 0.0)
    num_pairs = sum(1 for _ in _pairs(labels))
    no_sh = 0
    terms, daps, dans, active, chosen = [], [], [], [], {}
    if strategy in ("semi_hard", "semi_hard_paper"):
        for a, p, negs in _pairs(labels):
            if not negs:
                continue
            n, found = semi_hard_choice(dist, a, p, negs)
            if strategy == "semi_hard_paper":
                window = paper_window(dist, a, p, negs, margin)
                found = bool(window)
                n = int(paper_choice[a, p]) if window else n
                assert not window or n in window, (a, p, n, window)
            no_sh += not found
            chosen[(a, p)] = n
            dap, dan = float(dist[a, p]), float(dist[a, n])
            terms.append(term(dap, dan)); daps.append(dap); dans.append(dan)
            active.append(dap - dan + m > 0)
    elif strategy == "hard":
        for a in range(len(labels)):
            pos = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
            negs = [n for n in range(len(labels)) if labels[n] != labels[a]]
            if not pos or not negs:
                continue
            p = max(pos, key=lambda j: (dist[a, j], -j))
            n = min(negs, key=lambda j: (dist[a, j], j))
            chosen[a] = (p, n)
            dap, dan = float(dist[a, p]), float(dist[a, n])
            terms.append(term(dap, dan)); daps.append(dap); dans.append(dan)
            active.append(dap - dan + m > 0)
    elif strategy == "all":
        for a, p, negs in _pairs(labels):
            for n in negs:
                dap, dan = float(dist[a, p]), float(dist[a, n])
                is_active = dist[a, n] < np.float32(dist[a, p] + m)
                daps.append(dap); dans.append(dan); active.append(is_active)
                if is_active:
                    terms.append(dap - dan + float(m))
    if strategy in ("hard", "all"):
        for a, p, negs in _pairs(labels):
            if negs and not any(dist[a, n] > dist[a, p] for n in negs):
                no_sh += 1
    mean = lambda xs: float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    if strategy == "all":
        loss = float(np.sum(terms) / len(terms)) if terms else 0.0
    else:
        loss = mean(terms)
    stats = {"active_fraction": mean(np.asarray(active, float)), "mean_d_ap": mean(daps),
             "mean_d_an": mean(dans), "num_pairs": float(num_pairs),
             "num_no_semi_hard": float(no_sh)}
    return loss, stats, chosen


def random_batch(seed, sizes=(5, 1, 3, 7, 2, 4), dim=8, clustered=True):
    """Uneven identities (one singleton), unit embeddings, shuffled; float32 [B, D], int32 [B]."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(s, i) for i, s in enumerate(sizes)]).astype(np.int32)
    rng.shuffle(labels)
    centers = rng.normal(size=(len(sizes), dim))
    emb = rng.normal(size=(len(labels), dim)) + (1.5 * centers[labels] if clustered else 0)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels
