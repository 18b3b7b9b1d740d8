"""A snapshot as a readable table, like `sensors` and `nvidia-smi` side by side.

It works on the JSON form of a snapshot (`Snapshot.as_dict()`, also what /v1/status
returns), so the CLI prints the same table for a local round and for a running daemon;
`render` reads it through the status model `governor top` draws too (status_model.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from governor.cli.status_model import Job, RuleSeries, Status
from governor.text import printable

Row = tuple[str, ...]


def table(rows: Iterable[Row], indent: str = "  ") -> list[str]:
    """Aligned columns; every cell escaped (job names may come from Slurm or a pod)."""
    rows = [tuple(printable(str(cell)) for cell in row) for row in rows]
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _bytes(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.1f} GiB"


def render(snapshot: Mapping[str, Any] | Status) -> str:
    """The readings by device (CPU, temperatures, NVIDIA GPUs, accelerators) and each
    sampler's health; a section with no readings is left out."""
    status = snapshot if isinstance(snapshot, Status) else Status.parse(snapshot)
    g = status.readings
    out: list[str] = []

    cores = sorted(g.of("cpu_utilization_ratio"), key=lambda r: int(r.labels["cpu"]))
    if cores or "memory_used_ratio" in g:
        out.append("CPU")
        rows: list[Row] = [("cpu" + r.labels["cpu"], pct(r.value)) for r in cores]
        rows.append(("memory used", pct(g.value("memory_used_ratio"))))
        loads = [g.value("load_average_tasks", window=w) for w in ("1m", "5m", "15m")]
        if all(v is not None for v in loads):
            rows.append(("load 1m 5m 15m", " ".join(f"{v:.2f}" for v in loads if v is not None)))
        for r in g.of("pressure_stall_ratio"):
            rows.append((f"pressure {r.labels['resource']} {r.labels['kind']}", pct(r.value)))
        out += table(rows)
        out.append("")

    temps = [(r, "cpu") for r in g.of("cpu_temperature_celsius")]
    temps += [(r, "") for r in g.of("hwmon_temperature_celsius")]
    if temps:
        out.append("Temperatures")
        rows = [("chip", "sensor", "°C", "")]
        for r, kind in temps:
            rows.append((r.labels["chip"], r.labels["sensor"], f"{r.value:.1f}", kind))
        out += table(rows)
        out.append("")

    gpus = sorted(g.of("gpu_info"), key=lambda r: int(r.labels["gpu"]))
    if gpus:
        out.append("NVIDIA GPUs")
        rows = [("gpu", "name", "util", "temp", "power / limit", "memory used / total",
                 "SM clock", "clock events")]
        for info in gpus:
            gpu = info.labels["gpu"]
            temp = g.value("gpu_temperature_celsius", gpu=gpu)
            power = g.value("gpu_power_watts", gpu=gpu)
            limit = g.value("gpu_power_limit_watts", gpu=gpu)
            clock = g.value("gpu_sm_clock_hertz", gpu=gpu)
            events = [
                r.labels["reason"] for r in g.of("gpu_clock_event_active")
                if r.labels["gpu"] == gpu and r.value
            ]
            rows.append((
                gpu,
                info.labels["name"] or "?",
                pct(g.value("gpu_utilization_ratio", gpu=gpu)),
                "-" if temp is None else f"{temp:.0f} °C",
                f"{'-' if power is None else f'{power:.0f}'} / "
                f"{'-' if limit is None else f'{limit:.0f}'} W",
                f"{_bytes(g.value('gpu_memory_used_bytes', gpu=gpu))} / "
                f"{_bytes(g.value('gpu_memory_total_bytes', gpu=gpu))}",
                "-" if clock is None else f"{clock / 1e6:.0f} MHz",
                ", ".join(events) or "none",
            ))
        out += table(rows)
        for gpu, listed in sorted(status.gpu_pids.items()):
            if listed:
                out.append(f"  gpu {gpu} processes: {', '.join(str(p) for p in listed)}")
        out.append("")

    devices = sorted({
        (r.labels["device"], r.labels["driver"])
        for metric in ("accelerator_utilization_ratio", "accelerator_temperature_celsius",
                       "accelerator_power_watts", "accelerator_memory_total_bytes")
        for r in g.of(metric)
    })
    if devices:
        out.append("Accelerators")
        rows = [("device", "driver", "util", "temperatures", "power", "memory used / total")]
        for device, driver in devices:
            temps_text = ", ".join(
                f"{r.labels['sensor']} {r.value:.1f} °C"
                for r in g.of("accelerator_temperature_celsius")
                if r.labels["device"] == device
            )
            power = g.value("accelerator_power_watts", device=device)
            total = g.value("accelerator_memory_total_bytes", device=device)
            rows.append((
                device, driver, pct(g.value("accelerator_utilization_ratio", device=device)),
                temps_text or "-",
                "-" if power is None else f"{power:.1f} W",
                "-" if total is None else
                f"{_bytes(g.value('accelerator_memory_used_bytes', device=device))} / "
                f"{_bytes(total)}",
            ))
        out += table(rows)
        out.append("")

    out.append("Samplers")
    rows = []
    for s in status.samplers:
        detail = s.error or ""
        if s.problems:
            detail = "; ".join([detail, *s.problems] if detail else s.problems)
        rows.append((s.name, s.state, f"{s.duration_seconds * 1000:.1f} ms", detail))
    out += table(rows)
    return "\n".join(out)


