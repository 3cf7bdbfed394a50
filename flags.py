"""Command-line flags, defined once for train.py, evaluate.py, export.py, faces.py and data.align
(absl).

Import this module and call the ``define_*`` functions you need before ``app.run(main)``; each group
is defined at most once per process, so a module may call a group that another already defined.
Flag values are read from ``absl.flags.FLAGS``.

One vocabulary for every command-line tool: a flag name means the same thing in each tool that
has it (``--crop_size``/``--crop_margin``/``--alignment`` for the face crop, ``--image_size`` for
the network input, ``--triplet_margin`` for the loss's alpha, ``--linkage``, ``--threshold``), and
the choices of the enum flags come from ``choices.py``. Old names keep working for one release as
deprecated aliases (``define_deprecated_alias``): they print a warning and set the new flag;
``cli_checks.cli_main`` applies them before a tool's main runs.
"""
import sys

from absl import flags

from choices import (ALIGNMENTS, DISTANCES, DISTRIBUTION_STRATEGIES, HEADS, LINKAGES, LOSSES,
                     LR_SCHEDULES, MINING_SCOPES, MINING_STRATEGIES, MODEL_NAMES, NORMALIZATIONS,
                     OPTIMIZERS, RECIPES, SMALL_IDENTITY_POLICIES)
from exit_codes import CliError

FLAGS = flags.FLAGS

_defined = set()


def _once(group):
    def wrap(fn):
        def inner():
            if group in _defined:
                return
            _defined.add(group)
            fn()

        inner.__doc__ = fn.__doc__
        inner.__name__ = fn.__name__
        return inner

    return wrap


class _DeprecatedAlias(flags.Flag):
    """An old flag name kept for one release; ``new_name`` is the flag it sets."""

    def __init__(self, target, old):
        super().__init__(target.parser, target.serializer, old, None,
                         f"Deprecated: use --{target.name} (this name goes in the next release).")
        self.new_name = target.name


def define_deprecated_alias(old, new, flag_values=FLAGS):
    """Keep ``--old`` working for one release as a deprecated name of the defined flag ``--new``.

    ``--old`` parses values as ``--new`` does; ``apply_deprecated_aliases`` moves its value over.
    Defining the same alias twice is a no-op; a name already taken by another flag is an error.
    """
    if old in flag_values:
        if getattr(flag_values[old], "new_name", None) == new:
            return
        raise ValueError(f"--{old} cannot be a deprecated alias of --{new}: it is another flag")
    flags.DEFINE_flag(_DeprecatedAlias(flag_values[new], old), flag_values)


def apply_deprecated_aliases(program=None, flag_values=FLAGS):
    """Give each new flag the value of its deprecated alias when only the alias was used, with
    one warning line on stderr; both with different values is a CliError (exit code USAGE).

    Returns the old names that were used.
    """
    used = []
    for old in sorted(flag_values):
        alias = flag_values[old]
        if not isinstance(alias, _DeprecatedAlias) or not alias.present:
            continue
        target = flag_values[alias.new_name]
        if target.present and target.value != alias.value:
            raise CliError(f"--{old} is the deprecated name of --{target.name}; give only "
                           f"--{target.name}")
        sys.stderr.write(f"{program or 'facenet'}: warning: --{old} is deprecated and goes in the "
                         f"next release; use --{target.name}\n")
        target.value = alias.value
        target.present = alias.present
        used.append(old)
    return used


@_once("common")
def define_common_flags():
    """Model identity and run location: shared by every entry point."""
    flags.DEFINE_enum("model", "tiny", MODEL_NAMES, "Network architecture (FaceNet Section 3.3).")
    flags.DEFINE_string(
        "image_size", None,
        "Input size as 'S' or 'HxW' in pixels; default is the model's own (nn1 220, nn2 224, "
        "nn3 160, nn4 96, nns1 165, nns2 140x116).")
    flags.DEFINE_integer("embedding_size", 128, "Embedding dimension (the paper uses 128).")
    flags.DEFINE_enum("normalization", "batch", NORMALIZATIONS,
                      "Normalisation layers: batch norm (default) or the paper's LRN.")
    flags.DEFINE_string("model_dir", None, "Directory for checkpoints, logs and exports.")
    flags.DEFINE_integer("seed", 1234, "Random seed for data order, augmentation and init.")
    flags.DEFINE_string("export_dir", None,
                        "SavedModel directory: written by export.py (default model_dir/export), "
                        "read by evaluate.py.")
    flags.DEFINE_integer("batch_size", 64, "Batch size for embedding (evaluation and export checks).")


