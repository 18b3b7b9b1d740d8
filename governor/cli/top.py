"""`governor top`: a live terminal view of one daemon, built from /v1/status.

It reads nothing but the REST API, and reads need no token, so any user who can reach
the daemon can watch it. Drawing is split from fetching: `render` is a pure function
from the status JSON to a rich renderable (tests feed it hand-made dicts, no terminal
needed), `StatusPoller` fetches once per daemon round, and `run_live` joins the two.
`render` parses the JSON once into the status model `governor status` draws too
(status_model.py); the poller keeps the raw JSON, to tell a new round from the last.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import select
import sys
import termios
import time
import tty
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, TextIO, TypeVar

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from governor.cli.status_model import Job, Reading, RuleSeries, Status
from governor.client import ClientError
from governor.text import printable

#: the status JSON as /v1/status sends it; parsed into a Status once per frame
StatusJson = Mapping[str, Any]
T = TypeVar("T")

RULE_STYLE = {"ok": "green", "pending": "yellow", "tripped": "bold red"}
JOB_STYLE = {"running": "green", "slowed": "yellow", "paused": "bold red", "gone": "dim"}
#: a job someone outside governor resumed during a pause: it runs, against the rules
OUTSIDE_STYLE = "bold yellow"
SAMPLER_STYLE = {"ok": "green", "unavailable": "dim", "error": "bold red"}
#: worst first: the state a reading watched by several rules is shown in
SEVERITY = ("tripped", "pending", "ok")

#: with no terminal and no $COLUMNS, `--once` prints this wide rather than rich's 80:
#: a job's reason names a whole series, and 80 columns fold most of them
PIPE_WIDTH = 120
#: at this width and wider a job's pid, mode, devices and priority are shown too
WIDE = 120
#: a column cut narrower than this is left out instead, where it may be
SQUEEZED = 12


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


def _worst(states: Sequence[str]) -> str:
    for state in SEVERITY:
        if state in states:
            return state
    return "ok"


# ---- the frame -------------------------------------------------------------------


def _shown(status: Status, metric: str, value: float | None, labels: Mapping[str, str],
           text: str | None = None) -> Text:
    """The value, coloured by the worst state of the rules watching it, with the trip
    line of the first of them beside it: a main reading is coloured the way its rule
    sees it."""
    out = Text(text if text is not None else fmt_value(metric, value))
    rules = status.watchers(metric, labels)
    if rules:
        state = _worst([r.state for r in rules])
        out.stylize(RULE_STYLE.get(state, ""))
        first = rules[0]
        if first.holds:
            out.append(f" (held at {fmt_value(metric, first.target)})", style="dim")
        else:
            arrow = ">" if first.above else "<"
            out.append(f" (trips {arrow}{fmt_value(metric, first.threshold)})", style="dim")
    return out


#: the order lines are handed out in, where a frame must fit a terminal: held jobs,
#: what holds them, the other jobs, problems, readings, the rest
(TIER_SUMMARY, TIER_HELD, TIER_HOLDING, TIER_JOB, TIER_PROBLEM, TIER_READING, TIER_HOST,
 TIER_REST) = range(8)
JOB_RANK = {"paused": 0, "slowed": 1, "running": 2, "gone": 3}
SERIES_RANK = {"tripped": 0, "pending": 1, "ok": 2}


class _Part(Generic[T]):
    """A section of the frame that can be drawn with only its most important rows.

    Each row has a tier, the order in which the frame hands out lines (0 first: a held
    job before a tripped rule before a reading), and within its part a rank (the hottest
    GPU first). `make(shown, hidden)` draws the part with the rows kept, in their own
    order, and a line that counts the rest; it returns None to show nothing. Where a
    row is always one line, `lines(shown, hidden)` counts the lines without drawing
    them (fitting a frame would otherwise draw each part many times)."""

    def __init__(self, rows: Sequence[tuple[int, float, T]],
                 make: Callable[[list[T], list[T]], RenderableType | None],
                 lines: Callable[[list[T], list[T]], int] | None = None):
        self.rows = list(rows)
        self.make = make
        self.count_lines = lines
        self.order = sorted(range(len(self.rows)), key=lambda i: self.rows[i][:2])
        self._drawn: dict[int, RenderableType | None] = {}  # fitting draws each count often

    def wanted(self, tier: int) -> int:
        """How many rows it has in this tier and the tiers before it."""
        return sum(1 for t, _, _ in self.rows if t <= tier)

    def split(self, count: int) -> tuple[list[T], list[T]]:
        """The `count` most important rows, and the others, each in their own order."""
        kept = set(self.order[:count])
        return ([row for i, (_, _, row) in enumerate(self.rows) if i in kept],
                [row for i, (_, _, row) in enumerate(self.rows) if i not in kept])

    def draw(self, count: int) -> RenderableType | None:
        if count <= 0:
            return None
        if count not in self._drawn:
            self._drawn[count] = self.make(*self.split(count))
        return self._drawn[count]

    def height(self, count: int) -> int | None:
        """The lines it takes with `count` rows, if they can be told without drawing."""
        if count <= 0:
            return 0
        return None if self.count_lines is None else self.count_lines(*self.split(count))


def _table_lines(shown: Sequence[object], hidden: Sequence[object]) -> int:
    """A table of one-line rows: its header, its rows, and a line counting the rest."""
    return 1 + len(shown) + bool(hidden)


class _Frame:
    """What the parts of one frame share: the width they are drawn at, whether they must
    fit a height (then a row is one line where it can be, and cut with an ellipsis),
    and a console that counts the lines a part takes at that width."""

    def __init__(self, width: int | None, fitted: bool):
        self.width = width
        self.fitted = fitted
        self.wide = width is None or width >= WIDE
        self._console = Console(width=width or PIPE_WIDTH, file=io.StringIO(),
                                color_system=None, force_terminal=False,
                                force_jupyter=False, legacy_windows=False)

    def fold(self, text: Text) -> list[Text]:
        """The lines a text folds into at the frame's width."""
        return list(text.wrap(self._console, self.width or PIPE_WIDTH, overflow="fold"))

    def lines(self, renderable: RenderableType | None) -> list[list[Segment]]:
        """The renderable drawn at the frame's width, a list of segments per line."""
        if renderable is None:
            return []
        return self._console.render_lines(renderable, self._console.options, pad=False)

    def line(self, text: Text) -> Text:
        """One line, cut with an ellipsis, when the frame must fit; else folded."""
        text.no_wrap = self.fitted
        text.overflow = "ellipsis" if self.fitted else "fold"
        return text

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[RenderableType]], *,
              wrap: Sequence[str] = (), optional: Sequence[str] = (),
              squeeze: str | None = None, header: bool = True) -> Table:
        """A section without a title, its header line naming what it lists. Columns in
        `wrap` fold; the others stay on one line, and where the frame is narrow the
        `squeeze` column is cut with an ellipsis (the others keep their width as long
        as they can). In a frame that must fit, the `optional` columns (the least needed
        first) are left out while the table is wider than the frame."""
        keep = list(columns)
        unbounded = self._console.options.update(max_width=10_000)

        def natural(cell: RenderableType) -> int:
            if isinstance(cell, str | Text):
                return max(map(cell_len, str(cell).split("\n")))
            return Measurement.get(self._console, unbounded, cell).maximum

        widths = {column: max(natural(cell) for cell in (column, *(row[i] for row in rows)))
                  for i, column in enumerate(columns) if column not in wrap}
        while True:
            table = Table(box=None, show_edge=False, pad_edge=False, collapse_padding=True,
                          header_style="bold", show_header=header)
            # what is left for the squeezed column, with one space between columns
            room = None if not self.fitted or self.width is None or wrap else (
                self.width - len(keep) + 1 - sum(widths[c] for c in keep if c != squeeze))
            for column in keep:
                if column in wrap:
                    table.add_column(column, overflow="fold")
                else:
                    table.add_column(column, no_wrap=True, overflow="ellipsis",
                                     max_width=max(room, 4) if column == squeeze and room
                                     else None)
            for row in rows:  # a job's name is text, not rich markup, nor escape codes
                table.add_row(*(Text(printable(cell)) if isinstance(cell, str) else cell
                                for column, cell in zip(columns, row, strict=True)
                                if column in keep))
            left = [column for column in optional if column in keep]
            if not left or self.width is None or room is None:
                return table
            if squeeze in keep:
                if room >= min(widths[squeeze], SQUEEZED):
                    return table
            elif sum(widths[c] for c in keep) + len(keep) - 1 <= self.width:
                return table
            keep.remove(left[0])


