"""deploy/: alert rules (promtool), the metrics they and the dashboard use, a real Prometheus
scraping a running worker, and the Compose file and Kubernetes manifests.

The Compose file is validated against the Compose Specification's JSON schema (vendored by
check-jsonschema; this machine has no ``docker compose`` plugin), and ``docker compose
config`` runs where the plugin is.  The manifests are checked structurally with PyYAML (no
cluster for ``kubectl --dry-run``); ``kubectl kustomize`` builds them when kubectl is
installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.metrics import Metrics
from shared.queue_metrics import QueueDepthCollector
from shared.settings import ConfigError, RetrySettings, WebSettings, load_settings
from shared.topology import Topology
from tests.broker_fixtures import Vhost
from tests.ports import free_port
from tests.processes import Workers, wait_for

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mailroute.json"
METRIC = re.compile(r"\b(mailroute_[a-z0-9_]+)")
# The metrics an operator needs on the dashboard or in an alert (the reverse check).
MAIN_METRICS = {
    "mailroute_stage_messages_in_total", "mailroute_stage_messages_out_total",
    "mailroute_stage_messages_retried_total", "mailroute_stage_messages_dead_lettered_total",
    "mailroute_stage_processing_seconds_bucket", "mailroute_end_to_end_latency_seconds_bucket",
    "mailroute_mailbox_polls_total", "mailroute_mailbox_messages_fetched_total",
    "mailroute_mailbox_last_success_timestamp_seconds", "mailroute_mailbox_status",
    "mailroute_queue_depth", "mailroute_queue_consumers", "mailroute_queue_depth_up",
    "mailroute_messages_untracked_total", "mailroute_stage_ready",
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not installed: `make services` installs Debian's prometheus")
    return path


def exported_names() -> set[str]:
    """Every sample name this code can export, from the registry's metric families."""
    metrics = Metrics()
    metrics.watch(QueueDepthCollector(Topology(), lambda queues: {}))
    names: set[str] = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                                 "_created"),
                "gauge": ("",), "unknown": ("",)}
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def used_metrics() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in METRIC.findall(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in dashboard_expressions():
        for name in METRIC.findall(expr):
            used.setdefault(name, set()).add("dashboard")
    return used


def test_every_metric_of_the_dashboard_and_alerts_is_exported() -> None:
    exported = exported_names()
    used = used_metrics()
    assert len(used) >= 10
    missing = {name: where for name, where in used.items() if name not in exported}
    assert not missing, f"used but not exported: {missing}"


def test_the_main_metrics_are_on_the_dashboard_or_in_an_alert() -> None:
    assert exported_names() >= MAIN_METRICS
    assert not MAIN_METRICS - set(used_metrics()), "exported but never shown or alerted on"


def test_alert_rules_pass_promtool_and_every_alert_has_a_unit_test() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", "alerts.yml"], cwd=PROMETHEUS,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run([tool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS,
                           capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout + tests.stderr
    unit = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
    fired = {case["alertname"] for test in unit["tests"] for case in test["alert_rule_test"]
             if case["exp_alerts"]}
    quiet = {case["alertname"] for test in unit["tests"] for case in test["alert_rule_test"]
             if not case["exp_alerts"]}
    names = {rule["alert"] for rule in alert_rules()}
    assert names == fired == quiet, "each alert needs a firing and a quiet case"
    wanted = {"MailrouteMailboxFailing", "MailrouteMailboxDisabled",
              "MailrouteDeadLettersGrowing", "MailrouteBacklogGrowing",
              "MailrouteEndToEndLatencyHigh", "MailrouteNoMailProcessed"}
    assert wanted <= names


def test_compose_prometheus_config_passes_promtool() -> None:
    check = subprocess.run([promtool(), "check", "config", "prometheus.yml"], cwd=PROMETHEUS,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
            return result
    except OSError:
        return []


@pytest.fixture
def parse_worker(tmp_path: Path, rabbit_vhost: Vhost) -> Iterator[Workers]:
    config = tmp_path / "mailroute.yaml"
    config.write_text(yaml.safe_dump({
        "broker": {"url": rabbit_vhost.url, "confirm_timeout": 10},
        "metrics": {"base_port": 0}, "log_format": "json"}))
    workers = Workers(config, tmp_path)
    workers.start("parse")
    yield workers
    assert workers.stop_all() == {"parse": 0}


def test_a_real_prometheus_scrapes_a_running_worker(tmp_path: Path,
                                                    parse_worker: Workers) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not installed: `make services` installs Debian's prometheus")
    wait_for(lambda: parse_worker.metrics_port("parse") is not None, "the worker's metrics port",
             on_timeout=parse_worker.logs)
    target = f"127.0.0.1:{parse_worker.metrics_port('parse')}"
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    config["scrape_configs"] = [{"job_name": "mailroute",
                                 "static_configs": [{"targets": [target]}]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))  # noqa: SIM115
    try:
        wait_for(lambda: bool(query(port, 'mailroute_stage_ready{stage="parse"} == 1')),
                 "Prometheus to scrape the parse worker as ready",
                 on_timeout=lambda: (tmp_path / "prometheus.log").read_text()[-3000:])
        depth = query(port, 'mailroute_queue_depth{queue="mail.parse",kind="input"}')
        assert depth and depth[0]["value"][1] == "0"
        assert query(port, "mailroute_queue_depth_up")[0]["value"][1] == "1"
        rules = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).read())
        loaded = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert "MailrouteBacklogGrowing" in loaded
    finally:
        server.terminate()
        server.wait(timeout=60)


