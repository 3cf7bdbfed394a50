"""Fault tests (issue #16, defects 2 and 9): unreadable validation images, metrics.json, and user
errors at the command line.

A user error must end as one line ``<program>: error: ...`` on stderr that names the flag or file,
with a code from exit_codes.py and no traceback; an unreadable validation image is skipped and
counted, never fatal. The command-line tests run the CLIs as subprocesses; most of them fail
before TensorFlow loads (under a second each). The ones that train are marked slow.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import exit_codes

from tests.helpers import REPO, subprocess_env as _env


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _run(*args, timeout=300):
    """Run ``python *args`` in the repository root; returns the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _assert_user_error(proc, program, code, *needles, only_line=True):
    """One-line ``program: error: ...`` (the last stderr line; the only one when ``only_line``)
    naming every needle, exit code ``code``, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert lines, "nothing on stderr"
    if only_line:
        assert len(lines) == 1, proc.stderr
    assert lines[-1].startswith(f"{program}: error: "), proc.stderr[-3000:]
    for needle in needles:
        assert str(needle) in lines[-1], (needle, lines[-1])
    return lines[-1]


def _write_text_as_image(path):
    """A 'photo' that is a text file (the issue's ``echo text > x.jpg``)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("text\n")


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """10 training and 6 held-out synthetic identities, 5 images each at 32 px, with pairs.txt."""
    from data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("faces")
    return generate_dataset(str(root / "syn"), identities=16, images_per_identity=5, image_size=32,
                            seed=7, heldout_identities=6, workers=1, progress=False,
                            compute_baseline=False)


@pytest.fixture
def val_copy(tmp_path, faces):
    """A copy of the held-out folder (and its pairs.txt), safe to damage."""
    dst = tmp_path / "val"
    shutil.copytree(faces["test_dir"], dst)
    return dst


# ------------------------------------------------------------------------------------------------
# defect 2: an unreadable validation image is skipped and counted
# ------------------------------------------------------------------------------------------------

def test_lfw_validation_set_leaves_out_an_unreadable_image_and_counts_its_pairs(val_copy):
    from training.validation import from_lfw_pairs

    pairs = str(val_copy / "pairs.txt")
    clean = from_lfw_pairs(pairs, str(val_copy))
    bad = clean.paths[clean.idx_a[0]]  # an image the first pair uses
    uses = int(np.sum((np.asarray(clean.paths)[clean.idx_a] == bad)
                      | (np.asarray(clean.paths)[clean.idx_b] == bad)))
    _write_text_as_image(bad)

    vset = from_lfw_pairs(pairs, str(val_copy))
    assert [p for p, _ in vset.skipped_images] == [bad]
    assert bad not in vset.paths
    assert vset.num_failed_pairs == clean.num_failed_pairs + uses
    assert vset.num_pairs == clean.num_pairs - uses
    # the kept pairs still point at the same files as before
    kept = {(clean.paths[a], clean.paths[b]) for a, b in zip(clean.idx_a, clean.idx_b)
            if bad not in (clean.paths[a], clean.paths[b])}
    assert {(vset.paths[a], vset.paths[b]) for a, b in zip(vset.idx_a, vset.idx_b)} == kept


def test_holdout_validation_set_leaves_out_an_unreadable_image(val_copy):
    from data.dataset import scan_identity_folder
    from training.validation import from_identity_dataset

    bad = str(val_copy / "synth_00010" / "x.jpg")
    _write_text_as_image(bad)
    vset = from_identity_dataset(scan_identity_folder(str(val_copy)), num_pairs=40, seed=0)
    assert [p for p, _ in vset.skipped_images] == [bad]
    assert bad not in vset.paths and vset.num_pairs > 0
    assert max(vset.idx_a.max(), vset.idx_b.max()) < len(vset.paths)


def test_holdout_of_one_identity_is_a_clear_data_error(faces):
    from data.dataset import EmptyDatasetError, scan_identity_folder
    from training.validation import from_identity_dataset

    one = scan_identity_folder(faces["test_dir"]).subset([0])
    with pytest.raises(EmptyDatasetError, match="cannot make verification pairs"):
        from_identity_dataset(one, check_images=False, source="HOLDOUT")


@pytest.mark.slow
def test_embedding_recovers_from_an_image_damaged_during_training(val_copy):
    """An image that breaks after the set was checked is dropped at the next validation."""
    import keras

    from training.validation import embed_set, from_lfw_pairs

    vset = from_lfw_pairs(str(val_copy / "pairs.txt"), str(val_copy))
    n, pairs = len(vset.paths), vset.num_pairs
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(4), keras.layers.UnitNormalization()])
    assert embed_set(model, vset, (16, 16)).shape == (n, 4)
    bad = vset.paths[3]
    _write_text_as_image(bad)
    emb = embed_set(model, vset, (16, 16))
    assert emb.shape == (n - 1, 4) and np.all(np.isfinite(emb))
    assert [p for p, _ in vset.skipped_images] == [bad]
    assert vset.num_pairs < pairs and bad not in vset.paths


