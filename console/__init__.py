"""Flynn operator console: a small HTTP server that shows the mesh through the gateway's gRPC APIs."""
