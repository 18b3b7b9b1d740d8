"""The `governor` command: the daemon and the verbs that talk to it.

Exit status: 0 on success, 1 on a failure, 2 on bad usage (argparse's own). Errors go
to stderr as one line each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from governor import __version__
from governor.actuators.modes import MODE_NAMES
from governor.client.errors import ClientError
from governor.client.settings import ClientSettings
from governor.config import Config, ConfigError, find_config, load_config, state_dir_despite
from governor.sampling.nvml import NvmlUnavailableError
from governor.text import PrintableFormatter, printable

if TYPE_CHECKING:
    from governor.client.rest import ApiClient

log = logging.getLogger("governor")


def fail(message: str) -> int:
    print(f"governor: {printable(message)}", file=sys.stderr)
    return 1


def setup_logging(verbose: bool = False) -> None:
    level = os.environ.get("GOVERNOR_LOG_LEVEL", "DEBUG" if verbose else "INFO").upper()
    # journald stamps its own time; a terminal wants one
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    # names from the API, Slurm and pods reach these lines: escaped, one line each
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])


def _load(path_arg: str | None) -> tuple[Config, Path | None]:
    path = find_config(path_arg)
    return load_config(path), path


def cmd_run(args: argparse.Namespace) -> int:
    from governor.service.daemon import Daemon, StartupError

    setup_logging(args.verbose)
    try:
        config, path = _load(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"governor: {line}", file=sys.stderr)
        return 1
    try:
        daemon = Daemon(config, path)
    except (NvmlUnavailableError, StartupError) as exc:
        return fail(str(exc))
    try:
        daemon.serve()
    except StartupError as exc:
        daemon.close()
        return fail(str(exc))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = find_config(args.path or args.config)
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


#: a one-shot `sample` waits this long for each sampler: opening GPUs without persistence
#: mode takes about a second each, far longer than a daemon round allows
SAMPLE_TIMEOUT = 15.0


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 60:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 60 seconds")
    return value


def cmd_sample(args: argparse.Namespace) -> int:
    from governor.cli.report import render
    from governor.sampling.registry import build_samplers
    from governor.sampling.runner import SamplerRunner

    level = os.environ.get("GOVERNOR_LOG_LEVEL", "DEBUG" if args.verbose else "ERROR").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        config, _ = _load(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"governor: {line}", file=sys.stderr)
        return 1
    try:
        runner = SamplerRunner(build_samplers(config.sources), SAMPLE_TIMEOUT)
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


def _client(args: argparse.Namespace) -> ApiClient:
    from governor.client.rest import ApiClient

    config, path = _load(args.config)
    return ApiClient(_settings(config, path))


def _settings(config: Config, path: Path | None) -> ClientSettings:
    """The REST client's settings, naming the config they came from (for a refused
    token's error)."""
    return replace(config.api.client_settings(),
                   config_file=str(path) if path is not None else "")


def cmd_status(args: argparse.Namespace) -> int:
    from governor.cli.report import render, render_jobs, render_rules
    from governor.cli.status_model import Status

    with _client(args) as client:
        status = client.status()
    if args.json:
        json.dump(status, sys.stdout, indent=2)
        print()
        return 0
    model = Status.parse(status)
    print(render(model))
    print()
    print("Rules")
    print(render_rules(model.rules))
    print()
    print("Jobs")
    print(render_jobs(model.jobs))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from governor.cli.report import render_jobs
    from governor.cli.status_model import Job

    with _client(args) as client:
        jobs = client.jobs()
    if args.json:
        json.dump(jobs, sys.stdout, indent=2)
        print()
    else:
        print(render_jobs(Job.parse(j) for j in jobs))
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    if args.once and not args.scheduler_id:
        return fail("--once needs --scheduler-id")
    with _client(args) as client:
        found = _registered_as(client, args) if args.once else None
        if found is None:
            try:
                found = str(client.register(
                    args.name, pid=args.pid, cgroup=args.cgroup,
                    mode="cooperative" if args.cooperative and not args.mode else args.mode,
                    devices=args.device, priority=args.priority, source=args.source,
                    scheduler_id=args.scheduler_id,
                )["id"])
            except ClientError as exc:
                # registered meanwhile (by discovery, or another task of the job)
                found = _registered_as(client, args) if args.once and exc.status == 409 else None
                if found is None:
                    raise
    print(found)
    return 0


