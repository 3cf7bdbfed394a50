"""Issue #17, part 3: faces.py identify keeps its gallery cache across a compatible model upgrade.

Every export records an identity in assets/facenet.json (training/export.py ``export_metadata``):
``export_id`` (new for each export) and ``embedding_space`` (its own id, or for a model trained
compatible with an old export, the old export's space, with ``compatible_with`` naming the old
export). photos/gallery.py keys the cache by that space, so a gallery embedded by the old export is
reused by a compatible new one; an export of another space, or an old export without an identity
(keyed by its files as before), rebuilds it.

* Fast: the real :class:`photos.model.FaceModel` over fake export folders (a facenet.json written
  by ``export_metadata``, dummy graph files) and a fake embedder (mean colour per quadrant; the
  "compatible" model adds a small perturbation, the incompatible one swaps colour channels, so
  mixing its probes with the old gallery would name the wrong people).
* Slow: two real tiny SavedModels and faces.py identify end to end.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, subprocess_env

COLOURS = {"red": (220, 40, 40), "blue": (40, 40, 220), "green": (40, 200, 40)}


# ----------------------------------------------------------------------------- helpers
def _config(embedding_size=12):
    from training.run_config import RunConfig

    return RunConfig(model="tiny", image_size=(16, 16), embedding_size=embedding_size,
                     normalization="batch")


def _colour_image(rgb, seed, size=24):
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(rgb)[None, None] + rng.normal(0, 6, (size, size, 3)), 0, 255)
    return img.astype(np.uint8)


def _save(path, array):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(str(path))
    return str(path)


def _gallery(root, per_person=2):
    for k, (name, rgb) in enumerate(COLOURS.items()):
        for i in range(per_person):
            _save(root / name / f"{i}.png", _colour_image(rgb, 10 * k + i))
    return str(root)


def _probes(root):
    return [_save(root / f"{name}.png", _colour_image(rgb, 500 + k))
            for k, (name, rgb) in enumerate(COLOURS.items())]


def _mean_colour(images, channels=(0, 1, 2), jitter=0.0):
    """Unit vector of the mean colour of each image quadrant, [N, 12] (the fake backbone)."""
    x = np.asarray(images, np.float32)[..., list(channels)] - 127.5
    h, w = x.shape[1] // 2, x.shape[2] // 2
    q = [x[:, :h, :w], x[:, :h, w:], x[:, h:, :w], x[:, h:, w:]]
    e = np.concatenate([a.mean(axis=(1, 2)) for a in q], axis=1)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-6)
    e = e + jitter * np.cos(np.arange(e.shape[1]))[None]  # a near-identical, compatible model
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)


class _Counting:
    """The embedding function of a fake export, counting the images it embeds."""

    def __init__(self, **kwargs):
        self.kwargs, self.images = kwargs, 0

    def __call__(self, batch):
        self.images += len(batch)
        return _mean_colour(batch, **self.kwargs)


def _fake_export(root, meta):
    """An export folder as FaceModel.fingerprint sees it, with ``meta`` as facenet.json."""
    os.makedirs(os.path.join(root, "assets"), exist_ok=True)
    os.makedirs(os.path.join(root, "variables"), exist_ok=True)
    for name in ("saved_model.pb", os.path.join("variables", "variables.index")):
        with open(os.path.join(root, name), "wb") as fh:
            fh.write(os.urandom(64))
    with open(os.path.join(root, "assets", "facenet.json"), "w", encoding="utf-8") as fh:
        json.dump(dict(meta, image_size=[16, 16], threshold=0.5), fh)
    return str(root)


def _face_model(export_dir, **kwargs):
    """photos.model.FaceModel of a fake export: its facenet.json, a mean-colour embedder."""
    from evaluation.embedder import Embedder
    from photos.model import FaceModel, read_metadata

    fn = _Counting(**kwargs)
    model = FaceModel(export_dir, Embedder(fn, (16, 16), 12, read_metadata(export_dir), 8), 0.5)
    model.fn = fn
    return model


def _identify(gallery, probes, model):
    from photos.detection import FaceCropper
    from photos.identify import run_identify

    r = run_identify(gallery, probes, model, FaceCropper("none"), threshold=0.5, top_k=2,
                     progress=False)
    return [f["identity"] for f in r["faces"]], r


def _load(gal, model, **kwargs):
    from photos.detection import FaceCropper
    from photos.gallery import load_gallery

    return load_gallery(gal, model, FaceCropper("none"), progress=False, **kwargs)


def _cache_meta(path):
    with np.load(path) as z:
        return json.loads(str(z["meta"]))


@pytest.fixture
def exports(tmp_path):
    """OLD, NEW (trained compatible with OLD) and OTHER (an unrelated export) folders."""
    from training.export import export_metadata, read_export_metadata

    old = _fake_export(tmp_path / "old", export_metadata(_config(), step=100))
    new = _fake_export(tmp_path / "new", export_metadata(_config(), step=200, compatible_with=old))
    other = _fake_export(tmp_path / "other", export_metadata(_config(), step=300))
    return {name: (path, read_export_metadata(path))
            for name, path in (("old", old), ("new", new), ("other", other))}


# ----------------------------------------------------------------------------- metadata
def test_every_export_gets_its_own_id_and_space():
    from training.export import export_metadata

    config = _config()
    # the calls of trainer.export and export.py, unchanged
    a = export_metadata(config, step=7, data="synthetic", crop=None)
    b = export_metadata(config, checkpoint="ckpt-7", crop={"mode": "box"})
    assert a["step"] == 7 and b["checkpoint"] == "ckpt-7" and b["crop"] == {"mode": "box"}
    assert a["model"] == "tiny" and a["embedding_size"] == 12
    ids = {export_metadata(config)["export_id"] for _ in range(20)} | {a["export_id"],
                                                                       b["export_id"]}
    assert len(ids) == 22 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert a["embedding_space"] == a["export_id"] and "compatible_with" not in a
    # the identity is the export's own: extra keys cannot set it
    c = export_metadata(config, export_id="copied", embedding_space="copied")
    assert c["export_id"] != "copied" and c["embedding_space"] == c["export_id"]
    json.dumps(a)


def test_a_compatible_export_lives_in_the_old_space(tmp_path, caplog):
    from training.export import compatibility_record, export_metadata, read_export_metadata

    config = _config()
    old_dir = _fake_export(tmp_path / "old", export_metadata(config))
    old = read_export_metadata(old_dir)
    new = export_metadata(config, compatible_with=old_dir)
    assert new["export_id"] != old["export_id"]
    assert new["embedding_space"] == old["embedding_space"] == old["export_id"]
    assert new["compatible_with"] == {"export_id": old["export_id"],
                                      "embedding_space": old["embedding_space"],
                                      "export_dir": os.path.abspath(old_dir), "model": "tiny"}
    # the metadata as read (plus its folder), or the record itself (a re-export of the run)
    assert export_metadata(config, compatible_with=dict(old, export_dir=old_dir))[
        "compatible_with"] == new["compatible_with"]
    again = export_metadata(config, compatible_with=new["compatible_with"])
    assert again["compatible_with"] == new["compatible_with"]
    assert again["export_id"] not in (new["export_id"], old["export_id"])
    # a chain of upgrades stays in the first space, and names the export it was trained against
    new_dir = _fake_export(tmp_path / "new", new)
    newer = export_metadata(config, compatible_with=new_dir)
    assert newer["embedding_space"] == old["export_id"]
    assert newer["compatible_with"]["export_id"] == new["export_id"]
    # training/compatible.py old_identity of a model_dir: the ids are those of model_dir/export
    run = tmp_path / "run"
    os.makedirs(run)
    os.rename(old_dir, run / "export")
    ident = {"path": str(run), "kind": "model_dir", "model": "tiny",
             "export_id": old["export_id"], "embedding_space": old["embedding_space"]}
    record = compatibility_record(ident)
    assert record["export_dir"] == str(run / "export") and record["export_id"] == old["export_id"]
    assert (record["path"], record["kind"]) == (str(run), "model_dir")
    assert compatibility_record(str(run))["export_id"] == old["export_id"]
    # other embedding sizes are never compatible
    with pytest.raises(ValueError, match="dimensions"):
        export_metadata(_config(embedding_size=16), compatible_with=str(run / "export"))
    # an old export without an identity: compatible, but in a space of its own (warned)
    legacy = _fake_export(tmp_path / "legacy", {"model": "tiny", "embedding_size": 12})
    meta = export_metadata(config, compatible_with=legacy)
    assert meta["embedding_space"] == meta["export_id"]
    assert meta["compatible_with"] == {"export_id": None, "embedding_space": None,
                                       "export_dir": os.path.abspath(legacy), "model": "tiny"}
    assert any("records no export_id" in r.getMessage() for r in caplog.records)


def test_face_model_identity(exports):
    old_dir, old = exports["old"]
    new_dir, new = exports["new"]
    m_old, m_new = _face_model(old_dir), _face_model(new_dir)
    assert (m_old.export_id(), m_old.embedding_space()) == (old["export_id"], old["export_id"])
    assert (m_new.export_id(), m_new.embedding_space()) == (new["export_id"], old["export_id"])
    d = m_new.describe()
    assert d["export_id"] == new["export_id"] and d["embedding_space"] == old["export_id"]
    assert d["compatible_with"]["export_id"] == old["export_id"]


# ----------------------------------------------------------------------------- gallery cache
def test_compatible_export_reuses_the_old_gallery(tmp_path, exports, monkeypatch):
    monkeypatch.setenv("FACENET_CACHE", str(tmp_path / "cache"))
    gal, probes = _gallery(tmp_path / "gallery"), _probes(tmp_path / "probes")
    (old_dir, old), (new_dir, new) = exports["old"], exports["new"]
    m_old = _face_model(old_dir)
    first = _load(gal, m_old)
    assert (first.stats["embedded"], first.stats["cached"]) == (6, 0)
    assert first.stats["compatible_cache_from"] == []
    assert first.stats["export_id"] == old["export_id"]
    assert set(first.embedded_by) == {old["export_id"]}
    assert {e["export_id"] for e in _cache_meta(first.cache_path)["entries"]} == {old["export_id"]}

    m_new = _face_model(new_dir, jitter=0.02)
    up = _load(gal, m_new)
    assert (up.stats["embedded"], up.stats["cached"]) == (0, 6) and m_new.fn.images == 0
    assert up.cache_path == first.cache_path
    assert up.stats["compatible_cache_from"] == [old["export_id"]]
    assert up.stats["embedding_space"] == old["export_id"]
    np.testing.assert_array_equal(up.embeddings, first.embeddings)
    names, report = _identify(up, probes, m_new)  # probes embedded by NEW, gallery by OLD
    assert names == ["red", "blue", "green"] and m_new.fn.images == 3
    assert report["gallery"]["compatible_cache_from"] == [old["export_id"]]

    # a new photo: only it is embedded, by NEW, into the same cache
    _save(tmp_path / "gallery" / "green" / "9.png", _colour_image(COLOURS["green"], 99))
    more = _load(gal, m_new)
    assert (more.stats["embedded"], more.stats["cached"]) == (1, 6) and m_new.fn.images == 4
    assert more.cache_path == first.cache_path
    row = more.files.index(str(tmp_path / "gallery" / "green" / "9.png"))
    assert more.embedded_by[row] == new["export_id"]
    assert more.embedded_by.count(old["export_id"]) == 6
    assert more.stats["compatible_cache_from"] == [old["export_id"]]
    meta = _cache_meta(more.cache_path)
    assert meta["export_id"] == new["export_id"] and meta["embedding_space"] == old["export_id"]
    # the old export still reads the cache, and finds the photo NEW added
    back = _load(gal, m_old)
    assert (back.stats["embedded"], back.stats["cached"]) == (0, 7)
    assert back.stats["compatible_cache_from"] == [new["export_id"]]


def test_incompatible_export_rebuilds_the_gallery(tmp_path, exports, monkeypatch):
    monkeypatch.setenv("FACENET_CACHE", str(tmp_path / "cache"))
    gal, probes = _gallery(tmp_path / "gallery"), _probes(tmp_path / "probes")
    first = _load(gal, _face_model(exports["old"][0]))
    # another space (channels swapped: the old gallery would make it name the wrong people)
    m_other = _face_model(exports["other"][0], channels=(2, 1, 0))
    other = _load(gal, m_other)
    assert (other.stats["embedded"], other.stats["cached"]) == (6, 0) and m_other.fn.images == 6
    assert other.cache_path != first.cache_path and other.stats["compatible_cache_from"] == []
    assert _identify(other, probes, m_other)[0] == ["red", "blue", "green"]
    # even when given the old cache file: the key inside it does not match
    forced = _load(gal, _face_model(exports["other"][0], channels=(2, 1, 0)),
                   cache_path=first.cache_path)
    assert forced.stats["embedded"] == 6
    # and a cache keyed by a shared space id but holding other dimensions is rebuilt
    meta = dict(exports["old"][1])
    meta.update(export_id="liar", embedding_space=meta["embedding_space"])
    liar_dir = _fake_export(tmp_path / "liar", meta)

    class Wider:
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def embed(self, images):
            e = self.model.embed(images)
            return np.concatenate([e, e], axis=1) / np.sqrt(2)

    shared = str(tmp_path / "shared.npz")
    assert _load(gal, _face_model(exports["old"][0]), cache_path=shared).stats["embedded"] == 6
    _save(tmp_path / "gallery" / "red" / "9.png", _colour_image(COLOURS["red"], 98))
    wide = _load(gal, Wider(_face_model(liar_dir)), cache_path=shared)
    assert wide.stats["embedded"] == 7 and wide.embeddings.shape == (7, 24)
    assert _load(gal, Wider(_face_model(liar_dir)), cache_path=shared).stats["cached"] == 7


def test_old_exports_without_ids_keep_the_fingerprint_key(tmp_path, monkeypatch):
    from photos.detection import FaceCropper
    from photos.gallery import _settings_key

    monkeypatch.setenv("FACENET_CACHE", str(tmp_path / "cache"))
    gal, probes = _gallery(tmp_path / "gallery"), _probes(tmp_path / "probes")
    legacy_dir = _fake_export(tmp_path / "legacy", {"model": "tiny", "embedding_size": 12})
    model = _face_model(legacy_dir)
    assert model.export_id() is None and model.embedding_space() is None
    assert model.describe()["export_id"] is None
    # the key (hence the cache file name) is exactly the one older versions wrote
    cropper = FaceCropper("none")
    assert _settings_key(model, cropper) == json.dumps(
        {"version": 1, "model": model.fingerprint(), "crop": cropper.settings()}, sort_keys=True)
    first = _load(gal, model)
    assert first.stats["embedded"] == 6 and first.stats["export_id"] is None
    assert first.embedded_by == [None] * 6 and "export_id" not in _cache_meta(first.cache_path)
    again = _load(gal, _face_model(legacy_dir))
    assert (again.stats["embedded"], again.stats["compatible_cache_from"]) == (0, [])
    assert _identify(again, probes, model)[0] == ["red", "blue", "green"]
    # rewritten in place (new graph files): rebuilt, as before
    st = os.stat(os.path.join(legacy_dir, "saved_model.pb"))
    os.utime(os.path.join(legacy_dir, "saved_model.pb"),
             ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert _load(gal, _face_model(legacy_dir)).stats["embedded"] == 6


# ----------------------------------------------------------------------------- end to end
def _backbone(seed, dim=8, scale=0.0, base=None):
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, strides=2),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(dim),
                              keras.layers.UnitNormalization()])
    if base is not None:  # a fine-tuned copy of ``base``: its embeddings stay comparable
        rng = np.random.default_rng(seed)
        model.set_weights([w + scale * rng.normal(size=w.shape).astype(w.dtype)
                           for w in base.get_weights()])
    return model


@pytest.mark.slow
def test_faces_identify_with_a_compatible_export_end_to_end(tmp_path, monkeypatch):
    """Real SavedModels: the gallery cache built by OLD serves faces.py identify with NEW."""
    from training.export import export_metadata, export_saved_model

    config = _config(embedding_size=8)
    old_net = _backbone(0)
    old_dir = export_saved_model(old_net, str(tmp_path / "old"), (16, 16),
                                 export_metadata(config, step=1), threshold=1.0)
    new_dir = export_saved_model(_backbone(1, scale=1e-3, base=old_net), str(tmp_path / "new"),
                                 (16, 16), export_metadata(config, compatible_with=old_dir),
                                 threshold=1.0)
    other_dir = export_saved_model(_backbone(2), str(tmp_path / "other"), (16, 16),
                                   export_metadata(config), threshold=1.0)
    gal = _gallery(tmp_path / "gallery")
    probe = os.path.join(gal, "red", "0.png")
    monkeypatch.setenv("FACENET_CACHE", str(tmp_path / "cache"))  # here and in faces.py
    env = subprocess_env()

    def identify(export_dir):
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "faces.py"), "identify", f"--gallery={gal}",
             probe, f"--export_dir={export_dir}", "--detector=none", "--json", "--noprogress"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # the old gallery cache, written in-process by the old export
    from photos.model import load_model

    old_model = load_model(old_dir)
    built = _load(gal, old_model)
    assert built.stats["embedded"] == 6
    r = identify(new_dir)
    g = r["gallery"]
    assert (g["embedded"], g["cached"]) == (0, 6) and g["cache"] == built.cache_path
    assert g["compatible_cache_from"] == [old_model.export_id()]
    assert r["faces"][0]["identity"] == "red"
    other = _load(gal, load_model(other_dir))  # another space: the gallery is embedded again
    assert (other.stats["embedded"], other.stats["cached"]) == (6, 0)
    assert other.cache_path != built.cache_path and other.stats["compatible_cache_from"] == []
