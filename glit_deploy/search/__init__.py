"""Hierarchical evolutionary search under measured latency."""

from glit_deploy.search.evolution import EvolutionarySearch, SearchConfig, budget_label, parse_latency

__all__ = ["EvolutionarySearch", "SearchConfig", "budget_label", "parse_latency"]
