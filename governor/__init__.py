"""governor: keeps long-running compute jobs from cooking the hardware."""

__version__ = "0.1.0"
