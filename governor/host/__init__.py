"""The one place that reads the host: procfs (a process's stat, its tree, its uid),
cgroupfs (mounts, hierarchies, a process's cgroups) and NVML (loading, error kinds).
Samplers and actuators both use it; no actuator imports a sampler."""
