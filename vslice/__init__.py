"""vslice command line: wires libshared and the services for people."""