@_once("data")
def define_data_flags():
    """Where images come from."""
    flags.DEFINE_string("data_dir", None,
                        "Folder-per-identity image tree, or a TFRecord glob (e.g. 'shards/*.tfrecord'). "
                        "Empty: the built-in synthetic faces.")
    flags.DEFINE_string("val_dir", None, "Folder-per-identity hold-out tree for validation.")
    flags.DEFINE_string("lfw_dir", None, "LFW-format image root (name/name_0001.ext).")
    flags.DEFINE_string("lfw_pairs", None, "LFW pairs file: View 2 pairs.txt or a View 1 dev file.")
    flags.DEFINE_string("cache_dir", None,
                        "Where the built-in synthetic faces are cached "
                        "(default $FACENET_CACHE or ~/.cache/facenet).")


@_once("train")
def define_train_flags():
    """Batches, loss, optimisation and run control for train.py."""
    define_common_flags()
    define_data_flags()
    flags.DEFINE_enum(
        "recipe", "auto", RECIPES,
        "A measured set of defaults for the flags not given (training/recipes.py): 'real' for "
        "in-the-wild aligned crops, 'paper' for FaceNet's own setup (Adagrad 0.05, semi-hard, "
        "P=45 x K=40, NN4), 'synthetic' for the built-in data; 'auto' is 'real' with --data_dir, "
        "else 'synthetic'.")
    flags.DEFINE_integer("identities_per_batch", 16, "P: identities per batch.")
    flags.DEFINE_integer("images_per_identity", 8, "K: images per identity in a batch.")
    flags.DEFINE_enum("small_identities", "replace", SMALL_IDENTITY_POLICIES,
                      "Identities with fewer than K images: sample with replacement, or drop.")
    flags.DEFINE_bool("skip_damaged_shards", False,
                      "TFRecord --data_dir: train on the intact records of a damaged (e.g. truncated) "
                      "shard, with a warning counting the records lost, instead of stopping (exit 9).")
    flags.DEFINE_enum("loss", "triplet", LOSSES,
                      "Training objective: FaceNet's triplet loss, another metric-learning loss, or "
                      "a classification head over the embedding (see training/objectives.py).")
    flags.DEFINE_float("loss_margin", None,
                       "Margin of contrastive / lifted / distance_weighted (default: the loss's own).")
    flags.DEFINE_float("head_scale", None, "Scale s of normface/sphereface/cosface/arcface heads.")
    flags.DEFINE_float("head_margin", None, "Margin m of sphereface (integer)/cosface/arcface heads.")
    flags.DEFINE_float("center_weight", None, "lambda of the center loss for --loss=softmax_center.")
    flags.DEFINE_integer("pretrain_softmax_steps", 0,
                         "With --loss=triplet: train a classification head (--pretrain_head) for "
                         "this many steps first, then drop it and fine-tune with the triplet loss.")
    flags.DEFINE_enum("pretrain_head", "softmax", HEADS,
                      "The head of --pretrain_softmax_steps: plain softmax or a margin head "
                      "(--head_scale, --head_margin apply).")
    flags.DEFINE_enum("mining", "semi_hard", MINING_STRATEGIES, "Online triplet mining strategy.")
    flags.DEFINE_enum("distance", "squared_l2", DISTANCES, "Embedding distance in the loss.")
    flags.DEFINE_float("triplet_margin", 0.2, "Triplet margin alpha (the paper's 0.2, Section 3.1).")
    define_deprecated_alias("margin", "triplet_margin")
    flags.DEFINE_float("val_fraction", 0.2, "Fraction of identities held out when no --val_dir.")
    flags.DEFINE_enum("optimizer", "adagrad", OPTIMIZERS,
                      "Optimiser: Adagrad as in the paper, Adam, AdamW, or SGD with momentum.")
    flags.DEFINE_float("learning_rate", 0.05, "Initial learning rate (paper: 0.05 with Adagrad).")
    flags.DEFINE_enum("lr_schedule", "constant", LR_SCHEDULES,
                      "Learning-rate schedule: cosine and step run over --max_steps; "
                      "cosine_minutes is a cosine over the --max_minutes wall-clock budget "
                      "(constant without one).")
    flags.DEFINE_integer("warmup_steps", 0,
                         "Linear learning-rate warm-up over this many first steps.")
    flags.DEFINE_float("momentum", 0.9, "Momentum for --optimizer=sgd.")
    flags.DEFINE_float("weight_decay", 0.0, "L2 weight decay applied by the optimiser.")
    flags.DEFINE_float("ema_momentum", 0.0,
                       "Keep an exponential moving average of the weights with this momentum "
                       "(e.g. 0.99) and validate, checkpoint and export it; 0 = off.")
    flags.DEFINE_integer("max_steps", None, "Stop after this many steps (overrides --epochs).")
    flags.DEFINE_integer("steps_per_epoch", 100, "Steps between validations and checkpoints.")
    flags.DEFINE_integer("epochs", None, "Number of epochs; default from --max_steps.")
    flags.DEFINE_float("max_minutes", None,
                       "Stop cleanly after this much wall-clock time from start-up, not counting "
                       "the time spent validating. Default: no limit, except 8.5 minutes on the "
                       "built-in data with no --max_steps/--epochs.")
    flags.DEFINE_boolean("augment", True, "Random crop and flip (and --photometric).")
    flags.DEFINE_float("crop_fraction", 0.875,
                       "Augmentation: smallest random-crop side, as a fraction of the image side.")
    flags.DEFINE_boolean("photometric", False,
                         "Augmentation: random brightness and contrast.")
    flags.DEFINE_enum("cache_images", "auto", ("auto", "memory", "off"),
                      "Decode the training images once and keep them in memory (data/"
                      "memory_cache.py). auto: when they take at most a quarter of the RAM.")
    flags.DEFINE_boolean("mixed_precision", False,
                         "Mixed precision: mixed_float16 on a GPU, mixed_bfloat16 on a CPU (the "
                         "losses and their mining run in float32).")
    flags.DEFINE_boolean("jit_compile", False, "XLA-compile the training step.")
    flags.DEFINE_enum("distribution_strategy", "default", DISTRIBUTION_STRATEGIES,
                      "tf.distribute strategy (README: Scaling out).")
    flags.DEFINE_enum("mining_scope", "global", MINING_SCOPES,
                      "Under a distribution strategy: global mines over the whole P x K batch "
                      "(embeddings all-gathered across replicas and workers, FaceNet Section "
                      "3.2); replica mines inside each replica's slice.")
    flags.DEFINE_boolean("sync_batch_norm", True,
                         "With more than one replica: batch-norm statistics over the global batch "
                         "(synchronised across replicas); --nosync_batch_norm uses each replica's "
                         "slice.")
    flags.DEFINE_integer("num_cpu_devices", 1,
                         "Split the CPU into this many logical devices (to try --distribution_"
                         "strategy=mirrored without GPUs).")
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept by the CheckpointManager.")
    flags.DEFINE_integer("projector_images", 500, "Validation images shown in the projector.")
    flags.DEFINE_boolean("projector_only", False, "Only (re)write the projector files and exit.")
    flags.DEFINE_boolean("export", True, "Write a SavedModel to model_dir/export at the end.")
    flags.DEFINE_string(
        "compatible_with", None,
        "Harmonic embeddings (FaceNet's appendix): train embeddings that compare directly with "
        "those of this old model, an export folder (SavedModel) or a model_dir; it is loaded "
        "frozen and must have the same --embedding_size (losses/harmonic.py).")
    flags.DEFINE_integer("synthetic_identities", 400, "Built-in data: number of identities.")
    flags.DEFINE_integer("synthetic_images_per_identity", 20, "Built-in data: images per identity.")


