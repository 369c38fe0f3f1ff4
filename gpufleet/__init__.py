"""gpufleet: GPU fleet monitoring. This package holds what the agent and the collector share."""

__version__ = "0.1.0"