# ------------------------------------------------------------------------------------------------
# the boundary itself
# ------------------------------------------------------------------------------------------------

def test_cli_main_turns_user_errors_into_one_line_and_lets_bugs_through(capsys):
    from cli_checks import cli_main

    def user_error(argv):
        raise exit_codes.CliError("--x /nowhere: no such\nfolder", exit_codes.BAD_EXPORT)

    with pytest.raises(SystemExit) as exit_info:
        cli_main(user_error, "prog.py")(["prog.py"])
    assert exit_info.value.code == exit_codes.BAD_EXPORT
    assert capsys.readouterr().err == "prog.py: error: --x /nowhere: no such folder\n"

    def bug(argv):
        raise KeyError("a real bug")

    with pytest.raises(KeyError):  # not swallowed
        cli_main(bug, "prog.py", user_errors=(ValueError,))(["prog.py"])


def test_writable_dir_check_names_the_file_in_the_way(tmp_path):
    from cli_checks import require_writable_dir, require_writable_parent

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(exit_codes.CliError, match="a_file is a file, not a folder"):
        require_writable_dir(str(blocker / "model"), "--model_dir")
    with pytest.raises(exit_codes.CliError, match="--export_dir .*a_file is a file"):
        require_writable_parent(str(blocker / "export"), "--export_dir", exit_codes.BAD_EXPORT)
    require_writable_dir(str(tmp_path / "new" / "dir"), "--model_dir")  # created
    assert os.path.isdir(tmp_path / "new" / "dir") and not os.listdir(tmp_path / "new" / "dir")


# ------------------------------------------------------------------------------------------------
# defect 9: user errors of train.py, data.align, evaluate.py, export.py (fail before TensorFlow)
# ------------------------------------------------------------------------------------------------

def test_train_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = _run("train.py", f"--data_dir={missing}", f"--model_dir={tmp_path / 'm'}")
    _assert_user_error(proc, "train.py", exit_codes.USAGE, "--data_dir", missing)


def test_train_missing_val_dir(tmp_path, faces):
    missing = tmp_path / "no_such_val"
    proc = _run("train.py", f"--data_dir={faces['train_dir']}", f"--val_dir={missing}",
                f"--model_dir={tmp_path / 'm'}")
    _assert_user_error(proc, "train.py", exit_codes.USAGE, "--val_dir", missing)


def test_train_uncreatable_model_dir(tmp_path, faces):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = _run("train.py", f"--data_dir={faces['train_dir']}", f"--model_dir={blocker / 'm'}")
    _assert_user_error(proc, "train.py", exit_codes.USAGE, "--model_dir", blocker)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders; the file-in-the-way test covers it")
def test_train_read_only_model_dir(tmp_path, faces):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        proc = _run("train.py", f"--data_dir={faces['train_dir']}", f"--model_dir={ro}")
    finally:
        ro.chmod(0o700)
    _assert_user_error(proc, "train.py", exit_codes.USAGE, "--model_dir", ro, "not writable")


def test_train_bad_val_fraction_ema_momentum_and_half_lfw_flags(tmp_path, faces):
    base = (f"--data_dir={faces['train_dir']}", f"--model_dir={tmp_path / 'm'}")
    _assert_user_error(_run("train.py", *base, "--val_fraction=1"), "train.py", exit_codes.USAGE,
                       "--val_fraction")
    _assert_user_error(_run("train.py", *base, "--ema_momentum=1.5"), "train.py",
                       exit_codes.USAGE, "--ema_momentum")
    _assert_user_error(_run("train.py", *base, f"--lfw_dir={faces['test_dir']}"), "train.py",
                       exit_codes.USAGE, "--lfw_pairs")


