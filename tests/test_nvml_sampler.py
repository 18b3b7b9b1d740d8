"""NVML sampler against the C fake NVML (tests/support/c_nvml.py): the real nvidia-ml-py
binding loads a fake libnvidia-ml.so.1, so its structs, versioned symbols and real
NVMLError subclasses are all in play."""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import pynvml
import pytest

from governor.sampling.base import SamplerUnavailable
from governor.sampling.nvml import NvmlSampler, NvmlUnavailableError
from tests.support.c_nvml import CNvmlState
from tests.support.fake_nvml import FakeNvml, error, h100


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def by_series(readings: list[Any]) -> dict[str, float]:
    return {r.series(): r.value for r in readings}


class Driver:
    """The C fake's state, kept as a dict: change it, then `write()` it."""

    def __init__(self, c_nvml: CNvmlState, library: ctypes.CDLL, state: dict[str, Any]):
        self._c_nvml = c_nvml
        self._library = library
        self.state = state
        self.write()

    def write(self) -> None:
        self._c_nvml.write(self.state)

    @property
    def calls(self) -> list[str]:
        return self._c_nvml.calls()

    @property
    def init_calls(self) -> int:
        return self.calls.count("nvmlInit")

    @property
    def initialized(self) -> bool:
        return int(self._library.fake_nvml_init_depth()) > 0


MakeDriver = Callable[[dict[str, Any]], Driver]
TwoGpus = Callable[..., Driver]


@pytest.fixture
def driver(c_nvml: CNvmlState, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeDriver]:
    with c_nvml.loaded_into_pynvml(monkeypatch) as library:
        yield lambda state: Driver(c_nvml, library, state)


@pytest.fixture
def two_gpus(driver: MakeDriver) -> TwoGpus:
    def make(**gpu1: Any) -> Driver:
        return driver({"gpus": [h100(0, pids=[4242, 4343]), h100(1, temperature=88, **gpu1)]})
    return make


def test_the_python_fake_raises_the_real_error_classes() -> None:
    # The Python fake (tests/support/fake_nvml.py) is still what other test files use
    # in-process (the golden exposition, the CLI's, the fleet's); its errors must match.
    assert type(error("GPU_IS_LOST")) is pynvml.NVMLError_GpuIsLost
    assert isinstance(error("NOT_SUPPORTED"), pynvml.NVMLError)
    assert isinstance(FakeNvml({}), FakeNvml)


def test_the_c_fake_through_the_real_binding(two_gpus: TwoGpus) -> None:
    """pynvml's own structs and errors, straight from the library."""
    two_gpus(lost=True, processes=[(4242, 5 * 2**30)])
    pynvml.nvmlInit()
    try:
        assert pynvml.nvmlDeviceGetCount() == 2
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        assert pynvml.nvmlDeviceGetUUID(handle) == "GPU-00000000-0000-0000-0000-000000000000"
        assert pynvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU) == 61
        assert pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU) == 61
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        assert (memory.used, memory.total, memory.free) == (10 * 2**30, 80 * 2**30, 70 * 2**30)
        assert pynvml.nvmlDeviceGetUtilizationRates(handle).gpu == 37
        assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle) == 0x4
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        assert [(p.pid, p.usedGpuMemory) for p in procs] == [(4242, 2**30), (4343, 2**30)]
        assert pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle) == [100000, 700000]
        with pytest.raises(pynvml.NVMLError_GpuIsLost):
            pynvml.nvmlDeviceGetHandleByIndex(1)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
        with pytest.raises(pynvml.NVMLError_NotFound):
            pynvml.nvmlDeviceGetHandleByUUID("GPU-nope")
    finally:
        pynvml.nvmlShutdown()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_two_gpus(two_gpus: TwoGpus) -> None:
    two_gpus()
    result = NvmlSampler().sample()
    found = by_series(result.readings)
    assert found['gpu_info{gpu="0",uuid="GPU-00000000-0000-0000-0000-000000000000",'
                 'name="NVIDIA H100 80GB HBM3"}'] == 1
    assert found['gpu_temperature_celsius{gpu="0"}'] == 61
    assert found['gpu_temperature_celsius{gpu="1"}'] == 88
    assert found['gpu_utilization_ratio{gpu="1"}'] == 0.37
    assert found['gpu_power_watts{gpu="0"}'] == 312.0
    assert found['gpu_power_limit_watts{gpu="0"}'] == 700.0
    assert found['gpu_memory_used_bytes{gpu="0"}'] == 10 * 2**30
    assert found['gpu_memory_total_bytes{gpu="0"}'] == 80 * 2**30
    assert found['gpu_sm_clock_hertz{gpu="0"}'] == 1.98e9
    assert found['gpu_clock_event_active{gpu="0",reason="sw_power_cap"}'] == 1
    assert found['gpu_clock_event_active{gpu="0",reason="hw_thermal"}'] == 0
    assert result.gpu_pids == {"0": frozenset({4242, 4343}), "1": frozenset()}
    assert result.problems == []


