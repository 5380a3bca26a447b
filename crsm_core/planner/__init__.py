"""Batched PUCT search in latent space; the tree is tensors (see tree.py), the search in search.py."""
from .search import PlannerConfig, SearchResult, SearchStats, StepFn, ValueFn, search
from .tree import Tree, consensus_score

__all__ = ["PlannerConfig", "SearchResult", "SearchStats", "StepFn", "ValueFn", "search", "Tree",
           "consensus_score"]
