"""flynn-dev: the local launcher that runs the whole mesh on one machine."""
