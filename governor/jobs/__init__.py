"""Registered jobs: what they are, how processes are identified, the registry."""
