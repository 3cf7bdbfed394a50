"""Evaluation protocols of FaceNet Section 4-5: verification (VAL/FAR, LFW k-fold accuracy),
identification and clustering, with plots and an embedder for exported models.

Submodules are imported on demand so that the NumPy-only metrics never pull in TensorFlow:
``evaluation.verification``, ``evaluation.holdout_pairs``, ``evaluation.identification``,
``evaluation.clustering``, ``evaluation.plots``, ``evaluation.embedder``.
"""