def _registered_as(client: ApiClient, args: argparse.Namespace) -> str | None:
    """The id the daemon has the scheduler's job registered as, if it has: the daemon's
    word, never the caller's environment (a GOVERNOR_JOB_ID set at submit time)."""
    source = args.source or "api"
    for job in client.jobs():
        if (job.get("source") == source and job.get("scheduler_id") == args.scheduler_id
                and job.get("state") != "gone"):
            return str(job["id"])
    return None


def cmd_unregister(args: argparse.Namespace) -> int:
    if (args.id is None) == (args.slurm_job is None):
        return fail("name a job: its id, or --slurm-job")
    with _client(args) as client:
        if args.id is not None:
            client.unregister(args.id)
            return 0
        found = [job for job in client.jobs()
                 if job.get("source") == "slurm" and job.get("scheduler_id") == args.slurm_job
                 and (args.pid is None or job.get("pid") == args.pid)]
        for job in found:
            client.unregister(str(job["id"]))
    if not found:
        return fail(f"no job of Slurm job {args.slurm_job}"
                    + (f" with pid {args.pid}" if args.pid is not None else "") + " is registered")
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.pause(args.id) if args.verb == "pause" else client.resume(args.id)
    held = " (held by the operator)" if job.get("held_by_operator") else ""
    print(f"{job['id']} {job['name']}: {job['state']}{held}")
    return 0


_AGO = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h|d)\s*$")
_AGO_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def since_spec(text: str) -> float:
    """--since: Unix seconds, an ISO 8601 time (local unless it names a zone), or a
    duration ago: "90s", "10m", "2h", "7d"."""
    ago = _AGO.match(text)
    if ago:
        return time.time() - float(ago.group(1)) * _AGO_UNITS[ago.group(2)]
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not Unix seconds, an ISO 8601 time or a duration like 10m or 2h"
        ) from None


def cmd_events(args: argparse.Namespace) -> int:
    from governor.cli.report import render_events

    with _client(args) as client:
        events = client.all_events(args.since)
    if args.json:
        json.dump({"events": events}, sys.stdout, indent=2)
        print()
    else:
        print(render_events(events))
    return 0


#: how long `top` waits for one status: a hung daemon shows as unreachable, not as a
#: frozen view
TOP_TIMEOUT = 5.0


def cmd_top(args: argparse.Namespace) -> int:
    import signal

    from governor.cli.top import (
        StatusPoller,
        TerminalGone,
        detach_from_terminal,
        live_top,
        once_console,
        render,
    )
    from governor.client.rest import ApiClient

    config, path = _load(args.config)
    console = once_console()
    if args.once:
        with ApiClient(_settings(config, path), timeout=TOP_TIMEOUT) as client:
            console.print(render(client.status(), where=client.where, width=console.width))
        return 0

    def hang_up(*_: object) -> None:
        raise TerminalGone("hang-up")

    # a plain kill would leave the terminal in cbreak mode on the alternate screen
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGHUP, hang_up)
    # a script that starts top in the background (make demo) has it ignore Ctrl-C
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ApiClient(_settings(config, path), timeout=TOP_TIMEOUT) as client, \
                contextlib.suppress(KeyboardInterrupt):
            poller = StatusPoller(client.status, args.interval or config.daemon.interval)
            live_top(poller, console, where=client.where)
    except TerminalGone:
        detach_from_terminal()
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from governor.cli.launch import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("governor launch: give the command after --", file=sys.stderr)
        return 2
    with _client(args) as client:
        return launch(client, command, name=args.name or os.path.basename(command[0]),
                      mode=args.mode, devices=args.device, priority=args.priority)