def test_a_field_that_is_not_supported_is_absent_not_zero(two_gpus: TwoGpus) -> None:
    two_gpus(errors={"nvmlDeviceGetPowerUsage": "NOT_SUPPORTED",
                     "nvmlDeviceGetCurrentClocksEventReasons": "NOT_SUPPORTED"})
    found = by_series(NvmlSampler().sample().readings)
    assert 'gpu_power_watts{gpu="1"}' not in found
    assert not any(s.startswith('gpu_clock_event_active{gpu="1"') for s in found)
    # the rest of that GPU still reports
    assert found['gpu_power_limit_watts{gpu="1"}'] == 700.0
    assert found['gpu_temperature_celsius{gpu="1"}'] == 88
    assert found['gpu_power_watts{gpu="0"}'] == 312.0


def test_no_permission_is_absent_too(two_gpus: TwoGpus) -> None:
    two_gpus(errors={"nvmlDeviceGetComputeRunningProcesses": "NO_PERMISSION"})
    result = NvmlSampler().sample()
    assert "1" not in result.gpu_pids and result.problems == []


def test_a_gpu_lost_mid_run_is_skipped_and_the_others_keep_reporting(two_gpus: TwoGpus) -> None:
    fake = two_gpus()
    sampler = NvmlSampler()
    assert 'gpu_temperature_celsius{gpu="1"}' in by_series(sampler.sample().readings)
    fake.state["gpus"][1]["lost"] = True
    fake.write()
    result = sampler.sample()
    found = by_series(result.readings)
    assert not any('gpu="1"' in s for s in found), "a lost GPU leaves no series"
    assert found['gpu_temperature_celsius{gpu="0"}'] == 61
    assert result.problems == ["gpu 1: GPU is lost; skipped"]


def test_a_gpu_lost_halfway_through_its_fields_leaves_no_partial_series(two_gpus: TwoGpus) -> None:
    two_gpus(errors={"nvmlDeviceGetMemoryInfo": "GPU_IS_LOST"})
    result = NvmlSampler().sample()
    assert not any(r.label("gpu") == "1" for r in result.readings)
    assert "gpu 1: GPU is lost" in result.problems[0]


@pytest.mark.parametrize("failure", ["UNKNOWN", "TIMEOUT", "INSUFFICIENT_POWER"])
def test_an_unexpected_error_on_one_field_hides_only_that_field(
        failure: str, two_gpus: TwoGpus) -> None:
    two_gpus(errors={"nvmlDeviceGetTemperatureV": failure})
    result = NvmlSampler().sample()
    found = by_series(result.readings)
    assert 'gpu_temperature_celsius{gpu="1"}' not in found
    assert found['gpu_power_watts{gpu="1"}'] == 312.0, "the rest of the GPU still reports"
    assert found['gpu_temperature_celsius{gpu="0"}'] == 61
    assert result.problems == [f"gpu 1: nvmlDeviceGetTemperatureV: {error(failure)}"]


def test_a_versioned_call_the_binding_cannot_serve_falls_back(two_gpus: TwoGpus) -> None:
    fake = two_gpus()
    for gpu in fake.state["gpus"]:
        gpu["errors"] = {"nvmlDeviceGetTemperatureV": "ARGUMENT_VERSION_MISMATCH"}
    fake.write()
    found = by_series(NvmlSampler().sample().readings)
    assert found['gpu_temperature_celsius{gpu="1"}'] == 88
    assert "nvmlDeviceGetTemperature" in fake.calls


def test_library_not_found_is_unavailable_for_good(driver: MakeDriver) -> None:
    fake = driver({"init_error": "LIBRARY_NOT_FOUND"})
    clock = Clock()
    sampler = NvmlSampler(clock=clock)
    assert sampler.unavailable_reason is not None
    assert "NVML Shared Library Not Found" in sampler.unavailable_reason
    for _ in range(3):
        clock.now += 3600
        with pytest.raises(SamplerUnavailable, match="Not Found"):
            sampler.sample()
    assert fake.init_calls == 1, "a missing library is not looked for again"


