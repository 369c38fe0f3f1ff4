"""Alert rules: loading and validating YAML, evaluating in event time, tracking alert state."""
