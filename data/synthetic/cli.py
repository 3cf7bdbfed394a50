"""Command line of the synthetic-face generator: ``python -m data.synthetic``; prints one JSON summary.

It writes the dataset only. The raw-pixel baseline, which needs the verification protocol of the
evaluation layer, is measured by :mod:`evaluation.pixel_baseline` (and ``bench/synthetic.py``);
``--no_baseline`` is still accepted and does nothing.

The counts take train.py's names for the built-in data (``--synthetic_identities``,
``--synthetic_images_per_identity``), so that ``--images_per_identity`` means K of a P x K batch
everywhere; the old ``--identities`` and ``--images_per_identity`` work for one release, with a
warning.
"""
import json
import sys

from data.synthetic.dataset import generate_dataset

DEPRECATED_FLAGS = {"--identities": "--synthetic_identities",
                    "--images_per_identity": "--synthetic_images_per_identity"}


def main(argv=None):
    import argparse

    from data import synthetic

    ap = argparse.ArgumentParser(prog="python -m data.synthetic", allow_abbrev=False,
                                 description=synthetic.__doc__.split("\n\n")[0])
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--synthetic_identities", "--identities", dest="identities", type=int,
                    default=500, help="identities to render (--identities: deprecated name)")
    ap.add_argument("--synthetic_images_per_identity", "--images_per_identity",
                    dest="images_per_identity", type=int, default=20,
                    help="images rendered per identity (--images_per_identity: deprecated name)")
    ap.add_argument("--image_size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--heldout_identities", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--difficulty", type=float, default=1.0)
    ap.add_argument("--no_baseline", action="store_true",
                    help="deprecated, does nothing: the generator no longer measures the raw-pixel "
                         "baseline (see evaluation.pixel_baseline)")
    args = ap.parse_args(argv)
    for arg in (sys.argv[1:] if argv is None else argv):
        old = arg.split("=", 1)[0]
        if old in DEPRECATED_FLAGS:
            sys.stderr.write(f"synthetic: warning: {old} is deprecated and goes in the next "
                             f"release; use {DEPRECATED_FLAGS[old]}\n")
    if args.no_baseline:
        sys.stderr.write("synthetic: --no_baseline is deprecated and does nothing: the generator no "
                         "longer measures the raw-pixel baseline (see evaluation.pixel_baseline)\n")
    out = generate_dataset(args.output_dir, args.identities, args.images_per_identity, args.image_size,
                           args.seed, args.heldout_identities, args.workers, args.difficulty)
    summary = {k: out[k] for k in ("root", "train_dir", "test_dir", "pairs_file", "cached", "counts",
                                   "pixel_baseline_accuracy", "pixel_baseline_best_variant",
                                   "pixel_baseline", "render_seconds", "images_per_second")}
    print(json.dumps(summary))
    return 0
