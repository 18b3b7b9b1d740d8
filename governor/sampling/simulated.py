"""Simulated GPUs for the demo: `[sources] simulate = "scenario.toml"`, never on by default.

Each GPU is reported as the NVML sampler reports a real one (identity with a "SIM-..."
uuid, utilization, temperature, power and its limit, memory), so rules, metrics and
`governor top` treat it as any GPU. Its temperature follows a first-order thermal model,

    dT/dt = heat * utilization - cool * (T - ambient)

solved exactly between two rounds. Its utilization is the CPU the processes of the jobs
bound to it (`--device gpu0`) really used since the last round, capped at 1: a job that
is stopped, or that holds itself, stops heating its GPU, and one that keeps running
inside a critical section keeps heating it. The daemon's wiring hands the sampler a
callable that lists those jobs from the controller's published view; the sampler only
reads their CPU time under `sources.procfs_root`.
"""

from __future__ import annotations

import math
import os
import time
import tomllib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from governor.host.procfs import CLOCK_TICKS as CLOCK_TICKS  # the tests' clock ticks
from governor.host.procfs import parse_stat
from governor.sampling.base import SampleResult
from governor.sampling.paths import SysPaths, read_text
from governor.snapshot import reading

if TYPE_CHECKING:
    from governor.sampling.registry import SamplerContext

#: (pid, the devices its job is bound to) for every live job with a process
JobProcesses = Callable[[], Iterable[tuple[int, Iterable[str]]]]


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file and the key."""


class GpuScenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(default="Simulated GPU", min_length=1)
    ambient: float = Field(default=30.0, ge=-50, le=100)
    heat: float = Field(ge=0, le=1000)
    cool: float = Field(gt=0, le=100)
    start: float | None = Field(default=None, ge=-50, le=250)
    power_idle: float = Field(default=50.0, ge=0)
    power_max: float = Field(default=300.0, ge=0)
    power_limit: float = Field(default=300.0, gt=0)
    memory_total: float = Field(default=80 * 2**30, gt=0)
    memory_used: float = Field(default=2**30, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> GpuScenario:
        if self.power_max < self.power_idle:
            raise ValueError("power_max: is below power_idle")
        if self.memory_used > self.memory_total:
            raise ValueError("memory_used: is more than memory_total")
        return self


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
        return Scenario.model_validate(_floats(data))
    except ValidationError as exc:
        error = exc.errors()[0]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if ": " in message and message.split(": ", 1)[0].isidentifier():
            field, message = message.split(": ", 1)
            key += f".{field}"
        raise ScenarioError(f"{path}: {key.lstrip('.')}: {message}") from None


_FLOAT_KEYS = ("ambient", "heat", "cool", "start", "power_idle", "power_max", "power_limit",
               "memory_total", "memory_used")


def _floats(data: dict[str, object]) -> dict[str, object]:
    """Floats where the model wants them, from the integers TOML writers use (`heat = 6`);
    the model is strict otherwise, so `heat = "6"` is still an error."""
    gpus = data.get("gpu")
    if isinstance(gpus, list):
        data = {**data, "gpu": [
            {k: float(v) if k in _FLOAT_KEYS and type(v) is int else v for k, v in g.items()}
            if isinstance(g, dict) else g for g in gpus]}
    return data


@dataclass
class _Gpu:
    spec: GpuScenario
    index: int
    temperature: float
    uuid: str


class SimulatedSampler:
    name = "simulated"

    def __init__(self, scenario: Scenario, paths: SysPaths, jobs: JobProcesses | None = None,
                 *, clock: Callable[[], float] = time.monotonic):
        self._gpus = [
            _Gpu(spec, index, spec.start if spec.start is not None else spec.ambient,
                 "SIM-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"governor-sim/{index}/{spec.name}")))
            for index, spec in enumerate(scenario.gpu)]
        self._paths = paths
        self._jobs = jobs if jobs is not None else (lambda: ())
        self._clock = clock
        self._last: float | None = None
        #: (pid, start ticks) -> CPU ticks at the last round
        self._cpu: dict[tuple[int, int], int] = {}

    def sample(self) -> SampleResult:
        now = self._clock()
        elapsed = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        busy = self._utilization(elapsed)
        result = SampleResult()
        for gpu in self._gpus:
            spec = gpu.spec
            used = min(1.0, busy.get(f"gpu{gpu.index}", 0.0))
            gpu.temperature = _step(gpu.temperature, spec, used, elapsed)
            label = str(gpu.index)
            result.readings += [
                reading("gpu_info", 1, gpu=label, uuid=gpu.uuid, name=spec.name),
                reading("gpu_utilization_ratio", used, gpu=label),
                reading("gpu_temperature_celsius", round(gpu.temperature, 2), gpu=label),
                reading("gpu_power_watts",
                        spec.power_idle + (spec.power_max - spec.power_idle) * used, gpu=label),
                reading("gpu_power_limit_watts", spec.power_limit, gpu=label),
                reading("gpu_memory_used_bytes", spec.memory_used, gpu=label),
                reading("gpu_memory_total_bytes", spec.memory_total, gpu=label),
            ]
        return result

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
        pass


def _step(temperature: float, spec: GpuScenario, used: float, elapsed: float) -> float:
    """The temperature `elapsed` seconds on, at a constant utilization: the exact solution
    of dT/dt = heat * used - cool * (T - ambient)."""
    settled = spec.ambient + spec.heat * used / spec.cool
    return settled + (temperature - settled) * math.exp(-spec.cool * elapsed)


def from_context(context: SamplerContext) -> SimulatedSampler:
    """The simulated sampler's entry in governor/sampling/registry.py: the scenario that
    `sources.simulate` names, heated by the jobs `context.jobs` lists."""
    return SimulatedSampler(load_scenario(Path(context.sources.simulate)), context.paths,
                            context.jobs)
