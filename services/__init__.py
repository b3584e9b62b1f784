"""vslice services: admission, scheduler, nodeagent, metrics -- independent of each other."""
