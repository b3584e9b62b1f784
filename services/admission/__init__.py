"""Admission: turns a pod spec into a normalized PodRequest or a clear denial."""
