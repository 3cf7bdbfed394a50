"""The training and validation data of a run: where they come from, and the P x K batches.

Training data is a folder-per-identity tree (``--data_dir``), TFRecord shards (a glob or a
``.tfrecord`` file), or, with neither, the built-in synthetic faces (data/synthetic.py, rendered
once into the cache). Validation pairs come from ``--lfw_dir``/``--lfw_pairs``, ``--val_dir``, the
built-in data's own pairs, or a ``--val_fraction`` of the training identities
(training/validation.py). Every batch is P identities x K images so that triplets can be mined
inside it (FaceNet Section 3.2).
"""
import glob as globlib
import os

from absl import logging

from exit_codes import CliError

SYNTHETIC_SEED = 2015  # the built-in data set is the same for every run


def default_cache_dir(cache_dir=None):
    """``cache_dir`` (--cache_dir), else $FACENET_CACHE, else ~/.cache/facenet."""
    return cache_dir or os.environ.get("FACENET_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "facenet")


def is_tfrecord_source(path):
    """Whether --data_dir names TFRecord shards (a glob, or a .tfrecord(s) file), not a folder."""
    return any(ch in path for ch in "*?[") or path.endswith(".tfrecord") or path.endswith(".tfrecords")


def resolve_data(settings):
    """Returns (train_source, val_set or None, description dict) for ``settings``
    (training.settings.TrainSettings).

    Unreadable validation images are left out and counted (training/validation.py); an empty or
    unusable data set raises EmptyDatasetError (a one-line error at the command line).
    """
    from data.dataset import scan_identity_folder, split_identities
    from training import validation

    s = settings
    min_images = 1 if s.small_identities == "replace" else s.images_per_identity
    check_cache = os.path.join(s.model_dir, "validated_files.json")
    val_set = None
    if s.lfw_dir and s.lfw_pairs:
        val_set = validation.from_lfw_pairs(s.lfw_pairs, s.lfw_dir, cache_path=check_cache)
    elif s.val_dir:
        val_set = validation.from_identity_dataset(scan_identity_folder(s.val_dir),
                                                   seed=s.seed, cache_path=check_cache,
                                                   source=s.val_dir)

    if not s.data_dir:
        from data.synthetic import ensure_synthetic_dataset
        from evaluation.pixel_baseline import pixel_baseline

        size = max(s.image_size)
        info = ensure_synthetic_dataset(
            os.path.join(default_cache_dir(s.cache_dir), "synthetic"),
            identities=s.synthetic_identities,
            images_per_identity=s.synthetic_images_per_identity,
            image_size=size, seed=SYNTHETIC_SEED, baseline=pixel_baseline)
        train = scan_identity_folder(info["train_dir"], min_images_per_identity=min_images)
        if val_set is None:
            val_set = validation.from_lfw_pairs(info["pairs_file"], info["test_dir"],
                                                cache_path=check_cache)
        desc = {"data": "synthetic", "train_dir": info["train_dir"], "test_dir": info["test_dir"],
                "pixel_baseline_accuracy": info.get("pixel_baseline_accuracy")}
        return train, val_set, desc

    if is_tfrecord_source(s.data_dir):
        files = sorted(globlib.glob(s.data_dir)) or [s.data_dir]
        if val_set is None:
            logging.warning("TFRecord input without --val_dir or --lfw_dir/--lfw_pairs: no validation")
        return files, val_set, {"data": "tfrecord", "files": len(files)}

    from data.file_check import validate_files

    dataset = scan_identity_folder(s.data_dir, min_images_per_identity=min_images)
    dataset, skipped = validate_files(
        dataset, cache_path=os.path.join(s.model_dir, "validated_files.json"))
    if skipped:
        logging.warning("skipped %d unreadable training images (first: %s)", len(skipped), skipped[0])
    if val_set is None and s.val_fraction == 0:
        logging.warning("--val_fraction=%g and no --val_dir or --lfw_dir/--lfw_pairs: no "
                        "validation (no accuracy, no threshold in the export)", s.val_fraction)
    elif val_set is None:
        dataset, held_out = split_identities(dataset, s.val_fraction, s.seed)
        # held_out comes from the checked training images: nothing to decode again
        val_set = validation.from_identity_dataset(
            held_out, seed=s.seed, check_images=False,
            source=f"{s.data_dir} (--val_fraction={s.val_fraction:g} of its identities)")
    from data.align import read_crop_settings

    return dataset, val_set, {"data": s.data_dir, "identities": dataset.num_classes,
                              "images": len(dataset), "skipped": len(skipped),
                              "crop": read_crop_settings(s.data_dir)}


def num_classes(source, skip_damaged_shards=False):
    """Identities of the training data (class indices of the batches), for classification heads."""
    if hasattr(source, "num_classes"):
        return int(source.num_classes)
    from data.tfrecords import load_tfrecords

    table = load_tfrecords(source, skip_damaged=skip_damaged_shards)
    return len(table.class_names)  # cached: the pipeline reuses the table


def cached_images(settings, source):
    """The training images decoded into memory (--cache_images), or None."""
    from data import memory_cache
    from data.pipeline import resolve_source

    s = settings
    if s.cache_images == "off":
        return None
    size = memory_cache.cache_image_size(s.image_size, s.crop_fraction if s.augment else 1.0)
    n = len(resolve_source(source, skip_damaged_shards=s.skip_damaged_shards)[0])
    if s.cache_images == "auto" and not memory_cache.cache_fits(n, size):
        logging.info("cache_images=auto: %d images at %dx%d (%.1f GB) would take more than a "
                     "quarter of the RAM; decoding from files", n, size[0], size[1],
                     memory_cache.cache_bytes(n, size) / 1e9)
        return None
    logging.info("decoding %d training images into memory at %dx%d", n, size[0], size[1])
    # a live bar on a terminal, a plain line now and then in a log file (data/progress.py)
    return memory_cache.decode_to_memory(source, size, progress=True,
                                         skip_damaged_shards=s.skip_damaged_shards)


def batches(settings, source, epoch, images=None, strategy=None):
    """One epoch of P x K training batches, ``({"images", "labels"},)`` as the train model takes
    them; the data order and augmentation are seeded by --seed and ``epoch``.

    With a ``strategy`` of more than one replica the result is a distributed dataset
    (data/distributed.py): every worker builds the same global P x K batches and replica r gets
    rows [r*B/N, (r+1)*B/N) of each (images float32 [B/N, H, W, 3], labels int32 [B/N]); with
    no strategy or one replica, the plain dataset. A P x K that the data cannot fill or that does
    not split over the replicas (--mining_scope) raises CliError (one line).
    """
    from data.distributed import distribute_balanced
    from data.pipeline import balanced_dataset

    s = settings

    def global_batches(rows=None):
        ds = balanced_dataset(source, s.identities_per_batch, s.images_per_identity,
                              s.image_size, augment=s.augment,
                              seed=s.seed * 1_000_003 + epoch,
                              small_identities=s.small_identities,
                              crop_fraction=s.crop_fraction, photometric=s.photometric,
                              images=images, skip_damaged_shards=s.skip_damaged_shards,
                              rows=rows)
        return ds.map(lambda x, y: ({"images": x, "labels": y},))

    try:  # under a strategy, balanced_dataset's errors come out of distribute_balanced too
        return distribute_balanced(strategy, global_batches, s.identities_per_batch,
                                   s.images_per_identity, mining_scope=s.mining_scope,
                                   selects_rows=True)
    except ValueError as exc:  # P x K the data cannot fill, bad sizes: a user error, one line
        raise CliError(str(exc)) from exc
