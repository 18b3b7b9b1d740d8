"""`governor top`: a live terminal view of one daemon, built from /v1/status.

It reads nothing but the REST API, and reads need no token, so any user who can reach
the daemon can watch it. Drawing is split from fetching: `render` is a pure function
from the status JSON to a rich renderable (tests feed it hand-made dicts, no terminal
needed), `StatusPoller` fetches once per daemon round, and `run_live` joins the two.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from governor.client import ClientError

Status = Mapping[str, Any]

RULE_STYLE = {"ok": "green", "pending": "yellow", "tripped": "bold red"}
JOB_STYLE = {"running": "green", "slowed": "yellow", "paused": "bold red", "gone": "dim"}
SAMPLER_STYLE = {"ok": "green", "unavailable": "dim", "error": "bold red"}
#: worst first: the state a reading watched by several rules is shown in
SEVERITY = ("tripped", "pending", "ok")

#: with no terminal and no $COLUMNS, `--once` prints this wide rather than rich's 80:
#: a job's reason names a whole series, and 80 columns fold most of them
PIPE_WIDTH = 120


# ---- formatting ------------------------------------------------------------------


def fmt_value(metric: str, value: float | None) -> str:
    """A reading in the unit its metric name ends with; ratios as percentages."""
    if value is None:
        return "missing"
    if metric.endswith("_ratio"):
        return f"{value * 100:.1f}%"
    if metric.endswith("_celsius"):
        return f"{value:.1f} °C"
    if metric.endswith("_watts"):
        return f"{value:.0f} W"
    if metric.endswith("_bytes"):
        return f"{value / 2**30:.1f} GiB"
    if metric.endswith("_hertz"):
        return f"{value / 1e6:.0f} MHz"
    return f"{value:g}"


def fmt_duration(seconds: float) -> str:
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def fmt_clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%H:%M:%S")


def fmt_labels(labels: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in labels.items()) or "(no labels)"


def _key(metric: str, labels: Mapping[str, str]) -> tuple[str, frozenset[tuple[str, str]]]:
    return metric, frozenset(labels.items())


def _worst(states: Sequence[str]) -> str:
    for state in SEVERITY:
        if state in states:
            return state
    return "ok"


def _section(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 show_edge=False, pad_edge=False, collapse_padding=True)


# ---- the frame -------------------------------------------------------------------


class _Readings:
    """The readings of one status, looked up by metric and labels, each knowing the rule
    series that watch it, so a main reading is coloured the way its rule sees it."""

    def __init__(self, status: Status):
        self.by_metric: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for r in status.get("readings") or []:
            self.by_metric[r["metric"]].append(r)
        self.watched: dict[tuple[str, frozenset[tuple[str, str]]], list[Mapping[str, Any]]] = (
            defaultdict(list))
        for rule in status.get("rules") or []:
            if rule.get("series") is not None and rule.get("metric"):
                self.watched[_key(rule["metric"], rule.get("labels") or {})].append(rule)

    def value(self, metric: str, **labels: str) -> float | None:
        for r in self.by_metric.get(metric, []):
            if all(r["labels"].get(k) == v for k, v in labels.items()):
                return float(r["value"])
        return None

    def shown(self, metric: str, value: float | None, labels: Mapping[str, str],
              text: str | None = None) -> Text:
        """The value, coloured by the worst state of the rules watching it, with the trip
        line of the first of them beside it."""
        out = Text(text if text is not None else fmt_value(metric, value))
        rules = self.watched.get(_key(metric, labels), [])
        if rules:
            state = _worst([str(r["state"]) for r in rules])
            out.stylize(RULE_STYLE.get(state, ""))
            first = rules[0]
            arrow = ">" if first.get("direction", "above") == "above" else "<"
            out.append(f" (trips {arrow}{fmt_value(metric, first.get('threshold'))})",
                       style="dim")
        return out


def render(status: Status | None, *, where: str, error: str | None = None) -> RenderableType:
    """One frame: the header, then the main readings, each rule series against its
    lines, the rules, and the jobs. `error` says why the latest fetch failed; the view
    then shows the last status it had (if any) under that warning."""
    parts: list[RenderableType] = [_header(status, where, error)]
    if status is None:
        return Group(*parts)
    readings = _Readings(status)
    for section in (_gpus(status, readings), _accelerators(readings), _host(readings),
                    _thresholds(status), _rules(status), _jobs(status)):
        if section is not None:
            parts += [Text(""), section]
    return Group(*parts)


def _header(status: Status | None, where: str, error: str | None) -> RenderableType:
    lines = []
    title = Text.assemble(("governor top", "bold"), "  ", where)
    if status is not None and status.get("sequence") is not None:
        title.append(f"  round {status['sequence']} at {fmt_clock(float(status['taken_at']))}")
    elif status is not None:
        title.append("  no sampling round yet")
    lines.append(title)
    if error is not None:
        warning = Text(f"{error}; retrying", style="bold red")
        if status is not None:
            warning.append(" (showing the last status it sent)", style="red")
        lines.append(warning)
    if status is None:
        return Group(*lines)

    samplers = Text("samplers: ")
    for i, s in enumerate(status.get("samplers") or []):
        if i:
            samplers.append(", ")
        state = str(s.get("state", "?"))
        samplers.append(f"{s['name']} {state}", style=SAMPLER_STYLE.get(state, ""))
        why = s.get("error")
        if state != "ok" and why:
            samplers.append(f" ({why})", style=SAMPLER_STYLE.get(state, ""))
        if state == "error" and s.get("retry_at"):
            samplers.append(f", next try at {fmt_clock(float(s['retry_at']))}", style="red")
    if not status.get("samplers"):
        samplers.append("none reported", style="dim")
    lines.append(samplers)
    for s in status.get("samplers") or []:
        for problem in s.get("problems") or []:
            lines.append(Text(f"  {s['name']}: {problem}", style="yellow"))

    audit = status.get("audit")
    if isinstance(audit, Mapping) and audit.get("ok") is False:
        lines.append(Text(f"audit log {audit.get('path')}: {audit.get('errors')} write "
                          f"errors, last: {audit.get('last_error')}", style="bold red"))
    return Group(*lines)


def _gpus(status: Status, readings: _Readings) -> Table | None:
    infos = sorted(readings.by_metric.get("gpu_info", []),
                   key=lambda r: int(r["labels"]["gpu"]))
    if not infos:
        return None
    caps: Mapping[str, float] = status.get("power_caps") or {}
    table = _section("NVIDIA GPUs")
    for column in ("gpu", "name", "temp", "util", "power / limit", "memory", "clock events"):
        table.add_column(column)
    for info in infos:
        gpu = info["labels"]["gpu"]
        labels = {"gpu": gpu}
        temp = readings.value("gpu_temperature_celsius", gpu=gpu)
        util = readings.value("gpu_utilization_ratio", gpu=gpu)
        power = readings.value("gpu_power_watts", gpu=gpu)
        limit = readings.value("gpu_power_limit_watts", gpu=gpu)
        used = readings.value("gpu_memory_used_bytes", gpu=gpu)
        total = readings.value("gpu_memory_total_bytes", gpu=gpu)
        power_text = readings.shown("gpu_power_watts", power, labels,
                                    "-" if power is None else f"{power:.0f}")
        power_text.append(" / " + ("-" if limit is None else f"{limit:.0f}") + " W")
        if gpu in caps:
            power_text.append(f" capped at {caps[gpu]:.0f} W", style="yellow")
        events = [r["labels"]["reason"] for r in readings.by_metric.get(
            "gpu_clock_event_active", []) if r["labels"]["gpu"] == gpu and r["value"]]
        table.add_row(
            gpu, info["labels"].get("name") or "?",
            readings.shown("gpu_temperature_celsius", temp, labels,
                           "-" if temp is None else f"{temp:.0f} °C"),
            readings.shown("gpu_utilization_ratio", util, labels,
                           "-" if util is None else f"{util * 100:.0f}%"),
            power_text,
            "-" if used is None or total is None
            else f"{used / 2**30:.1f} / {total / 2**30:.1f} GiB",
            Text(", ".join(events), style="yellow") if events else Text("none", style="dim"),
        )
    return table


def _accelerators(readings: _Readings) -> Table | None:
    devices = sorted({
        (r["labels"]["device"], r["labels"]["driver"])
        for metric in ("accelerator_utilization_ratio", "accelerator_temperature_celsius",
                       "accelerator_power_watts", "accelerator_memory_total_bytes")
        for r in readings.by_metric.get(metric, [])
    })
    if not devices:
        return None
    table = _section("Accelerators")
    for column in ("device", "driver", "util", "temperatures", "power", "memory"):
        table.add_column(column)
    for device, driver in devices:
        labels = {"device": device, "driver": driver}
        temps = Text()
        for r in readings.by_metric.get("accelerator_temperature_celsius", []):
            if r["labels"]["device"] == device:
                if temps:
                    temps.append(", ")
                temps.append(f"{r['labels']['sensor']} ")
                temps.append(readings.shown(r["metric"], r["value"], r["labels"]))
        util = readings.value("accelerator_utilization_ratio", device=device)
        power = readings.value("accelerator_power_watts", device=device)
        used = readings.value("accelerator_memory_used_bytes", device=device)
        total = readings.value("accelerator_memory_total_bytes", device=device)
        table.add_row(
            device, driver,
            "-" if util is None else readings.shown("accelerator_utilization_ratio", util,
                                                    labels),
            temps or "-",
            "-" if power is None else readings.shown("accelerator_power_watts", power, labels),
            "-" if used is None or total is None
            else f"{used / 2**30:.1f} / {total / 2**30:.1f} GiB",
        )
    return table


def _host(readings: _Readings) -> Table | None:
    """CPU, memory, load and pressure in a few lines, and CPU temperatures a row per chip:
    a 128-core box fits on the screen as well as a laptop does."""
    rows: list[tuple[str, RenderableType]] = []
    cores = readings.by_metric.get("cpu_utilization_ratio", [])
    if cores:
        busiest = max(cores, key=lambda r: float(r["value"]))
        average = sum(float(r["value"]) for r in cores) / len(cores)
        rows.append(("cpu", Text(
            f"{average * 100:.1f}% average over {len(cores)} cores, busiest "
            f"cpu{busiest['labels']['cpu']} {float(busiest['value']) * 100:.1f}%")))
    memory = readings.value("memory_used_ratio")
    if memory is not None:
        rows.append(("memory", readings.shown("memory_used_ratio", memory, {},
                                              f"{memory * 100:.1f}% used")))
    loads = [readings.value("load_average_tasks", window=w) for w in ("1m", "5m", "15m")]
    if all(v is not None for v in loads):
        rows.append(("load", Text(" ".join(f"{v:.2f}" for v in loads if v is not None))))
    pressure: dict[str, list[Text]] = defaultdict(list)
    for r in readings.by_metric.get("pressure_stall_ratio", []):
        pressure[r["labels"]["resource"]].append(
            Text(f"{r['labels']['kind']} ") + readings.shown(r["metric"], r["value"], r["labels"]))
    if pressure:
        rows.append(("pressure", Text("  ·  ").join(
            Text(f"{resource} ") + Text(" ").join(kinds) for resource, kinds in pressure.items())))
    chips: dict[str, Text] = {}
    for r in readings.by_metric.get("cpu_temperature_celsius", []):
        line = chips.setdefault(r["labels"]["chip"], Text())
        if line:
            line.append(", ")
        line.append(f"{r['labels']['sensor']} ")
        line.append(readings.shown(r["metric"], r["value"], r["labels"]))
    for i, (chip, line) in enumerate(chips.items()):
        rows.append(("" if i else "CPU temp", Text(f"{chip}: ") + line))
    if not rows:
        return None
    table = _section("Host")
    table.add_column("")
    table.add_column("", overflow="fold")
    table.show_header = False
    for name, cell in rows:
        table.add_row(name, cell)
    return table


def _thresholds(status: Status) -> Table | None:
    series = [r for r in status.get("rules") or [] if r.get("series") is not None]
    if not series:
        return None
    taken_at = status.get("taken_at")
    table = _section("Readings against their rules")
    for column in ("rule", "series", "value", "trips", "clears", "state"):
        table.add_column(column, overflow="fold")
    for r in series:
        metric = str(r.get("metric") or "")
        state = str(r["state"])
        style = RULE_STYLE.get(state, "")
        above = r.get("direction", "above") == "above"
        value = Text(fmt_value(metric, r.get("value")), style=style)
        state_text = Text(state, style=style)
        if r.get("clearing"):
            state_text.append(" clearing", style="yellow")
        if r.get("missing"):
            state_text.append(" missing", style="magenta")
            value.stylize("magenta")
        if state != "ok" and r.get("since") is not None and taken_at is not None:
            state_text.append(f" for {fmt_duration(float(taken_at) - float(r['since']))}")
        table.add_row(
            str(r["name"]), fmt_labels(r.get("labels") or {}), value,
            ("> " if above else "< ") + fmt_value(metric, r.get("threshold")),
            ("< " if above else "> ") + fmt_value(metric, r.get("clear_threshold")),
            state_text,
        )
    return table


def _rules(status: Status) -> RenderableType:
    rules: dict[str, list[Mapping[str, Any]]] = {}
    for r in status.get("rules") or []:
        rules.setdefault(str(r["name"]), []).append(r)
    if not rules:
        return Text("Rules: none configured", style="bold")
    table = _section("Rules")
    for column in ("rule", "metric", "action", "state", "series"):
        table.add_column(column, overflow="fold")
    for name, entries in rules.items():
        first = entries[0]
        watched = [e for e in entries if e.get("series") is not None]
        state = _worst([str(e["state"]) for e in entries])
        state_text = Text(state, style=RULE_STYLE.get(state, ""))
        if first.get("enforceable") is False:
            state_text.append(f" not enforceable: {first.get('not_enforceable_because')}",
                              style="bold red")
        counts: dict[str, int] = defaultdict(int)
        for e in watched:
            counts[str(e["state"])] += 1
            if e.get("missing"):
                counts["missing"] += 1
        summary = Text()
        if not watched:
            summary.append("no series yet", style="dim")
        for key in ("tripped", "pending", "ok", "missing"):
            if counts[key]:
                if summary:
                    summary.append(", ")
                summary.append(f"{counts[key]} {key}",
                               style=RULE_STYLE.get(key, "magenta") if key != "ok" else "")
        table.add_row(name, str(first.get("metric") or "-"), str(first.get("action") or "-"),
                      state_text, summary)
    return table


def _jobs(status: Status) -> RenderableType:
    jobs = status.get("jobs") or []
    if not jobs:
        return Text("Jobs: none registered", style="bold")
    table = _section("Jobs")
    for column in ("id", "name", "pid", "mode", "devices", "prio", "state", "speed"):
        table.add_column(column, no_wrap=True)
    table.add_column("reasons", overflow="fold")
    for j in jobs:
        state = str(j["state"])
        style = JOB_STYLE.get(state, "")
        state_text = Text(state, style=style)
        if j.get("held_by_operator"):
            state_text.append(" (operator)", style=style)
        reasons = Text("; ".join(str(r) for r in j.get("reasons") or []))
        if j.get("error"):
            reasons = Text(f"ERROR: {j['error']}", style="bold red") + (
                Text("; ") + reasons if reasons else Text())
        speed = j.get("speed")
        table.add_row(
            str(j["id"]), str(j["name"]), "-" if j.get("pid") is None else str(j["pid"]),
            str(j.get("mode") or "-"), ",".join(j.get("devices") or []) or "-",
            str(j.get("priority", "-")), state_text,
            Text("-" if speed is None else f"{float(speed) * 100:.0f}%", style=style),
            reasons,
        )
    return table


# ---- fetching, once a round ------------------------------------------------------


class StatusPoller:
    """Fetches /v1/status about once per daemon round, just after each round is due.

    The daemon stamps each status with its round's start (`taken_at`), and the round is
    published once its samplers are done, so the next one is due an interval later plus
    about as long as the samplers took this time. Asking then, rather than on a
    free-running timer, shows every round once without asking many times for the same
    one. A clock that disagrees with the daemon's, or a late round, falls back to asking
    once an interval.
    """

    #: asked this long after a round is due, for the few ms that publishing takes
    SLACK = 0.05

    def __init__(self, fetch: Callable[[], Mapping[str, Any]], interval: float, *,
                 wall: Callable[[], float] = time.time):
        self.fetch = fetch
        self.interval = interval
        self.wall = wall
        self.status: Mapping[str, Any] | None = None
        self.error: str | None = None

    def poll(self) -> bool:
        """Fetch once; True when there is something new to draw (a new round, any change,
        the daemon lost or found again)."""
        try:
            status = self.fetch()
        except ClientError as exc:
            changed = self.error != str(exc)
            self.error = str(exc)
            return changed
        changed = self.error is not None or status != self.status
        self.error, self.status = None, status
        return changed

    def delay(self) -> float:
        """Seconds to wait before the next poll."""
        floor = min(self.SLACK * 2, self.interval)
        if self.error is not None or self.status is None or not self.status.get("taken_at"):
            return self.interval
        sampling = max((float(s.get("duration_seconds") or 0.0)
                        for s in self.status.get("samplers") or []), default=0.0)
        due = (float(self.status["taken_at"]) + self.interval + min(sampling, self.interval)
               + self.SLACK - self.wall())
        if due < -self.interval:
            return self.interval
        return min(self.interval, max(floor, due))


def run_live(poller: StatusPoller, show: Callable[[RenderableType], None],
             wait: Callable[[float], bool], *, where: str,
             max_frames: int | None = None) -> int:
    """Poll, and draw a frame whenever something changed, until `wait` reports a quit key
    or `max_frames` frames are drawn. Returns the number of frames drawn."""
    frames = 0
    while True:
        if poller.poll():
            show(render(poller.status, where=where, error=poller.error))
            frames += 1
            if max_frames is not None and frames >= max_frames:
                return frames
        if wait(poller.delay()):
            return frames


class TerminalGone(Exception):
    """The terminal hung up (its window closed, its ssh session dropped, its tmux session
    killed): nobody can see the view or press a key, so it ends rather than draw into
    nothing."""


@contextlib.contextmanager
def _terminal_errors() -> Iterator[None]:
    """A write to a hung-up terminal fails with EIO: the view has lost its terminal."""
    try:
        yield
    except OSError as exc:
        raise TerminalGone(exc.strerror or str(exc)) from exc


class KeyReader:
    """Waits for the next poll while watching for `q`; a terminal is put in cbreak mode
    (keys arrive unbuffered and unechoed; Ctrl-C still interrupts) and restored on exit.
    Without a terminal on stdin it just sleeps."""

    QUIT = frozenset(b"qQ")

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdin
        self._saved: list[Any] | None = None

    def __enter__(self) -> KeyReader:
        with contextlib.suppress(AttributeError, OSError, ValueError, termios.error):
            if self.stream.isatty():
                fd = self.stream.fileno()
                self._saved = termios.tcgetattr(fd)
                tty.setcbreak(fd)
        return self

    def __exit__(self, *_: object) -> None:
        if self._saved is not None:
            with contextlib.suppress(OSError, termios.error):
                termios.tcsetattr(self.stream.fileno(), termios.TCSADRAIN, self._saved)

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout`; True when a quit key was pressed. Raises TerminalGone
        when the terminal hangs up: it then stays readable and every read returns
        nothing (or fails with EIO), which would otherwise spin this loop."""
        if self._saved is None:
            time.sleep(timeout)
            return False
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.stream], [], [], left)
            if ready:
                with _terminal_errors():
                    keys = os.read(self.stream.fileno(), 64)
                if not keys:  # in cbreak mode only a hang-up reads as end of file
                    raise TerminalGone("end of input")
                if self.QUIT.intersection(keys):
                    return True
        return False


