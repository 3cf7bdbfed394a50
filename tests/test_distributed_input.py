"""data.distributed + training.data.batches under a strategy: one global P x K batch, one slice per
replica (FaceNet Section 3.2 mines over the whole batch).

Replica r must get rows [r*B/N, (r+1)*B/N) of each global batch, so that an all-gather in replica
order gives back the single-device batch. In process: the no-strategy path, the divisibility
checks, and two simulated workers (``tf.distribute.InputContext`` needs no devices). Logical CPU
devices can only be configured before TensorFlow initialises its devices, so the MirroredStrategy
checks run in one subprocess over 2 and 4 logical CPU devices and report JSON.
"""
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from data.distributed import (check_replica_split, distribute_balanced, pipeline_dataset_fn,
                              pipeline_rows, slice_for_pipeline)
from exit_codes import CliError

from tests.helpers import REPO, subprocess_env, write_colour_faces

NAMES = [f"Id{i}_X" for i in range(8)]
COLOURS = [(30 * i, 255 - 30 * i, (90 * i) % 256) for i in range(8)]
PER_ID = 3  # fewer than some K below: sampling with replacement is part of the sequence
SIZE = 12  # pixels (square)
STEPS = 3


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """A folder of 8 identities x 3 coloured 40 x 36 PNG faces."""
    root = tmp_path_factory.mktemp("faces")
    write_colour_faces(str(root / "train"), np.random.default_rng(0), NAMES, COLOURS, PER_ID,
                       jitter=8)
    return str(root / "train")


def _maker(folder, p, k, seed=7):
    """make_global_dataset for a folder: augmented P x K batches as ``({"images", "labels"},)``."""
    from data.dataset import scan_identity_folder
    from data.pipeline import balanced_dataset

    source = scan_identity_folder(folder)

    def make(rows=None):
        ds = balanced_dataset(source, p, k, SIZE, augment=True, seed=seed, rows=rows)
        return ds.map(lambda x, y: ({"images": x, "labels": y},))

    return make


def _arrays(element):
    (batch,) = element
    return batch["images"].numpy(), batch["labels"].numpy()


# ---------------------------------------------------------------------------------- in process
def test_no_strategy_or_one_replica_returns_the_dataset_unchanged():
    made = tf.data.Dataset.range(4).batch(4)
    make = lambda: made  # noqa: E731
    assert distribute_balanced(None, make, 2, 2) is made
    assert distribute_balanced(tf.distribute.get_strategy(), make, 2, 2) is made
    assert distribute_balanced(None, make, 3, 1, mining_scope="replica") is made


@pytest.mark.parametrize("n, p, k, scope, match", [
    (2, 3, 3, "global", r"3 x 3 = 9 images does not split evenly over 2 replicas"),
    (4, 3, 2, "global", r"3 x 2 = 6 images does not split evenly over 4 replicas"),
    (2, 3, 2, "replica", r"P=3 must be divisible by the 2 replicas"),
    (4, 4, 2, "replica", r"leaves 1 identity per replica: no negatives"),
    (2, 2, 2, "local", r"mining_scope must be one of"),
])
def test_a_batch_that_does_not_split_is_refused(n, p, k, scope, match):
    with pytest.raises(ValueError, match=match):
        check_replica_split(n, p, k, scope)
    fake = types.SimpleNamespace(num_replicas_in_sync=n)  # refused before the strategy is used
    with pytest.raises(ValueError, match=match):
        distribute_balanced(fake, lambda: pytest.fail("built the dataset"), p, k, scope)


def test_global_scope_needs_only_the_batch_to_divide():
    assert check_replica_split(2, 3, 2, "global") == 3  # identity 1 straddles the two replicas
    assert check_replica_split(4, 8, 2, "replica") == 4  # 2 whole identities each
    assert check_replica_split(1, 1, 5, "replica") == 5


def test_batches_turns_a_split_error_into_one_cli_line(faces):
    from data.dataset import scan_identity_folder
    from training.data import batches

    settings = types.SimpleNamespace(
        identities_per_batch=3, images_per_identity=3, image_size=(SIZE, SIZE), augment=True,
        seed=1, small_identities="replace", crop_fraction=0.875, photometric=False,
        skip_damaged_shards=False, mining_scope="global")
    source = scan_identity_folder(faces)
    with pytest.raises(CliError, match="does not split evenly over 2 replicas") as info:
        batches(settings, source, 0, strategy=types.SimpleNamespace(num_replicas_in_sync=2))
    assert "\n" not in str(info.value)
    plain = batches(settings, source, 0)  # no strategy: today's dataset
    assert isinstance(plain, tf.data.Dataset)
    (batch,) = plain.element_spec
    assert batch["images"].shape == (9, SIZE, SIZE, 3) and batch["labels"].shape == (9,)


