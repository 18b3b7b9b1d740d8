"""`make bench`: governor measured beside the tools a user would otherwise pick."""
