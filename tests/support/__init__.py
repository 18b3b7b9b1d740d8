"""Helpers shared by the tests: fixture trees, the fake NVML, a daemon runner."""
