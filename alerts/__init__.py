"""The default rule pack: YAML files in this folder, loaded by the collector."""