def _fixed(tier: int, renderable: RenderableType | None) -> _Part[Any]:
    """A part of one row, shown whole or not at all."""
    return _Part([(tier, 0.0, None)], lambda shown, _: renderable if shown else None)


def render(status: StatusJson | Status | None, *, where: str, error: str | None = None,
           width: int | None = None, height: int | None = None) -> RenderableType:
    """One frame: a summary line (and why the latest fetch failed, if it did: the view
    then shows the last status it had), sampler problems, the jobs, the rule series that
    tripped or are pending, the readings (GPUs, accelerators, host), then the series
    that are ok, the rules and every sampler's state.

    With a `height` (a terminal's) the frame fits it, like htop's: lines go to what
    matters first (a held job, a tripped or pending series, the other jobs, a problem,
    a reading, the rest), each part keeps its most important rows (held jobs, the
    hottest GPUs and sensors) and a line counts the rows it left out. Without one (a
    pipe) everything is drawn. Columns that matter less (a job's pid, mode, devices,
    priority) come at WIDE columns and more."""
    if status is not None and not isinstance(status, Status):
        status = Status.parse(status)
    frame = _Frame(width if width is not None or height is None else 80, height is not None)
    parts: list[_Part[Any]] = [_fixed(TIER_SUMMARY, _summary(status, where, error, frame))]
    if status is not None:
        parts += [_problems(status, frame), _jobs(status, frame), _series(status, frame),
                  _gpus(status, frame), _accelerators(status, frame), _host(status, frame),
                  _rules(status, frame), _paragraph(TIER_REST, _samplers(status), frame)]
    if height is None:
        drawn = [r for r in (p.draw(len(p.rows)) for p in parts) if r is not None]
        spare = len(drawn)
    else:
        # drawn once, to count their lines: the frame is made of those lines
        fitted = [lines for lines in _fit(parts, height, frame) if lines]
        drawn = [_Drawn(lines) for lines in fitted]
        spare = height - sum(map(len, fitted))
    spaced: list[RenderableType] = drawn[:1]
    for renderable in drawn[1:]:  # a blank line between parts, from the top, as room allows
        if spare > 0:
            spaced.append(Text(""))
            spare -= 1
        spaced.append(renderable)
    return Group(*spaced)