def test_driver_not_loaded_is_retried_with_backoff(driver: MakeDriver) -> None:
    fake = driver({"init_error": "DRIVER_NOT_LOADED", "gpus": [h100(0)]})
    clock = Clock()
    sampler = NvmlSampler(clock=clock)
    with pytest.raises(SamplerUnavailable, match="Driver Not Loaded"):
        sampler.sample()
    assert fake.init_calls == 1  # too soon to retry
    clock.now += 1.5
    with pytest.raises(SamplerUnavailable):
        sampler.sample()
    assert fake.init_calls == 2
    fake.state["init_error"] = None
    fake.write()
    clock.now += 1.5  # the backoff doubled: not yet
    with pytest.raises(SamplerUnavailable):
        sampler.sample()
    clock.now += 1.0
    assert by_series(sampler.sample().readings)['gpu_temperature_celsius{gpu="0"}'] == 61
    assert fake.init_calls == 3


def test_no_gpus_is_unavailable(driver: MakeDriver) -> None:
    driver({"gpus": []})
    with pytest.raises(SamplerUnavailable, match="no GPUs"):
        NvmlSampler().sample()


@pytest.mark.parametrize("state", [{"init_error": "LIBRARY_NOT_FOUND"},
                                   {"init_error": "DRIVER_NOT_LOADED"}, {"gpus": []}])
def test_required_refuses_without_nvml(state: dict[str, Any], driver: MakeDriver) -> None:
    driver(state)
    with pytest.raises(NvmlUnavailableError, match=r'sources\.nvml = "required"'):
        NvmlSampler(required=True)


def test_reinitialised_after_a_driver_reload(two_gpus: TwoGpus) -> None:
    fake = two_gpus()
    clock = Clock()
    sampler = NvmlSampler(clock=clock)
    sampler.sample()
    # The driver goes away: every call now fails as NVML does when it is unloaded.
    fake.state["count_error"] = "DRIVER_NOT_LOADED"
    fake.write()
    with pytest.raises(RuntimeError, match="NVML stopped answering"):
        sampler.sample()
    assert not fake.initialized, "NVML was shut down so that it can start over"
    # ...while it is away, rounds fail (it worked before: an alert should fire), without
    # hammering nvmlInit
    fake.state["init_error"] = "DRIVER_NOT_LOADED"
    fake.write()
    clock.now += 1.1
    with pytest.raises(RuntimeError, match="Driver Not Loaded"):
        sampler.sample()
    clock.now += 0.5
    with pytest.raises(RuntimeError):
        sampler.sample()
    assert fake.init_calls == 2
    # The driver is back.
    fake.state.update(init_error=None, count_error=None)
    fake.write()
    clock.now += 60
    result = sampler.sample()
    assert {r.label("gpu") for r in result.readings} == {"0", "1"}
    assert fake.init_calls == 3


def test_every_gpu_lost_fails_the_round_without_restarting_nvml(driver: MakeDriver) -> None:
    fake = driver({"gpus": [h100(0, lost=True), h100(1, lost=True)]})
    clock = Clock()
    sampler = NvmlSampler(clock=clock)
    for _ in range(5):
        clock.now += 1
        with pytest.raises(RuntimeError, match="every GPU failed: gpu 0: GPU is lost"):
            sampler.sample()
    assert fake.init_calls == 1, "a lost GPU is not the driver: NVML is not restarted"
    for gpu in fake.state["gpus"]:
        gpu["lost"] = False
    fake.write()
    assert len(sampler.sample().readings) > 0


def test_a_driver_upgrade_asks_for_a_restart_instead_of_retrying(two_gpus: TwoGpus) -> None:
    fake = two_gpus()
    clock = Clock()
    sampler = NvmlSampler(clock=clock)
    sampler.sample()
    fake.state["count_error"] = "LIB_RM_VERSION_MISMATCH"
    fake.write()
    for _ in range(3):
        clock.now += 60
        with pytest.raises(RuntimeError, match="restart governor"):
            sampler.sample()
    assert fake.init_calls == 1


def test_uninitialized_mid_round_restarts_nvml(two_gpus: TwoGpus) -> None:
    two_gpus(errors={"nvmlDeviceGetUUID": "UNINITIALIZED"})
    with pytest.raises(RuntimeError, match="NVML stopped answering: Uninitialized"):
        NvmlSampler().sample()


def test_old_drivers_without_the_v_functions(two_gpus: TwoGpus) -> None:
    fake = two_gpus()
    fake.state["missing_functions"] = ["nvmlDeviceGetTemperatureV",
                                       "nvmlDeviceGetCurrentClocksEventReasons"]
    fake.write()
    sampler = NvmlSampler()
    for _ in range(2):
        found = by_series(sampler.sample().readings)
        assert found['gpu_temperature_celsius{gpu="1"}'] == 88
        assert found['gpu_clock_event_active{gpu="0",reason="sw_power_cap"}'] == 1
    # the deprecated functions were found once and then used directly
    assert fake.calls.count("nvmlDeviceGetTemperatureV") == 1
    assert fake.calls.count("nvmlDeviceGetTemperature") == 4


