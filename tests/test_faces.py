"""faces.py and photos/: the photo tool (embed, verify, identify, cluster) and its error exits.

* Fast: the command logic with a fake detector (red rectangles are faces) and a fake model (mean
  colours), and the CLI's error exits that happen before TensorFlow starts (fake export folder).
* Slow: a real export: the ``tiny`` model trained here by train.py for 400 steps on synthetic faces
  (32 px, 16 identities; about 30 s on two cores). It separates those identities on new renders,
  which are already face crops, so verify / identify / cluster run with ``--detector=none``.
  Real MTCNN detection is tested on a group photo made of synthetic faces: face counts, boxes,
  --largest, and crops bit-identical to ``data.align``'s training thumbnails.
* Shared (FACENET_SHARED_DATA): identities of ORL and Extended Yale B with a model trained here on
  their other images, and the detector_test photos (several faces per photo).
"""
import csv
import glob
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data import align
from data.detect import Face
from photos import errors
from photos.detection import FaceCropper, expand_inputs

from tests.helpers import REPO, subprocess_env as _env
FACES = os.path.join(REPO, "faces.py")


# ----------------------------------------------------------------------------- helpers
def run_faces(*args, timeout=240, **env):
    """Run faces.py in a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, FACES, *[str(a) for a in args]], cwd=REPO,
                          env=_env(**env), capture_output=True, text=True, timeout=timeout)


def run_json(*args, **env):
    proc = run_faces(*args, "--json", **env)
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def _save(path, array):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path


class RedBoxDetector:
    """A stand-in for MTCNN: every pure-red rectangle is a face (its connected component)."""

    def detect(self, image):
        import cv2

        red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
        mask = red.astype(np.uint8)
        n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        faces = []
        for x, y, w, h, area in stats[1:]:
            if area < 16:
                continue
            lms = np.array([[x + .3 * w, y + .4 * h], [x + .7 * w, y + .4 * h],
                            [x + .5 * w, y + .6 * h], [x + .35 * w, y + .8 * h],
                            [x + .65 * w, y + .8 * h]], np.float32)
            faces.append(Face(box=(float(x), float(y), float(x + w), float(y + h)),
                              score=0.9 + 1e-4 * area / mask.size, landmarks=lms))
        faces.sort(key=lambda f: -f.score)
        return faces


class MeanColourModel:
    """A stand-in for the export: unit vector of the mean colour of each image quadrant."""

    image_size = (16, 16)
    batch_size = 4
    threshold = 0.5
    export_dir = "/fake/export"

    def __init__(self, tag="v1"):
        self.tag = tag
        self.calls = 0

    def embed(self, images):
        self.calls += 1
        x = np.asarray(images, np.float32) - 127.5
        q = [x[:, :8, :8], x[:, :8, 8:], x[:, 8:, :8], x[:, 8:, 8:]]
        e = np.concatenate([a.mean(axis=(1, 2)) for a in q], axis=1)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-6)

    def fingerprint(self):
        return f"mean-colour-{self.tag}"

    def describe(self):
        return {"export_dir": self.export_dir}


def _photo_with_boxes(boxes, shape=(300, 400), seed=0):
    """Grey noise photo with pure-red rectangles (x0, y0, x1, y1) as faces."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 160, (*shape, 3)).astype(np.uint8)
    img[..., 0] = np.minimum(img[..., 0], 150)
    for x0, y0, x1, y1 in boxes:
        img[y0:y1, x0:x1] = (255, 0, 0)
    return img


def _fake_export(root, threshold):
    """A folder that passes the cheap checks made before TensorFlow starts (errors come first)."""
    os.makedirs(os.path.join(root, "assets"), exist_ok=True)
    with open(os.path.join(root, "saved_model.pb"), "wb") as fh:
        fh.write(b"not a real graph")
    with open(os.path.join(root, "assets", "facenet.json"), "w") as fh:
        json.dump({"image_size": [32, 32], "threshold": threshold}, fh)
    return root


# ----------------------------------------------------------------------------- fast: logic
def test_every_face_or_the_largest_cropped_exactly_as_data_align(tmp_path):
    """Boxes in source pixels, crops equal to data.align's, also when the photo is decoded reduced
    (max_decode_side forces a scale of 2: the margin is converted as alignment converts it)."""
    boxes = [(40, 60, 110, 150), (180, 80, 300, 240), (330, 20, 370, 70)]
    path = _save(tmp_path / "group.png", _photo_with_boxes(boxes))
    for max_side in (4096, 200):
        cropper = FaceCropper(RedBoxDetector(), crop_size=48, margin=10, max_decode_side=max_side)
        faces, failure = cropper.extract(path)
        assert failure is None and len(faces) == 3
        got = sorted(tuple(round(v) for v in f.box) for f in faces)
        assert max(abs(a - b) for g, w in zip(got, sorted(boxes)) for a, b in zip(g, w)) <= 2
        assert all(f.num_faces == 3 and f.crop.shape == (48, 48, 3) for f in faces)
        main, failure = cropper.extract(path, largest=True)
        assert failure is None and len(main) == 1
        assert abs(main[0].box[0] - 180) <= 2  # the big central face
        for mode in ("box", "landmarks"):
            cropper.mode = mode
            (face,), _ = cropper.extract(path, largest=True)
            want, reason = align.align_image(path, image_size=48, margin=10, mode=mode,
                                              detector=RedBoxDetector(), max_decode_side=max_side)
            assert reason == "aligned"
            np.testing.assert_array_equal(face.crop, want)