class _Drawn:
    """A part already drawn, line by line, at the width of the frame."""

    def __init__(self, lines: list[list[Segment]]):
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines:
            yield from line
            yield Segment.line()


def _fit(parts: Sequence[_Part[Any]], height: int,
         frame: _Frame) -> list[list[list[Segment]]]:
    """Each part drawn with as many rows as fit in `height` lines, handed out tier by
    tier and, within a tier, part by part in the order they are drawn."""
    counts = [0] * len(parts)
    known: dict[tuple[int, int], list[list[Segment]]] = {}

    def cost(i: int, count: int) -> int:
        told = parts[i].height(count)
        if told is not None:
            return told
        if (i, count) not in known:
            known[i, count] = frame.lines(parts[i].draw(count))
        return len(known[i, count])

    def drawn(counts: Sequence[int]) -> list[list[list[Segment]]]:
        out = [known.get((i, n)) or frame.lines(parts[i].draw(n)) for i, n in enumerate(counts)]
        spill = sum(map(len, out)) - height
        for lines in reversed(out):  # were a count told wrong: the bottom lines go
            cut = min(spill, len(lines))
            if cut > 0:
                del lines[len(lines) - cut:]
                spill -= cut
        return out

    if sum(cost(i, len(part.rows)) for i, part in enumerate(parts)) <= height:
        return drawn([len(part.rows) for part in parts])
    used = 0
    for tier in sorted({t for part in parts for t, _, _ in part.rows}):
        for i, part in enumerate(parts):
            low, high = counts[i], part.wanted(tier)
            if high <= low:
                continue
            before = cost(i, low)
            while low < high:  # the most rows that still fit
                middle = (low + high + 1) // 2
                if used - before + cost(i, middle) <= height:
                    low = middle
                else:
                    high = middle - 1
            used += cost(i, low) - before
            counts[i] = low
    return drawn(counts)


def _more(hidden: Sequence[object], what: tuple[str, str], detail: str = "") -> Text | None:
    """The line under a part that was cut: `… and 3 more GPUs (the hottest at 71 °C)`."""
    if not hidden:
        return None
    return Text(f"… and {len(hidden)} more {what[len(hidden) > 1]}{detail}", style="dim",
                no_wrap=True, overflow="ellipsis")


def _stack(*renderables: RenderableType | None) -> RenderableType | None:
    present = [r for r in renderables if r is not None]
    return Group(*present) if present else None