def test_align_missing_input_and_uncreatable_output(tmp_path, faces):
    missing = tmp_path / "no_photos"
    proc = _run("-m", "data.align", f"--input_dir={missing}", f"--output_dir={tmp_path / 'out'}")
    _assert_user_error(proc, "data.align", exit_codes.USAGE, "--input_dir", missing)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = _run("-m", "data.align", f"--input_dir={faces['train_dir']}",
                f"--output_dir={blocker / 'out'}")
    _assert_user_error(proc, "data.align", exit_codes.USAGE, "--output_dir", blocker)


def test_evaluate_missing_or_empty_export_dir(tmp_path, faces):
    for export_dir in (tmp_path / "no_export", tmp_path / "empty_export"):
        if export_dir.name.startswith("empty"):
            export_dir.mkdir()
        proc = _run("evaluate.py", f"--export_dir={export_dir}", f"--data_dir={faces['test_dir']}")
        _assert_user_error(proc, "evaluate.py", exit_codes.BAD_EXPORT, "--export_dir", export_dir)


def test_evaluate_missing_data_dir_and_uncreatable_output_dir(tmp_path, faces):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "saved_model.pb").write_bytes(b"")  # passes the up-front check only
    missing = tmp_path / "no_holdout"
    proc = _run("evaluate.py", f"--export_dir={export_dir}", f"--data_dir={missing}")
    _assert_user_error(proc, "evaluate.py", exit_codes.USAGE, "--data_dir", missing)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = _run("evaluate.py", f"--export_dir={export_dir}", f"--data_dir={faces['test_dir']}",
                f"--output_dir={blocker / 'plots'}")
    _assert_user_error(proc, "evaluate.py", exit_codes.USAGE, "--output_dir", blocker)


def test_export_missing_model_dir_or_not_a_model_dir(tmp_path):
    missing = tmp_path / "no_run"
    _assert_user_error(_run("export.py", f"--model_dir={missing}"), "export.py", exit_codes.USAGE,
                       "--model_dir", missing)
    _assert_user_error(_run("export.py", f"--model_dir={tmp_path}"), "export.py", exit_codes.USAGE,
                       "--model_dir", "config.json")


def test_export_damaged_metrics_without_threshold_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model": "tiny"}')
    (tmp_path / "metrics.json").write_text('{"threshold": 1.1, "cro')  # cut short
    proc = _run("export.py", f"--model_dir={tmp_path}")
    _assert_user_error(proc, "export.py", exit_codes.DAMAGED_DATA,
                       tmp_path / "metrics.json", "--threshold")


def test_stored_metrics_is_optional_with_a_threshold(tmp_path):
    from training.export import stored_metrics

    assert stored_metrics(str(tmp_path)) == {}  # none: fine
    (tmp_path / "metrics.json").write_text("[1, 2]")
    with pytest.raises(exit_codes.CliError) as err:
        stored_metrics(str(tmp_path))
    assert err.value.exit_code == exit_codes.DAMAGED_DATA
    assert str(tmp_path / "metrics.json") in str(err.value)
    assert stored_metrics(str(tmp_path), required=False) == {}
    (tmp_path / "metrics.json").write_text('{"threshold": 0.8}')
    assert stored_metrics(str(tmp_path)) == {"threshold": 0.8}


# ------------------------------------------------------------------------------------------------
# end to end, with TensorFlow (slow)
# ------------------------------------------------------------------------------------------------

TINY = ("--recipe=synthetic", "--model=tiny", "--image_size=32", "--identities_per_batch=4",
        "--images_per_identity=4", "--steps_per_epoch=2", "--max_steps=2", "--projector_images=8")


