"""The admission service's edges: the NATS request handler of local mode."""
