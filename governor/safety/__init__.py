"""The safety chain: the journal of every hold, the guardian that releases them if the
daemon dies, release-all, and the lock on the state directory."""
