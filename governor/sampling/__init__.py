"""Samplers: one module per source, each behind the `Sampler` interface in `base`."""