def test_new_drivers_use_the_v_functions(two_gpus: TwoGpus) -> None:
    fake = two_gpus()
    NvmlSampler().sample()
    assert "nvmlDeviceGetTemperature" not in fake.calls
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" not in fake.calls


def test_close_shuts_nvml_down(two_gpus: TwoGpus) -> None:
    fake = two_gpus()
    sampler = NvmlSampler()
    sampler.close()
    assert not fake.initialized


def _nvml_library_present() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_nvml_library_present(), reason="this machine has an NVIDIA driver")
def test_real_pynvml_without_a_driver_is_unavailable() -> None:
    """The real binding on this GPU-less machine: library not found, CPU-only."""
    sampler = NvmlSampler()
    with pytest.raises(SamplerUnavailable, match="NVML Shared Library Not Found"):
        sampler.sample()
    with pytest.raises(NvmlUnavailableError):
        NvmlSampler(required=True)


@pytest.mark.skipif(not _nvml_library_present(), reason="no NVIDIA driver on this machine")
def test_real_gpus() -> None:
    """On a machine with a driver: every GPU reports and nothing raises."""
    result = NvmlSampler(required=True).sample()
    gpus = {r.label("gpu") for r in result.readings if r.metric == "gpu_info"}
    assert gpus == {str(i) for i in range(pynvml.nvmlDeviceGetCount())}
    for r in result.readings:
        if r.metric == "gpu_temperature_celsius":
            assert 0 < r.value < 120
        if r.metric == "gpu_utilization_ratio":
            assert 0 <= r.value <= 1


def test_nvidia_ml_py_is_what_provides_pynvml() -> None:
    """The deprecated `pynvml` package would shadow nvidia-ml-py's module."""
    spec = importlib.util.find_spec("pynvml")
    assert spec is not None and spec.origin is not None
    assert spec.origin.endswith("site-packages/pynvml.py"), spec.origin


def test_the_process_list_through_the_real_binding(driver: MakeDriver) -> None:
    driver({"gpus": [h100(0, processes=[(4242, 3 * 2**30), (4343, 0)]), h100(1, pids=[])]})
    result = NvmlSampler().sample()
    assert result.gpu_pids == {"0": frozenset({4242, 4343}), "1": frozenset()}


def test_a_driver_without_the_v3_process_list_falls_back_to_v2(two_gpus: TwoGpus) -> None:
    """pynvml turns the process list's FunctionNotFound into NVMLLibraryMismatchError,
    which is no NVMLError: it failed the whole round before governor fell back to _v2."""
    fake = two_gpus()
    fake.state["missing_functions"] = ["nvmlDeviceGetComputeRunningProcesses"]
    fake.write()
    sampler = NvmlSampler()
    for _ in range(2):
        result = sampler.sample()
        assert result.gpu_pids == {"0": frozenset({4242, 4343}), "1": frozenset()}
        assert result.problems == []
    assert fake.calls.count("nvmlDeviceGetComputeRunningProcesses") == 1, "found once"
    fake.state["missing_functions"].append("nvmlDeviceGetComputeRunningProcesses_v2")
    fake.write()
    result = NvmlSampler().sample()
    assert result.gpu_pids == {}, "neither: no process list, and the rest still reports"
    assert by_series(result.readings)['gpu_temperature_celsius{gpu="1"}'] == 88
    assert result.problems == []


def test_a_gpus_identity_is_asked_once_per_init_and_again_after_it_was_lost(
        two_gpus: TwoGpus) -> None:
    """The handle, UUID and name do not change while NVML stays initialized: a round
    asks only for what changes (issue 15: 3 of a GPU's 12 calls a round)."""
    fake = two_gpus()
    sampler = NvmlSampler()
    for _ in range(3):
        found = by_series(sampler.sample().readings)
        assert found['gpu_info{gpu="1",uuid="GPU-00000000-0000-0000-0000-000000000001",'
                     'name="NVIDIA H100 80GB HBM3"}'] == 1
        assert found['gpu_clock_event_active{gpu="0",reason="sw_power_cap"}'] == 1
    calls = fake.calls
    assert calls.count("nvmlDeviceGetUUID") == 2 and calls.count("nvmlDeviceGetName") == 2
    assert calls.count("nvmlDeviceGetHandleByIndex") == 2
    assert calls.count("nvmlDeviceGetTemperatureV") == 6, "what changes is read each round"
    fake.state["gpus"][1]["lost"] = True
    fake.write()
    sampler.sample()
    fake.state["gpus"][1]["lost"] = False
    fake.write()
    assert 'gpu_info{gpu="1",' in " ".join(by_series(sampler.sample().readings))
    assert fake.calls.count("nvmlDeviceGetUUID") == 3, "gpu 1 is identified again"
    sampler.close()
