"""`TripletLossLayer`: puts the triplet loss inside a Keras training model (backbone -> layer).

    embeddings = backbone(images)
    embeddings = TripletLossLayer(margin=0.2)([embeddings, labels])
    model = keras.Model([images, labels], embeddings); model.compile(optimizer); model.fit(...)

The layer adds the loss with `add_loss`, tracks the mining statistics (`losses.STAT_KEYS`) as
`keras.metrics.Mean` metrics so they appear in `fit` / `evaluate` logs, and returns the
embeddings unchanged.

Under a tf.distribute strategy with several replicas, `mining_scope="global"` (default) mines over
the global batch, all-gathered from the replicas (FaceNet Section 3.2; `losses.global_batch`
explains why the summed gradient is then the single-device one: Keras divides `add_loss` terms by
the number of replicas), and the statistics are the global batch's; `"replica"` mines inside each
replica's slice.
"""
import keras

from losses.global_batch import (ReplicaLocalLosses, check_mining_scope, gather_global,
                                 replica_consistent_seed)
from losses.seeding import next_seed, seed_generator
from losses.triplet import STAT_KEYS, _check_args, triplet_loss_with_stats


@keras.saving.register_keras_serializable(package="facenet")
class TripletLossLayer(ReplicaLocalLosses, keras.layers.Layer):
    """Adds the triplet loss of `[embeddings [B, D], labels [B]]`; returns embeddings [B, D].

    `mining_scope`: "global" | "replica" (`choices.MINING_SCOPES`), where the triplets are mined
    under a tf.distribute strategy; a config without it (saved before it existed) loads as
    "global". Its loss terms are kept per replica (`losses.global_batch.ReplicaLocalLosses`).
    """

    def __init__(self, margin=0.2, distance="squared_l2", mining="semi_hard", soft=False,
                 seed=None, mining_scope="global", **kwargs):
        super().__init__(**kwargs)
        _check_args(mining, soft, distance)
        if callable(distance):
            raise ValueError("TripletLossLayer needs a named distance to be serialisable.")
        self.margin = float(margin)
        self.distance = distance
        self.mining = mining
        self.soft = bool(soft)
        self.seed = None if seed is None else int(seed)
        self.mining_scope = check_mining_scope(mining_scope)
        # As TripletLoss: only the paper window draws, with a new seed per call.
        self._seed_generator = seed_generator(self.seed if mining == "semi_hard_paper" else None)
        self.stat_trackers = [keras.metrics.Mean(name=key) for key in STAT_KEYS]

    def call(self, inputs):
        embeddings, labels = inputs
        self._add_triplet_loss(*gather_global(embeddings, labels, self.mining_scope))
        return embeddings

    def _add_triplet_loss(self, embeddings, labels):
        """Adds the loss of the batch (embeddings [B, D], labels [B], already gathered) and
        updates the statistics."""
        seed = next_seed(self._seed_generator)
        if self.mining == "semi_hard_paper":
            seed = replica_consistent_seed(seed, self.mining_scope)
        loss, stats = triplet_loss_with_stats(
            labels, embeddings, margin=self.margin, distance=self.distance, mining=self.mining,
            soft=self.soft, seed=seed)
        self.add_loss(loss)
        for key, tracker in zip(STAT_KEYS, self.stat_trackers):
            tracker.update_state(stats[key])

    def compute_output_spec(self, inputs):
        embeddings = inputs[0]
        return keras.KerasTensor(embeddings.shape, dtype=embeddings.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[0])

    def get_config(self):
        config = super().get_config()
        config.update(margin=self.margin, distance=self.distance, mining=self.mining,
                      soft=self.soft, seed=self.seed, mining_scope=self.mining_scope)
        return config
