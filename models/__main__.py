"""``python -m models``: the model zoo with parameters and multiply-adds next to the paper's.

    python -m models                 # table: name, input HxW, params, madds, paper params, paper madds
    python -m models --json          # one JSON object per model
    python -m models --models nn2,nn4 --normalization lrn

Parameters and multiply-adds are counted from the built Keras models (see models/madds.py);
the paper's figures come from Tables 1-2 and Section 3.3 (its "FLPS" are multiply-adds).
"""
import argparse
import json
import sys
import time

from quiet_tf import import_tensorflow


def _human(value, unit=""):
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}{unit}"
    return f"{value}{unit}"


def describe(name, normalization="batch"):
    """Dict for one model at its default size: name, input_shape, params, madds, paper figures."""
    import models

    model = models.build_model(name, normalization=normalization)
    h, w = models.default_image_size(name)
    paper = models.PAPER_FIGURES[name]
    row = {
        "name": name,
        "input_shape": [h, w, 3],
        "params": int(model.count_params()),
        "madds": models.count_madds(model),
        "paper_params": paper["params"],
        "paper_madds": paper["madds"],
        "in_paper": name != "tiny",
    }
    del model
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per model")
    parser.add_argument("--models", default=None,
                        help="comma-separated subset (default: all of models.MODEL_NAMES)")
    parser.add_argument("--normalization", default="batch", choices=("batch", "lrn"))
    args = parser.parse_args(argv)

    import_tensorflow()
    import keras

    import models

    names = models.MODEL_NAMES if not args.models else tuple(
        n.strip() for n in args.models.split(",") if n.strip())
    for name in names:
        if name not in models.MODEL_NAMES:
            parser.error(f"unknown model {name!r}; choose from {', '.join(models.MODEL_NAMES)}")

    if not args.json:
        header = (f"{'model':<6} {'input':>9} {'params':>9} {'madds':>9} "
                  f"{'paper params':>13} {'paper madds':>12}")
        print(header)
        print("-" * len(header))
    start = time.time()
    for name in names:
        row = describe(name, args.normalization)
        keras.backend.clear_session()
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            h, w, _ = row["input_shape"]
            note = "" if row["in_paper"] else "  (not in the paper)"
            print(f"{name:<6} {f'{h}x{w}':>9} {_human(row['params']):>9} "
                  f"{_human(row['madds']):>9} {_human(row['paper_params']):>13} "
                  f"{_human(row['paper_madds']):>12}{note}", flush=True)
    if not args.json:
        print(f"(multiply-adds per image, counted from the built layers; {time.time() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
