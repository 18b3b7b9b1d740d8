"""What the two example jobs share: a toy self-optimizing search, its checkpoints, a trace.

The search is hill climbing on the Rastrigin function: each step evaluates a batch of
random neighbours of the best point on the CPU and keeps the best. Every few steps it
re-evaluates its best point thoroughly (the "evaluation that gates a self-modification")
and writes a checkpoint: that is the part a pause should not cut in two.

The trace is one JSON object a line (time, step, event, details), written where
--trace or $GOVERNOR_DEMO_TRACE says; the demo test reads it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

DIMENSIONS = 16


def rastrigin(x: list[float]) -> float:
    return 10 * len(x) + sum(v * v - 10 * math.cos(2 * math.pi * v) for v in x)


class Trace:
    """JSON lines, flushed at each line, so a reader sees what happened up to now."""

    def __init__(self, path: str | None):
        self._file: TextIO | None = open(path, "a", buffering=1) if path else None  # noqa: SIM115
        self.step = 0

    def write(self, event: str, **details: Any) -> None:
        if self._file is not None:
            line = {"time": time.time(), "step": self.step, "event": event, **details}
            self._file.write(json.dumps(line) + "\n")


class Search:
    def __init__(self, seed: int, step_seconds: float):
        self.rng = random.Random(seed)
        self.best = [self.rng.uniform(-5, 5) for _ in range(DIMENSIONS)]
        self.score = rastrigin(self.best)
        self.spread = 0.5
        self.batch = self._calibrate(step_seconds)

    def _calibrate(self, seconds: float) -> int:
        """Candidates per step, so that a step takes about `seconds` of CPU here."""
        began = time.process_time()
        for _ in range(200):
            rastrigin(self._neighbour())
        each = max(1e-7, (time.process_time() - began) / 200)
        return max(1, int(seconds / each))

    def _neighbour(self) -> list[float]:
        return [v + self.rng.gauss(0, self.spread) for v in self.best]

    def step(self) -> None:
        for _ in range(self.batch):
            candidate = self._neighbour()
            score = rastrigin(candidate)
            if score < self.score:
                self.best, self.score = candidate, score
        self.spread = max(0.05, self.spread * 0.995)

    def verify(self, rounds: int) -> Iterator[float]:
        """The thorough evaluation before a checkpoint, a round at a time (one step's
        worth of CPU each), so a cooperative job can call checkpoint() between rounds."""
        for _ in range(rounds):
            worst = self.score
            for _ in range(self.batch):
                worst = max(worst, rastrigin([v + self.rng.gauss(0, 0.01) for v in self.best]))
            yield worst

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "score": self.score, "spread": self.spread}


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomically (a temp file, fsync, rename), as real jobs do: a job stopped in the
    middle leaves a stale temp file and whoever waits for the checkpoint waiting."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--trace", default=os.environ.get("GOVERNOR_DEMO_TRACE"),
                   help="where to write the trace (default: $GOVERNOR_DEMO_TRACE; none)")
    p.add_argument("--checkpoint", default=None,
                   help="the checkpoint file (default: <trace or /tmp>/NAME.json)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--step-seconds", type=float, default=0.05,
                   help="CPU time of one step (default 0.05)")
    p.add_argument("--checkpoint-every", type=int, default=40,
                   help="steps between checkpoints (default 40)")
    p.add_argument("--verify-rounds", type=int, default=8,
                   help="evaluation rounds before each checkpoint write (default 8)")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(name: str, args: argparse.Namespace, trace: Trace,
        between_steps: Callable[[], object],
        critical: Callable[[], Any],
        inside: Callable[[], object]) -> None:
    """The job's loop: `between_steps` after each step, each checkpoint inside
    `critical()` with `inside` between its evaluation rounds."""
    search = Search(args.seed, args.step_seconds)
    checkpoint = Path(args.checkpoint or Path(args.trace or "/tmp").with_name(f"{name}.json"))
    trace.write("start", pid=os.getpid(), batch=search.batch)
    print(f"{name}: pid {os.getpid()}, {search.batch} candidates a step", flush=True)
    while args.steps is None or trace.step < args.steps:
        search.step()
        trace.step += 1
        trace.write("step", score=round(search.score, 4))
        between_steps()
        if trace.step % args.checkpoint_every == 0:
            with critical():
                for _ in search.verify(args.verify_rounds):
                    inside()
                write_checkpoint(checkpoint, search.state())
                trace.write("checkpoint", path=str(checkpoint), score=search.score)
            print(f"{name}: step {trace.step}, best {search.score:.3f}", flush=True)
    sys.stdout.flush()
