"""The service: the daemon's wiring, its loop, metrics, systemd notifications and the audit log."""
