"""--jit_compile (XLA) and --mixed_precision (mixed_bfloat16 on a CPU) with every --loss and every
--mining strategy, on CPU: two fit steps of training.objectives.build_train_model around a tiny
backbone (16 x 16 images, one conv + batch norm), and the loss stays finite; plus train.py's wiring
(training/trainer.py: the policy chosen and logged, the jit flag given to Keras' compile).

The global Keras policy is put back after every test that sets it.
"""
import types

import numpy as np
import pytest

from choices import LOSSES, MINING_STRATEGIES

P, K, SIZE = 4, 2, 16
CASES = [("triplet", m) for m in MINING_STRATEGIES] + [(loss, "semi_hard") for loss in LOSSES
                                                        if loss != "triplet"]
# losses/seeding.stateless_seed gives int64 seeds; XLA on the CPU has StatelessMultinomial for int32
# seeds only ("No registered 'StatelessMultinomial' OpKernel for XLA_CPU_JIT ... Tseed=DT_INT64").
XLA_INT64_SEEDS = pytest.mark.xfail(
    reason="distance_weighted draws with int64 stateless seeds, which XLA:CPU does not compile "
           "(int32 seeds do); not strict, so that the fix in losses/seeding.py shows as XPASS")
XLA_CASES = [pytest.param(*c, marks=XLA_INT64_SEEDS) if c[0] == "distance_weighted" else c
             for c in CASES]


@pytest.fixture
def policy():
    """Sets a Keras global dtype policy for the test; the previous one comes back after."""
    import keras

    previous = keras.mixed_precision.global_policy()
    yield keras.mixed_precision.set_global_policy
    keras.mixed_precision.set_global_policy(previous)


def _backbone():
    """[N, 16, 16, 3] -> unit embeddings [N, 8], float32 out (as the zoo's L2 head)."""
    import keras

    from models.layers import L2Normalization

    x = inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8)(x)
    return keras.Model(inputs, L2Normalization()(x))


def _two_steps(loss, mining, jit_compile):
    """Loss of each of two fit steps on P x K batches of random images, the model and its loss
    terms."""
    import keras
    import tensorflow as tf

    from training.objectives import build_train_model

    keras.utils.set_random_seed(3)
    model, terms = build_train_model(_backbone(), (SIZE, SIZE), loss, num_classes=P,
                                     mining=mining, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=jit_compile)
    assert model.jit_compile is jit_compile  # Keras did not turn XLA off for an unsupported layer
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2 * P * K, SIZE, SIZE, 3)).astype(np.float32)
    labels = np.tile(np.repeat(np.arange(P, dtype=np.int32), K), 2)
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(P * K, drop_remainder=True)
    ds = ds.map(lambda x, y: ({"images": x, "labels": y},))
    losses = []
    model.fit(ds, epochs=1, verbose=0, callbacks=[keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"])))])
    return losses, model, terms


@pytest.mark.slow
@pytest.mark.parametrize("loss, mining", XLA_CASES)
def test_every_loss_trains_under_xla(loss, mining):
    losses, _, _ = _two_steps(loss, mining, jit_compile=True)
    assert len(losses) == 2 and np.all(np.isfinite(losses)), losses


@pytest.mark.slow
@pytest.mark.parametrize("loss, mining", CASES)
def test_every_loss_trains_in_mixed_bfloat16(policy, loss, mining):
    policy("mixed_bfloat16")
    losses, model, terms = _two_steps(loss, mining, jit_compile=False)
    assert len(losses) == 2 and np.all(np.isfinite(losses)), losses
    conv = next(layer for layer in model.layers[1].layers if layer.name.startswith("conv"))
    assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"
    # the loss terms (and a classifier's head) take the float32 embeddings as they are: no
    # rounding to bfloat16 before the heads and the mining
    assert terms
    for term in terms.values():
        assert term.compute_dtype == "float32", term.name
        head = getattr(term, "head", None)
        assert head is None or head.compute_dtype == "float32", head.name


def _fake_tf(gpus):
    config = types.SimpleNamespace(list_logical_devices=lambda kind: list(gpus) if kind == "GPU"
                                   else ["/device:CPU:0"])
    return types.SimpleNamespace(config=config)


def test_mixed_precision_is_float16_on_a_gpu_and_bfloat16_without(policy, caplog):
    import keras
    import tensorflow as tf

    from training.distribute import precision_policy
    from training.trainer import apply_precision

    assert precision_policy(_fake_tf(["/device:GPU:0"])) == "mixed_float16"
    assert precision_policy(_fake_tf([])) == "mixed_bfloat16"
    before = keras.mixed_precision.global_policy().name
    assert apply_precision(tf, types.SimpleNamespace(mixed_precision=False)) is None
    assert keras.mixed_precision.global_policy().name == before  # untouched without the flag
    caplog.set_level("INFO")
    expected = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
    try:
        assert apply_precision(tf, types.SimpleNamespace(mixed_precision=True)) == expected
        assert keras.mixed_precision.global_policy().name == expected
        assert f"Keras policy {expected}" in caplog.text
    finally:
        keras.mixed_precision.set_global_policy(before)


@pytest.fixture
def settings(tmp_path):
    """TrainSettings of parsed train.py flags (tiny at 16 px); FLAGS are reset after (and the absl
    logger's level by conftest)."""
    import flags
    from training.settings import TrainSettings

    flags.define_train_flags()
    fv = flags.FLAGS

    def make(*argv):
        fv.unparse_flags()
        fv(["train.py", "--model=tiny", "--image_size=16", f"--model_dir={tmp_path}", *argv])
        return TrainSettings.from_flags(fv, "synthetic")

    yield make
    fv.unparse_flags()


@pytest.mark.parametrize("jit", [False, True])
def test_the_trainer_compiles_with_the_jit_flag(settings, jit):
    import tensorflow as tf

    from training.trainer import Trainer

    s = settings("--jit_compile" if jit else "--nojit_compile")
    trainer = Trainer(tf, s, tf.distribute.get_strategy())
    assert trainer.train_model.jit_compile is jit


def test_the_trainer_builds_synchronised_batch_norm_only_with_several_replicas(settings):
    import keras
    import tensorflow as tf

    from training.trainer import Trainer

    def synchronized(trainer):
        return {layer.synchronized for layer in trainer.backbone.layers
                if isinstance(layer, keras.layers.BatchNormalization)}

    # one replica: plain batch norm even with the flag on (its default)
    assert synchronized(Trainer(tf, settings(), tf.distribute.get_strategy())) == {False}
    assert synchronized(Trainer(tf, settings("--sync_batch_norm"),
                                tf.distribute.get_strategy())) == {False}


def test_batch_norm_is_synchronised_by_default_with_several_replicas(settings):
    import types

    from training.distribute import synchronised_batch_norm

    assert settings().sync_batch_norm  # the default
    assert synchronised_batch_norm(settings().sync_batch_norm, types.SimpleNamespace(
        num_replicas_in_sync=2))
    assert not synchronised_batch_norm(settings("--nosync_batch_norm").sync_batch_norm,
                                       types.SimpleNamespace(num_replicas_in_sync=2))
    assert not synchronised_batch_norm(True, types.SimpleNamespace(num_replicas_in_sync=1))