def test_bad_files_are_reported_and_the_rest_go_on(tmp_path):
    from photos.embedding import embed_photos

    good = _save(tmp_path / "good.png", _photo_with_boxes([(20, 20, 90, 100), (200, 40, 260, 120)]))
    empty_room = _save(tmp_path / "room.png", _photo_with_boxes([], seed=3))
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "zero.png").write_bytes(b"")
    files = [good, empty_room, str(tmp_path / "notes.jpg"), str(tmp_path / "zero.png"),
             str(tmp_path / "gone.jpg")]
    model = MeanColourModel()
    res = embed_photos(files, model, FaceCropper(RedBoxDetector(), crop_size=32), progress=False)
    assert [f.file for f in res.faces] == [good, good]
    assert res.embeddings.shape == (2, 12)
    np.testing.assert_allclose(np.linalg.norm(res.embeddings, axis=1), 1.0, atol=1e-5)
    reasons = {os.path.basename(f.file): f.reason for f in res.failures}
    assert reasons == {"room.png": "no_face", "notes.jpg": "not_an_image", "zero.png": "empty",
                       "gone.jpg": "missing"}
    assert {f.exit_code for f in res.failures} == {errors.EXIT_NO_FACE, errors.EXIT_UNREADABLE}
    assert "no face found" in [f for f in res.failures if f.reason == "no_face"][0].message()
    # When nothing at all can be embedded, embed is an error (unreadable beats no face).
    from photos.embed import run_embed

    with pytest.raises(errors.PhotoError) as info:
        run_embed(files[1:], model, FaceCropper(RedBoxDetector()), str(tmp_path / "e.npz"),
                  progress=False)
    assert info.value.exit_code == errors.EXIT_UNREADABLE and not (tmp_path / "e.npz").exists()
    with pytest.raises(errors.PhotoError) as info:
        run_embed([empty_room], model, FaceCropper(RedBoxDetector()), str(tmp_path / "e.npz"),
                  progress=False)
    assert info.value.exit_code == errors.EXIT_NO_FACE


def test_embed_writes_npz_and_json_row_for_row(tmp_path):
    from photos.embed import run_embed

    a = _save(tmp_path / "in" / "a.png",
              _photo_with_boxes([(20, 20, 90, 100), (200, 40, 300, 160)]))
    b = _save(tmp_path / "in" / "sub" / "b.png", _photo_with_boxes([(50, 50, 150, 150)], seed=2))
    (tmp_path / "in" / "README.txt").write_text("ignored")
    files, ignored = expand_inputs([str(tmp_path / "in")])
    assert files == [a, b] and ignored == 1
    out = str(tmp_path / "out" / "emb.npz")
    payload = run_embed(files, MeanColourModel(), FaceCropper(RedBoxDetector(), crop_size=32), out,
                        progress=False)
    assert payload["json"] == str(tmp_path / "out" / "emb.json")
    with np.load(out) as z:
        assert z["embeddings"].shape == (3, 12) and list(z["files"]) == [a, a, b]
        boxes, scores = z["boxes"], z["scores"]
    with open(payload["json"]) as fh:
        doc = json.load(fh)
    assert doc["num_faces"] == 3 and doc["num_photos"] == 2 and doc["failed"] == []
    for row, face in enumerate(doc["faces"]):
        assert face["row"] == row
        np.testing.assert_allclose(face["box"], boxes[row], atol=0.01)
        assert face["score"] == pytest.approx(float(scores[row]), abs=1e-4)
        assert set(face["landmarks"]) == {"left_eye", "right_eye", "nose", "mouth_left",
                                          "mouth_right"}
    payload = run_embed([a, b], MeanColourModel(), FaceCropper(RedBoxDetector()), out,
                        largest=True, progress=False)
    assert payload["num_faces"] == 2 and payload["faces"][0]["box"][0] == pytest.approx(200, abs=1)


def test_rank_people_top_k_and_unknown():
    from photos.gallery import Gallery
    from photos.identify import rank_people

    emb = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    g = Gallery("/g", ["ann", "bob", "cy"], np.array([0, 0, 1, 2]), ["a1", "a2", "b1", "c1"], emb,
                [None] * 4, [], {})
    probes = np.array([[0.8, 0.6, 0.0], [0.0, 0.6, 0.8]], np.float32)
    r = rank_people(g, probes, threshold=0.5, top_k=2)
    assert r[0]["identity"] == "ann" and r[0]["distance"] == pytest.approx(0.0, abs=1e-6)
    assert r[0]["candidates"][0]["nearest_file"] == "a2"
    assert [c["person"] for c in r[0]["candidates"]] == ["ann", "bob"]
    # probe 2: squared distances cy 0.4, bob 0.8, ann 1.28 (nearest of a1, a2).
    assert [c["person"] for c in r[1]["candidates"]] == ["cy", "bob"]
    assert r[1]["candidates"][0]["distance"] == pytest.approx(0.4, abs=1e-6)
    r = rank_people(g, probes[1:], threshold=0.35, top_k=5)[0]
    assert r["identity"] == "unknown" and len(r["candidates"]) == 3  # beyond: still ranked
    assert r["candidates"][2]["distance"] == pytest.approx(1.28, abs=1e-6)
    assert rank_people(g, probes[1:], threshold=0.45)[0]["identity"] == "cy"


def _colour_image(rgb, seed, size=24):
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(rgb)[None, None] + rng.normal(0, 6, (size, size, 3)), 0, 255)
    return img.astype(np.uint8)


