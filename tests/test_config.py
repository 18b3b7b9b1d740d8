"""Config: every contract key accepted, unknown keys and wrong types named, durations parsed."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from governor.config import (
    Config,
    ConfigError,
    RuleConfig,
    find_config,
    load_config,
    parse_config,
    parse_duration,
    parse_listen,
)

REPO = Path(__file__).resolve().parents[1]

CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "CONTRACT.md"


def contract_example() -> str:
    """The config block of CONTRACT.md section 3, verbatim."""
    text = CONTRACT.read_text()
    section = text[text.index("## 3. Config"):text.index("## 4.")]
    block = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    return "\n".join(block) + "\n"


def problems(data: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "test.toml")
    return [str(p) for p in caught.value.problems]


EXAMPLE = Path(__file__).parent / "fixtures" / "contract-example.toml"


@pytest.mark.skipif(not CONTRACT.exists(), reason="the shared CONTRACT.md is not beside the repo")
def test_our_copy_of_the_contract_example_is_verbatim() -> None:
    assert EXAMPLE.read_text().split("\n", 1)[1] == contract_example()


def test_the_contract_example_is_accepted() -> None:
    config = load_config(EXAMPLE)
    rule = config.rules[0]
    assert config.daemon.interval == 1.0
    assert config.api.host == "127.0.0.1" and config.api.port == 9474
    assert config.sources.nvml == "auto"
    assert rule.for_ == 5.0 and rule.clear_for == 30.0
    assert rule.match == {"gpu": "0"}
    assert rule.threshold == 85.0 and rule.clear_threshold == 80.0 and rule.trips_above
    assert rule.speed == 0.5 and rule.max_priority == 100 and rule.on_missing == "hold"
    assert rule.power_cap_watts == 250  # beside action "slow": accepted, not used


# every governor config shipped; the demo's scenario is another format (its own tests)
SHIPPED = sorted(p for p in (REPO / "config").rglob("*.toml") if p.name != "scenario.toml")


@pytest.mark.parametrize("path", SHIPPED, ids=str)
def test_shipped_configs_are_valid(path: Path) -> None:
    load_config(path)


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.api.listen == "127.0.0.1:9474"
    assert config.daemon.effective_sampler_timeout == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(1, 1.0), (0, 0.0), (2.5, 2.5), ("250ms", 0.25), ("5s", 5.0), ("2m", 120.0),
     ("1h", 3600.0), ("1.5s", 1.5), ("7", 7.0), (" 3 s ", 3.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["5 parsecs", "-1s", -1, "s", "", True, [1], "1e3",
                                 "100000000h"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_unknown_keys_are_named() -> None:
    found = problems({"daemon": {"intervall": 1}, "apii": {}, "rules": [
        {"name": "r", "metric": "memory_used_ratio", "above": 0.9, "thresold": 1}]})
    assert "daemon.intervall: unknown key" in found
    assert "apii: unknown key" in found
    assert 'rules[0].thresold (rule "r"): unknown key' in found


def test_every_error_is_reported_at_once() -> None:
    found = problems({
        "daemon": {"interval": "soon"},
        "api": {"listen": "localhost", "allow_unauthenticated": "yes"},
        "sources": {"nvml": "maybe"},
    })
    keys = [f.split(":")[0] for f in found]
    assert keys == ["daemon.interval", "api.listen", "api.allow_unauthenticated", "sources.nvml"]


def test_wrong_types_are_named_with_the_value() -> None:
    (found,) = problems({"rules": [{"name": "r", "metric": "memory_used_ratio", "above": "90"}]})
    assert found.startswith('rules[0].above (rule "r"):') and "'90'" in found


@pytest.mark.parametrize(
    ("rule", "key", "words"),
    [
        ({"metric": "gpu_temp", "above": 1}, "metric", "unknown metric 'gpu_temp'"),
        ({"metric": "memory_used_ratio"}, "above", "exactly one of"),
        ({"metric": "memory_used_ratio", "above": 1, "below": 0}, "above", "exactly one of"),
        ({"metric": "memory_used_ratio", "above": 0.9, "clear_below": 0.95}, "clear_below",
         "hysteresis clears below"),
        ({"metric": "memory_used_ratio", "below": 0.1, "clear_above": 0.05}, "clear_above",
         "hysteresis clears above"),
        ({"metric": "memory_used_ratio", "above": 0.9, "clear_above": 0.5}, "clear_above",
         "clear_below"),
        ({"metric": "memory_used_ratio", "above": 0.9, "action": "slow"}, "speed", "needs"),
        ({"metric": "memory_used_ratio", "above": 0.9, "action": "slow", "speed": 1.5}, "speed",
         "less than 1"),
        ({"metric": "gpu_temperature_celsius", "above": 80, "action": "power_cap"},
         "power_cap_watts", "needs"),
        ({"metric": "memory_used_ratio", "above": 0.9, "action": "power_cap",
          "power_cap_watts": 200}, "action", "per-GPU"),
        ({"metric": "gpu_temperature_celsius", "above": 80, "match": {"device": "x"}},
         "match.device", "no label 'device'"),
        ({"metric": "memory_used_ratio", "above": 0.9, "on_missing": "ignore"}, "on_missing",
         "'hold', 'trip' or 'clear'"),
        ({"metric": "memory_used_ratio", "above": 0.9, "action": "kill"}, "action", "'slow'"),
        ({"metric": "memory_used_ratio", "above": 0.9, "for": "forever"}, "for",
         "not a duration"),
        ({"metric": "gpu_temperature_celsius", "action": "hold"}, "target", "needs `target`"),
        ({"metric": "gpu_temperature_celsius", "action": "hold", "target": 80,
          "min_speed": 1.0}, "min_speed", "less than 1"),
        ({"metric": "gpu_temperature_celsius", "action": "hold", "target": 80,
          "min_speed": -0.1}, "min_speed", "greater than or equal to 0"),
        ({"metric": "gpu_temperature_celsius", "action": "hold", "target": 80, "above": 90},
         "above", "not trip lines"),
        ({"metric": "gpu_temperature_celsius", "action": "hold", "target": 80,
          "via": "clocks"}, "via", "'speed' or 'power_limit'"),
        ({"metric": "memory_used_ratio", "action": "hold", "target": 0.8,
          "via": "power_limit"}, "via", "per-GPU"),
    ],
)
def test_rule_errors_name_their_key(rule: dict[str, object], key: str, words: str) -> None:
    (found,) = problems({"rules": [{"name": "r", **rule}]})
    assert found.startswith(f'rules[0].{key} (rule "r"): '), found
    assert words in found


@pytest.mark.parametrize(("daemon", "key"), [({"interval": "2h"}, "daemon.interval"),
                                             ({"interval": 0.001}, "daemon.interval"),
                                             ({"sampler_timeout": 0}, "daemon.sampler_timeout")])
def test_daemon_bounds(daemon: dict[str, object], key: str) -> None:
    (found,) = problems({"daemon": daemon})
    assert found.startswith(f"{key}: must be")


def test_a_hold_rule_needs_no_lines() -> None:
    config = parse_config({"rules": [{"name": "h", "metric": "gpu_temperature_celsius",
                                      "action": "hold", "target": 80}]})
    rule = config.rules[0]
    assert rule.holds and rule.target == 80 and rule.min_speed == 0 and rule.via == "speed"


def test_match_values_may_be_numbers() -> None:
    config = parse_config({"rules": [{"name": "r", "metric": "gpu_temperature_celsius",
                                      "above": 80, "match": {"gpu": 1}}]})
    assert config.rules[0].match == {"gpu": "1"}


def test_metric_may_carry_the_prefix() -> None:
    config = parse_config({"rules": [{"name": "r", "metric": "governor_memory_used_ratio",
                                      "above": 0.9}]})
    assert config.rules[0].metric == "memory_used_ratio"


def test_rule_names_are_unique() -> None:
    rule = {"name": "twin", "metric": "memory_used_ratio", "above": 0.9}
    (found,) = problems({"rules": [rule, rule]})
    assert found.startswith("rules[1].name: another rule is named 'twin'")


def test_clear_threshold_defaults_to_the_trip_threshold() -> None:
    config = parse_config({"rules": [{"name": "r", "metric": "memory_used_ratio", "below": 0.1}]})
    assert config.rules[0].clear_threshold == 0.1 and not config.rules[0].trips_above


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [("127.0.0.1:9474", "127.0.0.1", 9474), ("[::1]:80", "::1", 80),
     ("localhost:1", "localhost", 1), ("0.0.0.0:9474", "0.0.0.0", 9474)],
)
def test_listen(listen: str, host: str, port: int) -> None:
    assert parse_listen(listen) == (host, port)


@pytest.mark.parametrize("bad", ["localhost", ":9474", "::1:80", "host:0", "host:99999", "h:x"])
def test_bad_listen(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(bad)


def test_toml_syntax_errors_give_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[daemon]\ninterval = = 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "not valid TOML" in caught.value.lines()[0] and "line 2" in caught.value.lines()[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    assert caught.value.lines() == [f"{tmp_path / 'nope.toml'}: no such file"]


def test_config_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GOVERNOR_CONFIG", raising=False)
    monkeypatch.setattr("governor.config.DEFAULT_SEARCH",
                        (tmp_path / "etc.toml", Path("config/governor.toml")))
    assert find_config(None) is None
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "governor.toml").write_text("")
    assert find_config(None) == Path("config/governor.toml")
    (tmp_path / "etc.toml").write_text("")
    assert find_config(None) == tmp_path / "etc.toml"
    monkeypatch.setenv("GOVERNOR_CONFIG", "/from/env.toml")
    assert find_config(None) == Path("/from/env.toml")
    assert find_config("explicit.toml") == Path("explicit.toml")


def test_transport_security_defaults() -> None:
    api = Config().api
    assert api.allowed_hosts == [] and not api.tls
    assert api.tls_cert == api.tls_key == api.tls_ca == ""


def test_tls_files_are_accepted_as_a_pair(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert")
    key.write_text("key")
    api = parse_config({"api": {"tls_cert": str(cert), "tls_key": str(key),
                                "tls_ca": str(cert), "allowed_hosts": ["gpu1.example", "*"]}}).api
    assert api.tls and api.allowed_hosts == ["gpu1.example", "*"]


@pytest.mark.parametrize(("given", "problem"), [
    ({"tls_cert": "CERT"}, "test.toml: api.tls_key: is needed with api.tls_cert (the "
                           "certificate's private key)"),
    ({"tls_key": "CERT"}, "test.toml: api.tls_cert: is needed with api.tls_key (the key's "
                          "certificate)"),
    ({"tls_ca": "CERT"}, "test.toml: api.tls_ca: applies only with api.tls_cert; without it "
                         "the API is served without TLS"),
    ({"tls_cert": "CERT", "tls_key": "MISSING"}, "test.toml: api.tls_key: no such file: "
                                                  "MISSING"),
    ({"tls_cert": "MISSING", "tls_key": "CERT"}, "test.toml: api.tls_cert: no such file: "
                                                  "MISSING"),
    ({"tls_cert": "CERT", "tls_key": "CERT", "tls_ca": "MISSING"},
     "test.toml: api.tls_ca: no such file: MISSING"),
    ({"tls_cert": "DIR", "tls_key": "CERT"}, "test.toml: api.tls_cert: DIR is a directory, "
                                              "not a file"),
    ({"allowed_hosts": "localhost"}, "test.toml: api.allowed_hosts: should be a valid list "
                                     "(got 'localhost')"),
    ({"allowed_hosts": ["evil example"]}, "test.toml: api.allowed_hosts: 'evil example' is "
                                          'not a host name, an address or "*"'),
])
def test_tls_and_host_errors_name_the_key(tmp_path: Path, given: dict[str, object],
                                          problem: str) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("cert")
    paths = {"CERT": str(cert), "MISSING": str(tmp_path / "missing.pem"), "DIR": str(tmp_path)}
    api = {key: paths.get(value, value) if isinstance(value, str) else value
           for key, value in given.items()}
    expected = problem
    for placeholder, path in paths.items():
        expected = expected.replace(placeholder, path)
    with pytest.raises(ConfigError) as caught:
        parse_config({"api": api}, "test.toml")
    assert caught.value.lines() == [expected]


def _takes_float(annotation: object) -> bool:
    """float, or float inside `| None` or `Annotated` (a Duration)."""
    return annotation is float or any(_takes_float(a) for a in typing.get_args(annotation))


def _float_keys(model: type[BaseModel]) -> list[str]:
    """The keys of a section that take a float (durations too), by their TOML name."""
    return [field.alias or name for name, field in model.model_fields.items()
            if _takes_float(field.annotation)]


#: every float key of the config: the sections' and a rule's, so a key added later is
#: checked too
FLOAT_KEYS = [
    *(f"{section}.{key}" for section, field in Config.model_fields.items()
      if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
      for key in _float_keys(field.annotation)),
    *(f"rules.{key}" for key in _float_keys(RuleConfig)),
]


def test_the_float_keys_are_found() -> None:
    assert {"daemon.interval", "daemon.sampler_timeout", "rules.above", "rules.target",
            "rules.power_cap_watts", "rules.for", "rules.min_speed"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_no_float_key_takes_nan_or_infinity(key: str, value: float) -> None:
    """TOML has `nan` and `inf`: a NaN line never trips (every comparison with it is
    false), a NaN target makes NaN speeds, an infinite power cap is no number NVML takes."""
    section, name = key.split(".")
    if section == "rules":
        rule = {"name": "r", "metric": "gpu_temperature_celsius", "above": 80.0, name: value}
        found, named = problems({"rules": [rule]}), f'rules[0].{name} (rule "r"): '
    else:
        found, named = problems({section: {name: value}}), f"{key}: "
    assert [f for f in found if f.startswith(named)], found


def test_nan_and_inf_in_a_file_are_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "nan.toml"
    path.write_text('''[daemon]
interval = inf

[[rules]]
name = "hot"
metric = "gpu_temperature_celsius"
above = nan

[[rules]]
name = "cap"
metric = "gpu_temperature_celsius"
above = 80.0
action = "power_cap"
power_cap_watts = inf

[[rules]]
name = "hold"
metric = "gpu_temperature_celsius"
action = "hold"
target = -nan
''')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.lines() == [
        f"{path}: daemon.interval: a duration is a finite number of seconds, not inf",
        f'{path}: rules[0].above (rule "hot"): should be a finite number (got nan)',
        f'{path}: rules[1].power_cap_watts (rule "cap"): should be a finite number (got inf)',
        f'{path}: rules[2].target (rule "hold"): should be a finite number (got nan)',
    ]


@pytest.mark.parametrize(("jobs", "problem"), [
    ({"protected_executables": ["bin/sshd"]}, "test.toml: jobs.protected_executables: "
     "'bin/sshd' is neither an executable's file name nor its absolute path"),
    ({"protected_executables": [""]}, "test.toml: jobs.protected_executables: '' is "
     "neither an executable's file name nor its absolute path"),
    ({"protected_units": ["ssh"]}, "test.toml: jobs.protected_units: 'ssh' is not a "
     "systemd service or scope name like ssh.service"),
])
def test_the_deny_list_errors_name_the_key(jobs: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"jobs": jobs}, "test.toml")
    assert caught.value.lines() == [problem]


def test_the_deny_list_defaults_protect_the_nodes_services() -> None:
    jobs = parse_config({}, "test.toml").jobs
    assert {"sshd", "kubelet", "containerd", "slurmd", "slurmctld", "munged",
            "systemd-journald"} <= set(jobs.protected_executables)
    assert "ssh.service" in jobs.protected_units
    assert parse_config({"jobs": {"protected_executables": [], "protected_units": []}},
                        "test.toml").jobs.protected_units == []