@_once("export")
def define_export_flags():
    """export.py: which checkpoint and where to."""
    define_common_flags()
    define_threshold_flag()
    flags.DEFINE_string("checkpoint", None, "Checkpoint prefix (default: latest in model_dir).")


@_once("evaluate")
def define_evaluate_flags():
    """evaluate.py: the model, the protocol and the outputs."""
    define_common_flags()
    define_data_flags()
    flags.DEFINE_boolean("flip", False, "Add horizontal-flip test-time augmentation.")
    flags.DEFINE_boolean("strict", False, "Score pairs with a missing image as wrong.")
    flags.DEFINE_enum("pairs", "balanced", ("all", "balanced"),
                      "Hold-out set (--data_dir): all pairs, or a balanced sample.")
    flags.DEFINE_integer("num_pairs", 6000, "Balanced sample size for --pairs=balanced.")
    flags.DEFINE_integer("num_folds", 10, "Cross-validation folds for threshold selection.")
    flags.DEFINE_boolean("identification", True, "Run the identification protocol (hold-out set).")
    flags.DEFINE_boolean("clustering", True, "Run the clustering protocol (hold-out set).")
    flags.DEFINE_integer("num_clusters", None, "k for k-means; default agglomerative by threshold.")
    define_linkage_flag()
    define_deprecated_alias("clustering_linkage", "linkage")
    flags.DEFINE_float("clustering_threshold", None,
                       "Agglomerative cut, squared L2; default: the hold-out verification threshold "
                       "(accuracy-optimal on the hold-out pairs, so small with --pairs=all).")
    flags.DEFINE_float("impostor_fraction", 0.2,
                       "Identification: fraction of identities held out as open-set impostors.")
    flags.DEFINE_string("output_json", None, "Write the metrics here as JSON.")
    flags.DEFINE_string("output_dir", None, "Write ROC and distance-histogram PNGs here.")
    flags.DEFINE_string(
        "compare_export_dir", None,
        "Harmonic embeddings (FaceNet's appendix, Figure 9): an old SavedModel with the same "
        "embedding size as the evaluated (new) model. The verification pairs are then also scored "
        "old-old and new-old (first image by the new model, second by the old), reported under "
        "cross_model in the JSON; --output_dir gets roc_cross_model.png with the three ROC curves.")