def live_top(poller: StatusPoller, console: Console, *, where: str,
             max_frames: int | None = None, keys: KeyReader | None = None) -> int:
    """The interactive view: the whole screen, redrawn each round, like top, leaving the
    terminal as it found it on `q`, Ctrl-C or an error. Without a terminal (a pipe, a
    file) each frame is printed after the last instead, since rich's Live would print
    only the final one. Raises TerminalGone when the terminal hangs up."""
    with keys or KeyReader() as reader:
        if not console.is_terminal:
            return run_live(poller, console.print, reader.wait, where=where,
                            max_frames=max_frames)
        return _on_screen(poller, console, reader, where, max_frames)


def _on_screen(poller: StatusPoller, console: Console, reader: KeyReader, where: str,
               max_frames: int | None) -> int:
    live = Live(console=console, screen=True, auto_refresh=False,
                redirect_stdout=False, redirect_stderr=False)

    def show(frame: RenderableType) -> None:
        # rich draws nothing, silently, once its file is no longer a terminal: a hung-up
        # one fails isatty(), and a write to it fails with EIO
        if not console.is_terminal:
            raise TerminalGone("no longer a terminal")
        with _terminal_errors():
            live.update(frame, refresh=True)

    with _terminal_errors():
        live.start()
    try:
        return run_live(poller, show, reader.wait, where=where, max_frames=max_frames)
    finally:
        with _terminal_errors():
            live.stop()


def detach_from_terminal() -> None:
    """Point stdin, stdout and stderr at /dev/null once the terminal is gone, so that
    flushing them on exit fails with no traceback into nowhere."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)


def once_console(stream: TextIO | None = None) -> Console:
    """The console `--once` prints with: the terminal's width, else $COLUMNS, else
    PIPE_WIDTH."""
    out = stream if stream is not None else sys.stdout
    width = None if out.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(file=out, width=width)

