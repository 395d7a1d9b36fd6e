"""fedrelay: live telemetry for federated and centralized training."""

__version__ = "0.1.0"