def parse_image_size(value, default):
    """'160' -> (160, 160); '140x116' -> (140, 116); None -> default (an int or (H, W))."""
    if value is None or value == "":
        value = default
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[1]))
    text = str(value).lower().replace("×", "x")
    parts = text.split("x")
    try:
        if len(parts) == 1:
            return (int(parts[0]), int(parts[0]))
        if len(parts) == 2:
            return (int(parts[0]), int(parts[1]))
    except ValueError:
        pass
    raise ValueError(f"image size must look like '160' or '140x116', got {value!r}")


@_once("threshold")
def define_threshold_flag():
    """--threshold: the verification threshold on the squared L2 distance (export.py stores it in
    the export, faces.py decides with it)."""
    flags.DEFINE_float("threshold", None,
                       "Verification threshold on the squared L2 distance (export.py: the one to "
                       "store, default from model_dir's metrics.json; faces.py: default the one "
                       "stored in the export).")


@_once("crop")
def define_crop_flags():
    """The face crop, shared by data.align (which makes it) and faces.py (which repeats it)."""
    flags.DEFINE_integer("crop_size", 160,
                         "Side of the square face crop, pixels, before any resize to the network's "
                         "--image_size. faces.py: default the export's recorded crop, else 160.")
    flags.DEFINE_float("crop_margin", 32,
                       "Margin of the face crop. box: source pixels around the face box in total "
                       "(half per side); landmarks: output pixels around the template. faces.py: "
                       "default the export's recorded crop, else 32.")
    flags.DEFINE_enum("alignment", "box", ALIGNMENTS,
                      "box: crop box + margin and resize; landmarks: 5-point similarity warp. "
                      "faces.py: default the export's recorded crop, else box.")
    flags.DEFINE_integer("min_face_size", None, "MTCNN minimum face size, pixels (default 20).")


@_once("linkage")
def define_linkage_flag():
    """--linkage: agglomerative clustering on squared L2 distances, shared by evaluate.py's
    clustering protocol and faces.py cluster, whose defaults differ (LINKAGE_DEFAULTS)."""
    flags.DEFINE_enum("linkage", None, LINKAGES,
                      "Agglomerative linkage on squared L2 distances, cut at the threshold. "
                      "complete: every pair of faces in a cluster is within it (a cluster never "
                      "joins two people the verifier tells apart); average: the mean distance "
                      "between merged groups is. Default: average in evaluate.py, complete in "
                      "faces.py cluster.")


LINKAGE_DEFAULTS = {"evaluate": "average", "faces": "complete"}


def linkage(tool):
    """The --linkage to use in ``tool`` ('evaluate' or 'faces'): the flag, else the tool's
    default."""
    return FLAGS.linkage or LINKAGE_DEFAULTS[tool]


@_once("faces")
def define_faces_flags():
    """faces.py: the photo tool (embed, verify, identify, cluster)."""
    define_common_flags()
    define_threshold_flag()
    define_crop_flags()
    flags.DEFINE_enum("detector", "mtcnn", ("mtcnn", "none"),
                      "Face detection: MTCNN as data.align, or none: every file is already an "
                      "aligned face crop.")
    flags.DEFINE_boolean("largest", False,
                         "Only the main face of each photo (largest and most central, the one "
                         "data.align keeps) instead of every face.")
    flags.DEFINE_string("output", "embeddings.npz",
                        "embed: the NPZ of embeddings to write; the JSON of files, boxes and "
                        "scores goes beside it (embeddings.json).")
    flags.DEFINE_string("gallery", None,
                        "identify: folder with one sub-folder of photos per person.")
    flags.DEFINE_integer("top_k", 3, "identify: how many nearest people to list per face.")
    flags.DEFINE_string("gallery_cache", None,
                        "identify: the gallery's embedding cache file (default: under "
                        "$FACENET_CACHE or ~/.cache/facenet, galleries/).")
    flags.DEFINE_boolean("use_gallery_cache", True, "identify: read and write the gallery cache.")
    flags.DEFINE_string("clusters_dir", "clusters",
                        "cluster: where clusters.json and the contact sheets are written.")
    define_linkage_flag()
    flags.DEFINE_boolean("json", False, "Print the result as one JSON object instead of text.")
    flags.DEFINE_boolean("progress", True, "Show a progress bar on stderr for long work.")
