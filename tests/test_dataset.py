"""data.dataset: scanning folder-per-identity trees, filtering, identity-disjoint splits."""
import logging
import os

import numpy as np
import pytest

from data.dataset import (IMAGE_EXTENSIONS, EmptyDatasetError, IdentityDataset, filter_min_images,
                          scan_identity_folder, split_identities)


def _touch(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def tree(tmp_path):
    """Identities with 3, 1, 2, 0 images; unicode, spaces, hidden and non-image files."""
    root = tmp_path / "root"
    _touch(root / "bob" / "b2.jpg")
    _touch(root / "bob" / "b1.PNG")
    _touch(root / "bob" / "b3.pgm")
    _touch(root / "bob" / "notes.txt")
    _touch(root / "bob" / ".DS_Store")
    _touch(root / "José Álvarez" / "one image.jpeg")
    _touch(root / "Zoë" / "z1.webp")
    _touch(root / "Zoë" / "z0.bmp")
    os.makedirs(root / "empty")
    _touch(root / ".hidden_identity" / "h.jpg")
    _touch(root / "loose_file.jpg")
    return root


def test_scan_sorts_labels_and_filters(tree, caplog):
    with caplog.at_level(logging.INFO, logger="absl"):
        ds = scan_identity_folder(tree)
    assert ds.class_names == ("José Álvarez", "Zoë", "bob")
    assert ds.paths == (
        str(tree / "José Álvarez" / "one image.jpeg"),
        str(tree / "Zoë" / "z0.bmp"), str(tree / "Zoë" / "z1.webp"),
        str(tree / "bob" / "b1.PNG"), str(tree / "bob" / "b2.jpg"), str(tree / "bob" / "b3.pgm"))
    np.testing.assert_array_equal(ds.labels, [0, 1, 1, 2, 2, 2])
    assert ds.labels.dtype == np.int32
    assert len(ds) == 6 and ds.num_classes == 3
    np.testing.assert_array_equal(ds.images_per_class(), [1, 2, 3])
    text = caplog.text
    assert "skipped 1 files with a non-image extension" in text  # notes.txt, counted
    assert "ignored 1 files directly under the root" in text
    assert "dropped 1 identities" in text  # 'empty'
    assert all(".hidden" not in p and "DS_Store" not in p for p in ds.paths)
    assert ds.describe()["identities_with_one_image"] == 1
    # Deterministic: a second scan is identical.
    assert scan_identity_folder(tree) == ds


def test_scan_min_images_and_extensions(tree):
    ds = scan_identity_folder(tree, min_images_per_identity=2)
    assert ds.class_names == ("Zoë", "bob")
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
    only_jpg = scan_identity_folder(tree, extensions=("JPG",))
    assert only_jpg.class_names == ("bob",) and len(only_jpg) == 1
    assert ".pgm" in IMAGE_EXTENSIONS and ".webp" in IMAGE_EXTENSIONS


def test_scan_empty_inputs_raise_clearly(tmp_path):
    with pytest.raises(EmptyDatasetError, match="does not exist"):
        scan_identity_folder(tmp_path / "missing")
    with pytest.raises(EmptyDatasetError, match="no usable images"):
        scan_identity_folder(tmp_path)
    os.makedirs(tmp_path / "a")
    _touch(tmp_path / "a" / "readme.md")
    with pytest.raises(EmptyDatasetError, match="1 non-image files"):
        scan_identity_folder(tmp_path)
    _touch(tmp_path / "a" / "x.jpg")
    with pytest.raises(EmptyDatasetError, match="min_images_per_identity=2"):
        scan_identity_folder(tmp_path, min_images_per_identity=2)
    assert len(scan_identity_folder(tmp_path)) == 1  # a single one-image identity is fine


def _synthetic(counts):
    paths, labels = [], []
    for c, n in enumerate(counts):
        for i in range(n):
            paths.append(f"/d/c{c}/{i}.jpg")
            labels.append(c)
    return IdentityDataset(tuple(paths), np.array(labels), tuple(f"c{c}" for c in range(len(counts))))


def test_dataset_validates_fields():
    with pytest.raises(ValueError, match="paths but"):
        IdentityDataset(("a",), np.array([0, 0]), ("x",))
    with pytest.raises(ValueError, match="labels must lie"):
        IdentityDataset(("a",), np.array([1]), ("x",))
    ds = _synthetic([2])
    with pytest.raises(ValueError):
        ds.labels[0] = 5  # read-only


def test_subset_relabels_in_given_order():
    ds = _synthetic([2, 3, 1])
    sub = ds.subset([2, 0])
    assert sub.class_names == ("c2", "c0")
    assert sub.paths == ("/d/c2/0.jpg", "/d/c0/0.jpg", "/d/c0/1.jpg")
    np.testing.assert_array_equal(sub.labels, [0, 1, 1])
    with pytest.raises(IndexError):
        ds.subset([3])
    with pytest.raises(ValueError):
        ds.subset([1, 1])


def test_filter_min_images():
    ds = _synthetic([5, 1, 3, 2])
    kept = filter_min_images(ds, 3)
    assert kept.class_names == ("c0", "c2")
    np.testing.assert_array_equal(kept.images_per_class(), [5, 3])
    # brute force: every kept path's class had >= 3 images
    counts = {n: sum(1 for p in ds.paths if p.startswith(f"/d/{n}/")) for n in ds.class_names}
    assert all(counts[kept.class_names[lab]] >= 3 for lab in kept.labels)
    with pytest.raises(EmptyDatasetError):
        filter_min_images(ds, 6)


def test_split_identities_disjoint_deterministic():
    ds = _synthetic([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    train, val = split_identities(ds, 0.3, seed=7)
    assert val.num_classes == 3 and train.num_classes == 7
    assert not set(train.class_names) & set(val.class_names)
    assert set(train.class_names) | set(val.class_names) == set(ds.class_names)
    assert sorted(train.paths + val.paths) == sorted(ds.paths)  # no image lost or duplicated
    for part in (train, val):  # every image keeps its identity
        for path, lab in zip(part.paths, part.labels):
            assert path.split("/")[2] == part.class_names[lab]
    train2, val2 = split_identities(ds, 0.3, seed=7)
    assert train2 == train and val2 == val
    splits = {split_identities(ds, 0.3, seed=s)[1].class_names for s in range(8)}
    assert len(splits) > 1  # the seed matters
    _, none = split_identities(ds, 0.0, seed=0)
    assert none.num_classes == 0 and len(none) == 0
    _, tiny = split_identities(ds, 0.01, seed=0)
    assert tiny.num_classes == 1  # at least one identity when a fraction is asked for
    with pytest.raises(ValueError):
        split_identities(ds, 1.0, seed=0)
    with pytest.raises(EmptyDatasetError):
        split_identities(_synthetic([4]), 0.5, seed=0)
