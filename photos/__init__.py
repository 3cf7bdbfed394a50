"""The photo tool behind ``faces.py``: embed, verify, identify and cluster faces in photos with any
SavedModel written by export.py.

One module per job, each with a ``run_*`` function returning a JSON-ready dict and a ``format_*``
function for the printed report:

* :mod:`photos.model`: load the export, its input size and verification threshold;
* :mod:`photos.detection`: photo -> face crops, identical to ``data.align``'s training thumbnails;
* :mod:`photos.embedding`: the shared photos -> embeddings pipeline (batches, progress, failures);
* :mod:`photos.embed`, :mod:`photos.verify`, :mod:`photos.identify` (with :mod:`photos.gallery`,
  the cached gallery), :mod:`photos.cluster`: the commands;
* :mod:`photos.errors`: the user-facing errors and their exit codes.

Nothing here imports TensorFlow at import time: the model and MTCNN are loaded on first use, so
input errors are reported before TensorFlow starts.
"""
