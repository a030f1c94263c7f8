"""Flynn nodes service: companion nodes (flynn.v1.Nodes) and the canvas (flynn.v1.Canvas) in one process."""
