"""data.pairs: LFW View 1 / View 2 pair files."""
import logging
import os

import numpy as np
import pytest

from data.pairs import Pair, read_pairs, write_pairs


def _make_lfw(root, images, ext="jpg"):
    for name, n in images:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / ("%s_%04d.%s" % (name, n, ext))).write_bytes(b"img")


VIEW2 = """2\t2
Abel_Pacheco\t1\t4
Akhmed_Zakayev\t1\t3
Abdel_Madi_Shabneh\t1\tDean_Barker\t1
Abdel_Madi_Shabneh\t1\tGiancarlo_Fisichella\t1
Aaron_Peirsol\t1\t2
Aaron_Peirsol\t3\t4
AJ_Cook\t1\tMarsha_Thomason\t1
Aaron_Sorkin\t2\tFrank_Solich\t5
"""

VIEW1 = """2
Abel_Pacheco 1 4
Aaron_Peirsol 3 4
AJ_Cook 1 Marsha_Thomason 1
Aaron_Sorkin 2 Frank_Solich 5
"""


def _all_images():
    return [("Abel_Pacheco", 1), ("Abel_Pacheco", 4), ("Akhmed_Zakayev", 1), ("Akhmed_Zakayev", 3),
            ("Abdel_Madi_Shabneh", 1), ("Dean_Barker", 1), ("Giancarlo_Fisichella", 1),
            ("Aaron_Peirsol", 1), ("Aaron_Peirsol", 2), ("Aaron_Peirsol", 3), ("Aaron_Peirsol", 4),
            ("AJ_Cook", 1), ("Marsha_Thomason", 1), ("Aaron_Sorkin", 2), ("Frank_Solich", 5)]


