"""Pure decisions of the metrics service: the fleet view, the figures and the families."""
