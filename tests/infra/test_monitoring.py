"""Dashboard, alert rules and scrape config use only the metrics the services export.

A quick check against tests/infra/exported_metrics.txt; tests/tests/metrics_live.rs
checks that list, and these files, against a live scrape of the coordinator and worker.
"""

import json
import re

import yaml

import infra
from infra import MONITORING

# PromQL words that look like metric names but are not.
PROMQL_WORDS = {
    "sum", "by", "without", "rate", "increase", "max", "min", "avg", "count", "histogram_quantile",
    "clamp_min", "clamp_max", "or", "and", "unless", "vector", "le", "on", "ignoring", "group_left",
    "group_right", "abs", "irate", "delta", "topk", "bottomk", "time", "absent", "offset", "bool",
}
SUFFIXES = ("_bucket", "_count", "_sum")


def metric_names(expr):
    """Metric names in a PromQL expression (label names, functions and range words left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)      # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)               # label matchers
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)              # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for word in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr):
        if word in PROMQL_WORDS or word.startswith("__"):
            continue
        for suffix in SUFFIXES:
            if word.endswith(suffix) and word[: -len(suffix)] in infra.exported_metrics():
                word = word[: -len(suffix)]
        names.add(word)
    return names


def test_exported_metrics_list_is_well_formed():
    metrics = infra.exported_metrics()
    assert len(metrics) >= 20
    for m in metrics:
        assert re.fullmatch(r"ao_[a-z0-9_]+", m), m


def dashboard():
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_exprs():
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_metric_name_extraction_sees_unknown_names():
    assert metric_names('sum by (queue) (rate(ao_nope_total{a="b"}[5m])) / ao_tasks') == {"ao_nope_total", "ao_tasks"}
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(ao_subtask_duration_seconds_bucket[5m])))") \
        == {"ao_subtask_duration_seconds"}


def test_dashboard_uses_only_exported_metrics():
    exprs = dashboard_exprs()
    assert exprs
    used = set().union(*(metric_names(e) for e in exprs))
    assert used <= infra.exported_metrics(), used - infra.exported_metrics()


def test_dashboard_first_panel_is_queue_depth():
    panels = sorted(dashboard()["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    first = panels[0]
    assert "queue depth" in first["title"].lower()
    assert all("ao_queue_messages" in t["expr"] for t in first["targets"])


def test_dashboard_covers_the_main_questions():
    exprs = " ".join(dashboard_exprs())
    for metric in ["ao_tasks", "ao_subtask_duration_seconds", "ao_agent_cost_usd_total", "ao_worker_runs_total",
                   "ao_worker_slots", "ao_webhook_deliveries_total"]:
        assert metric in exprs, metric


def alert_rules():
    doc = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_use_only_exported_metrics_and_are_complete():
    rules = alert_rules()
    for r in rules:
        assert {"alert", "expr", "labels", "annotations"} <= set(r), r.get("alert")
        used = metric_names(r["expr"])
        assert used and used <= infra.exported_metrics(), (r["alert"], used - infra.exported_metrics())
    exprs = {r["alert"]: r["expr"] for r in rules}
    assert any('state="dead"' in e for e in exprs.values()), "dead-letter alert"
    assert any("ao_queue_oldest_message_age_seconds" in e for e in exprs.values())
    assert any('ao_worker_slots{state="free"}' in e for e in exprs.values()), "saturation alert"
    assert any("ao_worker_runs_total" in e and "outcome" in e for e in exprs.values()), "failure rate alert"
    assert any("ao_budget_used_ratio" in e for e in exprs.values()), "budget alert"


def test_scrape_config_discovers_the_services_and_labels_capability():
    doc = yaml.safe_load((MONITORING / "prometheus-scrape.yml").read_text())
    jobs = doc["scrape_configs"]
    consul = [j for j in jobs if "consul_sd_configs" in j]
    assert consul, "Consul service discovery"
    assert any("prometheus" in sd.get("tags", []) for j in consul for sd in j["consul_sd_configs"])
    relabels = [r for j in consul for r in j["relabel_configs"]]
    assert any(r.get("target_label") == "capability" for r in relabels)
    assert any(r.get("target_label") == "__metrics_path__" for r in relabels)
    # The services the jobs register carry what the scrape config reads.
    for kind in ["coordinator.nomad.hcl", "worker.nomad.hcl"]:
        text = (infra.NOMAD / kind).read_text()
        assert '"prometheus"' in text and "metrics_path" in text and "component" in text
