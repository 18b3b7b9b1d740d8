#!/usr/bin/env python3
"""Write Prometheus file-based service discovery targets for every node of a Slurm cluster.

Run it where Slurm's client works (the Prometheus host, or a login node that shares a
file with it), from cron or a systemd timer, every few minutes:

    slurm_targets.py --output /etc/prometheus/governor-slurm.json --port 9474

It asks `sinfo -N` for the cluster's nodes and writes one target per node
(`<node>:<port>`), labelled with the node and, with `--cluster`, the cluster's name;
`prometheus-slurm.yml` reads the file. The file is replaced atomically, and left as it
was when sinfo fails, so a controller outage never empties the scrape list (Prometheus
would then forget every node's daemon, and GovernorDown could not fire).

Standard library only: it runs wherever python3 does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def nodes(sinfo: str = "sinfo", partition: str | None = None) -> list[str]:
    """The cluster's node names, once each, sorted (sinfo -N lists a node once per
    partition it is in)."""
    argv = [sinfo, "-N", "-h", "-o", "%N"]
    if partition:
        argv += ["-p", partition]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or f"sinfo exited {done.returncode}")
    return sorted({line.strip() for line in done.stdout.splitlines() if line.strip()})


def targets(names: list[str], port: int, cluster: str | None) -> list[dict[str, object]]:
    groups = []
    for name in names:
        labels = {"node": name}
        if cluster:
            labels["cluster"] = cluster
        groups.append({"targets": [f"{name}:{port}"], "labels": labels})
    return groups


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", "-o", required=True, type=Path,
                        help="the file_sd JSON file to write")
    parser.add_argument("--port", type=int, default=9474,
                        help="the port each node's governor serves /metrics on (9474)")
    parser.add_argument("--cluster", help="a `cluster` label for every target")
    parser.add_argument("--partition", help="only the nodes of this partition")
    parser.add_argument("--sinfo", default="sinfo", help="the sinfo to run")
    args = parser.parse_args(argv)
    try:
        names = nodes(args.sinfo, args.partition)
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"slurm_targets: sinfo failed, {args.output} left as it was: {exc}",
              file=sys.stderr)
        return 1
    if not names:
        print(f"slurm_targets: sinfo lists no node, {args.output} left as it was",
              file=sys.stderr)
        return 1
    write_atomically(args.output, json.dumps(targets(names, args.port, args.cluster),
                                             indent=2) + "\n")
    print(f"slurm_targets: {len(names)} nodes written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
