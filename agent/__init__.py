"""The gpufleet node agent: samples GPUs, the host and inference servers; serves /metrics; pushes to the collector."""