@pytest.mark.parametrize("structure", ["tuple", "one_tuple", "dict"])
def test_slicing_keeps_the_element_structure(structure):
    rows = tf.reshape(tf.range(8 * 2), [8, 2])
    element = {"tuple": (rows, rows[:, 0]), "one_tuple": ({"a": rows},), "dict": {"a": rows}}
    ds = tf.data.Dataset.from_tensors(element[structure])
    ctx = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                     num_replicas_in_sync=2)
    out = list(slice_for_pipeline(ds, 8, ctx))
    assert len(out) == 2  # one element per replica, 8 rows -> 4 each
    tf.nest.assert_same_structure(element[structure], out[0])
    for g, part in enumerate(out):
        np.testing.assert_array_equal(tf.nest.flatten(part)[0].numpy(), rows[4 * g:4 * g + 4])


def test_a_tensor_without_the_batch_dimension_is_refused():
    ds = tf.data.Dataset.from_tensors((tf.zeros([8, 2]), tf.zeros([4])))
    ctx = tf.distribute.InputContext(1, 0, 2)
    with pytest.raises(ValueError, match=r"must be \[8, \.\.\.\]"):
        slice_for_pipeline(ds, 8, ctx)


@pytest.mark.parametrize("selects_rows", [False, True])  # slice after / select before decoding
@pytest.mark.parametrize("replicas", [2, 4])  # 1 and 2 local replicas per worker
def test_two_workers_read_disjoint_slices_that_make_the_global_batch(faces, replicas,
                                                                     selects_rows):
    p, k = 4, 2
    make = _maker(faces, p, k)
    b = p * k
    reference = [_arrays(e) for e in make().take(STEPS)]
    local = replicas // 2
    assert pipeline_rows(tf.distribute.InputContext(2, 1, replicas), b) == (b // 2, local,
                                                                             b // replicas)
    per_worker = []
    for w in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=w,
                                         num_replicas_in_sync=replicas)
        fn = pipeline_dataset_fn(make, b, selects_rows)
        elements = [_arrays(e) for e in fn(ctx).take(STEPS * local)]
        assert all(x.shape == (b // replicas, SIZE, SIZE, 3) for x, _ in elements)
        per_worker.append(elements)
    for step, (images, labels) in enumerate(reference):
        parts = [per_worker[w][step * local + g] for w in range(2) for g in range(local)]
        np.testing.assert_array_equal(np.concatenate([x for x, _ in parts]), images)
        np.testing.assert_array_equal(np.concatenate([y for _, y in parts]), labels)
        halves = [np.concatenate([x for x, _ in parts[w * local:(w + 1) * local]])
                  for w in range(2)]
        assert not np.array_equal(halves[0], halves[1])  # no batch read twice
        # P % N == 0 here: each replica holds whole identities, none shared
        ids = [set(y.tolist()) for _, y in parts]
        assert sum(len(s) for s in ids) == p
        assert all(np.bincount(y)[list(s)].tolist() == [k] * len(s) for (_, y), s in zip(parts, ids))


def test_balanced_dataset_rows_are_the_rows_of_the_full_batch(faces):
    make = _maker(faces, 4, 2)
    full = [_arrays(e) for e in make().take(STEPS)]
    part = [_arrays(e) for e in make(rows=(3, 7)).take(STEPS)]
    for (images, labels), (x, y) in zip(full, part):
        np.testing.assert_array_equal(x, images[3:7])  # same pixels: same per-row seeds
        np.testing.assert_array_equal(y, labels[3:7])
    for bad in [(0, 0), (-1, 4), (4, 9)]:
        with pytest.raises(ValueError, match="rows must be"):
            make(rows=bad)


# ---------------------------------------------------------------------------------- subprocess
_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(4)])
devices = [d.name for d in tf.config.list_logical_devices("CPU")]

from data.dataset import scan_identity_folder
from data.distributed import distribute_balanced
from data.pipeline import balanced_dataset

source = scan_identity_folder(sys.argv[1])
SIZE, STEPS = int(sys.argv[2]), int(sys.argv[3])


