"""edgetrain: the shared kernel imported by both the agent and the coordinator (no gRPC servers here)."""

__version__ = "0.1.0"
