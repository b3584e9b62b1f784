"""Scheduler: fit, score and commit GPU slices; N active replicas, no leader."""
