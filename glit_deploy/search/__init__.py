"""Hierarchical evolutionary search under measured latency."""

from glit_deploy.latency.budget import Budget, budget_label, parse_latency
from glit_deploy.search.evolution import EvolutionarySearch, SearchConfig

__all__ = ["Budget", "EvolutionarySearch", "SearchConfig", "budget_label", "parse_latency"]
