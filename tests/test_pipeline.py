"""data.pipeline, data.sampler, data.decode, data.file_check + data.augment: balanced P x K batches,
decoding, validation, evaluation order."""
import os

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from data import augment as aug
from data import decode, file_check, pipeline
from data.dataset import EmptyDatasetError, IdentityDataset, scan_identity_folder
from data.image_io import read_image
from data.preprocess import preprocess_numpy

COUNTS = [1, 2, 3, 5, 8, 4]  # uneven identity sizes; identity 0 has a single image
P, K = 3, 4
SIZE = (12, 10)


def _code_image(c, i, rng, h=16, w=14):
    """R encodes the identity, G the image number (constant channels survive crop/flip/resize),
    B is noise so that crops and flips change pixels."""
    img = np.empty([h, w, 3], np.uint8)
    img[..., 0] = 10 + 12 * c
    img[..., 1] = 10 + 12 * i
    img[..., 2] = rng.integers(0, 256, [h, w])
    return img


def _write_rgb(path, rgb):
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    rng = np.random.default_rng(0)
    for c, n in enumerate(COUNTS):
        os.makedirs(root / f"id{c}")
        for i in range(n):
            _write_rgb(root / f"id{c}" / f"{i:02d}.png", _code_image(c, i, rng))
    return scan_identity_folder(root)


def _decode_codes(images):
    """preprocessed [B, H, W, 3] -> (identity code [B], image code [B]); asserts constant R, G."""
    raw = images * 128.0 + 127.5
    r, g = raw[..., 0], raw[..., 1]
    assert np.abs(r - r.mean(axis=(1, 2), keepdims=True)).max() < 0.05
    assert np.abs(g - g.mean(axis=(1, 2), keepdims=True)).max() < 0.05
    return (np.rint((r.mean(axis=(1, 2)) - 10) / 12).astype(int),
            np.rint((g.mean(axis=(1, 2)) - 10) / 12).astype(int))


def _check_batch(images, labels, allowed, counts=COUNTS):
    assert images.shape == (P * K,) + SIZE + (3,) and images.dtype == np.float32
    assert labels.shape == (P * K,) and labels.dtype == np.int32
    assert np.isfinite(images).all() and np.abs(images).max() <= 1.0
    groups = labels.reshape(P, K)
    assert (groups == groups[:, :1]).all(), "each identity's K images are contiguous"
    ids = groups[:, 0]
    assert len(set(ids.tolist())) == P, "P distinct identities"
    assert set(ids.tolist()) <= set(allowed)
    who, which = _decode_codes(images)
    np.testing.assert_array_equal(who, labels)  # every image really belongs to its label
    for p in range(P):
        n = counts[ids[p]]
        picks = which[p * K:(p + 1) * K]
        assert picks.min() >= 0 and picks.max() < n
        uses = np.bincount(picks, minlength=n)
        if n >= K:
            assert uses.max() == 1, "no repeats when the identity has >= K images"
        else:
            assert uses.min() >= K // n and uses.max() <= -(-K // n), "repeats spread evenly"
    return ids


@pytest.mark.slow
def test_balanced_replace_invariants_and_epoch_coverage(coded):
    ds = pipeline.balanced_dataset(coded, P, K, SIZE, augment=True, seed=11,
                                   small_identities="replace")
    assert ds.element_spec[0].shape.as_list() == [P * K, SIZE[0], SIZE[1], 3]
    batches = pipeline.iterate_batches(ds, 16)
    seen = []
    for images, labels in batches:
        seen.append(_check_batch(images, labels, allowed=range(6)))
    # 6 usable identities, P=3: each epoch is 2 batches covering every identity exactly once.
    for e in range(8):
        assert sorted(np.concatenate(seen[2 * e:2 * e + 2]).tolist()) == list(range(6))
    # different epochs are shuffled differently
    assert len({tuple(np.concatenate(seen[2 * e:2 * e + 2])) for e in range(8)}) > 1


