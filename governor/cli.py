"""The `governor` command: the daemon and the verbs that talk to it.

Exit status: 0 on success, 1 on a failure, 2 on bad usage (argparse's own). Errors go
to stderr as one line each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from governor import __version__
from governor.config import Config, ConfigError, find_config, load_config
from governor.sampling.nvml import NvmlUnavailableError

log = logging.getLogger("governor")


def fail(message: str) -> int:
    print(f"governor: {message}", file=sys.stderr)
    return 1


def setup_logging(verbose: bool = False) -> None:
    level = os.environ.get("GOVERNOR_LOG_LEVEL", "DEBUG" if verbose else "INFO").upper()
    # journald stamps its own time; a terminal wants one
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def _load(path_arg: str | None) -> tuple[Config, Path | None]:
    path = find_config(path_arg)
    return load_config(path), path


def cmd_run(args: argparse.Namespace) -> int:
    from governor.daemon import Daemon, StartupError

    setup_logging(args.verbose)
    try:
        config, path = _load(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"governor: {line}", file=sys.stderr)
        return 1
    try:
        daemon = Daemon(config, path)
    except NvmlUnavailableError as exc:
        return fail(str(exc))
    try:
        daemon.serve()
    except StartupError as exc:
        daemon.close()
        return fail(str(exc))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = find_config(args.path)
    if path is None:
        return fail("no config file found (looked at $GOVERNOR_CONFIG, "
                    "/etc/governor/governor.toml, config/governor.toml)")
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(config.rules)} rule{'s' if len(config.rules) != 1 else ''})")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from governor.report import render
    from governor.sampling.registry import build_samplers
    from governor.sampling.runner import SamplerRunner

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config, _ = _load(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"governor: {line}", file=sys.stderr)
        return 1
    try:
        runner = SamplerRunner(build_samplers(config.sources),
                               config.daemon.effective_sampler_timeout)
    except NvmlUnavailableError as exc:
        return fail(str(exc))
    try:
        # Utilization is a rate: a first round starts the window, the second one reports.
        runner.run_round()
        time.sleep(args.window)
        snapshot = runner.run_round()
    finally:
        runner.close()
    if args.json:
        json.dump(snapshot.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(render(snapshot.as_dict()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="governor",
        description="Watches CPUs, GPUs and accelerators and keeps compute jobs from "
        "cooking the hardware.",
    )
    parser.add_argument("--version", action="version", version=f"governor {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="PATH",
                       help="config file (default: $GOVERNOR_CONFIG, /etc/governor/governor.toml,"
                       " config/governor.toml, built-in defaults)")

    p = verbs.add_parser("run", help="run the daemon in the foreground",
                         description="Run the daemon in the foreground (systemd runs this).")
    config_option(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("check-config", help="validate a config file",
                         description="Validate a config file; print each error with its key.")
    p.add_argument("path", nargs="?", metavar="PATH", help="the file (default: as --config)")
    p.set_defaults(func=cmd_check_config)

    p = verbs.add_parser("sample", help="one round of sampling, as a table or JSON",
                         description="Sample once and print what the samplers see, and which "
                         "were unavailable and why.")
    config_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--window", type=float, default=0.5, metavar="SECONDS",
                   help="time between the two reads that rates are computed from (default 0.5)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
