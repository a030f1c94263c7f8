"""The gateway: the only public door. Forwards every internal service and serves System/Gateway."""