def test_balanced_drop_policy(coded):
    ds = pipeline.balanced_dataset(coded, P, K, SIZE, augment=False, seed=1,
                                   small_identities="drop")
    for images, labels in pipeline.iterate_batches(ds, 4):
        ids = _check_batch(images, labels, allowed=[3, 4, 5])
        assert sorted(ids.tolist()) == [3, 4, 5]


@pytest.mark.slow
def test_balanced_determinism_and_seeds(coded):
    def first(seed):
        ds = pipeline.balanced_dataset(coded, P, K, SIZE, augment=True, photometric=True,
                                       seed=seed, num_parallel_calls=4)
        return pipeline.iterate_batches(ds, 3)

    a, b, c = first(5), first(5), first(6)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    assert any(not np.array_equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_balanced_errors(coded):
    with pytest.raises(ValueError, match="only 3 identities are usable"):
        pipeline.balanced_dataset(coded, 4, K, SIZE, small_identities="drop")
    with pytest.raises(ValueError, match="only 6 identities are usable"):
        pipeline.balanced_dataset(coded, 7, K, SIZE)
    with pytest.raises(ValueError, match="small_identities"):
        pipeline.balanced_dataset(coded, P, K, SIZE, small_identities="oversample")
    with pytest.raises(ValueError, match=">= 1"):
        pipeline.balanced_dataset(coded, 0, K, SIZE)
    with pytest.raises(EmptyDatasetError):
        pipeline.balanced_dataset(IdentityDataset((), np.zeros([0], np.int32), ()), P, K, SIZE)
    with pytest.raises(TypeError):
        pipeline.balanced_dataset(42, P, K, SIZE)


def test_single_image_identities_with_replacement(tmp_path):
    rng = np.random.default_rng(1)
    for c in range(4):
        os.makedirs(tmp_path / f"id{c}")
        _write_rgb(tmp_path / f"id{c}" / "0.png", _code_image(c, 0, rng))
    ds = scan_identity_folder(tmp_path)
    batches = pipeline.iterate_batches(
        pipeline.balanced_dataset(ds, 2, 3, SIZE, augment=False, seed=0), 2)
    for images, labels in batches:
        assert labels.reshape(2, 3).tolist() in ([[a] * 3, [b] * 3] for a in range(4)
                                                  for b in range(4) if a != b)
        who, which = _decode_codes(images)
        np.testing.assert_array_equal(who, labels)
        assert (which == 0).all()


# ---------------------------------------------------------------------------------------------
# Augmentation (graph and eager, against brute force)
# ---------------------------------------------------------------------------------------------

def test_augment_graph_equals_eager_and_plain_resize():
    rng = np.random.default_rng(2)
    image = tf.constant(rng.integers(0, 256, [15, 13, 3]).astype(np.float32))
    seed = tf.constant([3, 4], tf.int64)
    eager = aug.augment_image(image, (9, 8), seed, crop_fraction=0.7, photometric=True)
    graph = tf.function(lambda im, s: aug.augment_image(im, (9, 8), s, crop_fraction=0.7,
                                                        photometric=True))(image, seed)
    np.testing.assert_allclose(eager.numpy(), graph.numpy(), atol=1e-4)
    assert eager.shape == (9, 8, 3) and 0 <= eager.numpy().min() and eager.numpy().max() <= 255
    plain = aug.augment_image(image, (9, 8), seed, crop_fraction=1.0, flip=False)
    np.testing.assert_allclose(plain.numpy(), aug.resize(image, (9, 8)).numpy(), atol=1e-4)
    with pytest.raises(ValueError):
        aug.random_crop_resize(image, (9, 8), seed, min_fraction=0.0)


def test_random_crop_is_a_resized_window_brute_force():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, [12, 12, 3]).astype(np.float32)
    out_size = (6, 6)
    windows = [(side, y0, x0) for side in range(6, 13)
               for y0 in range(0, 13 - side) for x0 in range(0, 13 - side)]
    refs = [aug.resize(image[y0:y0 + s, x0:x0 + s], out_size).numpy() for s, y0, x0 in windows]
    sides = set()
    for s in range(4):
        out = aug.random_crop_resize(tf.constant(image), out_size, tf.constant([s, 9]), 0.5).numpy()
        errors = [np.abs(ref - out).max() for ref in refs]
        best = int(np.argmin(errors))
        assert errors[best] < 1e-3, "the output is exactly some window of the image, resized"
        sides.add(windows[best][0])
    assert len(sides) > 1, "the crop scale is random"