def _summary(status: Status | None, where: str, error: str | None,
             frame: _Frame) -> RenderableType:
    """One line: the round, the jobs by state, the rules by state, the samplers, the
    daemon asked. On a narrow terminal the least needed pieces give way first: the
    address, the name of the view, the samplers, the round's number."""
    # (priority, the piece, shorter forms): the lowest priority is shortened, then dropped
    pieces: list[tuple[int, list[Text]]] = [(1, [Text("governor top", style="bold")])]
    if status is not None and status.sequence is not None and status.taken_at is not None:
        clock = fmt_clock(status.taken_at)
        pieces.append((3, [Text(f"round {status.sequence} at {clock}"), Text(clock)]))
    elif status is not None:
        pieces.append((3, [Text("no sampling round yet")]))
    if status is not None:
        pieces += [(5, [_job_counts(status)]), (4, [_rule_counts(status)]),
                   (2, [_sampler_counts(status)])]
    pieces.append((0, [Text(where, style="dim")]))

    def width() -> int:
        return sum(forms[0].cell_len + 2 for _, forms in pieces) - 2

    by_priority = sorted(pieces, key=lambda p: p[0])
    while frame.width is not None and width() > frame.width and by_priority:
        _, forms = by_priority[0]
        if len(forms) > 1:
            forms.pop(0)
        else:
            pieces.remove(by_priority.pop(0))
    line = Text("  ").join(forms[0] for _, forms in pieces)
    line.no_wrap, line.overflow = True, "ellipsis"
    if error is None:
        return line
    warning = Text(f"{error}; retrying", style="bold red")
    if status is not None:
        warning.append(" (showing the last status it sent)", style="red")
    return Group(line, warning)


def _job_counts(status: Status) -> Text:
    jobs = status.jobs
    if not jobs:
        return Text("no jobs")
    counts: dict[str, int] = defaultdict(int)
    for j in jobs:
        counts[j.state] += 1
    out = Text(f"jobs {len(jobs)}")
    held = [s for s in ("paused", "slowed") if counts[s]]
    for i, state in enumerate(held):
        out.append(": " if not i else ", ")
        out.append(f"{counts[state]} {state}", style=JOB_STYLE[state])
    outside = sum(1 for j in jobs if j.resumed_outside)
    if outside:
        out.append(": " if not held else ", ")
        out.append(f"{outside} resumed outside governor", style=OUTSIDE_STYLE)
    errors = sum(1 for j in jobs if j.error)
    if errors:
        out.append(f", {errors} failed", style="bold red")
    return out


def _rule_counts(status: Status) -> Text:
    rules: dict[str, list[str]] = defaultdict(list)
    unenforceable = set()
    for r in status.rules:
        rules[r.name].append(r.state)
        if not r.enforceable:
            unenforceable.add(r.name)
    if not rules:
        return Text("no rules")
    counts: dict[str, int] = defaultdict(int)
    for states in rules.values():
        counts[_worst(states)] += 1
    out = Text(f"rules {len(rules)}")
    bad = [s for s in ("tripped", "pending") if counts[s]]
    for i, state in enumerate(bad):
        out.append(": " if not i else ", ")
        out.append(f"{counts[state]} {state}", style=RULE_STYLE[state])
    if not bad:
        out.append(": all ok", style="green")
    if unenforceable:
        out.append(f", {len(unenforceable)} not enforceable", style="bold red")
    return out


def _sampler_counts(status: Status) -> Text:
    samplers = status.samplers
    ok = sum(1 for s in samplers if s.state == "ok")
    out = Text(f"samplers {ok}/{len(samplers)} ok")
    for s in samplers:
        if s.state == "error":
            out.append(f", {s.name} error", style=SAMPLER_STYLE["error"])
    return out


def _samplers(status: Status) -> Text:
    """Every sampler's state, and why one is unavailable (no such hardware here)."""
    line = Text("samplers: ")
    for i, s in enumerate(status.samplers):
        if i:
            line.append(", ")
        line.append(f"{s.name} {s.state}", style=SAMPLER_STYLE.get(s.state, ""))
        if s.state != "ok" and s.error:
            line.append(f" ({s.error})", style=SAMPLER_STYLE.get(s.state, ""))
    if not status.samplers:
        line.append("none reported", style="dim")
    return line


def _paragraph(tier: int, text: Text, frame: _Frame) -> _Part[Any]:
    """A paragraph a row per line it folds into: cut, the last line kept ends in `…`."""
    if not frame.fitted or frame.width is None:
        return _fixed(tier, text)
    width = frame.width

    def make(shown: list[Text], hidden: list[Text]) -> RenderableType | None:
        if hidden:
            last = shown[-1] + Text(" …", style="dim")
            last.truncate(width, overflow="ellipsis")
            shown = [*shown[:-1], last]
        return _stack(*shown)
    return _Part([(tier, i, line) for i, line in enumerate(frame.fold(text))], make,
                 lambda shown, _: len(shown))