def test_gallery_cache_refreshes_changed_new_and_removed_files(tmp_path):
    from photos.gallery import load_gallery

    gal = tmp_path / "gallery"
    for i in range(2):
        _save(gal / "red" / f"r{i}.png", _colour_image((220, 40, 40), i))
        _save(gal / "blue" / f"b{i}.png", _colour_image((40, 40, 220), 10 + i))
    (gal / ".hidden").mkdir()
    cache = str(tmp_path / "cache.npz")
    model, cropper = MeanColourModel(), FaceCropper("none")
    first = load_gallery(str(gal), model, cropper, cache_path=cache, progress=False)
    assert first.people == ["blue", "red"] and len(first.files) == 4
    assert (first.stats["embedded"], first.stats["cached"]) == (4, 0) and os.path.isfile(cache)
    calls = model.calls
    again = load_gallery(str(gal), model, cropper, cache_path=cache, progress=False)
    assert (again.stats["embedded"], again.stats["cached"]) == (0, 4) and model.calls == calls
    np.testing.assert_array_equal(again.embeddings, first.embeddings)

    # r0 becomes a blue picture (same name, new content and mtime), b1 goes, a person arrives.
    _save(gal / "red" / "r0.png", _colour_image((40, 40, 220), 99))
    st = os.stat(gal / "red" / "r0.png")
    os.utime(gal / "red" / "r0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    os.remove(gal / "blue" / "b1.png")
    _save(gal / "green" / "g0.png", _colour_image((40, 220, 40), 7))
    third = load_gallery(str(gal), model, cropper, cache_path=cache, progress=False)
    assert third.stats["embedded"] == 2 and third.stats["cached"] == 2
    assert third.stats["removed"] == 1 and third.people == ["blue", "green", "red"]
    row = third.files.index(str(gal / "red" / "r0.png"))
    blue = third.files.index(str(gal / "blue" / "b0.png"))
    assert np.sum((third.embeddings[row] - third.embeddings[blue]) ** 2) < 0.05
    # Another model (or crop settings) never reuses the cached embeddings.
    other = load_gallery(str(gal), MeanColourModel("v2"), cropper, cache_path=cache, progress=False)
    assert other.stats["embedded"] == 4 and other.stats["cached"] == 0


def test_gallery_without_any_face_is_empty(tmp_path):
    from photos.gallery import load_gallery

    _save(tmp_path / "g" / "ann" / "a.png", _photo_with_boxes([], seed=5))
    with pytest.raises(errors.PhotoError) as info:
        load_gallery(str(tmp_path / "g"), MeanColourModel(), FaceCropper(RedBoxDetector()),
                     use_cache=False, progress=False)
    assert info.value.exit_code == errors.EXIT_EMPTY_GALLERY and "no face" in str(info.value)


def test_identify_and_cluster_with_a_fake_model(tmp_path):
    """The two commands end to end on colour 'people' (fake model): answers, files, text."""
    from photos.cluster import format_cluster, run_cluster
    from photos.gallery import load_gallery
    from photos.identify import format_identify, run_identify

    colours = {"red": (220, 40, 40), "blue": (40, 40, 220), "green": (40, 200, 40)}
    for k, (name, rgb) in enumerate(colours.items()):
        for i in range(3):
            _save(tmp_path / "gallery" / name / f"{i}.png", _colour_image(rgb, 10 * k + i))
    probes = [_save(tmp_path / "probes" / f"{n}.png", _colour_image(rgb, 500 + i))
              for i, (n, rgb) in enumerate(colours.items())]
    probes.append(_save(tmp_path / "probes" / "grey.png", _colour_image((128, 128, 128), 7)))
    model, cropper = MeanColourModel(), FaceCropper("none")
    gallery = load_gallery(str(tmp_path / "gallery"), model, cropper, use_cache=False,
                           progress=False)
    r = run_identify(gallery, probes, model, cropper, threshold=0.5, top_k=2, progress=False)
    assert [f["identity"] for f in r["faces"]] == ["red", "blue", "green", "unknown"]
    text = format_identify(r).splitlines()
    assert text[0].startswith(f"gallery {tmp_path / 'gallery'}: 3 people, 9 faces")
    assert text[1].startswith("red.png: red  (top 2: red 0.0")
    assert text[4].startswith("grey.png: unknown")

    photos = sorted(glob.glob(str(tmp_path / "*" / "*" / "*.png"))) + probes[:3]
    rep = run_cluster(photos, model, cropper, 0.5, str(tmp_path / "out"), progress=False,
                      thumbnail_size=16)
    assert [c["size"] for c in rep["clusters"]] == [4, 4, 4]
    for c in rep["clusters"]:
        assert len({os.path.basename(os.path.dirname(f["file"])) for f in c["faces"]
                    if "gallery" in f["file"]}) == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["cluster_000.png", "cluster_001.png",
                                                    "cluster_002.png", "clusters.json"]
    assert "3 cluster(s) (0 single faces)" in format_cluster(rep)


def test_contact_sheet_grid():
    from photos.cluster import contact_sheet

    tiles = [np.full((10, 10, 3), i * 20, np.uint8) for i in range(5)]
    sheet = contact_sheet(tiles, gap=2)
    assert sheet.shape == (2 * 10 + 3 * 2, 3 * 10 + 4 * 2, 3)  # ceil(sqrt(5)) = 3 columns
    assert (sheet[2:12, 2 + 12:12 + 12] == 20).all() and (sheet[14:24, 2:12] == 60).all()


def test_faces_flag_group_lives_with_the_others():
    """--threshold is defined by the export group too; any order of definition works."""
    from absl import flags as absl_flags

    import flags

    flags.define_faces_flags()
    flags.define_export_flags()
    flags.define_train_flags()
    flags.define_evaluate_flags()
    for name in ("threshold", "gallery", "top_k", "largest", "detector", "clusters_dir",
                 "export_dir", "margin", "crop_margin"):
        assert name in absl_flags.FLAGS


def test_crop_defaults_come_from_the_export_unless_given(tmp_path):
    """faces.py crops as the export's training data was aligned; a flag on the command line wins."""
    from absl import flags as absl_flags
    from absl.testing import flagsaver

    import faces

    assets = tmp_path / "export" / "assets"
    assets.mkdir(parents=True)
    crop = {"detector": "mtcnn", "crop_size": 112, "margin": 16.0, "alignment": "landmarks"}
    (assets / "facenet.json").write_text(json.dumps({"model": "tiny", "crop": crop}))
    bare = tmp_path / "bare" / "assets"
    bare.mkdir(parents=True)
    (bare / "facenet.json").write_text(json.dumps({"model": "tiny"}))
    with flagsaver.flagsaver():
        absl_flags.FLAGS(["faces.py", f"--export_dir={tmp_path / 'export'}"])
        assert faces._crop_options() == {"crop_size": 112, "crop_margin": 16.0,
                                         "alignment": "landmarks"}
    with flagsaver.flagsaver():
        absl_flags.FLAGS(["faces.py", f"--export_dir={tmp_path / 'export'}", "--crop_size=160"])
        assert faces._crop_options()["crop_size"] == 160
        assert faces._crop_options()["alignment"] == "landmarks"
    with flagsaver.flagsaver():
        absl_flags.FLAGS(["faces.py", f"--export_dir={tmp_path / 'bare'}"])
        assert faces._crop_options() == {"crop_size": 160, "crop_margin": 32.0, "alignment": "box"}


# ----------------------------------------------------------------------------- fast: CLI exits
def test_cli_error_exits_before_tensorflow(tmp_path):
    face = _save(tmp_path / "face.png", _colour_image((200, 150, 120), 0, 64))
    (tmp_path / "notes.jpg").write_text("text")
    no_thr = _fake_export(str(tmp_path / "no_threshold"), None)
    with_thr = _fake_export(str(tmp_path / "with_threshold"), 0.8)

    proc = run_faces("verify", face, face, f"--export_dir={no_thr}")
    assert proc.returncode == errors.EXIT_NO_THRESHOLD, proc.stderr
    assert "stores no verification threshold" in proc.stderr and "--threshold" in proc.stderr
    assert "tensorflow" not in proc.stderr.lower()

    proc = run_faces("verify", tmp_path / "notes.jpg", face, f"--export_dir={with_thr}")
    assert proc.returncode == errors.EXIT_UNREADABLE, proc.stderr
    assert "notes.jpg: unreadable (not_an_image)" in proc.stderr
    proc = run_faces("verify", face, tmp_path / "missing.jpg", f"--export_dir={with_thr}")
    assert proc.returncode == errors.EXIT_UNREADABLE and "missing.jpg: no such file" in proc.stderr

    (tmp_path / "gallery" / "ann").mkdir(parents=True)  # a person without photos
    (tmp_path / "gallery" / "ann" / "notes.txt").write_text("x")
    for gallery in (tmp_path / "gallery", tmp_path / "nowhere"):
        proc = run_faces("identify", f"--gallery={gallery}", face, f"--export_dir={with_thr}")
        assert proc.returncode == errors.EXIT_EMPTY_GALLERY, proc.stderr
        assert "empty gallery" in proc.stderr

    proc = run_faces("verify", face, face, f"--export_dir={tmp_path / 'none'}")
    assert proc.returncode == errors.EXIT_BAD_EXPORT and "no such directory" in proc.stderr
    proc = run_faces("verify", face, f"--export_dir={with_thr}")
    assert proc.returncode == errors.EXIT_USAGE and "two photos" in proc.stderr
    proc = run_faces("frobnicate", face, f"--export_dir={with_thr}")
    assert proc.returncode == errors.EXIT_USAGE and "unknown command" in proc.stderr


# ----------------------------------------------------------------------------- slow: a real model
N_TRAIN, K_TRAIN, K_VAL, K_TEST, HELDOUT = 16, 16, 6, 6, 4


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """16 identities: 16 renders to train on, 6 to pick the threshold, 6 never seen (the tests');
    plus 4 identities never trained on (impostors)."""
    from data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic")
    info = generate_dataset(str(root / "all"), identities=N_TRAIN + HELDOUT,
                            images_per_identity=K_TRAIN + K_VAL + K_TEST, image_size=32, seed=5,
                            heldout_identities=HELDOUT, workers=1, difficulty=0.1, progress=False,
                            compute_baseline=False)
    splits = {"train": (0, K_TRAIN), "val": (K_TRAIN, K_TRAIN + K_VAL),
              "test": (K_TRAIN + K_VAL, K_TRAIN + K_VAL + K_TEST)}
    out = {}
    for split, (lo, hi) in splits.items():
        for ident in sorted(os.listdir(info["train_dir"])):
            names = sorted(os.listdir(os.path.join(info["train_dir"], ident)))[lo:hi]
            os.makedirs(root / split / ident)
            for n in names:
                os.symlink(os.path.join(info["train_dir"], ident, n), root / split / ident / n)
        out[split] = str(root / split)
    out["impostors"] = info["test_dir"]
    return out


def _identity_files(folder, identities=None):
    """[(identity, [files])] of a folder-per-identity tree, sorted."""
    names = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    return [(n, sorted(glob.glob(os.path.join(folder, n, "*.jpg"))))
            for n in names[:identities]]


def _copy_tree(pairs, root):
    """Copy files into root/<name>/ ; pairs: [(name, [files])]."""
    for name, files in pairs:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for f in files:
            shutil.copy(f, os.path.join(root, name, os.path.basename(f)))
    return str(root)


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    """train.py: tiny, 32 px, 8 x 4 batches, Adam 3e-3, 400 steps; exported with the threshold
    chosen on the validation renders."""
    model_dir = str(tmp_path_factory.mktemp("run"))
    # The flag defaults, decoding files every step: the pipeline these thresholds were set with.
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--recipe=synthetic", "--model=tiny",
           "--image_size=32", "--cache_images=off",
           f"--data_dir={synthetic['train']}", f"--val_dir={synthetic['val']}",
           f"--model_dir={model_dir}", "--identities_per_batch=8", "--images_per_identity=4",
           "--steps_per_epoch=400", "--max_steps=400", "--optimizer=adam",
           "--learning_rate=0.003", "--projector_images=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(model_dir, "metrics.json")) as fh:
        metrics = json.load(fh)
    return {"model_dir": model_dir, "export": os.path.join(model_dir, "export"),
            "threshold": metrics["threshold"]}


@pytest.fixture(scope="module")
def face_model(trained):
    from photos.model import load_model

    return load_model(trained["export"])


@pytest.fixture(scope="module")
def mtcnn():
    from quiet_tf import import_tensorflow

    import_tensorflow()
    from data.detect import FaceDetector

    return FaceDetector()


@pytest.fixture(scope="module")
def group_photo(tmp_path_factory, mtcnn):
    """A photo of three synthetic people (sizes 120, 200, 120 px; MTCNN finds each one alone),
    and the rectangles they were pasted into."""
    import cv2

    from data.synthetic.params import sample_identities
    from data.synthetic.render import render_face

    sizes, picked = (120, 200, 120), []
    for i, params in enumerate(sample_identities(12, seed=21)):
        img = render_face(params, np.random.default_rng([21, 1, i]), 200, difficulty=0.0)
        if len(mtcnn.detect(img)) == 1:
            picked.append(img)
        if len(picked) == 3:
            break
    assert len(picked) == 3
    canvas = np.full((260, 660, 3), 190, np.uint8)
    rects, x = [], 30
    for img, s in zip(picked, sizes):
        y = (260 - s) // 2
        canvas[y:y + s, x:x + s] = cv2.resize(img, (s, s), interpolation=cv2.INTER_AREA)
        rects.append((x, y, x + s, y + s))
        x += s + 50
    root = tmp_path_factory.mktemp("group")
    return {"path": _save(root / "group.png", canvas), "rects": rects, "root": root}


@pytest.fixture(scope="module")
def cli(trained, synthetic, group_photo, tmp_path_factory):
    """The slow command-line runs, started together (each mostly waits on TensorFlow's start-up).

    Returns {name: {"args", "returncode", "stdout", "stderr", "json" (parsed, or None)} plus the
    folders the runs read and wrote.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("cli")
    export = f"--export_dir={trained['export']}"
    people = _identity_files(synthetic["test"], 10)
    ctx = {"root": root, "cache": root / "cache", "clusters": root / "clusters",
           "npz": root / "emb.npz", "verify_pair": people[0][1][:2]}
    ctx["gallery"] = _copy_tree([(f"person {n[-2:]}", f[:2]) for n, f in people], root / "gallery")
    ctx["probes"] = _copy_tree([(n, f[2:]) for n, f in people], root / "probes")
    ctx["impostors"] = _copy_tree(
        [(n, f[:6]) for n, f in _identity_files(synthetic["impostors"])], root / "impostors")
    photos = root / "photos"  # 8 people in one flat folder, as a camera leaves them
    photos.mkdir()
    for _, files in people[:8]:
        for f in files:
            shutil.copy(f, photos / os.path.basename(f))
    ctx["photos"] = str(photos)
    ctx["clusters"].mkdir()
    (ctx["clusters"] / "cluster_999.png").write_bytes(b"stale")  # from an "earlier run"
    g = group_photo["root"]
    ctx["blank"] = _save(g / "blank.png", np.full((120, 160, 3), 128, np.uint8))
    Image.open(group_photo["path"]).save(g / "full.jpg", quality=90)
    (g / "broken.jpg").write_bytes((g / "full.jpg").read_bytes()[:3000])  # cut short
    fake = _fake_export(str(root / "fake_export"), 0.8)  # never loaded: the photo fails first
    runs = {
        "verify": ["verify", *ctx["verify_pair"], export, "--detector=none"],
        "identify": ["identify", f"--gallery={ctx['gallery']}", ctx["probes"], ctx["impostors"],
                     "--top_k=3", export, "--detector=none", "--json"],
        "cluster": ["cluster", ctx["photos"], f"--clusters_dir={ctx['clusters']}", export,
                    "--detector=none", "--json"],
        "embed": ["embed", group_photo["path"], ctx["blank"], g / "broken.jpg", g / "gone.png",
                  f"--output={ctx['npz']}", export, "--json"],
        "no_face": ["verify", group_photo["path"], ctx["blank"], f"--export_dir={fake}"],
    }

    def run(args):
        proc = run_faces(*args, FACENET_CACHE=ctx["cache"])
        parsed = None
        if "--json" in args and proc.returncode == 0:
            parsed = json.loads(proc.stdout.strip().splitlines()[-1])
        return {"args": args, "returncode": proc.returncode, "stdout": proc.stdout,
                "stderr": proc.stderr, "json": parsed}

    with ThreadPoolExecutor(len(runs)) as pool:
        done = dict(zip(runs, pool.map(run, runs.values())))
    for name, r in done.items():
        expected = errors.EXIT_NO_FACE if name == "no_face" else 0
        assert r["returncode"] == expected, f"{name}: exit {r['returncode']}\n{r['stderr'][-3000:]}"
    return dict(done, **ctx)


@pytest.mark.slow
def test_verify_separates_same_from_different(trained, face_model, synthetic, cli):
    from photos.model import resolve_threshold
    from photos.verify import main_faces, run_verify

    threshold, source = resolve_threshold(face_model)
    assert source == "export" and threshold == pytest.approx(trained["threshold"], rel=1e-6)
    cropper = FaceCropper("none")
    people = _identity_files(synthetic["test"], 8)
    rng = np.random.default_rng(0)
    same, diff = [], []
    for i, (_, files) in enumerate(people):
        for a in range(len(files)):
            for b in range(a + 1, len(files)):
                same.append(run_verify(main_faces(cropper, files[a], files[b]), face_model,
                                       threshold))
                j = (i + 1 + rng.integers(len(people) - 1)) % len(people)
                other = people[j][1][rng.integers(K_TEST)]
                diff.append(run_verify(main_faces(cropper, files[a], other), face_model,
                                       threshold))
    same_ok = np.mean([r["same"] for r in same])
    diff_ok = np.mean([not r["same"] for r in diff])
    print(f"\nverify on unseen renders: {same_ok:.3f} of {len(same)} same pairs accepted, "
          f"{diff_ok:.3f} of {len(diff)} different pairs rejected (threshold {threshold:.3f})")
    assert same_ok >= 0.85 and diff_ok >= 0.85
    assert all(r["same"] == (r["distance"] <= threshold) for r in same + diff)

    # The command line printed the same distance and verdict.
    want = run_verify(main_faces(cropper, *cli["verify_pair"]), face_model, threshold)
    lines = cli["verify"]["stdout"].strip().splitlines()
    assert len(lines) == 3 and lines[0].endswith("(no detection)")
    assert lines[2].startswith("distance ") and " (squared L2) " in lines[2]
    assert float(lines[2].split()[1]) == pytest.approx(want["distance"], abs=2e-4)
    assert f"threshold {threshold:.4f} (stored in the export)" in lines[2]
    assert lines[2].endswith("same person" if want["same"] else "different people")


@pytest.mark.slow
def test_identify_finds_the_right_person(face_model, cli):
    from photos.gallery import load_gallery

    r = cli["identify"]["json"]
    g = r["gallery"]
    assert (g["people"], g["images"], g["embedded"], g["cached"]) == (10, 20, 20, 0)
    assert g["cache"].startswith(str(cli["cache"] / "galleries")) and os.path.isfile(g["cache"])
    threshold = r["threshold"]
    genuine = [f for f in r["faces"] if f["file"].startswith(cli["probes"])]
    fakes = [f for f in r["faces"] if f["file"].startswith(cli["impostors"])]
    assert len(genuine) == 40 and len(fakes) == 24 and r["failed"] == []
    truth = [f"person {os.path.basename(os.path.dirname(f['file']))[-2:]}" for f in genuine]
    top1 = np.mean([f["candidates"][0]["person"] == t for f, t in zip(genuine, truth)])
    top3 = np.mean([t in [c["person"] for c in f["candidates"]] for f, t in zip(genuine, truth)])
    known = np.mean([f["identity"] != "unknown" for f in genuine])
    rejected = np.mean([f["identity"] == "unknown" for f in fakes])
    # Someone who is not in the gallery is farther from it than the people who are.
    farther = np.mean([i["distance"] > p["distance"] for i in fakes for p in genuine])
    print(f"\nidentify: rank-1 {top1:.3f}, rank-3 {top3:.3f}, known {known:.3f} of 40 probes; "
          f"impostor faces: {rejected:.3f} unknown, farther than a probe in {farther:.3f} of pairs")
    assert top1 >= 0.85 and top3 >= 0.95 and known >= 0.9
    assert farther >= 0.75 and rejected > 0
    for f in r["faces"]:
        d = [c["distance"] for c in f["candidates"]]
        assert len(d) == 3 and d == sorted(d) and f["distance"] == d[0]
        assert (f["identity"] == "unknown") == (d[0] > threshold)
        if f["identity"] != "unknown":
            assert f["identity"] == f["candidates"][0]["person"]
    # The cache the command wrote is the one a later run reads: nothing is embedded again.
    again = load_gallery(cli["gallery"], face_model, FaceCropper("none"), cache_path=g["cache"],
                         progress=False)
    assert (again.stats["cached"], again.stats["embedded"]) == (20, 0)


@pytest.mark.slow
def test_cluster_recovers_identities(cli):
    from sklearn.metrics import adjusted_rand_score

    r, out = cli["cluster"]["json"], cli["clusters"]
    assert r["num_faces"] == 48 and r["failed"] == []
    files = [f["file"] for c in r["clusters"] for f in c["faces"]]
    pred = [c["id"] for c in r["clusters"] for _ in c["faces"]]
    truth = [os.path.basename(f).rsplit("_", 1)[0] for f in files]
    ari = adjusted_rand_score(truth, pred)
    print(f"\ncluster: {r['num_clusters']} clusters for 8 identities, ARI {ari:.3f}")
    assert ari >= 0.75 and 6 <= r["num_clusters"] <= 12
    names = os.listdir(cli["photos"])
    assert sorted(files) == sorted(os.path.join(cli["photos"], n) for n in names)
    sizes = [c["size"] for c in r["clusters"]]
    assert sizes == sorted(sizes, reverse=True)
    with open(out / "clusters.json") as fh:
        assert json.load(fh)["clusters"] == r["clusters"]
    sheets = sorted(p.name for p in out.glob("cluster_*.png"))
    assert sheets == sorted(c["sheet"] for c in r["clusters"])  # the stale sheet is gone
    for c in r["clusters"]:
        w, h = Image.open(out / c["sheet"]).size
        cols = min(10, math.ceil(math.sqrt(c["size"])))
        rows = math.ceil(c["size"] / cols)
        assert (w, h) == (cols * 96 + (cols + 1) * 4, rows * 96 + (rows + 1) * 4)


@pytest.mark.slow
def test_embed_cli_detects_every_face_and_reports_bad_files(cli, group_photo):
    r, stderr = cli["embed"]["json"], cli["embed"]["stderr"]
    assert r["num_faces"] == 3 and r["num_photos"] == 4 and r["num_photos_with_faces"] == 1
    assert {os.path.basename(f["file"]): f["reason"] for f in r["failed"]} == {
        "blank.png": "no_face", "broken.jpg": "truncated", "gone.png": "missing"}
    for name in ("blank.png: no face found", "broken.jpg: unreadable", "gone.png: no such file"):
        assert name in stderr
    rects, hit = group_photo["rects"], []
    for f in r["faces"]:
        x0, y0, x1, y1 = f["box"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        inside = [i for i, (a, b, c, d) in enumerate(rects) if a < cx < c and b < cy < d]
        assert len(inside) == 1 and f["score"] > 0.8 and f["num_faces"] == 3
        assert (x1 - x0) > 0.3 * (rects[inside[0]][2] - rects[inside[0]][0])
        hit += inside
    assert sorted(hit) == [0, 1, 2]
    with np.load(cli["npz"]) as z:
        emb = z["embeddings"]
        assert emb.shape == (3, 128) and list(z["face"]) == [f["face"] for f in r["faces"]]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    assert os.path.isfile(cli["root"] / "emb.json")


@pytest.mark.slow
def test_no_face_exit(cli):
    assert cli["no_face"]["returncode"] == errors.EXIT_NO_FACE
    assert "blank.png: no face found" in cli["no_face"]["stderr"]


@pytest.mark.slow
def test_real_detection_crops_are_the_training_crops(group_photo, mtcnn):
    """--largest keeps data.align's face, and the crop is bit-identical to its aligned image."""
    from data.detect import crop_face

    path = group_photo["path"]
    for mode, margin in (("box", 32), ("landmarks", 24)):
        cropper = FaceCropper(mtcnn, crop_size=160, margin=margin, mode=mode)
        (main,), failure = cropper.extract(path, largest=True)
        assert failure is None
        want, reason = align.align_image(path, image_size=160, margin=margin, mode=mode,
                                          detector=mtcnn)
        assert reason == "aligned"
        np.testing.assert_array_equal(main.crop, want)
        x0, _, x1, _ = group_photo["rects"][1]
        assert x0 < (main.box[0] + main.box[2]) / 2 < x1  # the big one in the middle
    faces, _ = FaceCropper(mtcnn).extract(path)
    image = np.asarray(Image.open(path).convert("RGB"))
    raw = mtcnn.detect(image)
    assert len(faces) == len(raw) == 3
    for f, face in zip(faces, raw):
        np.testing.assert_array_equal(f.crop, crop_face(image, face, 160, 32))


@pytest.mark.slow
def test_export_without_threshold(trained, tmp_path, synthetic):
    """export.py's own writer with threshold=None: exit 5 unless --threshold is given; without
    facenet.json the threshold comes from the SavedModel's variable."""
    from training.export import export_saved_model, restore_backbone
    from photos.model import load_model, resolve_threshold

    backbone, config, _ = restore_backbone(trained["model_dir"])
    bare = export_saved_model(backbone, str(tmp_path / "bare"), config.image_size,
                              {"model": "tiny"}, threshold=None)
    (_, files), = _identity_files(synthetic["test"], 1)
    proc = run_faces("verify", files[0], files[1], f"--export_dir={bare}", "--detector=none")
    assert proc.returncode == errors.EXIT_NO_THRESHOLD and "--threshold" in proc.stderr
    model = load_model(bare)
    assert model.threshold is None
    with pytest.raises(errors.PhotoError) as info:
        resolve_threshold(model)
    assert info.value.exit_code == errors.EXIT_NO_THRESHOLD
    assert resolve_threshold(model, 0.7) == (0.7, "--threshold")

    no_json = str(tmp_path / "no_json")
    shutil.copytree(trained["export"], no_json)
    os.remove(os.path.join(no_json, "assets", "facenet.json"))
    assert load_model(no_json).threshold == pytest.approx(trained["threshold"], rel=1e-6)


# ----------------------------------------------------------------------------- shared real data
def _pgm_subjects(root, prefix, names_filter=None):
    out = []
    for ident in sorted(os.listdir(root)):
        folder = os.path.join(root, ident)
        if not (ident.startswith(prefix) and os.path.isdir(folder)):
            continue
        names = sorted(n for n in os.listdir(folder) if n.endswith(".pgm"))
        if names_filter:
            names = [n for n in names if names_filter(n)]
        out.append((ident, [os.path.join(folder, n) for n in names]))
    return out


def _yale_moderate(name):
    """Extended Yale B images lit from within 25 degrees azimuth and elevation of the camera."""
    if "Ambient" in name:
        return False
    a, e = name.split("A")[1].split("E")
    return abs(int(a)) <= 25 and abs(int(e.split(".")[0])) <= 25


@pytest.fixture(scope="module")
def real_faces(tmp_path_factory):
    """ORL (40 subjects) and Extended Yale B (38 subjects, moderate light): the first photos of
    each person train a tiny model; the others are new photos of known people."""
    shared = os.environ.get("FACENET_SHARED_DATA")
    if not shared or not os.path.isdir(os.path.join(shared, "att_faces")):
        pytest.skip("FACENET_SHARED_DATA is not set")
    orl = _pgm_subjects(os.path.join(shared, "att_faces"), "s")
    yale = _pgm_subjects(os.path.join(shared, "CroppedYale"), "yaleB", _yale_moderate)
    root = tmp_path_factory.mktemp("real")
    held = {}
    for ident, files in orl + yale:
        k = 6 if ident.startswith("s") else len(files) - 4
        os.makedirs(root / "train" / ident)
        for f in files[:k]:
            os.symlink(f, root / "train" / ident / os.path.basename(f))
        held[ident] = files[k:]
    val = root / "val"
    for ident, files in list(held.items()):
        os.makedirs(val / ident)
        os.symlink(files[0], val / ident / os.path.basename(files[0]))
        os.symlink(files[1], val / ident / os.path.basename(files[1]))
    model_dir = str(root / "run")
    # The flag defaults, decoding files every step: the pipeline these thresholds were set with.
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--recipe=synthetic", "--model=tiny",
           "--image_size=32", "--cache_images=off",
           f"--data_dir={root / 'train'}", f"--val_dir={val}", f"--model_dir={model_dir}",
           "--identities_per_batch=8", "--images_per_identity=4", "--steps_per_epoch=400",
           "--max_steps=400", "--optimizer=adam", "--learning_rate=0.003", "--projector_images=0"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"export": os.path.join(model_dir, "export"), "held": held, "root": root,
            "orl": [i for i, _ in orl], "yale": [i for i, _ in yale]}