# -- Compose and Kubernetes ----------------------------------------------------------------


def test_compose_file_has_every_service_wired() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"rabbitmq", "postgres", "migrate", "ingest", "parse", "route", "persist",
            "prometheus", "grafana"} <= set(services)
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    for stage, port in (("ingest", 9400), ("parse", 9401), ("route", 9402), ("persist", 9403)):
        service = services[stage]
        assert service["command"] == ["worker", stage]
        assert service["environment"]["HEALTH_PORT"] == str(port)
        assert service["environment"]["MAILROUTE_METRICS__HOST"] == "0.0.0.0"
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        # the service's configuration file with its environment loads (every MAILROUTE_*
        # variable is a settings override, so a stray one would stop the worker)
        settings = load_settings(DEPLOY / "compose" / "mailroute.yaml",
                                 environ=service["environment"])
        assert settings.metrics.host == "0.0.0.0" and settings.log_format == "json"
        assert settings.broker.url.startswith("amqp://") and "postgresql" in \
            settings.database.url
    web = services["web"]
    assert web["command"] == ["web", "--host", "0.0.0.0"]
    assert web["ports"] == ["127.0.0.1:8025:8025"]
    settings = load_settings(DEPLOY / "compose" / "mailroute.yaml", environ=web["environment"])
    assert settings.web.metrics_urls == tuple(
        f"http://{stage}:{port}/metrics" for stage, port in (
            ("ingest", 9400), ("parse", 9401), ("route", 9402), ("persist", 9403)))
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{source} does not exist"
    prometheus = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["ingest:9400", "parse:9401", "route:9402", "persist:9403"]
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p} == {uid}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    if compose_plugin_available():
        result = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"),
                                 "config", "--quiet"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_compose_file_validates_against_the_compose_specification() -> None:
    checker = Path(sys.executable).with_name("check-jsonschema")
    result = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec",
                             str(DEPLOY / "compose.yaml")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def compose_plugin_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True,
                          timeout=60).returncode == 0


def test_the_kubernetes_example_configuration_loads_with_its_environment(
        tmp_path: Path) -> None:
    secrets = {d["metadata"]["name"]: d["stringData"] for d in yaml.safe_load_all(
        (DEPLOY / "kubernetes" / "secret.example.yaml").read_text())}
    config = tmp_path / "mailroute.yaml"
    config.write_text(secrets["mailroute-config"]["mailroute.yaml"])
    settings = load_settings(config, environ={**secrets["mailroute-env"],
                                              **secrets["mailroute-web"],
                                              "MAILROUTE_METRICS__HOST": "0.0.0.0"})
    assert settings.broker.journal.max_age == "7D"
    assert settings.web.admin_token is not None
    assert [b.name for b in settings.mailboxes] == ["forward"]


