"""Simulated GPUs for the demo: `[sources] simulate = "scenario.toml"`, never on by default.

Each GPU is reported as the NVML sampler reports a real one (identity with a "SIM-..."
uuid, utilization, temperature, power and its limit, memory), so rules, metrics and
`governor top` treat it as any GPU. Its temperature follows a first-order thermal model,

    dT/dt = heat * utilization - cool * (T - ambient)

solved exactly between two rounds. Its utilization is the CPU the processes of the jobs
bound to it (`--device gpu0`) really used since the last round, in units of `busy_cores`
(default 1: one busy core keeps the GPU fully busy), capped at 1: a job that is stopped,
or that holds itself, stops heating its GPU, and one that keeps running inside a critical
section keeps heating it. The daemon's wiring hands the sampler a
callable that lists those jobs from the controller's published view; the sampler only
reads their CPU time under `sources.procfs_root`.

Optional keys make it a plant worth controlling (each off by default, so a scenario
without them behaves as before):

- a power limit: the GPU draws power_idle + (power_max - power_idle) * utilization, and a
  limit caps its utilization at (limit - power_idle) / (power_max - power_idle). The limit
  starts at `power_limit` and is set as a real GPU's is: `SimulatedSampler.nvml` is a
  stand-in for the NVML module with the functions PowerCapper calls
  (nvmlDeviceSetPowerManagementLimit, ...GetPowerManagementLimitConstraints, ...), over the
  sampler's `power_limits`, between `power_limit_min` and `power_limit_max`;
- `slowdown_at`: the firmware's own slowdown. Above it (the true temperature at the start
  of a round's interval) the GPU halves its utilization by itself and reports the
  `hw_thermal` clock event, as a real GPU does (gpu_clock_event_active, with every NVML
  reason, is reported only for a GPU with `slowdown_at`);
- `lag`: the sensor reports the temperature of `lag` seconds ago (exactly, from the model);
- `noise`: Gaussian noise of that standard deviation (°C) on the reported temperature,
  drawn from a generator seeded with `seed`, so a run is reproducible;
- `ambient_step = {at = S, by = D}`: the ambient temperature moves by D °C, S seconds after
  the sampler's first round;
- `trace`: a CSV file (relative to the scenario's folder) that each round appends the
  GPU's true state to, for a benchmark to measure what the sensor's lag and noise hide:
  TRACE_COLUMNS.

`steady_speed` is the speed at which a GPU settles at a target temperature, for benchmarks.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import tomllib
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from governor.host.procfs import CLOCK_TICKS as CLOCK_TICKS  # the tests' clock ticks
from governor.host.procfs import parse_stat
from governor.sampling.base import SampleResult
from governor.sampling.nvml import CLOCK_EVENT_REASONS
from governor.sampling.paths import SysPaths, read_text
from governor.snapshot import reading

if TYPE_CHECKING:
    from governor.sampling.registry import SamplerContext

log = logging.getLogger(__name__)

#: what a `trace` file's lines hold: seconds since the sampler's first round, the true
#: temperature then, what the sensor reported, the utilization over the round that ended
#: then, 1 while the firmware slowed the GPU, the power limit (W) and the ambient (°C)
TRACE_COLUMNS = ("seconds", "temperature", "reported", "utilization", "hw_slowdown",
                 "power_limit", "ambient")

#: (pid, the devices its job is bound to) for every live job with a process
JobProcesses = Callable[[], Iterable[tuple[int, Iterable[str]]]]


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the key."""


