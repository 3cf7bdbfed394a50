"""The identify gallery: ``DIR/<person>/<photo>``, embedded once and cached.

Each gallery photo contributes its main face (the one data.align keeps). Embeddings are cached in
an NPZ (default ``$FACENET_CACHE/galleries/<gallery>-<settings>.npz``, ``~/.cache/facenet`` when
FACENET_CACHE is unset) keyed per photo on (relative path, size, mtime): a later run re-embeds only
photos that are new or changed, and forgets removed ones. Photos that gave no face are cached too
(with their reason), so they are not re-detected on every run; they are re-tried when they change.
The cache is keyed by the crop settings and by the space the model's embeddings live in: an export
with an identity (``export_id`` and ``embedding_space`` in its assets/facenet.json, written by
training/export.py) is keyed by its ``embedding_space``, so a new export trained compatible with an
old one (same space: its embeddings can be compared with the old one's) finds and reuses the
gallery embedded by the old export, and embeds only new or changed photos; each entry records the
``export_id`` that embedded it and ``stats["compatible_cache_from"]`` lists the other exports whose
embeddings were reused. An export without an identity (written before exports had one) is keyed by
its files (path, size and mtime) as before. Whatever changes the key (another space, other crop
settings, an old export rewritten) rebuilds the whole cache: the key is part of the file name and
is checked inside it. A cache that cannot be read (empty, truncated, damaged bytes) is treated as
absent: one warning naming the file, then it is rebuilt (written atomically, like every cache
write).
"""
import dataclasses
import hashlib
import json
import os

import numpy as np

from photos.embedding import embed_photos
from photos.errors import EXIT_EMPTY_GALLERY, Failure, PhotoError
from photos.files import cache_dir, write_npz

CACHE_VERSION = 1


@dataclasses.dataclass
class Gallery:
    """Embedded gallery: row i of ``embeddings`` is ``files[i]`` of person ``people[labels[i]]``.

    ``stats``: images, people, cached, embedded, removed, failed, people_without_face, and the
    model's identity: export_id and embedding_space (None for an export without them),
    compatible_cache_from (sorted export ids, other than the model's, that embedded the cached
    rows reused now: the cache came from a compatible export; [] when none). ``failures``: Failure
    per photo without a face (cached ones included). ``cache_path``: where it was cached (None:
    not cached). ``embedded_by``: per row, the export_id that embedded it (None when unknown).
    """

    root: str
    people: list
    labels: np.ndarray
    files: list
    embeddings: np.ndarray
    boxes: list
    failures: list
    stats: dict
    cache_path: str = None
    embedded_by: list = None


def _model_identity(model):
    """(export_id, embedding_space) of ``model`` (photos.model.FaceModel); None for each one the
    export does not record (or a model object without the methods)."""
    def call(name):
        method = getattr(model, name, None)
        value = method() if callable(method) else None
        return value if isinstance(value, str) and value else None

    return call("export_id"), call("embedding_space")


def _settings_key(model, cropper):
    """What a cache must have been made with to be used: the cache version, the crop settings and
    the model's embedding space (its files' fingerprint when the export records no space)."""
    _, space = _model_identity(model)
    key = {"embedding_space": space} if space else {"model": model.fingerprint()}
    return json.dumps({"version": CACHE_VERSION, **key, "crop": cropper.settings()},
                      sort_keys=True)


def default_cache_path(gallery_dir, model, cropper):
    root = hashlib.sha1(os.path.realpath(gallery_dir).encode("utf-8")).hexdigest()[:16]
    settings = hashlib.sha1(_settings_key(model, cropper).encode("utf-8")).hexdigest()[:10]
    return os.path.join(cache_dir(), "galleries", f"{root}-{settings}.npz")


def _file_key(path):
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def _read_cache(path, settings):
    """{rel: entry} of a readable cache file; {} when made with other ``settings``.

    Raises on anything unexpected: the caller treats every exception as a damaged cache.
    """
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        emb = np.asarray(z["embeddings"], np.float32)
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    if meta.get("settings") != settings:
        return {}
    if emb.ndim != 2 or not np.all(np.isfinite(emb)):
        raise ValueError(f"embeddings of shape {emb.shape} are not a finite [N, D] matrix")
    entries = {}
    for e in meta.get("entries", []):
        if not isinstance(e.get("rel"), str):
            raise ValueError("an entry has no relative path")
        if "row" in e:
            row = e["row"]
            if not isinstance(row, int) or not 0 <= row < len(emb):
                raise ValueError(f"row {row!r} is outside the {len(emb)} stored embeddings")
            e = dict(e, embedding=emb[row])
        entries[e["rel"]] = e
    return entries


def _load_cache(path, settings):
    """({rel: entry}, warning) from a cache file made with ``settings``.

    Absent or stale (other model or crop settings): ({}, None). Damaged in any way (zero bytes,
    truncated, flipped bytes: EOFError, BadZipFile, zlib or JSON errors, a bad row): ({}, a
    one-line warning naming the file), and the caller rebuilds the cache from the photos.
    """
    if not path or not os.path.isfile(path):
        return {}, None
    try:
        return _read_cache(path, settings), None
    except Exception as exc:  # noqa: BLE001 - a cache is disposable: any failure means rebuild
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        return {}, f"gallery cache {path} is unreadable ({reason}); ignoring it and rebuilding it"


def _save_cache(path, settings, root, entries, identity=(None, None)):
    rows, meta_entries = [], []
    for rel in sorted(entries):
        e = {k: v for k, v in entries[rel].items() if k != "embedding"}
        if entries[rel].get("embedding") is not None:
            e["row"] = len(rows)
            rows.append(entries[rel]["embedding"])
        meta_entries.append(e)
    emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    meta = {"version": CACHE_VERSION, "settings": settings, "gallery": os.path.abspath(root),
            "entries": meta_entries}
    if identity[0] or identity[1]:  # the export that wrote the file (entries: who embedded them)
        meta.update(export_id=identity[0], embedding_space=identity[1])
    write_npz(path, meta=np.array(json.dumps(meta)), embeddings=emb)


