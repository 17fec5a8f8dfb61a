"""Latency measured on the deployment target: targets, the timing protocol, the latency model."""

from glit_deploy.latency.measure import Protocol, Timing
from glit_deploy.latency.table import ErrorReport, LatencyModel, measure_arch, profile_latency
from glit_deploy.latency.targets import TARGETS, Target, default_target_name, get_target

__all__ = ["TARGETS", "ErrorReport", "LatencyModel", "Protocol", "Target", "Timing", "default_target_name",
           "get_target", "measure_arch", "profile_latency"]
