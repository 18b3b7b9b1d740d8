"""Grafana dashboards (exporters/grafana/*.json) as the tests read them: their panels,
queries and variables, and the queries with the variables substituted as Grafana would.

Shared by tests/test_grafana.py (governor.json) and tests/test_fleet.py (fleet.json).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.support.daemon import REPO

GRAFANA = REPO / "exporters" / "grafana"
PROVISIONING = GRAFANA / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
#: what Grafana puts for its interval variables; 1m holds several 1 s scrapes
INTERVALS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h",
             "__interval_ms": "15000", "__range_s": "3600"}


class Dashboard:
    """One dashboard file, read afresh on each call (a test may look at it as it is)."""

    def __init__(self, path: Path):
        self.path = path

    def board(self) -> dict[str, Any]:
        return dict(json.loads(self.path.read_text()))

    def panels(self) -> list[dict[str, Any]]:
        """Every panel, those inside collapsed rows too; rows themselves left out."""
        found = []
        for panel in self.board()["panels"]:
            if panel["type"] == "row":
                found += panel.get("panels", [])
            else:
                found.append(panel)
        return found

    def targets(self) -> list[tuple[str, dict[str, Any]]]:
        return [(panel["title"], target) for panel in self.panels()
                for target in panel["targets"]]

    def variables(self) -> dict[str, dict[str, Any]]:
        return {v["name"]: v for v in self.board()["templating"]["list"]}

    def queries(self) -> list[tuple[str, str, str]]:
        """(panel title or "annotation <name>", refId, expr) of every PromQL query."""
        found = [(title, str(target["refId"]), str(target["expr"]))
                 for title, target in self.targets()]
        found += [("annotation " + a["name"], "-", str(a["expr"]))
                  for a in self.board()["annotations"]["list"] if a.get("expr")]
        return found


def check_panel(panel: dict[str, Any]) -> None:
    """What provisioning and Grafana need of every panel: the datasource variable, a
    description, a unit, queries with unique refIds, and a grid position."""
    title = panel["title"]
    assert panel["datasource"] == DATASOURCE, title
    assert len(panel.get("description", "")) > 20, f"{title}: no description"
    assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
    assert panel["targets"], title
    refs = [t["refId"] for t in panel["targets"]]
    assert len(refs) == len(set(refs)), title
    for target in panel["targets"]:
        assert target.get("expr"), title
        assert target.get("datasource", DATASOURCE) == DATASOURCE, title
    assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, title


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def regex_escape(value: str) -> str:
    r"""A value as Grafana writes it into a Prometheus regex: specials escaped, with the
    backslash doubled for the PromQL string (127\\.0\\.0\\.1)."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def substitute(expr: str, values: dict[str, str]) -> str:
    every = {**INTERVALS, **values}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return every[name] if name in every else match.group(0)

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""),
                  template).strip()


def promtool_parse_errors(exprs: list[str], workdir: Path) -> str:
    """promtool's verdict on PromQL expressions, offline: each becomes a recording rule
    of a rule file that `promtool check rules` parses. "" when every one parses."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is not installed (Debian: prometheus)"
    rules = [{"record": f"dashboard:query_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = workdir / "queries.yml"
    # JSON is YAML: no YAML writer needed
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=2))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    if done.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in done.stdout:
        return ""
    return done.stdout + done.stderr
