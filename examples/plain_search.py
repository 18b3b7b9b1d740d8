"""The same search, knowing nothing of the governor: it is held by signals.

    governor launch --name plain-search --device gpu1 -- \
        python examples/plain_search.py --trace plain.jsonl

SIGSTOP lands wherever the job happens to be, checkpoint writes included; its trace
marks its checkpoint writes (critical-enter, critical-exit) so the two can be compared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from toy_search import Trace, parser, run


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    trace = Trace(args.trace)

    @contextlib.contextmanager
    def marked() -> Iterator[None]:
        trace.write("critical-enter", section="checkpoint-write")
        yield
        trace.write("critical-exit", section="checkpoint-write")

    run("plain-search", args, trace, between_steps=lambda: None, critical=marked,
        inside=lambda: None)


if __name__ == "__main__":
    main()
