"""The settings of one training run: train.py's flags, read once into a frozen dataclass.

train.py applies the recipe (training/recipes.py) to its flags and then calls
:meth:`TrainSettings.from_flags`; everything under ``training/`` gets this object and never reads
absl flags. Not to be confused with ``training.run_config.RunConfig``, the network identity stored
as ``model_dir/config.json`` (:meth:`TrainSettings.run_config` derives it).
"""
import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One field per train.py flag (same name, same meaning; see flags.py), with ``recipe`` the
    resolved recipe name, ``image_size`` parsed to (H, W) and ``model_dir`` defaulted."""

    # the network (config.json)
    model: str
    image_size: tuple  # (H, W) pixels
    embedding_size: int
    normalization: str
    # where things are
    model_dir: str
    data_dir: str
    val_dir: str
    lfw_dir: str
    lfw_pairs: str
    cache_dir: str
    recipe: str
    seed: int
    # data: P x K batches (FaceNet Section 3.2), augmentation, validation split, built-in data
    identities_per_batch: int
    images_per_identity: int
    small_identities: str
    skip_damaged_shards: bool
    val_fraction: float
    synthetic_identities: int
    synthetic_images_per_identity: int
    cache_images: str
    augment: bool
    crop_fraction: float
    photometric: bool
    # the objective (stored in config.json: a checkpoint depends on it)
    loss: str
    triplet_margin: float
    distance: str
    mining: str
    loss_margin: float
    head_scale: float
    head_margin: float
    center_weight: float
    pretrain_softmax_steps: int
    pretrain_head: str
    compatible_with: str  # an old export or model_dir (harmonic embeddings), or None
    # the optimiser
    optimizer: str
    learning_rate: float
    lr_schedule: str
    momentum: float
    weight_decay: float
    ema_momentum: float
    warmup_steps: int
    # how long
    max_steps: int
    epochs: int
    steps_per_epoch: int
    max_minutes: float
    # the run
    mixed_precision: bool
    jit_compile: bool
    distribution_strategy: str
    mining_scope: str  # "global" | "replica" (losses/global_batch.py)
    sync_batch_norm: bool
    num_cpu_devices: int
    keep_checkpoints: int
    projector_images: int
    projector_only: bool
    export: bool

    @classmethod
    def from_flags(cls, flag_values, recipe):
        """The settings of parsed train.py ``flag_values`` (absl FLAGS, the recipe applied).

        ``recipe``: the resolved recipe name. ``--image_size`` defaults to the model's input size
        and ``--model_dir`` to ``runs/<model>``. Raises ValueError for a malformed --image_size.
        """
        import flags
        import models

        derived = {
            "image_size": flags.parse_image_size(flag_values.image_size,
                                                 models.default_image_size(flag_values.model)),
            "model_dir": flag_values.model_dir or os.path.join("runs", flag_values.model),
            "recipe": recipe,
        }
        given = {f.name: getattr(flag_values, f.name) for f in dataclasses.fields(cls)
                 if f.name not in derived}
        return cls(**given, **derived)

    @property
    def total_steps(self):
        """--max_steps, else --epochs x --steps_per_epoch, else 20 epochs."""
        if self.max_steps is not None:
            return int(self.max_steps)
        if self.epochs is not None:
            return int(self.epochs) * self.steps_per_epoch
        return 20 * self.steps_per_epoch

    @property
    def batch_images(self):
        """Images per step: P x K."""
        return self.identities_per_batch * self.images_per_identity

    def objective(self):
        """The flags a checkpoint's optimiser slots and loss state depend on (stored in
        config.json)."""
        return {"optimizer": self.optimizer, "loss": self.loss,
                "pretrain_softmax_steps": self.pretrain_softmax_steps,
                "pretrain_head": self.pretrain_head, "compatible_with": self.compatible_with}

    def run_config(self):
        """The network these settings describe, as stored in config.json."""
        from training.run_config import RunConfig

        return RunConfig(self.model, self.image_size, self.embedding_size, self.normalization)