def cmd_release_all(args: argparse.Namespace) -> int:
    from governor.safety.journal import Journal
    from governor.safety.release import release_holds
    from governor.safety.state_lock import StateLock

    logging.basicConfig(level=logging.CRITICAL)
    path = find_config(args.config)
    try:
        state_dir = Path(load_config(path).daemon.state_dir)
    except ConfigError as exc:
        # a broken rule must not keep the jobs held: only the state directory is needed
        state_dir = Path(state_dir_despite(path))
        print(f"governor: {exc.lines()[0]}; releasing what {state_dir} lists anyway",
              file=sys.stderr)
    lock = StateLock(state_dir)
    if lock.held_elsewhere():
        print(f"governor: a daemon (pid {lock.holder()}) is running with {state_dir}; "
              "releasing anyway: its rules hold the jobs again on its next round",
              file=sys.stderr)
    journal = Journal(state_dir)
    failed = False
    for problem in journal.load():
        print(f"governor: {problem}", file=sys.stderr)
        failed = True
    results = release_holds(journal)
    for result in results:
        print(result)
    if not results:
        print(f"nothing to release ({journal.path} lists no hold)")
    return 1 if failed or not all(r.ok for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="governor",
        description="Watches CPUs, GPUs and accelerators and keeps compute jobs from "
        "cooking the hardware.",
    )
    parser.add_argument("--version", action="version", version=f"governor {__version__}")
    # --config and -v are global: they may stand before the verb or after it (`governor -v
    # register ...` and `governor register -v ...` alike). A verb's own copy has no default
    # (SUPPRESS), so it does not overwrite one given before the verb.
    config_help = ("config file (default: $GOVERNOR_CONFIG, /etc/governor/governor.toml, "
                   "config/governor.toml, built-in defaults)")
    verbose_help = "log at debug level (the daemon's, or the files a verb could not read)"
    parser.add_argument("--config", metavar="PATH", help=config_help)
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                       help=config_help)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help=verbose_help)

    p = verbs.add_parser("run", help="run the daemon in the foreground",
                         description="Run the daemon in the foreground (systemd runs this).")
    config_option(p)
    p.set_defaults(func=cmd_run)

    p = verbs.add_parser("check-config", help="validate a config file",
                         description="Validate a config file; print each error with its key.")
    p.add_argument("path", nargs="?", metavar="PATH", help="the file (default: as --config)")
    config_option(p)
    p.set_defaults(func=cmd_check_config)

    p = verbs.add_parser("sample", help="one round of sampling, as a table or JSON",
                         description="Sample once and print what the samplers see, and which "
                         "were unavailable and why.")
    config_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--window", type=positive_seconds, default=0.5, metavar="SECONDS",
                   help="time between the two reads that rates are computed from (default 0.5)")
    p.set_defaults(func=cmd_sample)

    p = verbs.add_parser(
        "release-all", help="undo every hold the journal lists (no daemon needed)",
        description="Read the state journal and undo every action it records: resume stopped "
        "or frozen jobs, lift CPU quotas, restore GPU power limits. Works without the daemon; "
        "systemd's ExecStopPost runs it. Releasing twice is harmless.")
    config_option(p)
    p.set_defaults(func=cmd_release_all)

    p = verbs.add_parser("status", help="readings, rules and jobs of the running daemon",
                         description="Ask the running daemon for its readings, rules and jobs.")
    config_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_status)

    p = verbs.add_parser("jobs", help="the registered jobs, a row each",
                         description="List the registered jobs.")
    config_option(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_jobs)

    def job_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", action="append", default=[], metavar="D",
                       help="a device the job runs on (gpu0, card0, accel0...); repeatable")
        p.add_argument("--priority", type=int, default=0, metavar="N",
                       help="rules with max_priority below N leave the job alone (default 0)")
        p.add_argument("--mode", choices=MODE_NAMES,
                       help="how the job is held (default: signal with a pid, cgroup with a "
                       "cgroup, else cooperative)")

    p = verbs.add_parser("register", help="register a job; prints its id",
                         description="Register a job with the running daemon; print its id.")
    config_option(p)
    p.add_argument("--name", required=True, help="a name for the job")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="the process (and all its descendants)")
    target.add_argument("--cgroup", metavar="PATH", help="a cgroup")
    target.add_argument("--cooperative", action="store_true",
                        help="no process: the job asks for its directive and holds itself")
    job_options(p)
    p.add_argument("--source", choices=("api", "slurm"), default=None,
                   help="slurm: a Slurm job registered by hand (the task prolog), with "
                   "--scheduler-id (default: api)")
    p.add_argument("--scheduler-id", metavar="ID",
                   help="the scheduler's id for the job: the Slurm job id")
    p.add_argument("--once", action="store_true",
                   help="with --scheduler-id: if the daemon has that job registered "
                   "already, print its id instead of registering it again (the task prolog)")
    p.set_defaults(func=cmd_register)

    p = verbs.add_parser("unregister", help="forget a job, resuming it first",
                         description="Forget a job; it is resumed first if it was held.")
    config_option(p)
    p.add_argument("id", nargs="?", help="the job's id")
    p.add_argument("--slurm-job", metavar="ID",
                   help="instead of an id: the jobs registered for this Slurm job")
    p.add_argument("--pid", type=int,
                   help="with --slurm-job: only the one registered with this pid")
    p.set_defaults(func=cmd_unregister)

    for verb, text in (("pause", "operator hold: pause a job until `governor resume`"),
                       ("resume", "lift the operator hold (rules still apply)")):
        p = verbs.add_parser(verb, help=text, description=text[0].upper() + text[1:] + ".")
        config_option(p)
        p.add_argument("id", help="the job's id")
        p.set_defaults(func=cmd_hold)

    p = verbs.add_parser(
        "events", help="the audit log: what was done, by whom, and why",
        description="Print the daemon's audit log: every action and operator request, a "
        "line each (local time, who, what, job, why), oldest first.")
    config_option(p)
    p.add_argument("--since", type=since_spec, default=0.0, metavar="SPEC",
                   help="only events after this: Unix seconds, an ISO 8601 time "
                   "(2024-05-01T12:00), or a duration ago (10m, 2h, 7d); default: all kept")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_events)

    p = verbs.add_parser(
        "top", help="a live view of readings, rules and jobs",
        description="A live terminal view of the running daemon: readings against the rules' "
        "thresholds, rules and their states, jobs with state, speed and reasons; redrawn "
        "every round. It only reads the REST API, so any user who can reach the daemon may "
        "run it. q or Ctrl-C quits.")
    config_option(p)
    p.add_argument("--interval", type=positive_seconds, metavar="SECONDS",
                   help="how often to ask (default: the config's daemon.interval, so every "
                   "round is shown)")
    p.add_argument("--once", action="store_true",
                   help="print one frame to stdout and exit (no terminal needed)")
    p.set_defaults(func=cmd_top)

    p = verbs.add_parser(
        "launch", help="run a command as a governed job",
        usage="governor launch [--name N] [--device D]... [--priority N] [--mode M] -- CMD "
        "[ARG...]",
        description="Start CMD as a governed job: registered before it runs, in its own "
        "process group (and its own cgroup in cgroup mode). Exits with CMD's exit status. "
        "CMD gets GOVERNOR_URL and GOVERNOR_JOB_ID in its environment.")
    config_option(p)
    p.add_argument("--name", help="a name for the job (default: the command's name)")
    job_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")
    p.set_defaults(func=cmd_launch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose and args.verb not in ("run", "sample"):
        # the daemon's verbs set up their own logging; the others log only what -v asks
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
        logging.getLogger("governor").setLevel(logging.DEBUG)
    try:
        return int(args.func(args))
    except ClientError as exc:
        return fail(str(exc))
    except ConfigError as exc:
        for line in exc.lines():
            print(f"governor: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`governor status | head`): as a tool killed by SIGPIPE,
        # with no traceback, and none either when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    raise SystemExit(main())
