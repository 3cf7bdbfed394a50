"""Align a photo collection into FaceNet thumbnails: one face crop per image, MTCNN-detected.

    python -m data.align --input_dir RAW --output_dir ALIGNED --crop_size 160 --crop_margin 32

FaceNet trains on "thumbnails tightly cropped around the face area" (Section 4). This tool mirrors
the input tree (``RAW/<identity>/<image>`` -> ``ALIGNED/<identity>/<stem>.png``; a flat folder, or
any depth, works the same), keeps one face per image (:func:`data.detect.select_face`), and crops
it by box + margin (davidsandberg/facenet's convention) or by a 5-point similarity warp
(``--alignment=landmarks``). The crop flags are faces.py's too (``flags.define_crop_flags``); the
old names ``--image_size``, ``--margin`` and ``--align`` still work for one release, with a warning.

* Every image that yields no crop is listed in ``ALIGNED/align_report.tsv`` (path, reason,
  detail); reasons: ``no_face``, the :class:`data.image_io.UnreadableImageError` reasons
  (``empty``, ``not_an_image``, ``truncated``, ``too_large``, ``unsupported``), ``error``
  (anything unexpected, with the exception text). Files whose extension is not an image's are
  not read; they are counted as ``ignored_files``.
* The run ends by printing one JSON line: ``{"processed", "aligned", "no_face", "unreadable",
  "skipped_existing", "error", "ignored_files", "unreadable_by_reason", "seconds"}`` with
  processed = aligned + no_face + unreadable + error + skipped_existing.
* Resumable: an output that already exists is not recomputed (``skipped_existing``); outputs are
  written to a temporary name and renamed, so a killed run never leaves a partial PNG. Images that
  failed are retried on the next run (failures are cheap and deterministic).
* ``--detect_only FILE.json`` writes every face (box, score, landmarks, in source pixels) of every
  image and no crops; its JSON line has ``aligned`` 0 plus ``with_face`` (images with >= 1 face)
  and ``faces`` (total).
* ``--workers N`` processes (spawned; each builds its own MTCNN once).

Huge JPEGs are decoded reduced (:func:`data.image_io.read_image_downscaled`, longest side
``--max_decode_side``); boxes and crops then use that copy, with ``--crop_margin`` converted to its
pixels.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import collections  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from data import image_io  # noqa: E402
from data.atomic import is_partial, write_png_atomically, write_text_atomically  # noqa: E402

#: File extensions read as images (others are counted as ignored, never opened).
ALIGN_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".pgm", ".ppm", ".pbm",
                    ".pnm", ".webp", ".gif", ".tif", ".tiff")
REPORT_NAME = "align_report.tsv"
#: Written beside the aligned tree: how its crops were made, so that train.py can record it in
#: the export and faces.py can crop new photos the same way.
SETTINGS_NAME = "align_settings.json"
DEFAULT_MAX_DECODE_SIDE = 4096

AlignJob = collections.namedtuple("AlignJob", "src dst rel")


# ----------------------------------------------------------------------------- single image
def align_image(path, image_size=160, margin=32, mode="box", detector=None,
                max_decode_side=DEFAULT_MAX_DECODE_SIDE):
    """Read, detect, select and crop the face of one photo.

    Args:
        path: image file.
        image_size: output side S, pixels.
        margin: see :func:`data.detect.crop_face` ("box": source pixels; "landmarks": output pixels).
        mode: "box" or "landmarks".
        detector: a :class:`data.detect.FaceDetector` (default: the process-wide one).
        max_decode_side: longer side above which the photo is decoded reduced.
    Returns:
        ``(crop, reason)``: uint8 [S, S, 3] and "aligned", or None and the reason
        ("no_face" or an UnreadableImageError reason). Unexpected errors propagate.
    """
    crop, reason, _ = _align_one(path, image_size, margin, mode, detector, max_decode_side)
    return crop, reason


def _read(path, max_decode_side):
    """(uint8 RGB [h, w, 3], source pixels per returned pixel); raises UnreadableImageError."""
    return image_io.read_image_downscaled(path, max_decode_side)


def _align_one(path, image_size, margin, mode, detector, max_decode_side):
    from data import detect

    try:
        image, scale = _read(path, max_decode_side)
    except image_io.UnreadableImageError as exc:
        return None, exc.reason, str(exc)
    detector = detector or detect.default_detector()
    faces = detector.detect(image)
    face = detect.select_face(faces, image.shape)
    if face is None:
        return None, "no_face", f"{image.shape[1]}x{image.shape[0]}"
    crop_margin = margin / scale if mode == "box" else margin
    return detect.crop_face(image, face, image_size, crop_margin, mode=mode), "aligned", ""


def _detect_one(path, detector, max_decode_side):
    """JSON-able record of all faces in one photo, coordinates in upright source pixels."""
    from data import detect

    try:
        image, scale = _read(path, max_decode_side)
    except image_io.UnreadableImageError as exc:
        return {"faces": [], "reason": exc.reason, "detail": str(exc)}
    faces = (detector or detect.default_detector()).detect(image)
    h, w = image.shape[:2]
    return {"width": int(round(w * scale)), "height": int(round(h * scale)),
            "faces": [f.scaled(scale).to_json() for f in faces],
            "reason": "aligned" if faces else "no_face"}


# ----------------------------------------------------------------------------- files
def list_jobs(input_dir, output_dir):
    """Images under ``input_dir`` and their output paths, sorted.

    Returns:
        (jobs, ignored): list of :class:`AlignJob` (src, dst, rel = src relative to input_dir);
        ``ignored`` = relative paths of files skipped for their extension. Hidden files and
        folders, and ``output_dir`` when it lies inside ``input_dir``, are not scanned;
        symlinked folders are followed (each real folder once). Two
        inputs with the same stem in one folder (a.jpg, a.png) get distinct outputs
        (a.png, a_png.png).
    """
    input_dir = os.path.abspath(input_dir)
    output_dir = os.path.abspath(output_dir)
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input_dir {input_dir} is not a directory")
    jobs, ignored, taken = [], [], set()
    seen = {os.path.realpath(input_dir)}
    for root, dirs, files in os.walk(input_dir, followlinks=True):
        keep = []
        for d in sorted(dirs):
            full = os.path.join(root, d)
            real = os.path.realpath(full)
            if d.startswith(".") or os.path.abspath(full) == output_dir or real in seen:
                continue  # hidden, the output itself, or a symlink loop / second link
            seen.add(real)
            keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            if name.startswith("."):
                continue
            src = os.path.join(root, name)
            rel = os.path.relpath(src, input_dir)
            stem, ext = os.path.splitext(name)
            if ext.lower() not in ALIGN_EXTENSIONS:
                ignored.append(rel)
                continue
            rel_dir = os.path.dirname(rel)
            out_rel = os.path.join(rel_dir, stem + ".png")
            if out_rel in taken:
                out_rel = os.path.join(rel_dir, f"{stem}_{ext.lstrip('.').lower()}.png")
            taken.add(out_rel)
            jobs.append(AlignJob(src, os.path.join(output_dir, out_rel), rel))
    return jobs, ignored


def _remove_stale_partials(output_dir):
    removed = 0
    for root, _, files in os.walk(output_dir):
        for name in files:
            if is_partial(name):
                os.remove(os.path.join(root, name))
                removed += 1
    return removed


# ----------------------------------------------------------------------------- workers
_worker_state = {}


def _worker_init(settings, detector=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from data import detect

    if settings.get("threads_per_worker"):
        import tensorflow as tf  # share the cores between workers instead of oversubscribing

        tf.config.threading.set_intra_op_parallelism_threads(settings["threads_per_worker"])
        tf.config.threading.set_inter_op_parallelism_threads(1)

    _worker_state["settings"] = settings
    _worker_state["detector"] = detector or detect.FaceDetector(**settings["detector"])


def _worker_task(job):
    """One image -> (rel, status, detail, detect_record or None). Never raises."""
    s = _worker_state["settings"]
    det = _worker_state["detector"]
    try:
        if s["detect_only"]:
            rec = _detect_one(job.src, det, s["max_decode_side"])
            return job.rel, rec["reason"], rec.get("detail", ""), rec
        crop, reason, detail = _align_one(job.src, s["image_size"], s["margin"], s["mode"], det,
                                          s["max_decode_side"])
        if crop is not None:
            write_png_atomically(job.dst, crop)
        return job.rel, reason, detail, None
    except Exception as exc:  # a bad image must not stop a long run: count and report it
        return job.rel, "error", f"{type(exc).__name__}: {exc}", None


# ----------------------------------------------------------------------------- driver
def run_alignment(input_dir, output_dir=None, image_size=160, margin=32, mode="box", workers=1,
                  detect_only=None, min_face_size=None, thresholds=None,
                  max_decode_side=DEFAULT_MAX_DECODE_SIDE, progress=True, device="CPU:0",
                  detector=None):
    """Align (or only detect) every image under ``input_dir``. See the module docstring.

    Args:
        input_dir: photo tree.
        output_dir: aligned tree (required unless ``detect_only``); the report goes here.
        image_size, margin, mode: the crop (see :func:`data.detect.crop_face`).
        workers: processes; 1 runs in this process.
        detect_only: path of a JSON file: write all detections there, no crops.
        min_face_size, thresholds: MTCNN settings (None: data.detect defaults).
        max_decode_side: longer side above which photos are decoded reduced.
        progress: report progress on stderr (data.progress: a live bar on a terminal, a plain
            line every 10 s otherwise).
        device: TensorFlow device for MTCNN.
        detector: a ready :class:`data.detect.FaceDetector` to use when workers == 1 (then
            min_face_size, thresholds and device are ignored).
    Returns:
        the counts dict that the CLI prints.
    """
    from data import detect

    if mode not in ("box", "landmarks"):
        raise ValueError(f"mode must be 'box' or 'landmarks', got {mode!r}")
    if output_dir is None and not detect_only:
        raise ValueError("output_dir is required unless detect_only is given")
    if int(image_size) < 1 or margin < 0:
        raise ValueError(f"need image_size >= 1 and margin >= 0, got {image_size}, {margin}")
    start = time.time()
    jobs, ignored = list_jobs(input_dir, output_dir or os.path.join(input_dir, ".none"))
    counts = collections.Counter()
    counts["ignored_files"] = len(ignored)
    if not jobs:
        from absl import logging

        logging.warning("no image files (%s) under %s; %d other files ignored",
                        " ".join(ALIGN_EXTENSIONS), input_dir, len(ignored))
    todo = jobs
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    if not detect_only:
        _remove_stale_partials(output_dir)
        todo = [j for j in jobs if not os.path.exists(j.dst)]
        counts["skipped_existing"] = len(jobs) - len(todo)
    detector_kwargs = {"device": device}
    if min_face_size is not None:
        detector_kwargs["min_face_size"] = min_face_size
    if thresholds is not None:
        detector_kwargs["thresholds"] = tuple(thresholds)
    settings = {"detector": detector_kwargs, "image_size": int(image_size), "margin": margin,
                "mode": mode, "detect_only": bool(detect_only), "max_decode_side": max_decode_side}

    report_path = os.path.join(output_dir, REPORT_NAME) if output_dir else None
    report = open(report_path, "w", encoding="utf-8") if report_path else None
    if report:
        report.write("path\treason\tdetail\n")
    records = {}
    by_reason = collections.Counter()
    from data.progress import progress as make_progress

    bar = make_progress(len(todo), unit="image", label="aligning", enabled=bool(progress and todo))
    workers = max(1, min(int(workers), len(todo) or 1))
    try:
        if workers == 1:
            if todo:
                _worker_init(settings, detector)
            results = map(_worker_task, todo)
            pool = None
        else:
            settings["threads_per_worker"] = max(1, (os.cpu_count() or 1) // workers)
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(workers, initializer=_worker_init, initargs=(settings,))
            results = pool.imap_unordered(_worker_task, todo, chunksize=4)
        for i, (rel, reason, detail, rec) in enumerate(results, 1):
            if rec is not None:
                records[rel] = rec
            if reason == "aligned":
                counts["aligned"] += 1
            elif reason == "no_face":
                counts["no_face"] += 1
            elif reason == "error":
                counts["error"] += 1
            else:
                counts["unreadable"] += 1
                by_reason[reason] += 1
            if reason != "aligned" and report:
                clean = " ".join(str(detail).split())
                report.write(f"{rel}\t{reason}\t{clean}\n")
                report.flush()
            bar.update(i)
        if pool:
            pool.close()
            pool.join()
    finally:
        if report:
            report.close()
        _worker_state.clear()
    for key in ("aligned", "no_face", "unreadable", "skipped_existing", "error"):
        counts[key] += 0
    counts["processed"] = len(jobs)
    result = {"processed": counts["processed"], "aligned": counts["aligned"],
              "no_face": counts["no_face"], "unreadable": counts["unreadable"],
              "skipped_existing": counts["skipped_existing"], "error": counts["error"],
              "ignored_files": counts["ignored_files"],
              "unreadable_by_reason": dict(sorted(by_reason.items())),
              "seconds": round(time.time() - start, 2)}
    if detect_only:  # nothing was cropped: report images with a face and faces found instead
        result["with_face"], result["aligned"] = result["aligned"], 0
        result["faces"] = int(sum(len(r["faces"]) for r in records.values()))
        payload = {"input_dir": os.path.abspath(input_dir),
                   "detector": {"min_face_size": min_face_size or detect.DEFAULT_MIN_FACE_SIZE,
                                "thresholds": list(thresholds or detect.DEFAULT_THRESHOLDS)},
                   "coordinates": "upright source pixels; box = [x0, y0, x1, y1]",
                   "images": {rel: records[rel] for rel in sorted(records)}, "counts": result}
        write_text_atomically(detect_only, json.dumps(payload, indent=1))
    else:
        write_text_atomically(os.path.join(output_dir, SETTINGS_NAME),
                              json.dumps(crop_settings(image_size, margin, mode), indent=1) + "\n")
    return result


def crop_settings(image_size, margin, mode):
    """The crop description stored in ``align_settings.json`` and in an export's metadata."""
    return {"detector": "mtcnn", "crop_size": int(image_size), "margin": float(margin),
            "alignment": mode}


