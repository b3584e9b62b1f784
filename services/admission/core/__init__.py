"""Admission decisions, pure and synchronous: pod spec in, ``PodRequest`` or ``Denial`` out."""
