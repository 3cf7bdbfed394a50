"""Tests of the procedural synthetic-face dataset (data/synthetic/) and its raw-pixel baseline
(evaluation/pixel_baseline.py). Budget: < 60 s."""
import hashlib
import json
import os

import numpy as np
import pytest

from data import synthetic
from data.pairs import read_pairs
from data.synthetic import (default_heldout_identities, ensure_synthetic_dataset, generate_dataset,
                            identity_name, view2_folds)
from data.synthetic.params import CATEGORICAL, sample_identities, sample_identity
from data.synthetic.render import render_face, render_jpeg, rotation_matrix
from evaluation.pixel_baseline import PIXEL_VARIANTS, _pixel_features, pixel_baseline

SMALL = dict(identities=6, images_per_identity=4, image_size=32, seed=5, heldout_identities=3)


def _tree_digest(root):
    """{relative path: sha1} of every file under root."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def _images(digest):
    return {k: v for k, v in digest.items() if k.endswith(".jpg")}


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """The SMALL dataset generated with 1 and with 2 worker processes."""
    base = tmp_path_factory.mktemp("small")
    one = generate_dataset(str(base / "w1"), workers=1, progress=False, baseline=pixel_baseline, **SMALL)
    two = generate_dataset(str(base / "w2"), workers=2, progress=False, baseline=pixel_baseline, **SMALL)
    return one, two


# --- rendering --------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,difficulty", [(32, 1.0), (64, 1.0), (160, 1.0), (96, 0.0)])
def test_render_face_is_a_sane_uint8_image(size, difficulty):
    p = sample_identity(np.random.default_rng(3))
    img = render_face(p, np.random.default_rng(4), size, difficulty)
    assert img.dtype == np.uint8 and img.shape == (size, size, 3)
    assert img.std() > 10.0  # not constant
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


def test_render_is_deterministic_for_a_seed_and_varies_across_seeds():
    p = sample_identity(np.random.default_rng(0))
    a = render_face(p, np.random.default_rng([1, 2, 3]), 64)
    b = render_face(p, np.random.default_rng([1, 2, 3]), 64)
    c = render_face(p, np.random.default_rng([1, 2, 4]), 64)
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.abs(a.astype(int) - c.astype(int))) > 5.0
    ja, qa = render_jpeg(p, np.random.default_rng(9), 64)
    jb, qb = render_jpeg(p, np.random.default_rng(9), 64)
    assert ja == jb and qa == qb and ja[:2] == b"\xff\xd8"


def test_render_face_rejects_tiny_sizes():
    with pytest.raises(ValueError, match="image_size"):
        render_face(sample_identity(np.random.default_rng(0)), np.random.default_rng(0), 8)


def test_rotation_matrix_matches_explicit_axis_rotations():
    yaw, pitch, roll = 0.3, -0.2, 0.1
    r = rotation_matrix(yaw, pitch, roll)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    # yaw alone turns the nose (+z) towards +x by sin(yaw)
    np.testing.assert_allclose(rotation_matrix(yaw, 0, 0) @ [0, 0, 1], [np.sin(yaw), 0, np.cos(yaw)], atol=1e-12)
    # roll alone turns +x towards +y
    np.testing.assert_allclose(rotation_matrix(0, 0, roll) @ [1, 0, 0], [np.cos(roll), np.sin(roll), 0], atol=1e-12)


def test_identities_are_separated_in_categorical_attributes():
    ids = sample_identities(120, seed=11, min_differences=4)
    codes = [[p[k] for k in CATEGORICAL] for p in ids]
    for i in range(len(codes)):  # brute force over all pairs
        for j in range(i):
            assert sum(a != b for a, b in zip(codes[i], codes[j])) >= 4
    again = sample_identities(30, seed=11, min_differences=4)
    assert again == ids[:30]  # prefix-stable and deterministic


# --- dataset tree, determinism, metadata ------------------------------------------------------------
def test_tree_layout_and_naming(small_pair):
    out, _ = small_pair
    train, test = sorted(os.listdir(out["train_dir"])), sorted(os.listdir(out["test_dir"]))
    assert train == [identity_name(i) for i in range(3)]
    assert test == ["pairs.txt"] + [identity_name(i) for i in range(3, 6)]
    for split, names in ((out["train_dir"], train), (out["test_dir"], test[1:])):
        for name in names:
            files = sorted(os.listdir(os.path.join(split, name)))
            assert files == [f"{name}_{j:04d}.jpg" for j in range(1, 5)]
    meta = json.load(open(os.path.join(out["root"], "synthetic.json")))
    assert meta["complete"] is True and meta["params"]["format_version"] == synthetic.FORMAT_VERSION
    assert meta["params"]["identities"] == 6 and meta["params"]["heldout_identities"] == 3
    assert meta["counts"]["train_images"] == 12 and meta["counts"]["test_images"] == 12
    assert 0.0 <= meta["pixel_baseline_accuracy"] <= 1.0
    assert out["pairs_file"] == os.path.join(out["test_dir"], "pairs.txt")


def test_same_seed_is_byte_identical_whatever_the_worker_count(small_pair, tmp_path):
    one, two = small_pair
    d1, d2 = _images(_tree_digest(one["root"])), _images(_tree_digest(two["root"]))
    assert len(d1) == 24 and d1 == d2
    with open(one["pairs_file"]) as a, open(two["pairs_file"]) as b:
        assert a.read() == b.read()
    other = generate_dataset(str(tmp_path / "s6"), workers=1, progress=False, compute_baseline=False,
                             **dict(SMALL, seed=6))
    d3 = _images(_tree_digest(other["root"]))
    assert d3.keys() == d1.keys()
    assert sum(d3[k] != d1[k] for k in d1) == len(d1)  # every image differs


def test_pairs_file_parses_back_in_view2_format(small_pair):
    out, _ = small_pair
    lines = open(out["pairs_file"]).read().splitlines()
    folds, n = (int(v) for v in lines[0].split("\t"))
    assert folds == 10 and n >= 1 and len(lines) == 1 + folds * 2 * n
    test_names = set(os.listdir(out["test_dir"])) - {"pairs.txt"}
    for f in range(folds):
        block = [line.split("\t") for line in lines[1 + f * 2 * n: 1 + (f + 1) * 2 * n]]
        assert all(len(r) == 3 for r in block[:n]) and all(len(r) == 4 for r in block[n:])
        for r in block[:n]:
            assert r[0] in test_names and r[1] != r[2]
        for r in block[n:]:
            assert r[0] in test_names and r[2] in test_names and r[0] != r[2]
    ps = read_pairs(out["pairs_file"], out["test_dir"], ext="jpg")
    same, fold = ps.issame, ps.folds
    assert same.sum() == (~same).sum() == folds * n and fold.max() == 9
    pairs = list(zip(ps.paths_a, ps.paths_b))
    assert len(set(pairs)) == len(pairs)  # no pair repeats
    for a, b in pairs:
        assert os.path.isfile(a) and os.path.isfile(b)


def test_view2_folds_identity_disjoint_folds_and_limits():
    names = [identity_name(i) for i in range(40)]
    folds = view2_folds(names, 5, seed=1)
    assert len(folds) == 10
    n = len(folds[0][0])
    assert n == min(300, 4 * 10)  # 4 identities per fold, 10 matched pairs each
    per_fold = []
    for matched, mismatched in folds:
        assert len(matched) == len(mismatched) == n
        ids = {m[0] for m in matched} | {m[0] for m in mismatched} | {m[2] for m in mismatched}
        per_fold.append(ids)
    for a in range(10):
        for b in range(a):
            assert not per_fold[a] & per_fold[b]
    with pytest.raises(ValueError):
        view2_folds(names[:1], 5, seed=1)
    # fewer than 20 identities: folds share identities, pairs never repeat
    small = view2_folds(names[:5], 4, seed=2)  # 30 matched pairs exist -> 3 per fold
    flat = [m for f in small for m in f[0]] + [m for f in small for m in f[1]]
    assert len(small[0][0]) == 3 and len(set(flat)) == len(flat)
    # so small that 10 folds cannot be disjoint: unique within each fold, recur across folds
    tiny = view2_folds(names[:2], 2, seed=3)  # one matched pair per identity, two in all
    assert all(len(m) == len(d) == 2 for m, d in tiny)
    assert all(len(set(m)) == len(m) for m, _ in tiny)


def test_cache_is_reused_and_not_rewritten(small_pair):
    out, _ = small_pair
    meta_path = os.path.join(out["root"], "synthetic.json")
    before = os.stat(meta_path).st_mtime_ns, _tree_digest(out["root"])
    again = generate_dataset(out["root"], workers=1, progress=False, **SMALL)
    assert again["cached"] is True and again["pixel_baseline_accuracy"] == out["pixel_baseline_accuracy"]
    assert (os.stat(meta_path).st_mtime_ns, _tree_digest(out["root"])) == before
    with pytest.raises(FileExistsError):  # a different dataset in the same place is never overwritten
        generate_dataset(out["root"], workers=1, progress=False, **dict(SMALL, seed=99))


def test_ensure_synthetic_dataset_regenerates_a_partial_entry(tmp_path):
    cache = tmp_path / "cache"
    args = dict(SMALL, image_size=24)
    key = synthetic.dataset_key(args["identities"], args["images_per_identity"], args["image_size"],
                                args["seed"], args["heldout_identities"])
    partial = cache / key
    (partial / "train" / "synth_00000").mkdir(parents=True)
    (partial / "train" / "synth_00000" / "synth_00000_0001.jpg").write_bytes(b"half")
    (partial / "synthetic.json").write_text('{"complete": false}')
    out = ensure_synthetic_dataset(str(cache), workers=1, progress=False, **args)
    assert out["cached"] is False and out["root"] == str(partial)
    assert os.path.getsize(os.path.join(out["train_dir"], "synth_00000", "synth_00000_0001.jpg")) > 100
    assert ensure_synthetic_dataset(str(cache), workers=1, progress=False, **args)["cached"] is True
    assert [p for p in os.listdir(cache) if ".tmp-" in p] == []


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path):
    def boom(*a, **k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(str(tmp_path / "ds"), workers=1, progress=False, baseline=boom, **SMALL)
    assert os.listdir(tmp_path) == []  # neither the target nor the temp dir remains


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="images_per_identity"):
        generate_dataset(str(tmp_path / "a"), 6, 1, 32, 0)
    with pytest.raises(ValueError, match="heldout_identities"):
        generate_dataset(str(tmp_path / "b"), 6, 3, 32, 0, heldout_identities=6)
    with pytest.raises(ValueError, match="identities"):
        generate_dataset(str(tmp_path / "c"), 2, 3, 32, 0)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        generate_dataset(str(tmp_path / "d"), 6, 3, 32, 0, heldout_identities=3)
    assert default_heldout_identities(1000) == 200 and default_heldout_identities(30) == 15


def test_cli_prints_json_summary(tmp_path, capsys):
    rc = synthetic.main(["--output_dir", str(tmp_path / "cli"), "--synthetic_identities", "5",
                         "--synthetic_images_per_identity", "2", "--image_size", "24", "--seed", "3",
                         "--heldout_identities", "2", "--workers", "1"])
    assert rc == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["counts"]["test_identities"] == 2 and "pixel_baseline_accuracy" in summary
    assert os.path.isfile(summary["pairs_file"])
    assert "deprecated" not in out.err


def test_cli_old_count_flags_still_work_with_a_warning(tmp_path, capsys):
    """--identities / --images_per_identity are the deprecated names (one release)."""
    rc = synthetic.main(["--output_dir", str(tmp_path / "cli"), "--identities", "4",
                         "--images_per_identity=3", "--image_size", "24", "--seed", "3",
                         "--heldout_identities", "2", "--workers", "1"])
    assert rc == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["counts"]["train_identities"] == 2 and summary["counts"]["test_identities"] == 2
    assert "--identities is deprecated" in out.err and "use --synthetic_images_per_identity" in out.err


# --- hard for pixels ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_raw_pixel_baseline_is_at_most_70_percent(tmp_path):
    """30 held-out identities x 10 images, 64 px: threshold verification on raw pixels <= 70%."""
    out = generate_dataset(str(tmp_path / "px"), 32, 10, 64, seed=21, heldout_identities=30,
                           workers=2, progress=False, baseline=pixel_baseline)
    base = out["pixel_baseline"]
    assert set(base) == set(PIXEL_VARIANTS)
    assert out["counts"]["pairs_per_fold"] == 135  # 3 identities x 45 matched pairs per fold
    for variant, acc in base.items():
        assert 0.4 <= acc <= 0.70, (variant, acc)
    # brute-force check of one variant's distance against an explicit loop
    first = read_pairs(out["pairs_file"], out["test_dir"], ext="jpg").pairs[0]
    fa = _pixel_features(first.path_a, "grey_32")
    fb = _pixel_features(first.path_b, "grey_32")
    assert fa.shape == (32 * 32,)
    d = 0.0
    for k in range(fa.size):
        d += (fa[k] - fb[k]) ** 2
    assert np.isclose(d, np.sum((fa - fb) ** 2))


def test_pairs_file_is_read_by_the_project_reader(small_pair):
    out, _ = small_pair
    ps = read_pairs(out["pairs_file"], out["test_dir"])
    rows = open(out["pairs_file"]).read().split("\n")[1:-1]  # the file's own structure
    n = int(open(out["pairs_file"]).readline().split("\t")[1])
    same = np.array([len(r.split("\t")) == 3 for r in rows])
    fold = np.arange(len(rows)) // (2 * n)
    assert ps.num_folds == 10 and ps.missing == []
    np.testing.assert_array_equal(ps.issame, same)
    np.testing.assert_array_equal(ps.folds, fold)
