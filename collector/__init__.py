"""The gpufleet collector: receives remote-write, stores time series, evaluates rules, notifies, feeds Grafana."""
