"""What train.py optimises: the training model built around the backbone for a given ``--loss``.

    triplet            FaceNet's triplet loss with online mining (--mining, --margin, --distance)
    contrastive        DeepID2-style contrastive loss over all pairs of the batch
    lifted             lifted structured loss (Song et al. 2016)
    trihard            batch-hard triplet loss with a soft margin (Hermans et al. 2017)
    distance_weighted  margin loss on distance-weighted negatives (Wu et al. 2017)
    softmax, softmax_center, normface, sphereface, cosface, arcface
                       a classification head over the L2-normalised embedding (losses/margin_heads.py),
                       trained with cross-entropy against the identity labels

Every training model maps ``{"images": [B, H, W, 3], "labels": [B]}`` to the embeddings and adds
its loss with ``add_loss``; metric-learning losses need P x K batches, heads need global class
indices (the balanced pipeline provides both). The backbone alone is exported: heads are dropped.

``pretrain_steps > 0`` is the recipe of the FaceNet successors' seeds: a classification head
(``pretrain_head``: plain softmax, or a margin head such as CosFace or ArcFace) trains the backbone
for that many steps, then the classifier is switched off and the triplet loss fine-tunes.
Both terms live in one model with one optimiser, weighted by non-trainable 0/1 switches that
:class:`PhaseSwitch` sets from the global step, so a resumed run is exact in either phase.

Distribution (``--mining_scope``). Under a tf.distribute strategy with N replicas, each replica
runs the model on its slice of the global batch and Keras divides every ``add_loss`` term by N
before the optimiser sums the replicas' gradients.
  * Metric losses (triplet, harmonic triplet, contrastive, lifted, trihard, distance_weighted):
    with ``mining_scope="global"`` (default) every replica all-gathers the embeddings and labels
    and computes the loss of the global batch (FaceNet Section 3.2: mining over the whole batch);
    the summed gradient is the single-device gradient of the global batch
    (``losses/global_batch.py``). ``"replica"`` mines inside each replica's slice.
  * Heads (:class:`ClassifierTerm`): nothing is gathered. The class weights are ordinary
    replicated (mirrored) variables; each replica adds the mean cross-entropy of its slice, Keras
    divides it by N, and the sum over replicas is the mean over the global batch when the slices
    have equal sizes (always, with P x K batches split evenly). ``mining_scope`` does not apply.
    ``softmax_center``: its center loss is a per-sample mean as well (same argument); its
    centers (a non-trainable variable, one copy per replica) are moved by every replica with the
    whole global batch (``losses.global_batch.gather_constant``), so the copies stay equal and
    each step is the single-device one.
"""
import keras
import tensorflow as tf

from choices import LOSSES, METRIC_LOSSES  # defined once (TF-free; flags.py offers them)
from losses import TripletLoss, TripletLossLayer
from losses import margin_heads, pair_losses
from losses.global_batch import ReplicaLocalLosses, check_mining_scope


def metric_loss(name, margin=None, seed=None, mining_scope="global"):
    """The keras Loss object of a metric-learning ``name`` (margin None: the loss's default),
    mining over the batch of ``mining_scope`` ("global" | "replica") under a tf.distribute
    strategy."""
    kw = {"mining_scope": check_mining_scope(mining_scope)}
    if margin is not None:
        kw["margin"] = float(margin)
    if name == "contrastive":
        return pair_losses.ContrastiveLoss(**kw)
    if name == "lifted":
        return pair_losses.LiftedStructuredLoss(**kw)
    if name == "trihard":
        return pair_losses.TriHardLoss(mining_scope=kw["mining_scope"])
    if name == "distance_weighted":
        return pair_losses.DistanceWeightedLoss(seed=seed, **kw)
    raise ValueError(f"unknown metric loss {name!r}; choose from {METRIC_LOSSES}")


def needs_classes(loss, pretrain_steps=0):
    """True when the training model has a classifier over the identities (a head, or softmax
    pre-training), so it needs their number."""
    return loss in margin_heads.HEADS or pretrain_steps > 0