def test_flip_flips_about_half_the_time():
    image = tf.constant(np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3))
    flipped = 0
    for s in range(40):
        out = aug.random_flip(image, tf.constant([s, 0])).numpy()
        if np.array_equal(out, image.numpy()[:, ::-1]):
            flipped += 1
        else:
            np.testing.assert_array_equal(out, image.numpy())
    assert 8 <= flipped <= 32


# ---------------------------------------------------------------------------------------------
# Decoding and bad input
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def messy(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "messy"
    for d in ("good", "formats", "onlybad"):
        os.makedirs(root / d)
    rgb = rng.integers(0, 256, [20, 18, 3]).astype(np.uint8)
    grey = rng.integers(0, 256, [20, 18]).astype(np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, [20, 18]).astype(np.uint8)])
    _write_rgb(root / "good" / "a.jpg", rgb)
    _write_rgb(root / "good" / "b.png", rgb)
    (root / "good" / "empty.jpg").write_bytes(b"")
    (root / "good" / "text.jpg").write_text("this is not an image\n")
    jpeg = cv2.imencode(".jpg", rgb)[1].tobytes()
    (root / "good" / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])  # truncated: TF route fails
    cv2.imwrite(str(root / "formats" / "grey.png"), grey)
    cv2.imwrite(str(root / "formats" / "rgba.png"), rgba[..., [2, 1, 0, 3]])
    cv2.imwrite(str(root / "formats" / "grey.pgm"), grey)
    _write_rgb(root / "formats" / "colour.ppm", rgb)
    (root / "onlybad" / "zero.png").write_bytes(b"")
    return root, rgb, grey