def render_rules(rules: Iterable[RuleSeries]) -> str:
    """A row per rule series: its state (and why it may not hold), value and action."""
    rows: list[Row] = [("rule", "series", "state", "value", "action")]
    for r in rules:
        state = r.state
        if r.clearing:
            state += " (clearing)"
        if r.missing:
            state += " (missing)"
        if not r.enforceable:
            state += f" (not enforceable: {r.not_enforceable_because})"
        value = "-" if r.value is None else f"{r.value:g}"
        action = r.hold_text() if r.holds else r.action or ""
        rows.append((r.name, r.series or "(no series yet)", state, value, action))
    return "\n".join(table(rows, indent=""))


def render_jobs(jobs: Iterable[Job]) -> str:
    """A row per job: how it is held and why."""
    jobs = list(jobs)
    if not jobs:
        return "no jobs"
    # where each job came from and whose it is, always: on a shared node "whose job is
    # this?" is the first question
    rows: list[Row] = [("id", "name", "from", "user", "pid", "mode",
                        "devices", "prio", "state", "speed", "reasons")]
    for j in jobs:
        state = j.state_text
        reasons = "; ".join(j.reasons)
        if j.error:
            reasons = f"ERROR: {j.error}" + (f"; {reasons}" if reasons else "")
        rows.append((
            j.id, j.name, j.origin, j.user or "-",
            "-" if j.pid is None else str(j.pid), j.mode or "-",
            ",".join(j.devices) or "-", j.priority, state,
            "-" if j.speed is None else f"{j.speed:g}", reasons,
        ))
    return "\n".join(table(rows, indent=""))


def render_events(events: list[dict[str, Any]]) -> str:
    """The audit log, a row per event: local time, who, what, on which job (or GPU), why."""
    if not events:
        return "no events"
    rows: list[Row] = [("time", "who", "what", "job", "why")]
    for e in events:
        rows.append((
            datetime.fromtimestamp(float(e["time"])).strftime("%Y-%m-%d %H:%M:%S"),
            str(e.get("who", "")), str(e.get("what", "")), _event_subject(e), _event_why(e),
        ))
    return "\n".join(table(rows, indent=""))


def _event_subject(event: dict[str, Any]) -> str:
    job = event.get("job")
    if isinstance(job, dict):
        name, job_id = job.get("name"), job.get("id")
        if name and job_id:
            return f"{name} ({job_id})"
        return str(name or job_id or "-")
    if event.get("gpu") is not None:
        return f"gpu{event['gpu']}"
    return "-"


def _event_why(event: dict[str, Any]) -> str:
    why = event.get("why")
    reasons = why.get("reasons", []) if isinstance(why, dict) else []
    text = "; ".join(str(r) for r in reasons)
    readings = why.get("readings", []) if isinstance(why, dict) else []
    now = [f"{r['series']} = {_number(r.get('value'))}" for r in readings
           if isinstance(r, dict) and r.get("state") != "tripped"]
    if now:
        text += "; now " + ", ".join(now)
    if event.get("watts") is not None:
        text = f"{event['watts']:g} W: {text}"
    return text


def _number(value: Any) -> str:
    return "missing" if value is None else f"{value:g}"
