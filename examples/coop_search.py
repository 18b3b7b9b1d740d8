"""A cooperative job: it holds itself between steps and never inside a checkpoint write.

    governor launch --name coop-search --mode cooperative --device gpu0 -- \
        python examples/coop_search.py --trace coop.jsonl

Under `governor launch` it binds to the job the launcher registered (Job.from_env());
run on its own, it registers itself (Job.register). `job.checkpoint()` between steps
is where it slows or pauses; the checkpoint write (with the evaluation that gates it) is
a critical section, so a pause that arrives there waits for its end (or for
policy.max_defer).
"""

from __future__ import annotations

import logging
import os
import sys

from toy_search import Trace, parser, run

from governor.client import Job


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    trace = Trace(args.trace)
    if os.environ.get("GOVERNOR_JOB_ID"):
        job = Job.from_env()
    else:
        job = Job.register("coop-search", devices=["gpu0"])
    # every event of the client (held, resumed, slowed, deferred, critical-enter...) in
    # the trace, at the step it happened
    job.add_listener(lambda event, details: trace.write(event, **details))
    with job:
        run("coop-search", args, trace, between_steps=job.checkpoint,
            critical=lambda: job.critical("checkpoint-write"),
            inside=lambda: job.checkpoint(steps=0))


if __name__ == "__main__":
    main()
