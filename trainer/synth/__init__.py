"""The SyntheticDataJob workload: seeds in, a synthetic dataset with provenance out."""
