"""Raw-pixel verification baseline of a pairs file: how far L2 distance on pixels alone gets.

The built-in synthetic faces (:mod:`data.synthetic`) are meant to be easy for a small CNN and hard
for raw pixels; this measures the second half. Each image of a View 2 pairs file
(:func:`data.pairs.read_pairs`) becomes a pixel vector in a few variants (grey or RGB, full or
downsampled, raw or per-image standardised), and each variant is scored with the LFW 10-fold
threshold protocol (:func:`evaluation.verification.kfold_accuracy`) on squared L2 distances.

Pass :func:`pixel_baseline` as ``baseline=`` to :func:`data.synthetic.generate_dataset` or
:func:`data.synthetic.ensure_synthetic_dataset` to store it with the data (``synthetic.json``).
"""
import numpy as np

PIXEL_VARIANTS = ("grey_full", "grey_32", "grey_32_standardized", "rgb_16", "rgb_8_standardized")


def _pixel_features(path, variant):
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read {path}")
    if variant.startswith("grey"):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    side = {"grey_full": None, "grey_32": 32, "grey_32_standardized": 32, "rgb_16": 16,
            "rgb_8_standardized": 8}[variant]
    if side is not None:
        img = cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)
    x = img.astype(np.float64).ravel()
    if variant.endswith("standardized"):
        x = (x - x.mean()) / (x.std() + 1e-6)
    return x


def pixel_baseline(test_dir, pairs_file, variants=PIXEL_VARIANTS):
    """10-fold threshold verification accuracy of raw-pixel L2 distance on ``pairs_file``.

    Images are ``test_dir/name/name_%04d.jpg``. Returns {variant: mean accuracy, rounded to 4
    places} for each variant (grey or RGB, full or downsampled, raw or per-image standardised).
    """
    from data.pairs import read_pairs
    from evaluation.verification import kfold_accuracy

    pair_set = read_pairs(pairs_file, test_dir, ext="jpg")
    issame, folds = pair_set.issame, pair_set.folds
    result = {}
    for v in variants:
        cache = {}

        def feat(path):
            if path not in cache:
                cache[path] = _pixel_features(path, v)
            return cache[path]

        d = np.array([np.sum((feat(p.path_a) - feat(p.path_b)) ** 2) for p in pair_set.pairs])
        result[v] = round(kfold_accuracy(d, issame, folds)[0], 4)
    return result
