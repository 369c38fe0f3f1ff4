"""What the agent and the collector share: the remote-write codec and sender, the retry policy, Prometheus
durations, label matchers and series fingerprints. A leaf: it imports nothing else of gpufleet."""
