"""The policy: rules with hysteresis, and the directive each job gets. Pure functions."""