@pytest.mark.slow
@pytest.mark.shared
def test_identify_and_cluster_orl_and_yale_people(real_faces, tmp_path):
    """New photos of known people (already cropped: --detector=none, as evaluate.py treats
    aligned sets): identify by a one-photo-per-person gallery, cluster ORL's."""
    from sklearn.metrics import adjusted_rand_score

    from photos.identify import run_identify
    from photos.gallery import load_gallery
    from photos.model import load_model
    from photos.cluster import run_cluster

    model = load_model(real_faces["export"])
    cropper = FaceCropper("none")
    held = real_faces["held"]
    gallery_dir = _copy_tree([(i, held[i][:1]) for i in held], tmp_path / "gallery")
    gallery = load_gallery(gallery_dir, model, cropper, use_cache=False, progress=False)
    for name in ("orl", "yale"):
        probes = [f for i in real_faces[name] for f in held[i][2:]]
        r = run_identify(gallery, probes, model, cropper, model.threshold, top_k=5, progress=False)
        truth = [os.path.basename(os.path.dirname(f)) for f in probes]
        top1 = np.mean([f["candidates"][0]["person"] == t for f, t in zip(r["faces"], truth)])
        print(f"\n{name}: rank-1 {top1:.3f} over {len(probes)} new photos, "
              f"{len(gallery.people)} people in the gallery")
        assert top1 >= 0.7, name
    orl = [f for i in real_faces["orl"][:10] for f in held[i]]
    rep = run_cluster(orl, model, cropper, model.threshold, str(tmp_path / "clusters"),
                      progress=False)
    pred = [c["id"] for c in rep["clusters"] for _ in c["faces"]]
    truth = [os.path.basename(os.path.dirname(f["file"])) for c in rep["clusters"]
             for f in c["faces"]]
    ari = adjusted_rand_score(truth, pred)
    print(f"orl cluster: {rep['num_clusters']} clusters for 10 people, ARI {ari:.3f}")
    assert ari >= 0.5