def test_decode_formats_match_image_io(messy):
    root, rgb, grey = messy
    graph_load = tf.function(decode.load_image)
    for name in ("grey.png", "rgba.png", "grey.pgm", "colour.ppm"):
        path = str(root / "formats" / name)
        expected = read_image(path)  # the project's policy: grey x3, alpha on white
        for load in (decode.load_image, graph_load):
            got = load(tf.constant(path)).numpy()
            assert got.dtype == np.uint8 and got.shape == (20, 18, 3)
            np.testing.assert_array_equal(got, expected, err_msg=name)
    np.testing.assert_array_equal(decode.load_image(str(root / "formats" / "grey.pgm"))[..., 1],
                                  grey)
    np.testing.assert_array_equal(decode.load_image(str(root / "good" / "b.png")), rgb)
    jpg = decode.load_image(str(root / "good" / "a.jpg")).numpy()
    pil = read_image(root / "good" / "a.jpg").astype(int)
    diff = np.abs(jpg.astype(int) - pil)  # TF and Pillow differ slightly in chroma upsampling
    assert diff.mean() < 2 and diff.max() <= 12
    # EXIF-rotated JPEG: routed to image_io, so the orientation is applied as everywhere else.
    upright = np.zeros([20, 30, 3], np.uint8)
    upright[:5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(upright).save(root / "formats" / "rotated.jpg", exif=exif.tobytes())
    got = decode.load_image(str(root / "formats" / "rotated.jpg")).numpy()
    assert got.shape == (30, 20, 3)
    np.testing.assert_array_equal(got, read_image(root / "formats" / "rotated.jpg"))
    # CMYK JPEG: TensorFlow's conversion agrees with image_io's.
    Image.fromarray(rgb).convert("CMYK").save(root / "formats" / "cmyk.jpg", quality=95)
    cmyk = decode.load_image(str(root / "formats" / "cmyk.jpg")).numpy().astype(int)
    assert np.abs(cmyk - read_image(root / "formats" / "cmyk.jpg")).mean() < 2
    # Bytes path (as used for TFRecords) agrees too.
    data = tf.io.read_file(str(root / "formats" / "grey.pgm"))
    np.testing.assert_array_equal(decode.decode_image(data), read_image(root / "formats" / "grey.pgm"))


@pytest.mark.slow
def test_validate_files_skips_and_counts(messy, caplog):
    root, _, _ = messy
    ds = scan_identity_folder(root)
    assert ds.class_names == ("formats", "good", "onlybad") and len(ds) == 10
    clean, skipped = file_check.validate_files(ds)
    reasons = {os.path.basename(p): r for p, r in skipped}
    assert reasons == {"empty.jpg": "empty", "text.jpg": "not_an_image", "zero.png": "empty",
                       "cut.jpg": "truncated"}
    assert clean.class_names == ("formats", "good")  # the identity with no good image is gone
    assert len(clean) == 6 and len(clean) + len(skipped) == len(ds)
    assert all(clean.class_names[lab] in path for path, lab in zip(clean.paths, clean.labels))
    assert "skipping" in caplog.text
    # Validated data runs through the pipeline; unvalidated bad files fail with the file named.
    images, labels = pipeline.iterate_batches(
        pipeline.balanced_dataset(clean, 2, 2, SIZE, seed=0), 1)[0]
    assert images.shape == (4,) + SIZE + (3,) and np.isfinite(images).all()
    only_text = IdentityDataset((str(root / "good" / "text.jpg"),) * 2, np.array([0, 1]), ("a", "b"))
    with pytest.raises(tf.errors.OpError, match="text.jpg"):
        pipeline.iterate_batches(pipeline.balanced_dataset(only_text, 2, 1, SIZE, seed=0), 1)
    with pytest.raises(EmptyDatasetError, match="none of the 2 images"):
        file_check.validate_files(only_text)


def test_validate_files_cache_decodes_only_new_or_changed_files(tmp_path, monkeypatch):
    """A second call with the same cache decodes nothing; a file that changes is decoded again."""
    root = tmp_path / "ids"
    for ident in ("a", "b"):
        (root / ident).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full([8, 8, 3], 40 * k, np.uint8)).save(root / ident / f"{k}.png")
    ds = scan_identity_folder(root)
    cache = str(tmp_path / "cache" / "validated.json")
    clean, skipped = file_check.validate_files(ds, cache_path=cache)
    assert len(clean) == 6 and not skipped and os.path.exists(cache)

    decoded = []
    real_load = decode.load_image

    def counting_load(path):
        decoded.append(1)
        return real_load(path)

    monkeypatch.setattr(decode, "load_image", counting_load)
    clean, skipped = file_check.validate_files(ds, cache_path=cache)
    assert len(clean) == 6 and not skipped and decoded == []
    (root / "b" / "1.png").write_bytes(b"now a text file")  # size and mtime change
    clean, skipped = file_check.validate_files(ds, cache_path=cache)
    assert decoded == [1]  # traced once for the one file left to check
    assert [os.path.basename(p) for p, _ in skipped] == ["1.png"] and len(clean) == 5


def test_eval_dataset_order_and_values(coded):
    paths = list(coded.paths[:7])
    batches = list(pipeline.eval_dataset(paths, SIZE, batch_size=3).as_numpy_iterator())
    assert [b.shape[0] for b in batches] == [3, 3, 1]
    got = np.concatenate(batches)
    expected = np.stack([
        preprocess_numpy(aug.resize(read_image(p).astype(np.float32), SIZE).numpy())
        for p in paths])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    who, which = _decode_codes(got)
    np.testing.assert_array_equal(who, coded.labels[:7])
    assert pipeline.eval_dataset(coded, 8, 4).element_spec.shape.as_list() == [None, 8, 8, 3]
    with pytest.raises(EmptyDatasetError):
        pipeline.eval_dataset([], SIZE, 4)


