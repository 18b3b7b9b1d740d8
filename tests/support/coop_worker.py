"""A cooperative job for the tests: steps, critical sections and a trace of what happened.

    python -m tests.support.coop_worker --trace T.jsonl (--config C | --from-env) [...]

Each step works for --step seconds (sleeping, or spinning with --busy), then calls
`job.checkpoint()`. Every --section-every steps it runs a critical section of
--section-steps steps, with a checkpoint after each. The trace is one JSON object a line:
each step with the time it began and ended, and every event the client reports (held,
resumed, deferred, critical-enter...), each with the worker's step count.

With --rank R --ranks N --socket PATH, N such processes form one distributed job: rank 0
registers it and broadcasts each decision to the others over a unix socket, through
DistributedCheckpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from governor.client import Decision, DistributedCheckpoint, Job


class Trace:
    def __init__(self, path: str):
        self._file: TextIO = open(path, "a", buffering=1)  # noqa: SIM115 (closed at exit)
        self._lock = threading.Lock()
        self.step = 0

    def write(self, event: str, **details: Any) -> None:
        line = json.dumps({"time": time.time(), "mono": time.monotonic(), "step": self.step,
                           "event": event, **details})
        with self._lock:
            self._file.write(line + "\n")


def work(seconds: float, busy: bool) -> None:
    if not busy:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def run_single(args: argparse.Namespace, trace: Trace) -> None:
    if args.from_env:
        job = Job.from_env(fail_open=not args.fail_closed)
    else:
        job = Job.register(args.name, devices=args.device, config=args.config,
                           fail_open=not args.fail_closed)
    job.add_listener(lambda event, details: trace.write(event, **details))
    trace.write("start", job=job.id, pid=os.getpid())
    with job:
        while args.max_steps is None or trace.step < args.max_steps:
            if args.section_every and trace.step and trace.step % args.section_every == 0:
                with job.critical("checkpoint-write"):
                    for _ in range(args.section_steps):
                        one_step(job.checkpoint, args, trace)
            one_step(job.checkpoint, args, trace)


def one_step(checkpoint: Callable[[], str], args: argparse.Namespace, trace: Trace) -> None:
    began = time.monotonic()
    work(args.step, args.busy)
    trace.step += 1
    trace.write("step", began=began, ended=time.monotonic())
    did = checkpoint()
    if did != "run":
        trace.write(f"checkpoint-{did}")


def broadcaster(rank: int, ranks: int, path: str) -> Callable[[Decision | None], Decision]:
    """rank 0 sends each decision to every other rank over a unix socket; they receive."""
    if rank == 0:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(ranks)
        peers = [server.accept()[0] for _ in range(ranks - 1)]

        def send(obj: Decision | None) -> Decision:
            assert obj is not None
            data = pickle.dumps(obj)
            for peer in peers:
                peer.sendall(struct.pack("!I", len(data)) + data)
            return obj

        return send
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(200):
        try:
            conn.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.05)

    def receive_exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise SystemExit("rank 0 is gone")
            data += chunk
        return data

    def receive(obj: Decision | None) -> Decision:
        (size,) = struct.unpack("!I", receive_exactly(4))
        decision = pickle.loads(receive_exactly(size))
        assert isinstance(decision, Decision)
        return decision

    return receive


def run_rank(args: argparse.Namespace, trace: Trace) -> None:
    job = None
    if args.rank == 0:
        job = Job.register(args.name, devices=args.device, config=args.config)
        job.add_listener(lambda event, details: trace.write(event, **details))
    sync = DistributedCheckpoint(job, args.rank, broadcaster(args.rank, args.ranks,
                                                             args.socket))
    trace.write("start", job=job.id if job else None, pid=os.getpid(), rank=args.rank)
    try:
        while args.max_steps is None or trace.step < args.max_steps:
            one_step(sync.checkpoint, args, trace)
    finally:
        if job is not None:
            job.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", required=True)
    parser.add_argument("--config")
    parser.add_argument("--from-env", action="store_true")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--device", action="append", default=[])
    parser.add_argument("--step", type=float, default=0.02)
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("--section-every", type=int, default=0)
    parser.add_argument("--section-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--fail-closed", action="store_true")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--socket")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    trace = Trace(args.trace)
    if args.rank is not None:
        run_rank(args, trace)
    else:
        run_single(args, trace)


if __name__ == "__main__":
    main()