@pytest.mark.slow
def test_train_with_an_unreadable_val_image_then_export_past_a_damaged_metrics_json(
        tmp_path, faces, val_copy):
    """The issue's recipe for defect 2, then defect 9a on the run it leaves."""
    bad = val_copy / "synth_00010" / "x.jpg"
    _write_text_as_image(bad)
    model_dir = tmp_path / "m2"
    proc = _run("train.py", *TINY, f"--data_dir={faces['train_dir']}", f"--val_dir={val_copy}",
                f"--model_dir={model_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if "unreadable images left out" in l]
    assert len(warnings) == 1 and str(bad) in warnings[0], proc.stderr[-3000:]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1 and metrics["history"][-1]["skipped_images"] == 1
    assert metrics["num_pairs"] > 0 and metrics["threshold"] is not None
    assert not [n for n in os.listdir(model_dir) if ".partial-" in n]  # atomic write, no leftover

    (model_dir / "metrics.json").write_text(json.dumps(metrics)[:50])  # damaged
    proc = _run("export.py", f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'e1'}")
    _assert_user_error(proc, "export.py", exit_codes.DAMAGED_DATA, model_dir / "metrics.json")
    proc = _run("export.py", f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'e2'}",
                "--threshold=0.75")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["threshold"] == 0.75
    from training.export import read_export_metadata

    assert read_export_metadata(str(tmp_path / "e2"))["threshold"] == 0.75


@pytest.mark.slow
def test_train_val_fraction_zero_means_no_validation(tmp_path, faces):
    model_dir = tmp_path / "m"
    proc = _run("train.py", *TINY, f"--data_dir={faces['train_dir']}", "--val_fraction=0",
                "--export=false", f"--model_dir={model_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no validation" in proc.stderr
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["step"] == 2 and "accuracy_mean" not in metrics


@pytest.mark.slow
def test_train_dataset_without_images_is_one_line(tmp_path):
    data = tmp_path / "data"
    (data / "alice").mkdir(parents=True)
    (data / "bob").mkdir()
    (data / "bob" / "notes.txt").write_text("no image here")
    proc = _run("train.py", f"--data_dir={data}", f"--model_dir={tmp_path / 'm'}")
    _assert_user_error(proc, "train.py", exit_codes.USAGE, data, only_line=False)


@pytest.mark.slow
def test_evaluate_unparsable_saved_model_is_bad_export(tmp_path, faces):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "saved_model.pb").write_bytes(bytes(range(256)) * 4)
    proc = _run("evaluate.py", f"--export_dir={export_dir}", f"--data_dir={faces['test_dir']}")
    _assert_user_error(proc, "evaluate.py", exit_codes.BAD_EXPORT, "--export_dir", export_dir,
                       only_line=False)


@pytest.mark.slow
def test_train_on_a_truncated_shard_names_it_and_can_skip_it(tmp_path, faces):
    """Defect 5 at the command line: exit DAMAGED_DATA naming the shard; --skip_damaged_shards
    trains on the intact records and says how many were lost."""
    from data.dataset import scan_identity_folder
    from data.tfrecords import write_tfrecords

    out = tmp_path / "shards"
    write_tfrecords(scan_identity_folder(faces["train_dir"]), str(out), num_shards=2,
                    progress=False)
    shard = sorted(out.glob("train-*"))[0]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    flags_ = (*TINY, f"--data_dir={out}/train-*", f"--val_dir={faces['test_dir']}",
              "--export=false", "--projector_images=0")
    proc = _run("train.py", *flags_, f"--model_dir={tmp_path / 'm1'}")
    _assert_user_error(proc, "train.py", exit_codes.DAMAGED_DATA, shard.name, only_line=False)
    proc = _run("train.py", *flags_, "--skip_damaged_shards", f"--model_dir={tmp_path / 'm2'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert shard.name in proc.stderr and "lost" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((tmp_path / "m2" / "metrics.json").read_text())["step"] == 2



@pytest.mark.slow
def test_nan_loss_exits_with_its_own_code(tmp_path, faces):
    """A diverging run stops at the step that went NaN/inf with exit code NAN_LOSS (10), which no
    other failure of any tool uses (it was 3, faces.py's "no face")."""
    from exit_codes import NAN_LOSS, NO_FACE

    proc = _run("train.py", *TINY, f"--data_dir={faces['train_dir']}", "--val_fraction=0",
                "--optimizer=sgd", "--learning_rate=1e38", "--max_steps=4", "--steps_per_epoch=4",
                "--export=false", f"--model_dir={tmp_path / 'nan'}")
    assert proc.returncode == NAN_LOSS != NO_FACE, proc.stderr[-3000:]
    assert "loss became NaN/inf at step" in proc.stderr