@pytest.mark.shared
def test_att_faces_balanced_batches(shared_data_dir):
    ds = scan_identity_folder(os.path.join(shared_data_dir, "att_faces"))
    assert ds.num_classes == 40 and len(ds) == 400
    assert (ds.images_per_class() == 10).all()
    batches = pipeline.iterate_batches(
        pipeline.balanced_dataset(ds, 8, 5, (112, 92), seed=0), 3)
    for images, labels in batches:
        assert images.shape == (40, 112, 92, 3) and np.isfinite(images).all()
        groups = labels.reshape(8, 5)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 8
        # grey source: the three channels are equal
        np.testing.assert_allclose(images[..., 0], images[..., 2], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# In-memory decoded images (data.memory_cache)
# ----------------------------------------------------------------------------------------------

def test_memory_cache_holds_the_same_pixels_as_the_files(coded):
    from data import memory_cache

    images = memory_cache.decode_to_memory(coded, (16, 14), progress=False)
    assert images.shape == (len(coded), 16, 14, 3) and images.dtype == np.uint8
    for i in (0, 7, len(coded) - 1):  # source size: decoding alone, no resampling
        np.testing.assert_array_equal(images[i], read_image(coded.paths[i]))


@pytest.mark.parametrize("augment", [False, True])
def test_balanced_batches_from_memory_keep_every_invariant(coded, augment):
    from data import memory_cache

    images = memory_cache.decode_to_memory(coded, memory_cache.cache_image_size(SIZE, 0.875),
                                           progress=False)
    ds = pipeline.balanced_dataset(coded, P, K, SIZE, augment=augment, seed=11, images=images)
    assert ds.element_spec[0].shape.as_list() == [P * K, SIZE[0], SIZE[1], 3]
    from_memory = pipeline.iterate_batches(ds, 6)
    from_files = pipeline.iterate_batches(
        pipeline.balanced_dataset(coded, P, K, SIZE, augment=augment, seed=11), 6)
    for (im, lab), (im_f, lab_f) in zip(from_memory, from_files):
        _check_batch(im, lab, allowed=range(6))  # identity and image codes survive the cache
        np.testing.assert_array_equal(lab, lab_f)  # the same sampling as from the files
    again = pipeline.iterate_batches(
        pipeline.balanced_dataset(coded, P, K, SIZE, augment=augment, seed=11, images=images), 6)
    for (im, _), (im2, _) in zip(from_memory, again):
        np.testing.assert_array_equal(im, im2)  # deterministic from the seed


def test_balanced_from_memory_rejects_a_mismatched_array(coded):
    with pytest.raises(ValueError, match="one per item"):
        pipeline.balanced_dataset(coded, P, K, SIZE, images=np.zeros([3, 8, 8, 3], np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pipeline.balanced_dataset(coded, P, K, SIZE,
                                  images=np.zeros([len(coded), 8, 8, 3], np.float32))


def test_memory_cache_size_and_fit():
    from data import memory_cache

    assert memory_cache.cache_image_size((64, 64), 0.875) == (74, 74)
    assert memory_cache.cache_image_size((112, 96), 1.0) == (112, 96)
    assert memory_cache.cache_bytes(10, (4, 5)) == 600
    assert memory_cache.cache_fits(10, (4, 5))
    assert not memory_cache.cache_fits(10**9, (1000, 1000))


def test_memory_cache_of_a_corrupt_file_names_it(tmp_path):
    from data import memory_cache

    os.makedirs(tmp_path / "a")
    _write_rgb(tmp_path / "a" / "good.png", np.zeros([8, 8, 3], np.uint8))
    (tmp_path / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    ds = scan_identity_folder(tmp_path)
    with pytest.raises(Exception, match="bad.jpg"):
        memory_cache.decode_to_memory(ds, (8, 8), progress=False)
