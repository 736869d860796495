"""EXITS stage 1b: point retrieval by random walks on a Sinkhorn-normalised attention graph."""
from exits.propagation.random_walk import (
    factored_walk_scores,
    random_walk_scores,
    random_walk_scores_reference,
    seed_distribution,
)
from exits.propagation.retrieval import (
    DEFAULT_ALPHA,
    DEFAULT_SINKHORN_ITERS,
    DEFAULT_TAU_BG,
    DEFAULT_TAU_FG,
    Retrieval,
    label_points,
    propagation_scores,
    retrieval_score,
    retrieve_points,
)
from exits.propagation.seeds import (
    SeedMasks,
    box_overlap_mask,
    move_points_inwards,
    patch_index_of_points,
    seed_masks,
)
from exits.propagation.sinkhorn import (
    SinkhornScaling,
    marginal_error,
    sinkhorn,
    sinkhorn_scaling,
    sinkhorn_transition,
    transition_matrix,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_SINKHORN_ITERS",
    "DEFAULT_TAU_BG",
    "DEFAULT_TAU_FG",
    "Retrieval",
    "SeedMasks",
    "SinkhornScaling",
    "box_overlap_mask",
    "factored_walk_scores",
    "label_points",
    "marginal_error",
    "move_points_inwards",
    "patch_index_of_points",
    "propagation_scores",
    "random_walk_scores",
    "random_walk_scores_reference",
    "retrieval_score",
    "retrieve_points",
    "seed_distribution",
    "seed_masks",
    "sinkhorn",
    "sinkhorn_scaling",
    "sinkhorn_transition",
    "transition_matrix",
]
