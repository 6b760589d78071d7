"""Workloads that run inside Ray: curation, synthesis, training, pivotal token search."""
