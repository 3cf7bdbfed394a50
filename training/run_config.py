"""The run's identity, stored as ``model_dir/config.json``.

evaluate.py and export.py rebuild the backbone from this file; a resumed run checks that its flags
still describe the same network. train.py writes it just before a run's first checkpoint, and
checks it only when the checkpoints folder holds a checkpoint: a config.json left by a run that
failed before saving one does not refuse a corrected rerun with other flags.
"""
import dataclasses
import json
import os

from data.atomic import write_text_atomically

CONFIG_NAME = "config.json"
CHECKPOINT_SUBDIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str
    image_size: tuple  # (H, W) pixels
    embedding_size: int
    normalization: str

    def to_json(self):
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_json(cls, d):
        return cls(model=d["model"], image_size=tuple(int(v) for v in d["image_size"]),
                   embedding_size=int(d["embedding_size"]),
                   normalization=d.get("normalization", "batch"))

    def build_model(self, sync_batch_norm=False):
        """The backbone: preprocessed RGB [N, H, W, 3] -> unit embeddings [N, D].

        ``sync_batch_norm`` (train.py --sync_batch_norm) is how it trains, not what it is: it is
        not stored, and checkpoints restore with or without it (models.build_model)."""
        import models

        return models.build_model(self.model, embedding_size=self.embedding_size,
                                  image_size=self.image_size, normalization=self.normalization,
                                  sync_batch_norm=sync_batch_norm)


def config_path(model_dir):
    return os.path.join(model_dir, CONFIG_NAME)


def checkpoint_dir(model_dir):
    return os.path.join(model_dir, CHECKPOINT_SUBDIR)


def load_run_config(model_dir):
    """The RunConfig stored in model_dir; FileNotFoundError with a clear message when absent."""
    path = config_path(model_dir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {model_dir!r} a train.py model_dir?")
    try:
        with open(path, encoding="utf-8") as f:
            return RunConfig.from_json(json.load(f))
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc


def save_run_config(model_dir, config, extra=None):
    """Write config.json atomically (temp file + rename), with optional extra keys."""
    os.makedirs(model_dir, exist_ok=True)
    d = config.to_json()
    if extra:
        d.update(extra)
    write_text_atomically(config_path(model_dir), json.dumps(d, indent=2, sort_keys=True))


def check_compatible(stored, requested):
    """Raise ValueError when a resumed run's flags describe another network."""
    diffs = [f"{k}: checkpoint has {getattr(stored, k)!r}, flags ask for {getattr(requested, k)!r}"
             for k in ("model", "image_size", "embedding_size", "normalization")
             if getattr(stored, k) != getattr(requested, k)]
    if diffs:
        raise ValueError("model_dir holds a different network; use a new --model_dir or matching "
                         "flags.\n  " + "\n  ".join(diffs))