def kubernetes_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def docs_by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_kubernetes_manifests_run_each_worker_and_scale_three_on_queue_length() -> None:
    docs = kubernetes_documents()
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {f"mailroute-{s}" for s in ("ingest", "parse", "route",
                                                           "persist", "web")}
    workers = {name: d for name, d in deployments.items() if name != "mailroute-web"}
    for name, deployment in workers.items():
        stage = name.removeprefix("mailroute-")
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= \
            spec["template"]["metadata"]["labels"].items()
        (container,) = spec["template"]["spec"]["containers"]
        assert container["args"][-2:] == ["worker", stage]
        port = container["ports"][0]["containerPort"]
        assert spec["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs
              if d["kind"] == "ScaledObject"}
    assert set(scaled) == {"mailroute-parse", "mailroute-route", "mailroute-persist"}
    for name, obj in scaled.items():
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "rabbitmq" and trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["metadata"]["queueName"] == "mail." + name.removeprefix("mailroute-")
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]
    for resource in kustomization["resources"]:
        assert (DEPLOY / "kubernetes" / resource).exists()
    if shutil.which("kubectl"):
        built = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "kubernetes")],
                               capture_output=True, text=True, timeout=120)
        assert built.returncode == 0, built.stderr
        kinds = [d["kind"] for d in yaml.safe_load_all(built.stdout) if d]
        assert kinds.count("Deployment") == 5 and kinds.count("ScaledObject") == 3


def test_kubernetes_pods_get_no_service_link_variables_which_would_be_read_as_settings(
        tmp_path: Path) -> None:
    docs = kubernetes_documents()
    services = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Service")
    # What Kubernetes would inject for them (service links): MAILROUTE_* variables that the
    # settings loader reads as keys, and refuses.
    injected = {f"{name.upper().replace('-', '_')}_SERVICE_HOST": "10.0.0.7"
                for name in services if name.startswith("mailroute-")}
    assert injected
    config = tmp_path / "mailroute.yaml"
    config.write_text("log_level: INFO\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(config, environ=injected)
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
    assert len(pods) == 6
    for pod in pods:
        assert pod.get("enableServiceLinks") is False, pod["containers"][0]["name"]


def test_kubernetes_web_page_reads_each_worker_kind_through_a_service(tmp_path: Path) -> None:
    docs = kubernetes_documents()
    (web,) = [d for d in docs if d["kind"] == "Deployment"
              and d["metadata"]["name"] == "mailroute-web"]
    (container,) = web["spec"]["template"]["spec"]["containers"]
    assert container["args"][-3:] == ["web", "--host", "0.0.0.0"]
    port = container["ports"][0]["containerPort"]
    assert port == WebSettings().port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/login"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > \
        RetrySettings().startup_wait  # the page waits that long for its database
    env = {e["name"]: e.get("value") for e in container["env"]}
    urls = yaml.safe_load(env["MAILROUTE_WEB__METRICS_URLS"])
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services["mailroute-web"]["spec"]["ports"][0]["port"] == port
    ports = {}
    for name, deployment in docs_by_kind(docs, "Deployment").items():
        (worker,) = deployment["spec"]["template"]["spec"]["containers"]
        ports[name] = worker["ports"][0]["containerPort"]
    for stage, offset in (("ingest", 0), ("parse", 1), ("route", 2), ("persist", 3)):
        name = f"mailroute-{stage}"
        service = services[name]
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == stage
        assert service["spec"]["ports"][0]["port"] == ports[name] == 9400 + offset
        assert f"http://{name}:{ports[name]}/metrics" in urls
    config = tmp_path / "mailroute.yaml"
    config.write_text("log_level: INFO\n")
    loaded = load_settings(config, environ={
        "MAILROUTE_WEB__METRICS_URLS": env["MAILROUTE_WEB__METRICS_URLS"]})
    assert loaded.web.metrics_urls == tuple(urls)  # the variable reads as the page needs it