def maker(p, k, seed=7):
    def make():
        ds = balanced_dataset(source, p, k, SIZE, augment=True, seed=seed)
        return ds.map(lambda x, y: ({"images": x, "labels": y},))
    return make


def compare(n, p, k, scope="global"):
    strategy = tf.distribute.MirroredStrategy(devices[:n])
    make = maker(p, k)
    reference = [(e[0]["images"].numpy(), e[0]["labels"].numpy()) for e in make().take(STEPS)]
    out = {"max_abs_diff": 0.0, "labels_equal": True, "replica_labels": [], "shapes": set()}
    for build in range(2):  # two builds: the same sequence
        it = iter(distribute_balanced(strategy, make, p, k, scope))
        for step in range(STEPS):
            (batch,) = next(it)
            xs = [v.numpy() for v in strategy.experimental_local_results(batch["images"])]
            ys = [v.numpy() for v in strategy.experimental_local_results(batch["labels"])]
            out["shapes"].add(tuple(xs[0].shape))
            out["max_abs_diff"] = max(out["max_abs_diff"],
                                      float(np.abs(np.concatenate(xs) - reference[step][0]).max()))
            out["labels_equal"] &= bool(np.array_equal(np.concatenate(ys), reference[step][1]))
            if build == 0:
                out["replica_labels"].append([y.tolist() for y in ys])
    out["shapes"] = sorted(out["shapes"])
    return out


report = {
    "n2": compare(2, 4, 2),
    "n4": compare(4, 4, 2),
    "n2_straddle": compare(2, 3, 2),  # global scope: P % N != 0 is fine
    "n2_replica_scope": compare(2, 4, 2, "replica"),
}
try:  # the pipeline's own errors come out of distribute_datasets_from_function as they are
    distribute_balanced(tf.distribute.MirroredStrategy(devices[:2]), maker(10, 2), 10, 2)
    report["too_many_identities"] = None
except ValueError as exc:
    report["too_many_identities"] = str(exc)

# Keras fit takes the distributed dataset: every replica trains on its B/N rows
import keras

strategy = tf.distribute.MirroredStrategy(devices[:2])


class Probe(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, images):
        return self.dense(tf.reshape(images, [tf.shape(images)[0], -1]))

    def train_step(self, data):
        (batch,) = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(self(batch["images"]) ** 2)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        return {"rows": tf.cast(tf.shape(batch["labels"])[0], tf.float32)}


with strategy.scope():
    model = Probe()
    model(tf.zeros([1, SIZE, SIZE, 3]))
    model.compile(optimizer="sgd")
history = model.fit(distribute_balanced(strategy, maker(4, 2), 4, 2), epochs=1,
                    steps_per_epoch=2, verbose=0)
report["fit_rows"] = history.history["rows"]
print("REPORT " + json.dumps(report))
"""


@pytest.fixture(scope="module")
def mirrored(faces):
    """The subprocess's report (MirroredStrategy over 2 and 4 logical CPU devices)."""
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, faces, str(SIZE), str(STEPS)],
                          cwd=REPO, env=subprocess_env(TF_CPP_MIN_LOG_LEVEL=2),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


@pytest.mark.slow
@pytest.mark.parametrize("case, replicas, p, k", [
    ("n2", 2, 4, 2), ("n4", 4, 4, 2), ("n2_straddle", 2, 3, 2), ("n2_replica_scope", 2, 4, 2)])
def test_replicas_concatenate_to_the_single_device_batch(mirrored, case, replicas, p, k):
    out = mirrored[case]
    assert out["max_abs_diff"] == 0.0 and out["labels_equal"], out
    assert out["shapes"] == [[p * k // replicas, SIZE, SIZE, 3]]
    assert len(out["replica_labels"]) == STEPS
    if p % replicas == 0:  # whole identities: K rows each, no identity on two replicas
        for step in out["replica_labels"]:
            seen = [set(labels) for labels in step]
            assert sum(len(s) for s in seen) == p
            assert all(labels.count(c) == k for labels in step for c in set(labels))
    else:  # an identity straddles two replicas
        assert any(set(a) & set(b) for step in out["replica_labels"] for a, b in zip(step, step[1:]))


@pytest.mark.slow
def test_pipeline_errors_and_keras_fit_under_mirrored(mirrored):
    assert "a batch needs P=10 distinct identities" in mirrored["too_many_identities"]
    assert mirrored["fit_rows"] == [4.0]  # the logs of the last step: B/N = 8/2 rows per replica