def read_crop_settings(aligned_dir):
    """``aligned_dir/align_settings.json`` as a dict, or None when the folder has none (not made
    by this module, or made before it wrote one) or it is unreadable."""
    path = os.path.join(os.fspath(aligned_dir), SETTINGS_NAME)
    try:
        with open(path, encoding="utf-8") as fh:
            settings = json.load(fh)
        return {"detector": str(settings["detector"]), "crop_size": int(settings["crop_size"]),
                "margin": float(settings["margin"]), "alignment": str(settings["alignment"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        print(f"data.align: ignoring unreadable {path}", file=sys.stderr)
        return None


def _define_flags():
    from absl import flags

    import flags as project_flags

    flags.DEFINE_string("input_dir", None, "Photo tree: root/<identity>/<image>, or a flat folder.")
    flags.DEFINE_string("output_dir", None, "Aligned tree (mirrors input_dir); report goes here.")
    project_flags.define_crop_flags()  # --crop_size, --crop_margin, --alignment, --min_face_size
    for old, new in (("image_size", "crop_size"), ("margin", "crop_margin"), ("align", "alignment")):
        project_flags.define_deprecated_alias(old, new)
    flags.DEFINE_integer("workers", min(2, os.cpu_count() or 1), "Worker processes.")
    flags.DEFINE_string("detect_only", None, "Write all detections to this JSON file; no crops.")
    flags.DEFINE_list("thresholds", None, "MTCNN PNet,RNet,ONet thresholds (default 0.6,0.7,0.8).")
    flags.DEFINE_integer("max_decode_side", DEFAULT_MAX_DECODE_SIDE,
                         "Photos with a longer side above this are decoded reduced.")
    flags.DEFINE_string("device", "CPU:0", "TensorFlow device for MTCNN, e.g. GPU:0.")
    return flags.FLAGS


def main(argv=None):
    from absl import app

    from cli_checks import cli_main, require_dir, require_writable_dir, require_writable_parent

    FLAGS = _define_flags()

    def _main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        if not FLAGS.input_dir:
            raise app.UsageError("--input_dir is required")
        if not FLAGS.output_dir and not FLAGS.detect_only:
            raise app.UsageError("--output_dir is required (or --detect_only FILE.json)")
        # missing or unwritable folders: one line and exit code USAGE (cli_main), no traceback
        require_dir(FLAGS.input_dir, "--input_dir")
        if FLAGS.detect_only:
            require_writable_parent(FLAGS.detect_only, "--detect_only")
        else:
            require_writable_dir(FLAGS.output_dir, "--output_dir")
        thresholds = [float(t) for t in FLAGS.thresholds] if FLAGS.thresholds else None
        result = run_alignment(FLAGS.input_dir, FLAGS.output_dir, image_size=FLAGS.crop_size,
                               margin=FLAGS.crop_margin, mode=FLAGS.alignment, workers=FLAGS.workers,
                               detect_only=FLAGS.detect_only, min_face_size=FLAGS.min_face_size,
                               thresholds=thresholds, max_decode_side=FLAGS.max_decode_side,
                               device=FLAGS.device)
        print(json.dumps(result), flush=True)

    app.run(cli_main(_main, "data.align"), argv=argv or sys.argv)


if __name__ == "__main__":
    main()
