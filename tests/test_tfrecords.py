"""data.tfrecords: shard writing (library and CLI) and the in-memory balanced reader."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import tensorflow as tf

from data import decode, file_check, pipeline
from data.dataset import EmptyDatasetError, scan_identity_folder
from data.tfrecords import load_tfrecords, native_format, write_tfrecords

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """5 identities, 2-6 images each, in JPEG, PNG, grey PGM and RGBA PNG, plus one bad file."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    kinds = ["jpg", "png", "pgm", "rgba.png"]
    for c, n in enumerate([2, 6, 3, 4, 5]):
        d = root / f"person {c}"
        os.makedirs(d)
        for i in range(n):
            kind = kinds[(c + i) % len(kinds)]
            h, w = rng.integers(20, 40, 2)
            img = rng.integers(0, 256, [h, w, 4]).astype(np.uint8)
            if kind == "pgm":
                assert cv2.imwrite(str(d / f"{i}.pgm"), img[..., 0])
            elif kind == "rgba.png":
                assert cv2.imwrite(str(d / f"{i}.png"), img)
            else:
                assert cv2.imwrite(str(d / f"{i}.{kind}"), img[..., :3])
    (root / "person 1" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return root


@pytest.fixture(scope="module")
def written(folder, tmp_path_factory):
    ds = scan_identity_folder(folder)
    out = tmp_path_factory.mktemp("shards")
    summary = write_tfrecords(ds, out, num_shards=3, progress=False)
    return ds, out, summary


def test_write_summary_and_metadata(written):
    ds, out, summary = written
    assert len(ds) == 21
    assert summary["images_written"] == 20 and summary["skipped"] == 1
    assert summary["skipped_files"][0][0].endswith("broken.jpg")
    # pgm and rgba.png files are re-encoded to lossless PNG; jpg and plain png are kept as is
    def has_alpha(path):
        img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        return img is not None and img.ndim == 3 and img.shape[2] == 4

    n_reencoded = sum(p.endswith(".pgm") or (p.endswith(".png") and has_alpha(p)) for p in ds.paths)
    assert summary["reencoded"] == n_reencoded > 0
    names = sorted(os.listdir(out))
    assert names == ["classes.json"] + [f"train-{i:05d}-of-00003.tfrecord" for i in range(3)]
    meta = json.loads((out / "classes.json").read_text())
    assert meta["class_names"] == list(ds.class_names)
    assert meta["images_per_class"] == [2, 6, 3, 4, 5] and sum(meta["images_per_shard"]) == 20
    assert max(meta["images_per_shard"]) - min(meta["images_per_shard"]) <= 1


def test_read_back_equals_source_images(written):
    ds, out, _ = written
    table = load_tfrecords(str(out / "*.tfrecord"))
    clean, skipped = file_check.validate_files(ds)
    assert len(skipped) == 1
    assert table.class_names == ds.class_names
    np.testing.assert_array_equal(table.labels, clean.labels)
    assert [os.path.join(str(ds.paths[0]).rsplit(os.sep, 2)[0], f) for f in table.filenames] == \
        list(clean.paths)
    for enc, path in zip(table.encoded, clean.paths):
        np.testing.assert_array_equal(decode.decode_image(enc).numpy(),
                                      decode.load_image(path).numpy(), err_msg=path)
    # other ways to name the same shards
    for source in (str(out), sorted(str(p) for p in out.glob("*.tfrecord"))):
        again = load_tfrecords(source)
        np.testing.assert_array_equal(again.labels, table.labels)


@pytest.mark.slow
def test_balanced_from_tfrecords_equals_folder(written):
    ds, out, _ = written
    clean, _ = file_check.validate_files(ds)
    kwargs = dict(identities_per_batch=3, images_per_identity=4, image_size=(16, 12), seed=9,
                  photometric=True)
    from_records = pipeline.iterate_batches(
        pipeline.balanced_dataset(str(out / "train-*.tfrecord"), **kwargs), 4)
    from_folder = pipeline.iterate_batches(pipeline.balanced_dataset(clean, **kwargs), 4)
    for (xr, yr), (xf, yf) in zip(from_records, from_folder):
        assert xr.shape == (12, 16, 12, 3)
        groups = yr.reshape(3, 4)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == 3
        np.testing.assert_array_equal(yr, yf)
        np.testing.assert_array_equal(xr, xf)


def test_reader_errors(written, tmp_path):
    _, out, _ = written
    with pytest.raises(EmptyDatasetError, match="no TFRecord files"):
        load_tfrecords(str(tmp_path / "*.tfrecord"))
    with pytest.raises(FileNotFoundError):
        load_tfrecords(str(tmp_path / "nope.tfrecord"))
    with pytest.raises(ValueError, match="in memory"):
        load_tfrecords(str(out / "*.tfrecord"), max_bytes=100)
    empty = tmp_path / "empty.tfrecord"
    with tf.io.TFRecordWriter(str(empty)):
        pass
    with pytest.raises(EmptyDatasetError, match="no records"):
        load_tfrecords(str(empty))


def test_writer_rejects_bad_arguments(written, tmp_path):
    ds, _, _ = written
    with pytest.raises(ValueError, match="num_shards"):
        write_tfrecords(ds, tmp_path, 0, progress=False)
    only_bad = ds.subset_images([i for i, p in enumerate(ds.paths) if p.endswith("broken.jpg")])
    with pytest.raises(EmptyDatasetError, match="none of the 1 images"):
        write_tfrecords(only_bad, tmp_path / "o", 1, progress=False)


@pytest.mark.slow
def test_cli(folder, tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "data.tfrecords", f"--input_dir={folder}", f"--output_dir={out}",
         "--shards=2", "--min_images_per_identity=3"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["images_written"] == 18 and summary["skipped"] == 1  # 'person 0' has 2 images
    assert summary["identities"] == 4 and summary["shards"] == 2
    table = load_tfrecords(str(out / "*.tfrecord"))
    assert table.class_names == ("person 1", "person 2", "person 3", "person 4")
    assert table.filenames[0].startswith("person 1" + os.sep)


def test_routing_agrees_between_writer_and_pipeline():
    """The writer keeps a file's bytes exactly when the pipeline would decode them with TF."""
    jfif = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08"
    cases = {
        jfif + b"\xff\xdb\x00C" + b"\x01" * 60: "jpeg",
        jfif + b"\xff\xe1\x00\x22Exif\x00\x00MM" + b"\x00" * 40: None,
        b"\xff\xd8\xff\xe1\x00\x22Exif\x00\x00II" + b"\x00" * 40: None,
        b"\xff\xd8\xff\xdb" + b"\x00" * 10: "jpeg",
        b"BM" + b"\x00" * 60: "bmp",
        png + b"\x00" + b"\x00" * 40: "png",
        png + b"\x02" + b"\x00" * 40: "png",
        png + b"\x06" + b"\x00" * 40: None,  # RGBA
        png + b"\x03" + b"\x00" * 40: None,  # palette
        png: None,  # cut short before the colour type
        b"P5\n92 112\n255\n" + b"\x00" * 50: None,
        b"GIF89a" + b"\x00" * 20: None,
        b"": None,
        b"B": None,
        b"hello world": None,
    }
    graph = tf.function(decode._tf_decodable)
    for data, expected in cases.items():
        assert native_format(data) == expected, data[:12]
        for fn in (decode._tf_decodable, graph):
            assert bool(fn(tf.constant(data))) == (expected is not None), data[:12]


def test_reader_cache(written, tmp_path):
    ds, out, _ = written
    first = load_tfrecords(str(out / "*.tfrecord"))
    assert load_tfrecords(str(out)) is first  # same files, unchanged: served from memory
    assert load_tfrecords(str(out), cache=False) is not first
    copy = tmp_path / "copy"
    write_tfrecords(ds.subset([0, 1]), copy, 1, progress=False)
    other = load_tfrecords(str(copy / "*.tfrecord"))
    assert other is not first and len(other) == 8
