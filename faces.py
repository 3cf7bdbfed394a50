"""Faces in photos with an exported FaceNet model: embed, verify, identify, cluster.

    python faces.py embed PHOTO_OR_DIR... --export_dir runs/tiny/export [--output embeddings.npz]
                    [--largest]
    python faces.py verify A B --export_dir E [--threshold T]
    python faces.py identify --gallery DIR PROBE_OR_DIR... --export_dir E [--top_k 3]
    python faces.py cluster PHOTO_OR_DIR... --export_dir E [--clusters_dir clusters]
                    [--linkage complete]

Faces are found with MTCNN and cropped exactly as ``python -m data.align`` crops training data:
the same flags, --crop_size, --crop_margin and --alignment (flags.define_crop_flags), by default
the values the export records for its training data, else data.align's defaults; --detector=none
takes every file as an already-aligned face. Distances are squared L2; the threshold is the one
stored in the export unless --threshold is given. --json prints one JSON object instead of text;
progress goes to stderr.

Exit status (the table of exit_codes.py, shared by every tool): 0 done (with many inputs, photos
without a face are reported on stderr and in the output, and the rest go on); 1 bad command line;
2 bad --export_dir; 3 no face found; 4 a file missing or unreadable; 5 no threshold (none stored
in the export and no --threshold); 6 empty gallery.
"""
import json
import sys

from absl import app
from absl import flags as absl_flags

import flags

FLAGS = flags.FLAGS
flags.define_common_flags()
_COMMON = set(FLAGS)
flags.define_faces_flags()
for _name in sorted(set(FLAGS) - _COMMON) + ["export_dir", "batch_size"]:
    absl_flags.declare_key_flag(_name)  # listed by --help (the rest: --helpfull)

COMMANDS = ("embed", "verify", "identify", "cluster")


def _crop_options():
    """--crop_size, --crop_margin, --alignment: given on the command line, else the crop the
    export records (train.py copies the aligned folder's align_settings.json), else data.align's
    defaults (the flags' defaults)."""
    from photos.model import read_metadata

    stored = (read_metadata(FLAGS.export_dir) or {}).get("crop") or {}
    options = {}
    for flag, key in (("crop_size", "crop_size"), ("crop_margin", "margin"),
                      ("alignment", "alignment")):
        given = FLAGS[flag].present or key not in stored
        options[flag] = FLAGS[flag].value if given else stored[key]
    return options


def _cropper():
    from photos.detection import FaceCropper

    options = _crop_options()
    return FaceCropper(detector=FLAGS.detector, crop_size=int(options["crop_size"]),
                       margin=float(options["crop_margin"]), mode=options["alignment"],
                       min_face_size=FLAGS.min_face_size)


def _model():
    from photos.model import load_model

    return load_model(FLAGS.export_dir, batch_size=FLAGS.batch_size)


def _threshold(model):
    from photos.model import resolve_threshold

    return resolve_threshold(model, FLAGS.threshold)


def _inputs(paths):
    from photos.detection import expand_inputs
    from photos.errors import EXIT_USAGE, PhotoError

    files, _ = expand_inputs(paths)
    if not files:
        raise PhotoError(f"no image files in {' '.join(paths)}", EXIT_USAGE)
    return files


def _report_failures(failures, total):
    for f in failures:
        print(f"faces.py: skipped {f.message()}", file=sys.stderr)
    if failures:
        print(f"faces.py: {len(failures)} of {total} photo(s) gave no face", file=sys.stderr)


def _emit(result, formatter):
    if FLAGS.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(formatter(result))


def cmd_embed(args):
    from photos.embed import format_embed, run_embed
    from photos.model import check_export_dir

    if not args:
        raise app.UsageError("embed needs at least one photo or folder")
    check_export_dir(FLAGS.export_dir)
    files = _inputs(args)
    result = run_embed(files, _model(), _cropper(), FLAGS.output,
                       largest=FLAGS.largest, progress=FLAGS.progress)
    _report_failures([_failure(f) for f in result["failed"]], len(files))
    _emit(result, format_embed)


def _failure(record):
    from photos.errors import Failure

    return Failure(record["file"], record["reason"], record.get("detail", ""))


def cmd_verify(args):
    from photos.model import check_export_dir, threshold_before_loading
    from photos.verify import format_verify, main_faces, run_verify

    if len(args) != 2:
        raise app.UsageError(f"verify takes two photos, got {len(args)}")
    check_export_dir(FLAGS.export_dir)
    threshold_before_loading(FLAGS.export_dir, FLAGS.threshold)  # fail fast, before TensorFlow
    faces = main_faces(_cropper(), args[0], args[1])  # input problems before the model loads
    model = _model()
    threshold, source = _threshold(model)
    _emit(run_verify(faces, model, threshold, source), format_verify)


def cmd_identify(args):
    from photos.gallery import load_gallery, scan_gallery
    from photos.identify import format_identify, run_identify
    from photos.model import check_export_dir, threshold_before_loading

    if not args:
        raise app.UsageError("identify needs at least one probe photo or folder")
    check_export_dir(FLAGS.export_dir)
    threshold_before_loading(FLAGS.export_dir, FLAGS.threshold)
    items = scan_gallery(FLAGS.gallery)  # exit 6 before TensorFlow when empty
    files = _inputs(args)
    model, cropper = _model(), _cropper()
    threshold, source = _threshold(model)
    gallery = load_gallery(FLAGS.gallery, model, cropper, cache_path=FLAGS.gallery_cache,
                           use_cache=FLAGS.use_gallery_cache, progress=FLAGS.progress, items=items)
    for f in gallery.failures:
        print(f"faces.py: gallery photo skipped: {f.message()}", file=sys.stderr)
    for person in gallery.stats["people_without_face"]:
        print(f"faces.py: gallery person {person!r} has no usable face", file=sys.stderr)
    result = run_identify(gallery, files, model, cropper, threshold, source, top_k=FLAGS.top_k,
                          largest=FLAGS.largest, progress=FLAGS.progress)
    _report_failures([_failure(f) for f in result["failed"]], len(files))
    _emit(result, format_identify)


def cmd_cluster(args):
    from photos.cluster import format_cluster, run_cluster
    from photos.model import check_export_dir, threshold_before_loading

    if not args:
        raise app.UsageError("cluster needs a folder (or photos)")
    check_export_dir(FLAGS.export_dir)
    threshold_before_loading(FLAGS.export_dir, FLAGS.threshold)
    files = _inputs(args)
    model = _model()
    threshold, source = _threshold(model)
    result = run_cluster(files, model, _cropper(), threshold, FLAGS.clusters_dir, source,
                         linkage=flags.linkage("faces"), largest=FLAGS.largest, progress=FLAGS.progress)
    _report_failures([_failure(f) for f in result["failed"]], len(files))
    _emit(result, format_cluster)


def main(argv):
    from absl import logging

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # no INFO chatter unless asked for (-v 0)

    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = f"unknown command {argv[1]!r}" if len(argv) >= 2 else "no command"
        raise app.UsageError(f"{got}; choose one of: {', '.join(COMMANDS)}")
    globals()[f"cmd_{argv[1]}"](argv[2:])


if __name__ == "__main__":
    from cli_checks import cli_main

    # PhotoError (a CliError): one line `faces.py: error: ...` and its exit code
    app.run(cli_main(main, "faces.py"))
