"""Triplet loss with in-graph online mining (FaceNet, Schroff et al. 2015, Sections 3.1-3.2).

Modules: `distances` (pairwise distance matrices), `masks` (positive/negative pair masks, masked
reductions), `mining` (one function per mining strategy, and distance-weighted sampling),
`seeding` (seeds of the random draws), `triplet` (the loss, its statistics and the Keras Loss),
`layer` (a Keras Layer adding the loss and its statistics), `harmonic` (FaceNet's harmonic
triplet loss: new embeddings compatible with an old frozen model's, and its Layer), `tfa_compat`
(drop-in replacements for tensorflow_addons' TripletSemiHardLoss / TripletHardLoss); the losses
that followed FaceNet: `pair_losses` (contrastive, lifted structured, soft-margin batch-hard,
distance-weighted) and `margin_heads` (softmax, center loss, NormFace, SphereFace, CosFace,
ArcFace heads over the embedding); `wrapper` (the Keras Loss form shared by the batch losses);
`empty_batch` makes every batch loss 0 on an empty batch; `global_batch` (under a tf.distribute
strategy, the global batch all-gathered from the replicas, so mining sees the whole batch:
`mining_scope="global"`, or each replica's slice: "replica").
"""
from losses.distances import DISTANCES, pairwise_distances
from losses.global_batch import MINING_SCOPES, gather_global, num_replicas
from losses.harmonic import (HarmonicTripletLossLayer, harmonic_triplet_loss,
                             harmonic_triplet_loss_with_stats)
from losses.layer import TripletLossLayer
from losses.margin_heads import (HEADS, ArcFaceHead, CenterLoss, CosFaceHead, NormFaceHead,
                                 SoftmaxCenterHead, SoftmaxHead, SphereFaceHead, make_head)
from losses.masks import masked_maximum, masked_minimum, negative_mask, positive_mask
from losses.mining import (STRATEGIES, distance_weighted_sampling, mine_all, mine_hard,
                           mine_semi_hard, mine_semi_hard_paper)
from losses.pair_losses import (ContrastiveLoss, DistanceWeightedLoss, LiftedStructuredLoss,
                                TriHardLoss, contrastive_loss, distance_weighted_loss,
                                lifted_structured_loss, trihard_loss)
from losses.tfa_compat import (TripletHardLoss, TripletSemiHardLoss, triplet_hard_loss,
                               triplet_semihard_loss)
from losses.triplet import STAT_KEYS, TripletLoss, triplet_loss, triplet_loss_with_stats

__all__ = [
    "HEADS", "ArcFaceHead", "CenterLoss", "ContrastiveLoss", "CosFaceHead", "DistanceWeightedLoss",
    "LiftedStructuredLoss", "NormFaceHead", "SoftmaxCenterHead", "SoftmaxHead", "SphereFaceHead",
    "TriHardLoss", "contrastive_loss", "distance_weighted_loss", "distance_weighted_sampling",
    "lifted_structured_loss", "make_head", "trihard_loss",
    "HarmonicTripletLossLayer", "harmonic_triplet_loss", "harmonic_triplet_loss_with_stats",
    "MINING_SCOPES", "gather_global", "num_replicas",
    "DISTANCES", "STAT_KEYS", "STRATEGIES", "TripletHardLoss", "TripletLoss", "TripletLossLayer",
    "TripletSemiHardLoss", "masked_maximum", "masked_minimum", "mine_all", "mine_hard",
    "mine_semi_hard", "mine_semi_hard_paper", "negative_mask", "pairwise_distances",
    "positive_mask", "triplet_hard_loss", "triplet_loss", "triplet_loss_with_stats",
    "triplet_semihard_loss",
]
