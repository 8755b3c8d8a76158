"""contrib/grafana/polarkvd.json cannot drift from the code: every metric its queries use is served by
a live daemon's /metrics (one with the disk tier and a one-member cluster, so the cluster's and the
disk's series are there), and every label a query selects or groups by is one those series carry."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.request import urlopen

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO_ROOT, chain_tokens, store_chain
from tests.test_metrics import metrics_url

DASHBOARD = REPO_ROOT / "contrib" / "grafana" / "polarkvd.json"

#: A metric name in a query: the daemon's own series and the standard process ones.
METRIC = re.compile(r"\b((?:polarkv|process|python)_[A-Za-z0-9_]+)\b")
#: metric{label="v", other=~"..."}: the selector's labels.
SELECTOR = re.compile(r"\b((?:polarkv|process|python)_[A-Za-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
#: Labels Prometheus adds to every series it scrapes (the `host` variable is `instance`).
TARGET_LABELS = {"instance", "job"}


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target (rows' nested panels too) and every query variable."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for p in panels:
            for t in p.get("targets", []):
                yield f"panel {p.get('title')!r}", t["expr"]
            yield from walk(p.get("panels", []))

    yield from walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        q = var.get("query")
        if var.get("type") == "query":
            yield f"variable {var['name']!r}", q["query"] if isinstance(q, dict) else q


def test_dashboard_is_grafana_json_with_a_host_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["host"]["type"] == "query" and variables["host"]["multi"] is True
    assert variables["datasource"]["type"] == "datasource"
    exprs = list(queries(dash))
    assert len(exprs) > 30, "the dashboard lost its panels"
    for where, expr in exprs:
        if where.startswith("panel"):
            # every panel follows the host selection
            assert 'instance=~"$host"' in expr, (where, expr)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for what in ("occupancy", "hit rate per tier", "evictions", "demotions", "sessions", "fetch", "l1"):
        assert what in titles, what


def test_every_metric_the_dashboard_queries_is_served(daemon_factory) -> None:
    d = daemon_factory(
        {
            "cluster.enabled": "true",
            "cluster.insecure": "true",
            "cluster.node_id": "dash",
            "cluster.gossip_address": "127.0.0.1:0",
            "cluster.data_address": "127.0.0.1:0",
            "cluster.dmp_bytes": "4MiB",
        }
    )
    with d.engine(engine_id="dashboard") as kv, d.control() as c:  # traffic: the counters have moved
        keys = store_chain(kv, chain_tokens(1, 4))
        assert kv.lookup(keys).hits == 4
        # an operator pin: a counter served through polarkv_manager_events_total{event=...}, whose
        # family has no sample (so no name in the text format) before its first event
        c.pin(keys[:1])
    with urlopen(metrics_url(d), timeout=30) as r:
        text = r.read().decode()
    labels: dict[str, set[str]] = {}  # sample name -> label names seen on it
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels.setdefault(s.name, set()).update(s.labels)

    dash = json.loads(DASHBOARD.read_text())
    used: dict[str, str] = {}
    problems = []
    for where, expr in queries(dash):
        for name in METRIC.findall(expr):
            used.setdefault(name, where)
        for name, body in SELECTOR.findall(expr):
            for label in MATCHER.findall(body):
                if label not in TARGET_LABELS and label not in labels.get(name, set()):
                    problems.append(
                        f"{where}: {name} has no label {label!r} (it has {sorted(labels.get(name, []))})"
                    )
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (x.strip() for x in grouping.split(",")):
                if (
                    label
                    and label not in TARGET_LABELS | {"le"}
                    and not any(label in labels.get(n, set()) for n in METRIC.findall(expr))
                ):
                    problems.append(f"{where}: groups by {label!r}, which none of its metrics has")
    missing = {name: where for name, where in used.items() if name not in labels}
    assert not missing, f"the dashboard queries metrics /metrics does not serve: {missing}"
    assert not problems, "\n".join(problems)
    assert len(used) > 30, sorted(used)
