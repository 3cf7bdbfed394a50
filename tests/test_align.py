"""data.detect + data.align: geometry against brute-force references, the CLI's bookkeeping with a
fake detector (fast), and real MTCNN on generated and (when FACENET_SHARED_DATA is set) real photos."""
import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data import align, atomic, detect
from data.atomic import PARTIAL_MARK
from data.detect import Face, crop_face, select_face, similarity_transform


# ----------------------------------------------------------------------------- helpers
class FakeDetector:
    """Finds one face in any image whose top-left 8x8 block is green, none elsewhere."""

    def __init__(self):
        self.calls = 0

    def detect(self, image):
        self.calls += 1
        if np.abs(image[:8, :8].mean(axis=(0, 1)) - (0, 255, 0)).max() > 30:
            return []
        h, w = image.shape[:2]
        lms = np.array([[0.35 * w, 0.4 * h], [0.65 * w, 0.4 * h], [0.5 * w, 0.55 * h],
                        [0.38 * w, 0.75 * h], [0.62 * w, 0.75 * h]], np.float32)
        return [Face(box=(0.2 * w, 0.2 * h, 0.8 * w, 0.9 * h), score=0.99, landmarks=lms)]


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _face_img(h=60, w=50, seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[:8, :8] = (0, 255, 0)
    return a


def _noface_img(h=60, w=50, seed=1):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    a[:8, :8] = (1, 2, 3)
    return a


def _make_tree(root):
    """root/alice: 2 faces + 1 no-face; root/bob: 1 face + bad files; a README (ignored)."""
    _save(root / "alice" / "a1.jpg", _face_img(seed=1))
    _save(root / "alice" / "a1.png", _face_img(seed=2))
    _save(root / "alice" / "a2.png", _face_img(seed=3))
    _save(root / "alice" / "empty_room.png", _noface_img())
    _save(root / "bob" / "b1.bmp", _face_img(seed=4))
    (root / "bob" / "zero.jpg").write_bytes(b"")
    (root / "bob" / "notes.jpg").write_text("not an image")
    (root / "README.txt").write_text("ignored")
    (root / ".hidden").mkdir()
    _save(root / ".hidden" / "h.png", _face_img(seed=5))


# ----------------------------------------------------------------------------- geometry
def test_select_face_matches_brute_force_rule():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = rng.integers(50, 400, 2)
        faces = []
        for _ in range(rng.integers(1, 6)):
            x0, y0 = rng.uniform(0, w - 5), rng.uniform(0, h - 5)
            faces.append(Face(box=(x0, y0, rng.uniform(x0 + 1, w), rng.uniform(y0 + 1, h)),
                              score=0.9))
        best, best_score = None, -math.inf
        for f in faces:  # davidsandberg: area - 2 * squared centre offset
            x0, y0, x1, y1 = f.box
            s = (x1 - x0) * (y1 - y0) - 2 * (((x0 + x1) / 2 - w / 2) ** 2 + ((y0 + y1) / 2 - h / 2) ** 2)
            if s > best_score:
                best, best_score = f, s
        assert select_face(faces, (h, w, 3)) is best
    assert select_face([], (10, 10, 3)) is None


def test_select_face_prefers_central_over_slightly_larger_corner_face():
    centre = Face(box=(80, 80, 120, 120), score=0.9)  # 40x40 at the centre of 200x200
    corner = Face(box=(0, 0, 45, 45), score=0.99)  # larger, far off-centre
    assert select_face([corner, centre], (200, 200, 3)) is centre


def _apply(m, pts):
    return pts @ m[:, :2].T + m[:, 2]


def test_similarity_transform_recovers_known_transform_and_is_least_squares():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, t = 0.4, 1.7, np.array([12.0, -7.0])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = src @ (scale * rot).T + t
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], t, atol=1e-7)
    # Noisy points: no perturbation of (a, b, tx, ty) of M = [[a, -b, tx], [b, a, ty]] does better.
    noisy = dst + rng.normal(0, 2.0, dst.shape)
    m = similarity_transform(src, noisy)
    assert m[0, 0] == pytest.approx(m[1, 1]) and m[0, 1] == pytest.approx(-m[1, 0])
    best = ((_apply(m, src) - noisy) ** 2).sum()
    params = np.array([m[0, 0], m[1, 0], m[0, 2], m[1, 2]])
    for _ in range(200):
        a, b, tx, ty = params + rng.normal(0, 1e-3, 4)
        other = np.array([[a, -b, tx], [b, a, ty]])
        assert ((_apply(other, src) - noisy) ** 2).sum() >= best - 1e-9
    # Reflection is never used: a mirrored point set gives a proper rotation (det > 0).
    assert np.linalg.det(similarity_transform(src, src * [-1, 1])[:, :2]) > 0
    with pytest.raises(ValueError):
        similarity_transform(np.ones((5, 2)), dst)


