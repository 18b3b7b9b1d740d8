"""`make bench` (or `python -m bench [--quick] [--only NAME...]`): every benchmark, a table,
bench/results.json, and the table in README.md between its markers."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

from bench import (
    accuracy,
    footprint,
    hold,
    idle_cost,
    kubernetes_poll,
    reaction,
    round_cost,
    scaling,
    scrape,
    slurm_discovery,
)
from bench.common import REPO, Row, machine, table, write_results

BENCHMARKS: dict[str, Callable[[bool], list[Row]]] = {
    "round": round_cost.run,
    "reaction": reaction.run,
    "accuracy": accuracy.run,
    "scrape": scrape.run,
    "footprint": footprint.run,
    "slurm": slurm_discovery.run,
    "hold": hold.run,
    "idle": idle_cost.run,
    "scaling": scaling.run,
    "kubernetes": kubernetes_poll.run,
}
README = REPO / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
#: the "How cost grows" table (bench/scaling.py), written like the main one
SCALING_START, SCALING_END = "<!-- scaling:start -->", "<!-- scaling:end -->"


def readme_table(rows: list[Row], info: dict[str, object]) -> str:
    head = (f"Last run: {info['date']}, {info['cpus']} CPUs ({info['cpu_model']}), kernel "
            f"{info['kernel']}, Python {info['python']}, load before "
            f"{float(str(info['load_before'])):.2f}.\n\n")
    lines = ["| benchmark | governor | peer | ratio | target | |", "|---|---|---|---|---|---|"]
    for r in rows:
        result = "-" if r.passed is None else ("pass" if r.passed else "**FAIL**")
        lines.append(f"| {r.name} | {r.governor} | {r.peer} | {r.ratio} | {r.target} | "
                     f"{result} |")
    return head + "\n".join(lines)


def write_readme(rows: list[Row], info: dict[str, object], main_table: bool) -> None:
    """The main table after a full run of everything; the scaling table after any full
    run of the scaling benchmark (`--only scaling` too: it is a table of its own, headed
    by its own run's machine and load)."""
    text = README.read_text()
    if main_table and START in text:
        block = f"{START}\n{readme_table(rows, info)}\n{END}"
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text,
                      flags=re.S)
    growth = scaling.readme_block(rows)
    if growth is not None and SCALING_START in text:
        head = (f"Last run: {info['date']}, {info['cpus']} CPUs ({info['cpu_model']}), "
                f"load before {float(str(info['load_before'])):.2f}.\n\n")
        block = f"{SCALING_START}\n{head}{growth}\n{SCALING_END}"
        text = re.sub(re.escape(SCALING_START) + ".*?" + re.escape(SCALING_END),
                      lambda _: block, text, flags=re.S)
    README.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="short runs, to check the benchmarks themselves")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"some of: {', '.join(BENCHMARKS)}")
    args = parser.parse_args()
    info = machine()
    rows: list[Row] = []
    began = time.monotonic()
    for name, bench in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        step = time.monotonic()
        found = bench(args.quick)
        rows += found
        print(table(found), f"\n   ({time.monotonic() - step:.0f} s)", flush=True)
    print(f"\n{table(rows)}\n\n{time.monotonic() - began:.0f} s in all")
    write_results(rows, info)
    if not args.quick:
        write_readme(rows, info, main_table=not args.only)
    return 0 if all(r.passed is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
