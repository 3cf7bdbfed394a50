"""Validation during training: embed a fixed set of held-out images and score verification pairs.

A validation set is a list of unique image paths, the identity of each, and pairs given as index
arrays into that list, with a fold per pair. It comes from an LFW pairs file (the paper's protocol)
or from a folder-per-identity hold-out set.

Images that do not decode (a text file named x.jpg, a truncated JPEG, ...) are found once, when the
set is built, with the training data's check (``data.file_check.validate_files``): they are left out
and counted (``skipped_images``), and the pairs that use one are dropped and counted
(``num_failed_pairs``, like pairs with a missing image), with one warning line naming the first.
An image damaged later, during training, is found the same way when embedding it fails.
"""
import dataclasses
import os

import numpy as np
from absl import logging


@dataclasses.dataclass
class ValidationSet:
    paths: list           # unique image paths, [M]
    names: list           # identity name of each path, [M]
    idx_a: np.ndarray     # int [N], first image of each pair
    idx_b: np.ndarray     # int [N], second image of each pair
    issame: np.ndarray    # bool [N]
    folds: np.ndarray     # int [N]
    num_failed_pairs: int = 0  # pairs dropped because an image is missing or unreadable
    source: str = ""
    skipped_images: list = dataclasses.field(default_factory=list)  # (path, reason) left out

    @property
    def num_pairs(self):
        return int(len(self.issame))

    def drop_images(self, skipped):
        """Leave out the images ``skipped`` ((path, reason) pairs), in place.

        Pairs that use one are dropped and added to ``num_failed_pairs``; the kept images are
        re-indexed. Logs one warning line naming the first image. Raises EmptyDatasetError when
        no pair is left.
        """
        from data.dataset import EmptyDatasetError

        bad = {p for p, _ in skipped} & set(self.paths)
        if not bad:
            return
        keep = np.array([p not in bad for p in self.paths], bool)
        new_index = np.cumsum(keep) - 1  # old image index -> new one (where kept)
        ok = keep[self.idx_a] & keep[self.idx_b]
        dropped = int(np.count_nonzero(~ok))
        self.skipped_images += [(p, r) for p, r in skipped if p in bad]
        first = next((p, r) for p, r in skipped if p in bad)
        logging.warning("validation (%s): %d unreadable images left out (first: %s: %s); %d of %d "
                        "pairs use one and are not scored", self.source, len(bad), first[0],
                        first[1], dropped, self.num_pairs)
        self.paths = [p for p, k in zip(self.paths, keep) if k]
        self.names = [n for n, k in zip(self.names, keep) if k]
        self.idx_a, self.idx_b = new_index[self.idx_a[ok]], new_index[self.idx_b[ok]]
        self.issame, self.folds = self.issame[ok], self.folds[ok]
        self.num_failed_pairs += dropped
        if self.num_pairs == 0:
            raise EmptyDatasetError(f"validation set {self.source}: no pair left to score once "
                                    f"{len(self.skipped_images)} unreadable images are left out "
                                    f"(first: {self.skipped_images[0][0]})")


def find_unreadable(paths, names, cache_path=None, source=""):
    """(path, reason) of every image in ``paths`` that does not decode as training would decode it
    (``data.file_check.validate_files``; ``cache_path``: its verdict cache). Raises
    EmptyDatasetError when none decodes."""
    from data.dataset import EmptyDatasetError, IdentityDataset
    from data.file_check import validate_files

    if not paths:
        return []
    classes = sorted(set(names))
    row = {c: i for i, c in enumerate(classes)}
    dataset = IdentityDataset(tuple(paths), np.asarray([row[n] for n in names], np.int32),
                              tuple(classes))
    try:
        _, skipped = validate_files(dataset, cache_path=cache_path)
    except EmptyDatasetError as exc:
        raise EmptyDatasetError(f"validation set {source}: {exc}") from None
    return skipped


def from_lfw_pairs(pairs_file, lfw_dir, check_images=True, cache_path=None):
    """Build a ValidationSet from an LFW-format pairs file; pairs with a missing image are counted,
    and with ``check_images`` those with an unreadable one too (``cache_path``: see
    :func:`find_unreadable`)."""
    from data.pairs import read_pairs

    pair_set = read_pairs(pairs_file, lfw_dir)
    index, paths, names = {}, [], []
    a, b, same, folds = [], [], [], []
    failed = 0
    for p in pair_set.pairs:
        if not (os.path.exists(p.path_a) and os.path.exists(p.path_b)):
            failed += 1
            continue
        ids = []
        for path in (p.path_a, p.path_b):
            if path not in index:
                index[path] = len(paths)
                paths.append(path)
                names.append(os.path.basename(os.path.dirname(path)))
            ids.append(index[path])
        a.append(ids[0])
        b.append(ids[1])
        same.append(p.issame)
        folds.append(p.fold)
    if failed:
        logging.warning("validation: %d of %d pairs have a missing image and are not scored",
                        failed, len(pair_set.pairs))
    if not a:
        from data.dataset import EmptyDatasetError

        raise EmptyDatasetError(f"no usable pairs in {pairs_file} under {lfw_dir}: every pair "
                                "has a missing image")
    vset = ValidationSet(paths, names, np.asarray(a), np.asarray(b), np.asarray(same, bool),
                         np.asarray(folds), failed, source=pairs_file)
    if check_images:
        vset.drop_images(find_unreadable(vset.paths, vset.names, cache_path, pairs_file))
    return vset


