"""The names a user picks on the command line, defined once (TF-free).

``flags.py`` offers these tuples as the choices of its enum flags, and the code that implements
each name imports the same tuple (``models.MODEL_NAMES``, ``losses.mining.STRATEGIES``,
``losses.distances.DISTANCES``, ``losses.margin_heads.HEADS``, ``training.objectives.LOSSES``,
``training.optim``, ``training.recipes``, ``data.sampler``), so a name is added in one place. Importing this module loads nothing else.
"""
# FaceNet Section 3.3 (Table 1: NN1; Table 2: NN2; NN3, NN4, NNS1, NNS2), plus a CPU-sized `tiny`.
MODEL_NAMES = ("nn1", "nn2", "nn3", "nn4", "nns1", "nns2", "tiny")
NORMALIZATIONS = ("batch", "lrn")

# Online triplet mining inside a batch (Section 3.2); `all` is batch-all.
MINING_STRATEGIES = ("semi_hard", "semi_hard_paper", "hard", "all")
# Embedding distances a loss can use; the paper's is squared L2 (Section 3.1).
DISTANCES = ("squared_l2", "l2", "cosine")
# Classification heads over the embedding (plain, centre-loss and margin softmax variants).
HEADS = ("softmax", "softmax_center", "normface", "sphereface", "cosface", "arcface")
# Metric-learning losses other than the triplet loss.
METRIC_LOSSES = ("contrastive", "lifted", "trihard", "distance_weighted")
# train.py --loss: the triplet loss, another metric loss, or a head.
LOSSES = ("triplet",) + METRIC_LOSSES + HEADS

# Optimisers and learning-rate schedules (training/optim.py); the paper uses Adagrad (Section 4).
OPTIMIZERS = ("adagrad", "adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step", "cosine_minutes")
# P x K batches: identities with fewer than K images are sampled with replacement, or dropped.
SMALL_IDENTITY_POLICIES = ("replace", "drop")

# tf.distribute strategies by name (training/distribute.py).
DISTRIBUTION_STRATEGIES = ("default", "mirrored", "multi_worker_mirrored")
# where online mining happens under a tf.distribute strategy (losses/global_batch.py)
MINING_SCOPES = ("global", "replica")

# train.py --recipe: named sets of defaults (training/recipes.py); auto picks real or synthetic.
RECIPES = ("auto", "real", "paper", "synthetic")

# Face crops (data.align, faces.py): box + margin, or a 5-point similarity warp.
ALIGNMENTS = ("box", "landmarks")
# Agglomerative clustering on squared L2 distances (evaluate.py, faces.py cluster).
LINKAGES = ("complete", "average", "single")