class AmbientStep(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: seconds after the sampler's first round
    at: float = Field(ge=0)
    #: °C added to the ambient temperature from then on
    by: float = Field(ge=-100, le=100)


class GpuScenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(default="Simulated GPU", min_length=1)
    ambient: float = Field(default=30.0, ge=-50, le=100)
    heat: float = Field(ge=0, le=1000)
    cool: float = Field(gt=0, le=100)
    start: float | None = Field(default=None, ge=-50, le=250)
    power_idle: float = Field(default=50.0, ge=0)
    power_max: float = Field(default=300.0, ge=0)
    #: W, the limit at start (and NVML's default limit); None = power_max
    power_limit: float | None = Field(default=None, gt=0)
    #: the lowest and highest limit that can be set (NVML's limit constraints); default
    #: min(power_idle, power_limit) and max(power_max, power_limit)
    power_limit_min: float | None = Field(default=None, gt=0)
    power_limit_max: float | None = Field(default=None, gt=0)
    memory_total: float = Field(default=80 * 2**30, gt=0)
    memory_used: float = Field(default=2**30, ge=0)
    #: °C above which the firmware halves the utilization (hw_thermal); None = never
    slowdown_at: float | None = Field(default=None, ge=-50, le=250)
    #: seconds by which the reported temperature lags the true one
    lag: float = Field(default=0.0, ge=0, le=3600)
    #: °C, the standard deviation of the noise on the reported temperature
    noise: float = Field(default=0.0, ge=0, le=100)
    #: seeds the noise
    seed: int = 0
    ambient_step: AmbientStep | None = None
    #: CPU cores of its jobs that keep the GPU fully busy
    busy_cores: float = Field(default=1.0, gt=0, le=1024)
    #: a CSV file each round appends the GPU's true state to (TRACE_COLUMNS); None = none
    trace: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> GpuScenario:
        if self.power_max < self.power_idle:
            raise ValueError("power_max: is below power_idle")
        if self.memory_used > self.memory_total:
            raise ValueError("memory_used: is more than memory_total")
        if self.power_limit_min is not None and self.power_limit_min > self.limit:
            raise ValueError("power_limit_min: is above power_limit")
        if self.power_limit_max is not None and self.power_limit_max < self.limit:
            raise ValueError("power_limit_max: is below power_limit")
        return self

    @property
    def limit(self) -> float:
        """The power limit in W at start: power_limit, or power_max."""
        return self.power_limit if self.power_limit is not None else self.power_max

    @property
    def limit_constraints(self) -> tuple[float, float]:
        """(lowest, highest) power limit in W that can be set."""
        low = self.power_limit_min if self.power_limit_min is not None else min(
            self.power_idle, self.limit)
        high = self.power_limit_max if self.power_limit_max is not None else max(
            self.power_max, self.limit)
        return low, high

    def utilization_cap(self, limit: float) -> float:
        """The highest utilization a power limit of `limit` W lets the GPU reach."""
        if limit >= self.power_max:
            return 1.0
        if self.power_max <= self.power_idle:
            return 1.0 if limit >= self.power_idle else 0.0
        return min(1.0, max(0.0, (limit - self.power_idle) / (self.power_max - self.power_idle)))

    def ambient_at(self, since_start: float) -> float:
        """The ambient temperature `since_start` seconds after the first round."""
        step = self.ambient_step
        if step is not None and since_start >= step.at:
            return self.ambient + step.by
        return self.ambient


def steady_speed(spec: GpuScenario, target: float, *, ambient: float | None = None) -> float:
    """The optimal steady speed s* for `target` °C: the utilization at which the GPU settles
    at the target, s* = cool * (target - ambient) / heat, within 0..1 (1 when the GPU never
    reaches the target, 0 when even idle it is above it). `ambient` defaults to the
    scenario's (pass `spec.ambient_at(t)` for the ambient after a step)."""
    air = spec.ambient if ambient is None else ambient
    if spec.heat == 0:
        return 1.0 if target >= air else 0.0
    return min(1.0, max(0.0, spec.cool * (target - air) / spec.heat))


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    gpu: list[GpuScenario] = Field(min_length=1, max_length=64)


def load_scenario(path: str | os.PathLike[str]) -> Scenario:
    """The scenario in `path`; ScenarioError naming the file and the key otherwise."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ScenarioError(f"no such file: {path}") from None
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    try:
        scenario = Scenario.model_validate(_floats(data))
    except ValidationError as exc:
        error = exc.errors()[0]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if ": " in message and message.split(": ", 1)[0].isidentifier():
            field, message = message.split(": ", 1)
            key += f".{field}"
        raise ScenarioError(f"{path}: {key.lstrip('.')}: {message}") from None
    folder = Path(path).parent
    return scenario.model_copy(update={"gpu": [
        gpu if gpu.trace is None else gpu.model_copy(update={"trace": str(folder / gpu.trace)})
        for gpu in scenario.gpu]})


_FLOAT_KEYS = ("ambient", "heat", "cool", "start", "power_idle", "power_max", "power_limit",
               "power_limit_min", "power_limit_max", "memory_total", "memory_used",
               "slowdown_at", "lag", "noise", "at", "by", "busy_cores")


def _floats(data: dict[str, object]) -> dict[str, object]:
    """Floats where the model wants them, from the integers TOML writers use (`heat = 6`);
    the model is strict otherwise, so `heat = "6"` is still an error."""
    def fix(table: dict[str, object]) -> dict[str, object]:
        return {k: float(v) if k in _FLOAT_KEYS and type(v) is int
                else fix(v) if isinstance(v, dict) else v for k, v in table.items()}

    gpus = data.get("gpu")
    if isinstance(gpus, list):
        data = {**data, "gpu": [fix(g) if isinstance(g, dict) else g for g in gpus]}
    return data


class PowerLimits:
    """The simulated GPUs' power limits in W, by GPU index: what NVML's limit calls read and
    set on a real GPU. One per sampler."""

    def __init__(self, specs: list[GpuScenario]):
        self._specs = specs
        self._limits = [spec.limit for spec in specs]

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, gpu: int) -> float:
        return self._limits[self._index(gpu)]

    def default(self, gpu: int) -> float:
        return self._specs[self._index(gpu)].limit

    def constraints(self, gpu: int) -> tuple[float, float]:
        """(lowest, highest) limit in W, as nvmlDeviceGetPowerManagementLimitConstraints."""
        return self._specs[self._index(gpu)].limit_constraints

    def set(self, gpu: int, watts: float) -> None:
        """Set GPU `gpu`'s limit; ValueError outside its constraints (NVML's
        NVML_ERROR_INVALID_ARGUMENT) or for no such GPU."""
        low, high = self.constraints(gpu)
        if not low <= watts <= high:
            raise ValueError(f"gpu {gpu}: power limit {watts:g} W is outside "
                             f"{low:g}..{high:g} W")
        self._limits[gpu] = float(watts)

    def _index(self, gpu: int) -> int:
        if not 0 <= gpu < len(self._specs):
            raise ValueError(f"no simulated gpu {gpu}")
        return gpu


class SimulatedNvmlError(Exception):
    """What SimulatedNvml raises where NVML raises NVMLError."""


class SimulatedNvml:
    """A stand-in for the NVML module (pynvml) over simulated GPUs: the calls
    governor/actuators/gpu_power.py makes, in the same units (mW), with a handle per GPU
    index. Hand it to PowerCapper(journal, nvml=..., is_root=lambda: True): setting a
    simulated limit needs no root."""

    NVMLError = SimulatedNvmlError

    def __init__(self, limits: PowerLimits, uuids: list[str]):
        self._limits = limits
        self._uuids = uuids

    def nvmlInit(self) -> None:  # NVML's names, as pynvml spells them
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self._uuids)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self._uuids):
            raise SimulatedNvmlError(f"no simulated gpu {index}")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> int:
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        if text not in self._uuids:
            raise SimulatedNvmlError(f"no simulated gpu {text}")
        return self._uuids.index(text)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._uuids[self.nvmlDeviceGetHandleByIndex(handle)]

    def nvmlDeviceGetPowerManagementLimit(self, handle: int) -> int:
        return round(self._limits.get(self.nvmlDeviceGetHandleByIndex(handle)) * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return self.nvmlDeviceGetPowerManagementLimit(handle)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: int) -> int:
        return round(self._limits.default(self.nvmlDeviceGetHandleByIndex(handle)) * 1000)

    def nvmlDeviceGetPowerManagementLimitConstraints(
            self, handle: int) -> tuple[int, int]:
        low, high = self._limits.constraints(self.nvmlDeviceGetHandleByIndex(handle))
        return round(low * 1000), round(high * 1000)

    def nvmlDeviceSetPowerManagementLimit(self, handle: int, limit_mw: int) -> None:
        try:
            self._limits.set(self.nvmlDeviceGetHandleByIndex(handle), limit_mw / 1000)
        except ValueError as exc:
            raise SimulatedNvmlError(str(exc)) from None


@dataclass
class _Gpu:
    spec: GpuScenario
    index: int
    temperature: float
    uuid: str
    rng: random.Random
    #: (time, true temperature then, utilization over the interval that ended then), oldest
    #: first: what a lagging sensor reports from
    history: deque[tuple[float, float, float]]
    #: the open `trace` file, once the first round has written to it
    trace: TextIO | None = None
    #: the trace file could not be written: given up on
    trace_failed: bool = False


class SimulatedSampler:
    name = "simulated"

    def __init__(self, scenario: Scenario, paths: SysPaths, jobs: JobProcesses | None = None,
                 *, clock: Callable[[], float] = time.monotonic):
        self._gpus = [
            _Gpu(spec, index, spec.start if spec.start is not None else spec.ambient,
                 "SIM-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"governor-sim/{index}/{spec.name}")),
                 random.Random(f"governor-sim/{spec.seed}/{index}"), deque())
            for index, spec in enumerate(scenario.gpu)]
        #: the GPUs' power limits, by index; set through `nvml` as a real GPU's
        self.power_limits = PowerLimits(list(scenario.gpu))
        #: a stand-in for the NVML module over these GPUs, for PowerCapper
        self.nvml = SimulatedNvml(self.power_limits, [gpu.uuid for gpu in self._gpus])
        self._paths = paths
        self._jobs = jobs if jobs is not None else (lambda: ())
        self._clock = clock
        self._last: float | None = None
        #: the time of the first round (ambient steps count from it)
        self._start: float | None = None
        #: (pid, start ticks) -> CPU ticks at the last round
        self._cpu: dict[tuple[int, int], int] = {}

    def set_power_limit(self, gpu: int, watts: float) -> None:
        """Set simulated GPU `gpu`'s power limit (ValueError outside its constraints)."""
        self.power_limits.set(gpu, watts)

    def sample(self) -> SampleResult:
        now = self._clock()
        if self._start is None:
            self._start = now
        before = now if self._last is None else min(now, self._last)
        elapsed = now - before
        self._last = now
        busy = self._utilization(elapsed)
        result = SampleResult()
        for gpu in self._gpus:
            spec = gpu.spec
            used = min(1.0, busy.get(f"gpu{gpu.index}", 0.0) / spec.busy_cores)
            cap = spec.utilization_cap(self.power_limits.get(gpu.index))
            limited = used > cap
            used = min(used, cap)
            slowed = spec.slowdown_at is not None and gpu.temperature > spec.slowdown_at
            if slowed:
                used /= 2
            gpu.temperature = self._advance(spec, gpu.temperature, used, before, now)
            label = str(gpu.index)
            reported = round(self._sensor(gpu, used, now), 2)
            if spec.trace is not None and not gpu.trace_failed:
                self._trace(gpu, now, reported, used, slowed)
            result.readings += [
                reading("gpu_info", 1, gpu=label, uuid=gpu.uuid, name=spec.name),
                reading("gpu_utilization_ratio", used, gpu=label),
                reading("gpu_temperature_celsius", reported, gpu=label),
                reading("gpu_power_watts",
                        spec.power_idle + (spec.power_max - spec.power_idle) * used, gpu=label),
                reading("gpu_power_limit_watts", self.power_limits.get(gpu.index), gpu=label),
                reading("gpu_memory_used_bytes", spec.memory_used, gpu=label),
                reading("gpu_memory_total_bytes", spec.memory_total, gpu=label),
            ]
            if spec.slowdown_at is not None:
                active = {"hw_thermal": slowed, "sw_power_cap": limited}
                result.readings += [
                    reading("gpu_clock_event_active", 1.0 if active.get(reason) else 0.0,
                            gpu=label, reason=reason)
                    for _, reason in CLOCK_EVENT_REASONS]
        return result

    def _advance(self, spec: GpuScenario, temperature: float, used: float, t0: float,
                 t1: float) -> float:
        """The true temperature at t1 from `temperature` at t0, at a constant utilization,
        across an ambient step if one falls in between."""
        start = self._start if self._start is not None else t0
        if spec.ambient_step is not None and t0 < start + spec.ambient_step.at < t1:
            middle = start + spec.ambient_step.at
            temperature = _step(temperature, spec, used, middle - t0, spec.ambient_at(t0 - start))
            t0 = middle
        return _step(temperature, spec, used, t1 - t0, spec.ambient_at(t0 - start))

    def _sensor(self, gpu: _Gpu, used: float, now: float) -> float:
        """What the GPU's sensor reports now: the true temperature `lag` seconds ago, plus
        noise."""
        spec = gpu.spec
        reported = gpu.temperature
        if spec.lag > 0:
            gpu.history.append((now, gpu.temperature, used))
            then = now - spec.lag
            # keep the last point at or before `then`, and what follows it
            while len(gpu.history) > 1 and gpu.history[1][0] <= then:
                gpu.history.popleft()
            t0, reported, _ = gpu.history[0]
            if t0 < then and len(gpu.history) > 1:
                reported = self._advance(spec, reported, gpu.history[1][2], t0, then)
        if spec.noise > 0:
            reported += gpu.rng.gauss(0.0, spec.noise)
        return reported

    def _trace(self, gpu: _Gpu, now: float, reported: float, used: float,
               slowed: bool) -> None:
        """Append this round's line to the GPU's `trace` file (TRACE_COLUMNS); a file that
        cannot be written is given up on, not fatal: the GPU is still reported."""
        spec = gpu.spec
        since = now - (self._start if self._start is not None else now)
        try:
            if gpu.trace is None:
                gpu.trace = open(str(spec.trace), "a", buffering=1)  # noqa: SIM115 - kept open
                if gpu.trace.tell() == 0:
                    gpu.trace.write(",".join(TRACE_COLUMNS) + "\n")
            gpu.trace.write(f"{since:.3f},{gpu.temperature:.4f},{reported:.2f},{used:.4f},"
                            f"{int(slowed)},{self.power_limits.get(gpu.index):g},"
                            f"{spec.ambient_at(since):g}\n")
        except OSError as exc:
            gpu.trace_failed = True
            log.warning("simulated gpu %d: cannot write its trace %s (%s); no more lines",
                        gpu.index, spec.trace, exc.strerror or exc)

    def _utilization(self, elapsed: float) -> dict[str, float]:
        """Device -> the CPU share the processes bound to it used since the last round."""
        seen: dict[tuple[int, int], int] = {}
        busy: dict[str, float] = {}
        for pid, devices in self._jobs():
            times = self._cpu_ticks(pid)
            if times is None:
                continue
            key, ticks = times
            seen[key] = ticks
            before = self._cpu.get(key)
            if before is None or elapsed <= 0:
                continue
            share = max(0, ticks - before) / CLOCK_TICKS / elapsed
            for device in devices:
                busy[device] = busy.get(device, 0.0) + share
        self._cpu = seen
        return busy

    def _cpu_ticks(self, pid: int) -> tuple[tuple[int, int], int] | None:
        """((pid, start time), user + system ticks) from procfs_root/PID/stat; None if
        the process is gone."""
        text = read_text(self._paths.proc(str(pid), "stat"))
        stat = None if text is None else parse_stat(text)
        if stat is None:
            return None
        try:
            return (pid, stat.start_ticks), stat.cpu_ticks
        except ValueError:
            return None

    def close(self) -> None:
        for gpu in self._gpus:
            if gpu.trace is not None:
                gpu.trace.close()
                gpu.trace = None


def _step(temperature: float, spec: GpuScenario, used: float, elapsed: float,
          ambient: float) -> float:
    """The temperature `elapsed` seconds on, at a constant utilization and ambient
    temperature: the exact solution of dT/dt = heat * used - cool * (T - ambient)."""
    settled = ambient + spec.heat * used / spec.cool
    return settled + (temperature - settled) * math.exp(-spec.cool * elapsed)


def from_context(context: SamplerContext) -> SimulatedSampler:
    """The simulated sampler's entry in governor/sampling/registry.py: the scenario that
    `sources.simulate` names, heated by the jobs `context.jobs` lists."""
    return SimulatedSampler(load_scenario(Path(context.sources.simulate)), context.paths,
                            context.jobs)