def _problems(status: Status, frame: _Frame) -> _Part[Any]:
    """What a reader should know before the readings: a sampler failing (its rules see
    nothing new), a sensor it could not read, an audit log that cannot be written."""
    rows: list[tuple[int, float, Text]] = []
    audit = status.audit
    if audit is not None and not audit.ok:
        rows.append((TIER_PROBLEM, 0, Text(
            f"audit log {audit.path}: {audit.errors} write errors, last: "
            f"{audit.last_error}", style="bold red")))
    for s in status.samplers:
        if s.state == "error":
            line = Text(f"{s.name} error", style="bold red")
            if s.error:
                line.append(f": {s.error}", style="bold red")
            if s.retry_at:
                line.append(f", next try at {fmt_clock(s.retry_at)}", style="red")
            rows.append((TIER_PROBLEM, 1, line))
        for problem in s.problems:
            rows.append((TIER_PROBLEM, 2, Text(f"{s.name}: {problem}", style="yellow")))

    def make(shown: list[Text], hidden: list[Text]) -> RenderableType | None:
        return _stack(*(frame.line(t) for t in shown), _more(hidden, ("problem", "problems")))
    return _Part(rows, make, lambda shown, hidden: len(shown) + bool(hidden))


def _jobs(status: Status, frame: _Frame) -> _Part[Any]:
    jobs = status.jobs
    if not jobs:
        return _fixed(TIER_HELD, Text("Jobs: none registered", style="bold"))
    def tier(j: Job) -> int:
        if j.error or j.resumed_outside or j.state in ("paused", "slowed"):
            return TIER_HELD
        return TIER_REST if j.state == "gone" else TIER_JOB

    def rank(j: Job) -> int:
        if j.error:
            return -1
        return JOB_RANK["slowed"] if j.resumed_outside else JOB_RANK.get(j.state, 2)

    rows = [(tier(j), rank(j), j) for j in jobs]

    def make(shown: list[Job], hidden: list[Job]) -> RenderableType | None:
        extra = ("pid", "mode", "devices", "prio") if frame.wide else ()
        cells: list[list[RenderableType]] = []
        for j in shown:
            style = OUTSIDE_STYLE if j.resumed_outside else JOB_STYLE.get(j.state, "")
            state_text = Text(j.state_text, style=style)
            reasons = Text("\n".join(printable(r) for r in j.reasons))
            if j.error:
                reasons = Text(f"ERROR: {printable(j.error)}", style="bold red") + (
                    Text("\n") + reasons if reasons else Text())
            speed = j.speed
            name = j.name if not j.scheduler_id else (
                f"{j.name} ({j.origin}" + (f", {j.user})" if j.user else ")"))
            row: list[RenderableType] = [j.id, name]
            if frame.wide:
                row += ["-" if j.pid is None else str(j.pid), j.mode or "-",
                        ",".join(j.devices) or "-", j.priority]
            row += [state_text,
                    Text("-" if speed is None else f"{speed * 100:.0f}%", style=style),
                    reasons]
            cells.append(row)
        table = frame.table(("job", "name", *extra, "state", "speed", "reasons"), cells,
                            wrap=("reasons",), squeeze="name")
        counts: dict[str, int] = defaultdict(int)
        for j in hidden:
            counts[j.state] += 1
        detail = " (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + ")"
        return _stack(table, _more(hidden, ("job", "jobs"), detail))
    return _Part(rows, make)


