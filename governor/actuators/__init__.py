"""Actuators: the only code that signals processes, writes cgroup files or sets GPU limits."""
