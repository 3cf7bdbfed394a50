"""The built-in dataset: procedural synthetic faces, written as an LFW-style image tree.

Lets ``python train.py`` run with no data download: a few thousand faces of a few hundred identities
render at roughly 200 images per second per core. Identity lives in stable mid/large-scale cues (face shape,
skin tone, hair style and colour, eyes, brows, nose, mouth, facial hair, glasses; see
:mod:`data.synthetic.params`), while nuisances break pixel alignment (3-D pose, expression, lighting,
background clutter, crop jitter, occlusion, blur, noise, JPEG; see :mod:`data.synthetic.render`).
Identities are therefore easy for a small CNN and hard for raw pixels (the raw-pixel baseline,
:mod:`evaluation.pixel_baseline`, is stored with the data when the caller passes it).
:mod:`data.synthetic.dataset` writes the tree, its View 2 ``pairs.txt`` and ``synthetic.json``
(layout, atomicity and determinism are described there).

Knob: ``difficulty`` (default 1.0) scales every nuisance (pose range, lighting, clutter, occlusion
probability, blur, noise, JPEG quality, expression); 0 gives frontal, clean, neutral faces.

CLI (:mod:`data.synthetic.cli`)::

    python -m data.synthetic --output_dir DIR --synthetic_identities N --synthetic_images_per_identity K \\
        --image_size S --seed X [--heldout_identities M] [--workers W] [--difficulty D]
"""
from data.synthetic.cli import main
from data.synthetic.dataset import (FORMAT_VERSION, MAX_PAIRS_PER_FOLD, METADATA_FILE, NUM_FOLDS, PAIRS_FILE,
                                    dataset_key, default_heldout_identities, ensure_synthetic_dataset,
                                    generate_dataset, identity_name, load_metadata, view2_folds)

__all__ = ["FORMAT_VERSION", "MAX_PAIRS_PER_FOLD", "METADATA_FILE", "NUM_FOLDS", "PAIRS_FILE", "dataset_key",
           "default_heldout_identities", "ensure_synthetic_dataset", "generate_dataset", "identity_name",
           "load_metadata", "main", "view2_folds"]