def _series(status: Status, frame: _Frame) -> _Part[Any]:
    """Each rule series against its trip and clear lines: those tripped or pending (or
    clearing, or missing their reading) among the first things shown, the rest last."""
    series = [r for r in status.rules if r.series is not None]
    taken_at = status.taken_at

    def quiet(r: RuleSeries) -> bool:
        return r.state == "ok" and not r.clearing and not r.missing and not r.holding_back

    rows = [(TIER_REST if quiet(r) else TIER_HOLDING, SERIES_RANK.get(r.state, 2), r)
            for r in series]

    def make(shown: list[RuleSeries], hidden: list[RuleSeries]) -> RenderableType | None:
        cells: list[list[RenderableType]] = []
        for r in shown:
            metric = r.metric
            state = r.state
            style = RULE_STYLE.get(state, "")
            above = r.above
            value = Text(fmt_value(metric, r.value), style=style)
            state_text = Text(state, style=style)
            if r.clearing:
                state_text.append(" clearing", style="yellow")
            if r.missing:
                state_text.append(" missing", style="magenta")
                value.stylize("magenta")
            if state != "ok" and r.since is not None and taken_at is not None:
                state_text.append(f" for {fmt_duration(taken_at - r.since)}")
            if r.holds:
                # a hold rule: its target where the lines are, and its loop's output
                lines = ["= " + fmt_value(metric, r.target),
                         "output " + ("-" if r.output is None else f"{r.output:.2f}")
                         + (" (power)" if r.via == "power_limit" else "")]
                if r.holding_back:
                    state_text.append(" holding", style="yellow")
            else:
                lines = [("> " if above else "< ") + fmt_value(metric, r.threshold),
                         ("< " if above else "> ") + fmt_value(metric, r.clear_threshold)]
            cells.append([r.name, fmt_labels(r.labels), value, *lines, state_text])
        table = frame.table(("rule", "series", "value", "trips", "clears", "state"), cells,
                            wrap=() if frame.fitted else ("series",), optional=("clears",),
                            squeeze="series")
        ok = sum(1 for r in hidden if quiet(r))
        detail = f" ({ok} ok)" if ok == len(hidden) else ""
        return _stack(table, _more(hidden, ("rule series", "rule series"), detail))
    return _Part(rows, make, _table_lines if frame.fitted else None)


def _rules(status: Status, frame: _Frame) -> _Part[Any]:
    """A line per rule: its metric, action, worst state and its series by state. A rule
    that cannot be enforced here comes early; the rest only when there is room."""
    by_name = status.rules_by_name()
    if not by_name:
        return _fixed(TIER_REST, Text("Rules: none configured", style="bold"))
    rows = [(TIER_HOLDING if not entries[0].enforceable else TIER_REST + 1,
             0, (name, entries)) for name, entries in by_name.items()]

    def make(shown: list[tuple[str, list[RuleSeries]]],
             hidden: list[tuple[str, list[RuleSeries]]]) -> RenderableType | None:
        cells: list[list[RenderableType]] = []
        for name, entries in shown:
            first = entries[0]
            watched = [e for e in entries if e.series is not None]
            state = _worst([e.state for e in entries])
            state_text = Text(state, style=RULE_STYLE.get(state, ""))
            if not first.enforceable:
                state_text.append(f" not enforceable: {first.not_enforceable_because}",
                                  style="bold red")
            counts: dict[str, int] = defaultdict(int)
            for e in watched:
                counts[e.state] += 1
                if e.missing:
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
            action = first.action or "-"
            if first.holds:
                action = f"hold at {first.target:g}" + (
                    " via power limit" if first.via == "power_limit" else "")
                held = sum(1 for e in watched if e.holding_back)
                if held:
                    summary.append((", " if summary else "") + f"{held} holding back",
                                   style="yellow")
            cells.append([name, first.metric or "-", action, state_text, summary])
        table = frame.table(("rule", "metric", "action", "state", "series"), cells,
                            wrap=() if frame.fitted else ("metric", "state", "series"),
                            squeeze="metric")
        return _stack(table, _more(hidden, ("rule", "rules")))
    return _Part(rows, make, _table_lines if frame.fitted else None)


def _hottest(temperature: float | None) -> float:
    """A rank that puts the hottest first and a device with no temperature last."""
    return -temperature if temperature is not None else math.inf