def test_view2(tmp_path):
    lfw = tmp_path / "lfw"
    _make_lfw(lfw, _all_images())
    f = tmp_path / "pairs.txt"
    f.write_text(VIEW2)
    ps = read_pairs(f, lfw)
    assert ps.num_folds == 2 and len(ps) == 8 and ps.missing == []
    np.testing.assert_array_equal(ps.issame, [1, 1, 0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(ps.folds, [0, 0, 0, 0, 1, 1, 1, 1])
    assert ps.pairs[0] == Pair(str(lfw / "Abel_Pacheco" / "Abel_Pacheco_0001.jpg"),
                               str(lfw / "Abel_Pacheco" / "Abel_Pacheco_0004.jpg"), True, 0)
    assert ps.pairs[7].path_b == str(lfw / "Frank_Solich" / "Frank_Solich_0005.jpg")
    assert ps.present_mask().all()
    assert len(ps.unique_paths()) == 15
    assert ps.paths_a[2] == str(lfw / "Abdel_Madi_Shabneh" / "Abdel_Madi_Shabneh_0001.jpg")


def test_view1_spaces_and_extension_detection(tmp_path):
    lfw = tmp_path / "lfw"
    _make_lfw(lfw, _all_images(), ext="png")
    f = tmp_path / "pairsDevTest.txt"
    f.write_text(VIEW1)
    ps = read_pairs(f, lfw)
    assert ps.num_folds == 1 and len(ps) == 4 and ps.missing == []
    np.testing.assert_array_equal(ps.issame, [1, 1, 0, 0])
    np.testing.assert_array_equal(ps.folds, [0, 0, 0, 0])
    assert all(p.path_a.endswith(".png") and os.path.isfile(p.path_a) for p in ps.pairs)
    explicit = read_pairs(f, lfw, ext=".png")
    assert explicit.pairs == ps.pairs
    wrong = read_pairs(f, lfw, ext="jpg")
    assert len(wrong.missing) == 8 and not wrong.present_mask().any()


def test_missing_images_reported_not_dropped(tmp_path, caplog):
    lfw = tmp_path / "lfw"
    images = [x for x in _all_images() if x != ("Dean_Barker", 1) and x != ("Aaron_Peirsol", 4)]
    _make_lfw(lfw, images)
    f = tmp_path / "pairs.txt"
    f.write_text(VIEW2)
    with caplog.at_level(logging.WARNING):
        ps = read_pairs(f, lfw)
    assert len(ps) == 8  # nothing silently skipped
    assert ps.missing == sorted([str(lfw / "Aaron_Peirsol" / "Aaron_Peirsol_0004.jpg"),
                                 str(lfw / "Dean_Barker" / "Dean_Barker_0001.jpg")])
    np.testing.assert_array_equal(ps.present_mask(), [1, 1, 0, 1, 1, 0, 1, 1])
    assert "2 referenced images are missing" in caplog.text


@pytest.mark.parametrize("text, match", [
    ("", "empty pairs file"),
    ("2\t1\tx\n", "header must be"),
    ("ten\t1\n", ":1: number of folds must be an integer"),
    ("1\t1\nA\t1\t2\nA\t1\tB\t2\t9\n", ":3: expected 'name n1 n2'"),
    ("1\t1\nA\t1\tx\nA\t1\tB\t2\n", ":2: image number must be an integer"),
    ("1\t1\nA\t1\t-2\nA\t1\tB\t2\n", ":2: image number must be >= 0"),
    ("1\t2\nA\t1\t2\nA\t1\tB\t2\n", "found 2"),
    ("1\t1\nA\t1\tB\t2\nC\t1\tD\t2\n", "fold 1 has 0 matched and 2 mismatched"),
    ("0\t5\n", "announces no pairs"),
])
def test_malformed(tmp_path, text, match):
    f = tmp_path / "pairs.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_pairs(f, tmp_path)


def test_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"person_{i}" for i in range(6)]
    folds, expected = [], []
    for fold in range(3):
        matched = [(names[rng.integers(6)], int(rng.integers(1, 5)), int(rng.integers(1, 5)))
                   for _ in range(4)]
        mismatched = [(names[0], int(rng.integers(1, 5)), names[1 + fold], int(rng.integers(1, 5)))
                      for _ in range(4)]
        folds.append((matched, mismatched))
        expected += [(m[0], m[1], m[0], m[2], True, fold) for m in matched]
        expected += [(m[0], m[1], m[2], m[3], False, fold) for m in mismatched]
    f = tmp_path / "pairs.txt"
    write_pairs(f, folds)
    assert f.read_text().splitlines()[0] == "3\t4"
    ps = read_pairs(f, tmp_path / "lfw", ext="png")
    assert ps.num_folds == 3 and len(ps) == 24
    for pair, (na, a, nb, b, same, fold) in zip(ps.pairs, expected):
        assert pair.path_a == str(tmp_path / "lfw" / na / ("%s_%04d.png" % (na, a)))
        assert pair.path_b == str(tmp_path / "lfw" / nb / ("%s_%04d.png" % (nb, b)))
        assert pair.issame == same and pair.fold == fold
    assert len(ps.missing) == len(set(ps.paths_a + ps.paths_b))


def test_write_rejects_bad_input(tmp_path):
    f = tmp_path / "p.txt"
    with pytest.raises(ValueError, match="no folds"):
        write_pairs(f, [])
    with pytest.raises(ValueError, match="fold 1 has 1 matched"):
        write_pairs(f, [([("a", 1, 2)], [("a", 1, "b", 1)]), ([("a", 1, 2)], [])])
    with pytest.raises(ValueError, match="cannot be written"):
        write_pairs(f, [([("a\tb", 1, 2)], [("a", 1, "b", 1)])])
    assert not f.exists()


def test_a_missing_image_is_counted_once_with_mixed_extensions(tmp_path):
    """The extension search remembers the last one found; a missing image keeps one name."""
    lfw = tmp_path / "lfw"
    _make_lfw(lfw, [("A", 2), ("B", 1)], ext="jpg")
    _make_lfw(lfw, [("C", 1), ("C", 2)], ext="png")
    f = tmp_path / "pairs.txt"
    # A_0001 is missing: first looked up while the last extension found is jpg, then after png.
    f.write_text("1\t2\nA\t1\t2\nC\t1\t2\nA\t1\tB\t1\nC\t1\tA\t1\n")
    ps = read_pairs(f, lfw)
    assert ps.missing == [str(lfw / "A" / "A_0001.jpg")]
    np.testing.assert_array_equal(ps.present_mask(), [0, 1, 0, 0])
