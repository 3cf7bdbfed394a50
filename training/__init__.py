"""The training job that train.py drives: its frozen settings (settings.py), data sources (data.py),
distribution strategy (distribute.py), the trainer and its epoch loop (trainer.py), with the
objectives, optimiser, callbacks, validation, checkpoints, model_dir lock, run config, embedding
projector, and the export library that export.py drives (export.py)."""