def _gpus(status: Status, frame: _Frame) -> _Part[Any]:
    readings = status.readings
    infos = sorted(readings.of("gpu_info"), key=lambda r: int(r.labels["gpu"]))
    caps = status.power_caps

    def temperature(info: Reading) -> float | None:
        return readings.value("gpu_temperature_celsius", gpu=info.labels["gpu"])

    rows = [(TIER_READING, _hottest(temperature(info)), info) for info in infos]

    def make(shown: list[Reading], hidden: list[Reading]) -> RenderableType | None:
        cells: list[list[RenderableType]] = []
        for info in shown:
            gpu = info.labels["gpu"]
            labels = {"gpu": gpu}
            temp = temperature(info)
            util = readings.value("gpu_utilization_ratio", gpu=gpu)
            power = readings.value("gpu_power_watts", gpu=gpu)
            limit = readings.value("gpu_power_limit_watts", gpu=gpu)
            used = readings.value("gpu_memory_used_bytes", gpu=gpu)
            total = readings.value("gpu_memory_total_bytes", gpu=gpu)
            power_text = _shown(status, "gpu_power_watts", power, labels,
                                "-" if power is None else f"{power:.0f}")
            power_text.append(" / " + ("-" if limit is None else f"{limit:.0f}") + " W")
            if gpu in caps:
                power_text.append(f" capped at {caps[gpu]:.0f} W", style="yellow")
            events = [r.labels["reason"] for r in readings.of("gpu_clock_event_active")
                      if r.labels["gpu"] == gpu and r.value]
            cells.append([
                gpu,
                _shown(status, "gpu_temperature_celsius", temp, labels,
                       "-" if temp is None else f"{temp:.0f} °C"),
                _shown(status, "gpu_utilization_ratio", util, labels,
                       "-" if util is None else f"{util * 100:.0f}%"),
                power_text,
                "-" if used is None or total is None
                else f"{used / 2**30:.1f} / {total / 2**30:.1f} GiB",
                Text(", ".join(events), style="yellow") if events else Text("none", style="dim"),
                info.labels.get("name") or "?",
            ])
        table = frame.table(
            ("gpu", "temp", "util", "power / limit", "memory", "clock events", "name"), cells,
            wrap=() if frame.fitted else ("clock events", "name"),
            optional=("name", "memory", "clock events"), squeeze="name")
        temps = [t for t in map(temperature, hidden) if t is not None]
        detail = f" (the hottest at {max(temps):.0f} °C)" if temps else ""
        return _stack(table, _more(hidden, ("GPU", "GPUs"), detail))
    return _Part(rows, make, _table_lines if frame.fitted else None)


def _accelerators(status: Status, frame: _Frame) -> _Part[Any]:
    readings = status.readings
    devices = sorted({
        (r.labels["device"], r.labels["driver"])
        for metric in ("accelerator_utilization_ratio", "accelerator_temperature_celsius",
                       "accelerator_power_watts", "accelerator_memory_total_bytes")
        for r in readings.of(metric)
    })

    def sensors(device: str) -> list[Reading]:
        return [r for r in readings.of("accelerator_temperature_celsius")
                if r.labels["device"] == device]

    def hottest(device: str) -> float | None:
        return max((r.value for r in sensors(device)), default=None)

    rows = [(TIER_READING, _hottest(hottest(device)), (device, driver))
            for device, driver in devices]

    def make(shown: list[tuple[str, str]],
             hidden: list[tuple[str, str]]) -> RenderableType | None:
        cells: list[list[RenderableType]] = []
        for device, driver in shown:
            labels = {"device": device, "driver": driver}
            temps = _temperature_list(status, sensors(device), frame, room=60)
            util = readings.value("accelerator_utilization_ratio", device=device)
            power = readings.value("accelerator_power_watts", device=device)
            used = readings.value("accelerator_memory_used_bytes", device=device)
            total = readings.value("accelerator_memory_total_bytes", device=device)
            cells.append([
                device, driver,
                "-" if util is None else _shown(status, "accelerator_utilization_ratio", util,
                                                labels),
                temps or "-",
                "-" if power is None else _shown(status, "accelerator_power_watts", power,
                                                 labels),
                "-" if used is None or total is None
                else f"{used / 2**30:.1f} / {total / 2**30:.1f} GiB",
            ])
        table = frame.table(("device", "driver", "util", "temperatures", "power", "memory"),
                            cells, wrap=() if frame.fitted else ("temperatures",),
                            optional=("driver", "memory", "power"), squeeze="temperatures")
        hot = [t for t in (hottest(d) for d, _ in hidden) if t is not None]
        detail = f" (the hottest at {max(hot):.0f} °C)" if hot else ""
        return _stack(table, _more(hidden, ("accelerator", "accelerators"), detail))
    return _Part(rows, make, _table_lines if frame.fitted else None)


def _temperature_list(status: Status, sensors: Sequence[Reading], frame: _Frame,
                      room: int | None) -> Text:
    """`sensor value, sensor value...`; in a frame that must fit, the hottest first and
    as many as `room` columns hold, then how many more there are."""
    if frame.fitted:
        sensors = sorted(sensors, key=lambda r: -r.value)
    pieces = [Text(f"{r.labels['sensor']} ") + _shown(status, r.metric, r.value, r.labels)
              for r in sensors]
    out = Text()
    for i, piece in enumerate(pieces):
        rest = len(pieces) - i - 1
        tail = f", +{rest} more" if rest else ""
        if (frame.fitted and room is not None and out
                and out.cell_len + 2 + piece.cell_len + len(tail) > room):
            out.append(f", +{len(pieces) - i} more", style="dim")
            break
        if out:
            out.append(", ")
        out.append_text(piece)
    return out