def from_identity_dataset(dataset, num_pairs=6000, num_folds=10, seed=0, check_images=True,
                          cache_path=None, source="holdout"):
    """Build a ValidationSet from a folder-per-identity hold-out set with balanced sampled pairs.

    With ``check_images`` unreadable images are left out (counted in ``skipped_images``) before
    the pairs are drawn, so no pair is lost to them. Raises EmptyDatasetError when no pair can be
    made (fewer than two identities, or no identity with two readable images).
    """
    from data.dataset import EmptyDatasetError
    from evaluation.holdout_pairs import make_pairs

    skipped = []
    if check_images and len(dataset):
        from data.file_check import validate_files

        try:
            clean, skipped = validate_files(dataset, cache_path=cache_path)
        except EmptyDatasetError as exc:
            raise EmptyDatasetError(f"validation set {source}: {exc}") from None
        if skipped:
            logging.warning("validation (%s): %d unreadable images left out (first: %s: %s)",
                            source, len(skipped), skipped[0][0], skipped[0][1])
        dataset = clean
    try:
        idx_a, idx_b, issame, folds = make_pairs(dataset.labels, mode="balanced",
                                                 num_pairs=num_pairs, num_folds=num_folds,
                                                 seed=seed)
    except ValueError as exc:
        raise EmptyDatasetError(
            f"validation set {source}: cannot make verification pairs from {len(dataset)} "
            f"readable images of {dataset.num_classes} identities ({exc})") from None
    names = [dataset.class_names[int(l)] for l in dataset.labels]
    return ValidationSet(list(dataset.paths), names, np.asarray(idx_a), np.asarray(idx_b),
                         np.asarray(issame, bool), np.asarray(folds), 0, source=source,
                         skipped_images=list(skipped))


class LocalEmbedder:
    """``backbone(images, training=False)`` as one tf.function that this process runs alone.

    Keras ``predict`` under a multi-worker strategy splits its data across the workers and gathers
    the result, a collective that the other workers, which do not validate, would never join; this
    runs no collective (distributed variables are read from their local copy), so the chief of a
    multi-worker job validates and projects on its own. Same graph as ``predict`` otherwise.
    ``__call__``: float32 [N, H, W, 3] preprocessed images -> float32 numpy [N, D].
    """

    def __init__(self, backbone, image_size):
        import tensorflow as tf

        h, w = image_size
        self.backbone = backbone
        self.dim = int(backbone.output_shape[-1])
        self._forward = tf.function(lambda x: backbone(x, training=False),
                                    input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32)])

    def __call__(self, images):
        return np.asarray(self._forward(images), dtype=np.float32)


def embed_paths(backbone, paths, image_size, batch_size=128):
    """Unit embeddings of images on disk, float32 [M, D], in order (no augmentation).

    ``backbone``: a Keras model, or a :class:`LocalEmbedder` of one (made once, traced once).
    """
    from data.pipeline import eval_dataset

    embed = backbone if isinstance(backbone, LocalEmbedder) else LocalEmbedder(backbone, image_size)
    ds = eval_dataset(list(paths), image_size, batch_size)
    out = [embed(batch) for batch in ds]
    return np.concatenate(out) if out else np.zeros((0, embed.dim), np.float32)


def embed_set(backbone, vset, image_size, batch_size=128):
    """:func:`embed_paths` of ``vset.paths``, float32 [M, D]. If decoding fails (an image damaged
    after the set was checked), the images are checked again, the unreadable ones are dropped from
    ``vset`` in place (counted, one warning) and the rest is embedded; any other error is raised."""
    import tensorflow as tf

    try:
        return embed_paths(backbone, vset.paths, image_size, batch_size)
    except tf.errors.OpError:
        skipped = find_unreadable(vset.paths, vset.names, source=vset.source)
        if not skipped:
            raise
    vset.drop_images(skipped)
    return embed_paths(backbone, vset.paths, image_size, batch_size)


def score(embeddings, vset, far_targets=(1e-3,)):
    """Verification metrics for embeddings [M, D] of vset.paths (squared L2, Section 4)."""
    from evaluation.verification import evaluate_verification

    # In the embeddings' float32, as train.py always has: evaluation.report.pair_distances works in
    # float64, which would move recorded thresholds in their 7th digit.
    diff = embeddings[vset.idx_a] - embeddings[vset.idx_b]
    dist = np.sum(diff * diff, axis=1)
    return evaluate_verification(dist, vset.issame, folds=vset.folds, far_targets=far_targets)
