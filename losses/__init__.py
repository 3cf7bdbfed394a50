"""Triplet loss with in-graph online mining (FaceNet, Schroff et al. 2015, Sections 3.1-3.2).

Modules: `distances` (pairwise distance matrices), `masks` (positive/negative pair masks, masked
reductions), `mining` (one function per mining strategy), `triplet` (the loss, its statistics and
the Keras Loss), `layer` (a Keras Layer adding the loss and its statistics), `tfa_compat` (drop-in
replacements for tensorflow_addons' TripletSemiHardLoss / TripletHardLoss).
"""
from losses.distances import DISTANCES, pairwise_distances
from losses.layer import TripletLossLayer
from losses.masks import masked_maximum, masked_minimum, negative_mask, positive_mask
from losses.mining import (STRATEGIES, mine_all, mine_hard, mine_semi_hard,
                           mine_semi_hard_paper)
from losses.tfa_compat import (TripletHardLoss, TripletSemiHardLoss, triplet_hard_loss,
                               triplet_semihard_loss)
from losses.triplet import STAT_KEYS, TripletLoss, triplet_loss, triplet_loss_with_stats

__all__ = [
    "DISTANCES", "STAT_KEYS", "STRATEGIES", "TripletHardLoss", "TripletLoss", "TripletLossLayer",
    "TripletSemiHardLoss", "masked_maximum", "masked_minimum", "mine_all", "mine_hard",
    "mine_semi_hard", "mine_semi_hard_paper", "negative_mask", "pairwise_distances",
    "positive_mask", "triplet_hard_loss", "triplet_loss", "triplet_loss_with_stats",
    "triplet_semihard_loss",
]