def _host(status: Status, frame: _Frame) -> _Part[Any]:
    """CPU, memory, load and pressure in a few lines, and CPU temperatures a row per chip:
    a 128-core box fits on the screen as well as a laptop does. A frame that must fit
    shows each chip's hottest sensors first, and the hottest chips."""
    readings = status.readings
    rows: list[tuple[int, float, tuple[str, Text, float | None]]] = []
    cores = readings.of("cpu_utilization_ratio")
    if cores:
        busiest = max(cores, key=lambda r: r.value)
        average = sum(r.value for r in cores) / len(cores)
        rows.append((TIER_HOST, -math.inf, ("cpu", Text(
            f"{average * 100:.1f}% average over {len(cores)} cores, busiest "
            f"cpu{busiest.labels['cpu']} {busiest.value * 100:.1f}%"), None)))
    memory = readings.value("memory_used_ratio")
    if memory is not None:
        rows.append((TIER_HOST, -math.inf, ("memory", _shown(
            status, "memory_used_ratio", memory, {}, f"{memory * 100:.1f}% used"), None)))
    loads = [readings.value("load_average_tasks", window=w) for w in ("1m", "5m", "15m")]
    if all(v is not None for v in loads):
        rows.append((TIER_REST, 0, ("load", Text(
            " ".join(f"{v:.2f}" for v in loads if v is not None)), None)))
    pressure: dict[str, list[Text]] = defaultdict(list)
    for r in readings.of("pressure_stall_ratio"):
        pressure[r.labels["resource"]].append(
            Text(f"{r.labels['kind']} ") + _shown(status, r.metric, r.value, r.labels))
    if pressure:
        rows.append((TIER_REST, 0, ("pressure", Text("  ·  ").join(
            Text(f"{resource} ") + Text(" ").join(kinds)
            for resource, kinds in pressure.items()), None)))
    chips: dict[str, list[Reading]] = defaultdict(list)
    for r in readings.of("cpu_temperature_celsius"):
        chips[r.labels["chip"]].append(r)
    room = None if frame.width is None else frame.width - len("CPU temp") - 2
    for chip, sensors in chips.items():
        hottest = max(r.value for r in sensors)
        line = Text(f"{chip}: ")
        line.append_text(_temperature_list(
            status, sensors, frame, None if room is None else room - line.cell_len))
        rows.append((TIER_HOST, _hottest(hottest), ("CPU temp", line, hottest)))

    def make(shown: list[tuple[str, Text, float | None]],
             hidden: list[tuple[str, Text, float | None]]) -> RenderableType | None:
        named: set[str] = set()
        cells: list[list[RenderableType]] = []
        for name, cell, _ in shown:
            cells.append(["" if name in named else name, cell])
            named.add(name)
        table = frame.table(("host", ""), cells, wrap=() if frame.fitted else ("",),
                            header=False, squeeze="")
        # what a cut leaves out of CPU, memory, load and pressure needs no line of its own
        chips = [hottest for name, _, hottest in hidden if hottest is not None]
        detail = f" (the hottest at {max(chips):.0f} °C)" if chips else ""
        return _stack(table, _more(chips, ("CPU chip", "CPU chips"), detail))

    def lines(shown: list[tuple[str, Text, float | None]],
              hidden: list[tuple[str, Text, float | None]]) -> int:
        return len(shown) + any(hottest is not None for _, _, hottest in hidden)
    return _Part(rows, make, lines if frame.fitted else None)


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
             max_frames: int | None = None,
             size: Callable[[], tuple[int | None, int | None]] = lambda: (None, None)) -> int:
    """Poll, and draw a frame whenever something changed, until `wait` reports a quit key
    or `max_frames` frames are drawn. Returns the number of frames drawn. `size` is the
    width and height to fit each frame in (the terminal's, asked each frame since it may
    have been resized)."""
    frames = 0
    while True:
        if poller.poll():
            width, height = size()
            show(render(poller.status, where=where, error=poller.error, width=width,
                        height=height))
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
                            max_frames=max_frames, size=lambda: (console.width, None))
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
        return run_live(poller, show, reader.wait, where=where, max_frames=max_frames,
                        size=lambda: (console.size.width, console.size.height))
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

