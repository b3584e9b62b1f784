"""Metrics: HAMi-compatible Prometheus exporter and the fleet dashboard."""