def scan_gallery(gallery_dir):
    """[(person, path)] of ``gallery_dir/<person>/<image>``; PhotoError (exit 6) when empty."""
    from data.align import ALIGN_EXTENSIONS
    from data.dataset import EmptyDatasetError, scan_identity_folder

    if not gallery_dir:
        raise PhotoError("identify needs --gallery DIR (one folder of photos per person)",
                         EXIT_EMPTY_GALLERY)
    try:
        ds = scan_identity_folder(gallery_dir, extensions=ALIGN_EXTENSIONS)
    except EmptyDatasetError as exc:
        raise PhotoError(f"empty gallery {gallery_dir}: {exc}", EXIT_EMPTY_GALLERY) from exc
    return [(ds.class_names[int(label)], path) for path, label in zip(ds.paths, ds.labels)]


def _plan(items, gallery_dir, cached, export_id):
    """({rel: entry}, [paths to embed]): cached entries of unchanged photos, new ones for the rest
    (recording the ``export_id`` that embeds them when the export has one)."""
    entries, todo = {}, []
    for person, path in items:
        rel = os.path.relpath(path, gallery_dir)
        key = _file_key(path)
        hit = cached.get(rel)
        if hit is not None and hit.get("key") == key and hit.get("person") == person:
            entries[rel] = hit
        else:
            entries[rel] = {"rel": rel, "person": person, "key": key}
            if export_id:
                entries[rel]["export_id"] = export_id
            todo.append(path)
    return entries, todo


def _embed_into(entries, todo, gallery_dir, model, cropper, progress):
    """Embed the main face of each of ``todo`` into its entry (or record why there is none)."""
    result = embed_photos(todo, model, cropper, largest=True, progress=progress)
    for face, emb in zip(result.faces, result.embeddings):
        entry = entries[os.path.relpath(face.file, gallery_dir)]
        entry.update(embedding=emb, box=[float(v) for v in face.box], score=face.score)
    for failure in result.failures:
        entry = entries[os.path.relpath(failure.file, gallery_dir)]
        entry.update(reason=failure.reason, detail=failure.detail)


def _dimensions(entries):
    return {int(np.shape(e["embedding"])[-1]) for e in entries.values()
            if e.get("embedding") is not None}


def load_gallery(gallery_dir, model, cropper, cache_path=None, use_cache=True, progress=True,
                 items=None):
    """Embed the gallery, reusing and refreshing the cache. See the module docstring.

    Returns :class:`Gallery`; raises PhotoError (exit 6) when the gallery has no image or no face.
    """
    from absl import logging

    items = items if items is not None else scan_gallery(gallery_dir)
    settings = _settings_key(model, cropper)
    export_id, space = identity = _model_identity(model)
    if use_cache and cache_path is None:
        cache_path = default_cache_path(gallery_dir, model, cropper)
    cached, warning = _load_cache(cache_path, settings) if use_cache else ({}, None)
    if warning:
        logging.warning("%s", warning)
    entries, todo = _plan(items, gallery_dir, cached, export_id)
    if todo:
        _embed_into(entries, todo, gallery_dir, model, cropper, progress)
        if len(_dimensions(entries)) > 1:  # a space id shared by models that are not compatible
            warning = (f"gallery cache {cache_path}: its embeddings have other dimensions than "
                       f"this model's ({export_id or model.fingerprint()}); rebuilding it")
            logging.warning("%s", warning)
            cached = {}
            entries, todo = _plan(items, gallery_dir, cached, export_id)
            _embed_into(entries, todo, gallery_dir, model, cropper, progress)
    removed = len(set(cached) - set(entries))
    if use_cache and (todo or removed or warning or not os.path.isfile(cache_path)):
        try:
            _save_cache(cache_path, settings, gallery_dir, entries, identity)
        except OSError as exc:
            logging.warning("could not write the gallery cache %s: %s", cache_path, exc)
            cache_path = None

    people = sorted({person for person, _ in items})
    index = {p: i for i, p in enumerate(people)}
    files, labels, rows, boxes, failures, embedded_by = [], [], [], [], [], []
    for person, path in items:
        e = entries[os.path.relpath(path, gallery_dir)]
        if e.get("embedding") is None:
            failures.append(Failure(path, e.get("reason", "error"), e.get("detail", "")))
            continue
        files.append(path)
        labels.append(index[person])
        rows.append(np.asarray(e["embedding"], np.float32))
        boxes.append(e.get("box"))
        embedded_by.append(e.get("export_id"))
    reused_from = {e.get("export_id") for rel, e in entries.items()
                   if rel in cached and e is cached[rel] and e.get("embedding") is not None}
    stats = {"images": len(items), "people": len(people), "cached": len(items) - len(todo),
             "embedded": len(todo), "removed": removed, "failed": len(failures),
             "people_without_face": sorted(set(people) - {people[i] for i in labels}),
             "export_id": export_id, "embedding_space": space,
             "compatible_cache_from": sorted(i for i in reused_from if i and i != export_id)}
    if not rows:
        raise PhotoError(f"empty gallery {gallery_dir}: no face found in any of its {len(items)} "
                         f"photo(s) (e.g. {failures[0].message()})", EXIT_EMPTY_GALLERY)
    return Gallery(os.path.abspath(gallery_dir), people, np.asarray(labels, np.int64), files,
                   np.stack(rows), boxes, failures, stats, cache_path if use_cache else None,
                   embedded_by)