class _LossTerm(ReplicaLocalLosses, keras.layers.Layer):
    """Base: ``[embeddings [B, D], labels [B]]`` -> embeddings, adding ``weight *`` a loss.

    ``weight`` is a non-trainable 0/1 switch (checkpointed), set by :class:`PhaseSwitch`. The loss
    terms are kept per replica (``losses.global_batch.ReplicaLocalLosses``: Keras' shared list
    mixes the replicas' terms as soon as a cross-replica call, such as the metric losses'
    all-gather, interleaves their forward passes).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.weight = self.add_weight(shape=(), initializer="ones", trainable=False,
                                      name="weight")

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs[0].shape, dtype=inputs[0].dtype)


@keras.saving.register_keras_serializable(package="facenet")
class EmbeddingLossTerm(_LossTerm):
    """Adds ``weight * loss(labels, embeddings)`` for a keras Loss; returns embeddings [B, D].

    A loss of this package (``losses.wrapper.LossFunctionWrapper``) is evaluated with its
    ``batch_loss``: the batch loss of its ``mining_scope``, not divided by the number of replicas,
    since Keras divides ``add_loss`` terms itself (its ``__call__`` divides too, for
    ``compile(loss=...)``; calling it here would divide twice). Another keras Loss is called as
    usual.
    """

    def __init__(self, loss, **kwargs):
        super().__init__(**kwargs)
        self.loss_fn = keras.losses.deserialize(loss) if isinstance(loss, dict) else loss

    def call(self, inputs):
        embeddings, labels = inputs
        batch_loss = getattr(self.loss_fn, "batch_loss", self.loss_fn)
        self.add_loss(tf.cast(self.weight, tf.float32) * batch_loss(labels, embeddings))
        return embeddings

    def get_config(self):
        return {**super().get_config(), "loss": keras.losses.serialize(self.loss_fn)}


@keras.saving.register_keras_serializable(package="facenet")
class ClassifierTerm(_LossTerm):
    """Adds ``weight * cross-entropy(labels, head([embeddings, labels]))``; returns embeddings.

    Also reports ``classifier_accuracy``: the top-1 accuracy of the (margin-free) cosine or
    linear logits on the batch. Under N replicas each adds the mean over its own slice (no
    gathering; Keras divides by N): the global mean when the slices are equal (module docstring).
    """

    def __init__(self, head, **kwargs):
        super().__init__(**kwargs)
        self.head = keras.layers.deserialize(head) if isinstance(head, dict) else head
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="classifier_accuracy")

    def call(self, inputs):
        embeddings, labels = inputs
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        start = len(self.head._losses)
        logits = self.head([embeddings, labels])
        self._claim_losses(self.head, start)  # the center loss of softmax_center, kept per replica
        ce = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        self.add_loss(tf.cast(self.weight, tf.float32) * tf.reduce_mean(ce))
        self.accuracy.update_state(labels, logits)
        return embeddings

    def get_config(self):
        return {**super().get_config(), "head": keras.layers.serialize(self.head)}


def head_kwargs(name, scale=None, margin=None, center_weight=None):
    """Keyword arguments for margin_heads.make_head(name, ...) from optional flag values."""
    kw = {}
    if scale is not None and name in ("normface", "sphereface", "cosface", "arcface"):
        kw["scale"] = float(scale)
    if margin is not None and name in ("sphereface", "cosface", "arcface"):
        kw["margin"] = int(margin) if name == "sphereface" else float(margin)
    if center_weight is not None and name == "softmax_center":
        kw["center_weight"] = float(center_weight)
    return kw


def build_train_model(backbone, image_size, loss="triplet", num_classes=None, *, margin=0.2,
                      distance="squared_l2", mining="semi_hard", loss_margin=None,
                      head_scale=None, head_margin=None, center_weight=None,
                      pretrain_steps=0, pretrain_head="softmax", seed=None, old_embedding=None,
                      mining_scope="global"):
    """The training model and the layers that hold state to checkpoint besides the backbone.

    Returns ``(train_model, terms)``: ``terms`` maps "triplet" / "metric" / "classifier" to the loss
    layers in the model ("metric" and "classifier" have a ``weight`` switch). ``seed`` seeds the
    distance-weighted sampler. ``pretrain_head`` is the head trained for the first
    ``pretrain_steps`` steps (any of margin_heads.HEADS). ``old_embedding``: a frozen layer
    (training.compatible.FrozenEmbedding) from the batch's images to an old model's embeddings;
    with it the triplet loss is the harmonic one (losses/harmonic.py, FaceNet's appendix).
    ``mining_scope`` ("global" | "replica", ``choices.MINING_SCOPES``) goes to every metric loss:
    under a tf.distribute strategy, mine over the global batch or inside each replica's slice
    (heads ignore it; see the module docstring).
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
    check_mining_scope(mining_scope)
    with_classifier = needs_classes(loss, pretrain_steps)
    if with_classifier and not num_classes:
        raise ValueError(f"--loss={loss} (or softmax pre-training) needs the number of identities "
                         "of the training data")
    if pretrain_steps > 0 and loss != "triplet":
        raise ValueError("softmax pre-training (--pretrain_softmax_steps) fine-tunes with "
                         f"--loss=triplet, got --loss={loss}")
    if old_embedding is not None and (loss != "triplet" or pretrain_steps > 0):
        raise ValueError("--compatible_with trains with the harmonic triplet loss: it needs "
                         f"--loss=triplet without softmax pre-training (got --loss={loss}, "
                         f"--pretrain_softmax_steps={pretrain_steps})")
    h, w = image_size
    images = keras.Input((h, w, 3), name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    emb = backbone(images)
    terms = {}
    # The loss terms compute in float32 whatever the global policy: under --mixed_precision the
    # backbone's float32 unit embeddings reach the heads and the mining unrounded.
    f32 = {"dtype": "float32"}
    if with_classifier:
        head_name = loss if loss in margin_heads.HEADS else pretrain_head
        head = margin_heads.make_head(head_name, int(num_classes),
                                      **head_kwargs(head_name, head_scale, head_margin,
                                                    center_weight), **f32)
        terms["classifier"] = ClassifierTerm(head, name=f"{head_name}_head", **f32)
        emb = terms["classifier"]([emb, labels])
    if loss == "triplet" and pretrain_steps > 0:
        # A switchable term; it reports no mining statistics (TripletLossLayer does).
        triplet = TripletLoss(margin=margin, distance=distance, mining=mining, seed=seed,
                              mining_scope=mining_scope)
        terms["metric"] = EmbeddingLossTerm(triplet, name="triplet_loss", **f32)
        emb = terms["metric"]([emb, labels])
    elif loss == "triplet" and old_embedding is not None:
        from losses.harmonic import HarmonicTripletLossLayer

        terms["triplet"] = HarmonicTripletLossLayer(margin=margin, distance=distance, mining=mining,
                                                    seed=seed, mining_scope=mining_scope,
                                                    name="harmonic_triplet_loss", **f32)
        emb = terms["triplet"]([emb, old_embedding(images), labels])
    elif loss == "triplet":
        terms["triplet"] = TripletLossLayer(margin=margin, distance=distance, mining=mining,
                                            seed=seed, mining_scope=mining_scope,
                                            name="triplet_loss", **f32)
        emb = terms["triplet"]([emb, labels])
    elif loss in METRIC_LOSSES:
        terms["metric"] = EmbeddingLossTerm(metric_loss(loss, loss_margin, seed, mining_scope),
                                            name=f"{loss}_loss", **f32)
        emb = terms["metric"]([emb, labels])
    model = keras.Model({"images": images, "labels": labels}, emb, name="facenet_train")
    return model, terms


class PhaseSwitch(keras.callbacks.Callback):
    """Before each step: the classifier term on and the metric term off while the global step is
    below ``pretrain_steps``, then the other way round (the seeds' softmax-then-triplet recipe)."""

    def __init__(self, step_fn, pretrain_steps, classifier, metric):
        super().__init__()
        self.step_fn = step_fn
        self.pretrain_steps = int(pretrain_steps)
        self.classifier = classifier
        self.metric = metric

    def on_train_batch_begin(self, batch, logs=None):
        pretraining = self.step_fn() < self.pretrain_steps
        self.classifier.weight.assign(1.0 if pretraining else 0.0)
        self.metric.weight.assign(0.0 if pretraining else 1.0)