@pytest.mark.slow
@pytest.mark.shared
def test_real_photos_faces_and_crops(shared_data_dir, mtcnn):
    """detector_test through the embed pipeline: every face photo gives faces, group photos
    several, no-face photos are reported as such (and the run goes on); ORL/Yale raw photos give
    crops identical to data.align's."""
    from photos.embedding import embed_photos

    root = os.path.join(shared_data_dir, "detector_test")
    with open(os.path.join(root, "manifest.csv")) as fh:
        rows = list(csv.DictReader(fh))
    files = [os.path.join(root, r["path"]) for r in rows]
    res = embed_photos(files, MeanColourModel(), FaceCropper(mtcnn), progress=False)
    counts = {f: 0 for f in files}
    for face in res.faces:
        counts[face.file] += 1
    failed = {f.file: f.reason for f in res.failures}
    missed, false_faces, groups = [], [], []
    for r, f in zip(rows, files):
        want = r["expected_human_faces"]
        if want == "0":
            if counts[f]:
                false_faces.append(r["path"])
            else:
                assert failed[f] == "no_face"
        elif counts[f] == 0:
            missed.append(r["path"])
        if want.rstrip("+").isdigit() and int(want.rstrip("+")) >= 2:
            groups.append((r["path"], int(want.rstrip("+")), counts[f]))
    print(f"\ndetector_test: {len(res.faces)} faces from {len(files)} photos; groups {groups}")
    assert missed == [] and false_faces == []
    assert all(n >= 2 for _, _, n in groups)
    assert sum(n for _, _, n in groups) >= 0.9 * sum(w for _, w, _ in groups)
    # One photo at four resolutions: the main face's box scales with the photo.
    obama = {r: next(f for f in res.faces if f.file.endswith(f"obama-{r}.jpg") and f.face == 0)
             for r in ("240p", "480p", "720p", "1080p")}
    widths = {r: (f.box[2] - f.box[0]) / int(r[:-1]) for r, f in obama.items()}
    assert max(widths.values()) / min(widths.values()) < 1.25, widths  # MTCNN box jitter

    shared = shared_data_dir
    for path in (os.path.join(shared, "att_faces", "s1", "1.pgm"),
                 os.path.join(shared, "CroppedYale", "yaleB01", "yaleB01_P00A+000E+00.pgm")):
        (face,), failure = FaceCropper(mtcnn).extract(path, largest=True)
        want, reason = align.align_image(path, detector=mtcnn)
        assert failure is None and reason == "aligned"
        np.testing.assert_array_equal(face.crop, want)