def test_box_with_margin_and_crop_against_explicit_slices():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    face = Face(box=(10.4, 5.2, 70.9, 60.0), score=1.0)
    x0, y0, x1, y1 = detect.box_with_margin(face, img.shape, 32)
    assert (x0, y0, x1, y1) == (max(math.floor(10.4 - 16), 0), max(math.floor(5.2 - 16), 0),
                                min(math.ceil(70.9 + 16), 120), min(math.ceil(60.0 + 16), 90))
    import cv2

    want = cv2.resize(img[y0:y1, x0:x1], (40, 40), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(crop_face(img, face, 40, 32), want)
    edge = Face(box=(100, 70, 125, 95), score=1.0)  # runs off the image: clipped
    assert detect.box_with_margin(edge, img.shape, 10) == (95, 65, 120, 90)
    assert crop_face(img, edge, 160, 10).shape == (160, 160, 3)
    with pytest.raises(ValueError):
        crop_face(img, face, 40, 32, mode="wrong")


def test_landmark_crop_puts_landmarks_on_the_template():
    """Draw 5 dots where a rotated, scaled face would have them; the warp must move each dot
    onto its template position."""
    size, margin = 112, 16
    template = detect.landmark_template(size, margin)
    angle, scale, t = -0.3, 2.5, np.array([200.0, 150.0])
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    src_pts = (template - size / 2) @ (scale * rot).T + t  # source = similarity of the template
    img = np.zeros((400, 500, 3), np.uint8)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    import cv2

    for (x, y), c in zip(src_pts, colours):
        cv2.circle(img, (int(round(x)), int(round(y))), 6, c, -1)
    face = Face(box=(0, 0, 1, 1), score=1.0, landmarks=src_pts.astype(np.float32))
    out = crop_face(img, face, size, margin, mode="landmarks")
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    for (x, y), c in zip(template, colours):
        mask = np.all(np.abs(out.astype(int) - c) < 60, axis=-1) & (out.sum(-1) > 100)
        ys, xs = np.nonzero(mask)
        assert len(xs) > 3
        assert abs(xs.mean() - x) < 1.5 and abs(ys.mean() - y) < 1.5
    with pytest.raises(ValueError):
        crop_face(img, Face(box=(0, 0, 1, 1), score=1.0), size, margin, mode="landmarks")


def test_landmark_template_geometry():
    t = detect.landmark_template(160, 32)
    # Scaled ArcFace template: 128 px wide face area centred in 160, eyes level, nose centred.
    np.testing.assert_allclose(t, detect.LANDMARK_TEMPLATE_112 * 128 / 112 + 16, rtol=1e-6)
    assert abs(t[2, 0] - 80) < 1.0
    with pytest.raises(ValueError):
        detect.landmark_template(32, 40)


def test_detector_maps_boxes_back_from_resized_and_padded_copies():
    """FaceDetector.detect's bookkeeping, with MTCNN replaced by a stub that reports a face at
    fixed coordinates of whatever copy it is given."""
    seen = []

    def stub_run(work):
        seen.append(work.shape)
        h, w = work.shape[:2]
        return [Face(box=(0.25 * w, 0.25 * h, 0.5 * w, 0.75 * h), score=0.9,
                     landmarks=np.array([[0.3 * w, 0.4 * h]] * 5, np.float32))]

    det = object.__new__(detect.FaceDetector)
    det.detect_max_side, det.detect_min_side, det.retry_with_padding = 400, 100, True
    det._run = stub_run
    img = np.zeros((600, 800, 3), np.uint8)  # downscaled to 300x400 for detection
    (f,) = det.detect(img)
    assert seen[-1][:2] == (300, 400)
    np.testing.assert_allclose(f.box, (200, 150, 400, 450), atol=1e-6)
    np.testing.assert_allclose(f.landmarks[0], (240, 240), atol=1e-4)
    small = np.zeros((50, 80, 3), np.uint8)  # upscaled to 100x160
    (f,) = det.detect(small)
    assert seen[-1][:2] == (100, 160)
    np.testing.assert_allclose(f.box, (20, 12.5, 40, 37.5), atol=1e-6)

    # Retry: nothing on the plain copy, a face on the padded copy -> mapped back, clipped.
    calls = []

    def stub_pad(work):
        calls.append(work.shape)
        if len(calls) == 1:
            return []
        return [Face(box=(10.0, 30.0, 90.0, 110.0), score=0.8, landmarks=None)]

    det._run = stub_pad
    det.detect_min_side = None
    (f,) = det.detect(np.zeros((100, 120, 3), np.uint8))
    kind, fraction = detect.RETRY_PADDINGS[0]
    pad = round(fraction * 100)
    assert calls[1][:2] == (100 + 2 * pad, 120 + 2 * pad)
    np.testing.assert_allclose(f.box, (0.0, 30.0 - pad, 90.0 - pad, 110.0 - pad))


# ----------------------------------------------------------------------------- files, CLI logic
def test_list_jobs_mirrors_tree_and_resolves_collisions(tmp_path):
    raw = tmp_path / "raw"
    _make_tree(raw)
    out = tmp_path / "out"
    jobs, ignored = align.list_jobs(raw, out)
    rels = [j.rel for j in jobs]
    assert rels == sorted(rels)
    assert ".hidden/h.png" not in rels and ignored == ["README.txt"]
    dsts = {j.rel: os.path.relpath(j.dst, out) for j in jobs}
    assert dsts["alice/a1.jpg"] == "alice/a1.png"
    assert dsts["alice/a1.png"] == "alice/a1_png.png"
    assert dsts["bob/b1.bmp"] == "bob/b1.png"
    assert len(set(dsts.values())) == len(dsts)
    # An output folder inside the input folder is not scanned.
    inner = raw / "aligned"
    _save(inner / "x.png", _face_img())
    assert all(not j.rel.startswith("aligned") for j in align.list_jobs(raw, inner)[0])
    with pytest.raises(FileNotFoundError):
        align.list_jobs(tmp_path / "missing", out)


def test_run_alignment_counts_report_and_resume(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _make_tree(raw)
    fake = FakeDetector()
    res = align.run_alignment(raw, out, image_size=32, margin=4, detector=fake, progress=False)
    want = {"processed": 7, "aligned": 4, "no_face": 1, "unreadable": 2, "skipped_existing": 0,
            "error": 0, "ignored_files": 1}
    assert {k: res[k] for k in want} == want
    assert res["unreadable_by_reason"] == {"empty": 1, "not_an_image": 1}
    assert res["processed"] == (res["aligned"] + res["no_face"] + res["unreadable"]
                                + res["error"] + res["skipped_existing"])
    files = sorted(os.path.relpath(os.path.join(r, f), out)
                   for r, _, fs in os.walk(out) for f in fs)
    assert files == sorted(["align_report.tsv", "align_settings.json", "alice/a1.png",
                            "alice/a1_png.png", "alice/a2.png", "bob/b1.png"])
    crop = np.asarray(Image.open(out / "alice" / "a2.png"))
    assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
    with open(out / "align_report.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert {(r["path"], r["reason"]) for r in rows} == {
        ("alice/empty_room.png", "no_face"), ("bob/zero.jpg", "empty"),
        ("bob/notes.jpg", "not_an_image")}
    assert all(r["detail"] for r in rows)

    # Resume: every aligned output is skipped without being read; failures are retried.
    fake2 = FakeDetector()
    mtime = os.path.getmtime(out / "alice" / "a2.png")
    res2 = align.run_alignment(raw, out, image_size=32, margin=4, detector=fake2, progress=False)
    assert res2["skipped_existing"] == 4 and res2["aligned"] == 0
    assert res2["no_face"] == 1 and res2["unreadable"] == 2 and res2["processed"] == 7
    assert fake2.calls == 1  # only the no-face image was detected again
    assert os.path.getmtime(out / "alice" / "a2.png") == mtime


def test_run_alignment_landmarks_mode_and_flat_folder(tmp_path):
    raw, out = tmp_path / "flat", tmp_path / "out"
    _save(raw / "x.png", _face_img(80, 70))
    _save(raw / "y.png", _face_img(90, 60, seed=9))
    res = align.run_alignment(raw, out, image_size=48, margin=8, mode="landmarks",
                              detector=FakeDetector(), progress=False)
    assert res["aligned"] == 2
    assert np.asarray(Image.open(out / "x.png")).shape == (48, 48, 3)
    # The crop is recorded beside the tree (train.py copies it into the export for faces.py).
    assert align.read_crop_settings(out) == {"detector": "mtcnn", "crop_size": 48, "margin": 8.0,
                                             "alignment": "landmarks"}
    assert align.read_crop_settings(raw) is None
    (raw / align.SETTINGS_NAME).write_text("{not json")
    assert align.read_crop_settings(raw) is None
    with pytest.raises(ValueError):
        align.run_alignment(raw, out, mode="bogus", detector=FakeDetector(), progress=False)


def test_unexpected_detector_error_is_counted_not_fatal(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _save(raw / "a.png", _face_img())
    bomb = _face_img(seed=3)
    bomb[:8, :8] = (0, 0, 255)
    _save(raw / "b.png", bomb)

    class Exploding(FakeDetector):
        def detect(self, image):
            if tuple(image[0, 0]) == (0, 0, 255):
                raise RuntimeError("boom")
            return super().detect(image)

    res = align.run_alignment(raw, out, image_size=16, margin=0, detector=Exploding(),
                              progress=False)
    assert res["error"] == 1 and res["aligned"] == 1
    report = (out / "align_report.tsv").read_text()
    assert "b.png\terror\tRuntimeError: boom" in report


def test_write_png_atomically_leaves_nothing_on_failure(tmp_path, monkeypatch):
    img = _face_img()
    target = tmp_path / "d" / "x.png"
    atomic.write_png_atomically(str(target), img)
    np.testing.assert_array_equal(np.asarray(Image.open(target)), img)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(align.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic.write_png_atomically(str(tmp_path / "d" / "y.png"), img)
    assert sorted(os.listdir(tmp_path / "d")) == ["x.png"]  # no y.png, no temp file
    monkeypatch.undo()
    # A temp file from a killed run is cleaned up and never counted as an output.
    stale = tmp_path / "out" / "alice" / f".z.png{PARTIAL_MARK}999"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"\x89PNG partial")
    raw = tmp_path / "raw"
    _save(raw / "alice" / "z.png", _face_img())
    res = align.run_alignment(raw, tmp_path / "out", image_size=16, margin=0,
                              detector=FakeDetector(), progress=False)
    assert res["aligned"] == 1 and not stale.exists()


def test_detect_only_json(tmp_path):
    raw = tmp_path / "raw"
    _make_tree(raw)
    target = tmp_path / "det" / "faces.json"
    res = align.run_alignment(raw, None, detect_only=str(target), detector=FakeDetector(),
                              progress=False)
    assert res["with_face"] == 4 and res["aligned"] == 0
    assert res["no_face"] == 1 and res["unreadable"] == 2 and res["faces"] == 4
    data = json.loads(target.read_text())
    assert data["counts"] == res
    rec = data["images"]["alice/a2.png"]
    assert rec["width"] == 50 and rec["height"] == 60
    (face,) = rec["faces"]
    np.testing.assert_allclose(face["box"], [10, 12, 40, 54], atol=0.01)
    assert set(face["landmarks"]) == set(detect.LANDMARK_NAMES)
    assert data["images"]["bob/zero.jpg"]["reason"] == "empty"
    assert not (tmp_path / "raw" / "align_report.tsv").exists()


def test_reduced_decode_maps_detections_back_to_source_pixels(tmp_path):
    """A photo above max_decode_side is decoded reduced; the JSON still speaks source pixels
    and the box crop uses the same source region."""
    raw = tmp_path / "raw"
    big = _face_img(200, 160)
    big[:40, :40] = (0, 255, 0)  # the fake detector's marker survives 1/4 reduction
    _save(raw / "big.png", big)
    res = align.run_alignment(raw, None, detect_only=str(tmp_path / "d.json"),
                              detector=FakeDetector(), max_decode_side=50, progress=False)
    assert res["faces"] == 1
    rec = json.loads((tmp_path / "d.json").read_text())["images"]["big.png"]
    assert (rec["width"], rec["height"]) == (160, 200)
    np.testing.assert_allclose(rec["faces"][0]["box"], [32, 40, 128, 180], atol=0.6)
    crop, reason = align.align_image(raw / "big.png", image_size=20, margin=0,
                                     detector=FakeDetector(), max_decode_side=50)
    assert reason == "aligned" and crop.shape == (20, 20, 3)


# ----------------------------------------------------------------------------- real MTCNN
@pytest.fixture(scope="module")
def mtcnn_detector():
    return detect.FaceDetector()


@pytest.mark.slow
def test_mtcnn_finds_nothing_in_noise_and_flat_images(mtcnn_detector, tmp_path):
    rng = np.random.default_rng(0)
    assert mtcnn_detector.detect(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) == []
    assert mtcnn_detector.detect(np.full((200, 200, 3), 128, np.uint8)) == []
    assert mtcnn_detector.detect(np.zeros((8, 8, 3), np.uint8)) == []  # below PNet's window
    _save(tmp_path / "noise.png", rng.integers(0, 256, (120, 100, 3), dtype=np.uint8))
    crop, reason = align.align_image(tmp_path / "noise.png", detector=mtcnn_detector)
    assert crop is None and reason == "no_face"


@pytest.mark.slow
def test_graph_mode_matches_eager_mtcnn(mtcnn_detector):
    """The tf.function-wrapped networks give the eager Keras networks' outputs."""
    assert mtcnn_detector.graph_mode
    eager = detect.FaceDetector(graph_mode=False)
    rng = np.random.default_rng(3)
    for stage_g, stage_e, shape in zip(mtcnn_detector._mtcnn.stages, eager._mtcnn.stages,
                                       [(1, 37, 53, 3), (7, 24, 24, 3), (5, 48, 48, 3)]):
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        for a, b in zip(stage_g._model(x), stage_e._model(x)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.shared
def test_graph_mode_matches_eager_on_a_group_photo(shared_data_dir, mtcnn_detector):
    from data.image_io import read_image

    image = read_image(os.path.join(shared_data_dir, "detector_test", "dlib_examples_faces",
                                    "2007_007763.jpg"))
    got = mtcnn_detector.detect(image)
    want = detect.FaceDetector(graph_mode=False).detect(image)
    assert len(got) == len(want) == 7
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.box, w.box, atol=1e-3)
        np.testing.assert_allclose(g.landmarks, w.landmarks, atol=1e-3)
        assert g.score == pytest.approx(w.score, abs=1e-5)


@pytest.mark.slow
def test_cli_subprocess_with_two_workers(tmp_path):
    """The real entry point: spawned workers, JSON line on stdout, report, resumability."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    rng = np.random.default_rng(5)
    for ident in ("p1", "p2"):
        for i in range(2):
            _save(raw / ident / f"{i}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    (raw / "p2" / "bad.jpg").write_text("nope")
    cmd = [sys.executable, "-m", "data.align", "--input_dir", str(raw), "--output_dir", str(out),
           "--image_size", "64", "--margin", "16", "--workers", "2"]  # deprecated names
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["processed"] == 5 and res["no_face"] == 4 and res["unreadable"] == 1
    assert res["unreadable_by_reason"] == {"not_an_image": 1}
    assert "p2/bad.jpg\tnot_an_image" in (out / "align_report.tsv").read_text()
    # the old flag names (--image_size, --margin) still work for one release, with a warning
    assert "--image_size is deprecated" in proc.stderr and "use --crop_margin" in proc.stderr
    settings = json.loads((out / "align_settings.json").read_text())
    assert settings["crop_size"] == 64 and settings["margin"] == 16


# ----------------------------------------------------------------------------- shared real data
def _expected_range(text):
    """Manifest's expected face count -> (at least, at most): '3', '2+', 'many' (~25)."""
    text = text.strip()
    if text == "many":
        return 1, math.inf
    if text.endswith("+"):
        return int(text[:-1]), math.inf
    return int(text), int(text)


@pytest.mark.slow
@pytest.mark.shared
def test_detector_test_photos(shared_data_dir, mtcnn_detector):
    from data.image_io import read_image_downscaled

    root = os.path.join(shared_data_dir, "detector_test")
    with open(os.path.join(root, "manifest.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 50
    tp = fp = fn = 0
    missed, false_on_empty = [], []
    for row in rows:
        low, high = _expected_range(row["expected_human_faces"])
        image, _ = read_image_downscaled(os.path.join(root, row["path"]), 4096)
        n = len(mtcnn_detector.detect(image))
        tp += min(n, high if high != math.inf else n, max(low, n))
        fn += max(0, low - n)
        fp += max(0, n - high) if high != math.inf else 0
        if low >= 1 and n == 0:
            missed.append(row["path"])
        if high == 0 and n > 0:
            false_on_empty.append((row["path"], n))
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    print(f"\ndetector_test: {len(rows)} photos, precision {precision:.3f}, recall {recall:.3f} "
          f"(face counts; tp={tp} fp={fp} fn={fn})")
    assert missed == [], f"no face found on {missed}"
    assert false_on_empty == [], f"faces found on no-face photos: {false_on_empty}"
    assert recall >= 0.95 and precision >= 0.9


@pytest.mark.slow
@pytest.mark.shared
def test_align_real_identities_att_and_yale(shared_data_dir, mtcnn_detector, tmp_path):
    raw = tmp_path / "raw"
    picks = [("att_faces", "s1", 10), ("att_faces", "s2", 10),
             ("CroppedYale", "yaleB01", 12), ("CroppedYale", "yaleB02", 12)]
    for dataset, ident, k in picks:
        folder = os.path.join(shared_data_dir, dataset, ident)
        names = sorted(n for n in os.listdir(folder) if n.endswith(".pgm")
                       and "Ambient" not in n)[:k]
        (raw / ident).mkdir(parents=True)
        for n in names:  # symlinks: the images are read in place, never copied
            os.symlink(os.path.join(folder, n), raw / ident / n)
    out = tmp_path / "aligned"
    res = align.run_alignment(raw, out, image_size=96, margin=16, detector=mtcnn_detector,
                              progress=False)
    print("\natt+yale:", res)
    total = sum(k for *_, k in picks)
    assert res["processed"] == total and res["unreadable"] == 0 and res["error"] == 0
    assert res["aligned"] + res["no_face"] == total
    assert res["aligned"] >= 0.9 * total  # misses: Yale's lit-from-above E+90 (face mostly dark)
    for ident in ("s1", "yaleB01"):
        pngs = os.listdir(out / ident)
        assert len(pngs) >= 8
        crop = np.asarray(Image.open(out / ident / sorted(pngs)[0]))
        assert crop.shape == (96, 96, 3)
        # Grey input stays grey after alignment.
        assert np.abs(crop[..., 0].astype(int) - crop[..., 2]).max() <= 1


@pytest.mark.slow
@pytest.mark.shared
def test_landmark_alignment_on_real_face(shared_data_dir, mtcnn_detector):
    """Aligned by landmarks, the face re-detected in the crop has its landmarks where the
    similarity transform sent the source landmarks (and close to the template)."""
    from data.image_io import read_image

    path = os.path.join(shared_data_dir, "detector_test", "skimage_data", "astronaut.png")
    crop, reason = align.align_image(path, image_size=160, margin=48, mode="landmarks",
                                     detector=mtcnn_detector)
    assert reason == "aligned" and crop.shape == (160, 160, 3)
    image = read_image(path)
    src = select_face(mtcnn_detector.detect(image), image.shape)
    template = detect.landmark_template(160, 48)
    expected = _apply(similarity_transform(src.landmarks, template), src.landmarks)
    face = select_face(mtcnn_detector.detect(crop), crop.shape)
    assert face is not None
    err = np.linalg.norm(face.landmarks - expected, axis=1)
    assert err.max() < 4.0, err  # MTCNN's landmark noise between two views of one face
    # The face's shape differs from the template's only a little (least-squares residual).
    assert np.linalg.norm(expected - template, axis=1).max() < 10.0
