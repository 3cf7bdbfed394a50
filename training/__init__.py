"""Pieces of the training job that train.py puts together: run config, data, optimiser,
validation, callbacks, checkpoints and the embedding projector."""
