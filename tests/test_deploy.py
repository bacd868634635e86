"""deploy/: correct by construction, since nothing here can run Docker or a cluster.

What is checked, file by file:
- every YAML parses (and the YAML/JSON embedded in ConfigMaps);
- the Kubernetes manifests validate against the JSON schemas of their kinds
  (kubernetes-validate's bundled schemas, strict: no unknown fields);
- every command line given to the sidecar or the testbed (compose, Kubernetes,
  the Dockerfile's CMD) is accepted by the real ``enginetime`` argument parser;
- the pieces point at each other: the engine and the sidecar share the socket's
  directory and ENGINETIME_INGEST, Prometheus scrapes the port the sidecar serves
  /metrics on, the sidecar exports to the collector's OTLP port, the collector's
  pipelines only use components it defines, probes use declared ports;
- the Dockerfile copies every package directory pyproject.toml maps and compose's
  build targets exist;
- the Grafana dashboard only queries metrics a real sidecar exposes, and the
  Kubernetes ConfigMap holds the same dashboard.
"""

from __future__ import annotations

import json
import re
import sys
import time
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helpers import IngestConnection, arrived, finished, hello, start_sidecar, step, wait_until
from otel_helpers import metrics_address, scrape

from enginetime.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.37.0"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _compose() -> dict:
    return _docs(DEPLOY / "compose.yaml")[0]


def _k8s_objects() -> list[dict]:
    return [d for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml" for d in _docs(p)]


def _find(kind: str, name: str) -> dict:
    for d in _k8s_objects():
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name} in deploy/k8s")


def _parse(argv: list[str]):
    """The real CLI parser; argparse errors become test failures with the message."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"enginetime rejects {argv}") from exc


def test_every_yaml_in_deploy_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 9
    for path in files:
        docs = _docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
    for cm in (d for d in _k8s_objects() if d["kind"] == "ConfigMap"):
        for key, value in cm["data"].items():
            parsed = json.loads(value) if key.endswith(".json") else yaml.safe_load(value)
            assert isinstance(parsed, dict), (cm["metadata"]["name"], key)


def test_kubernetes_manifests_validate_against_their_schemas() -> None:
    objects = _k8s_objects()
    kinds = sorted({(d["apiVersion"], d["kind"]) for d in objects})
    assert ("apps/v1", "Deployment") in kinds and ("v1", "ConfigMap") in kinds and ("v1", "Service") in kinds
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    # Strict validation does catch mistakes (the check is not vacuous).
    broken = yaml.safe_load((K8S / "engine.yaml").read_text().split("\n---\n")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}


def test_engine_pod_shares_the_socket_with_its_sidecar() -> None:
    dep = _find("Deployment", "enginetime-engine")
    pod = dep["spec"]["template"]["spec"]
    (sidecar,) = [c for c in pod["initContainers"] if c["name"] == "enginetime-sidecar"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: up before the engine, down after
    (engine,) = pod["containers"]
    env = {c["name"]: {e["name"]: e.get("value") for e in c["env"]} for c in (sidecar, engine)}
    ingest = env["enginetime-sidecar"]["ENGINETIME_INGEST"]
    assert env["engine"]["ENGINETIME_INGEST"] == ingest and ingest.startswith("unix:")
    socket_dir = Path(ingest[len("unix:") :]).parent
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in (sidecar, engine):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        # The socket's directory is a subdirectory the sidecar creates inside the shared
        # emptyDir (an emptyDir is world-writable: the sidecar refuses it as the socket's directory).
        assert str(socket_dir) not in mounts and "emptyDir" in volumes[mounts[str(socket_dir.parent)]], c[
            "name"
        ]
    assert pod["securityContext"]["runAsUser"] == 10001  # one uid: the socket is 0600
    for c in (sidecar, engine):
        assert "runAsUser" not in c.get("securityContext", {})

    # The sidecar's command line is one the real sidecar accepts, with the env's ingest address.
    args = _parse(["sidecar", *sidecar["args"]])
    assert args.ingest is None  # it comes from ENGINETIME_INGEST, the engine's variable too
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert args.listen == f"0.0.0.0:{ports['accounting']}" and args.metrics_port == ports["metrics"]
    assert args.metrics_host == "0.0.0.0"
    # The API listens beyond loopback, so it is authenticated: a token from a mounted Secret.
    token_dir = str(Path(args.api_token_file).parent)
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert "secret" in volumes[mounts[token_dir]] and not args.allow_insecure_listen
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == ports["accounting"]  # grpc.health.v1 is served
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]

    # It exports to the collector Service's OTLP/gRPC port.
    svc = _find("Service", "otel-collector")
    otlp = re.fullmatch(r"http://([^:/]+):(\d+)", args.otlp_endpoint)
    assert otlp and otlp.group(1).split(".")[0] == svc["metadata"]["name"]
    assert int(otlp.group(2)) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "otlp-grpc"}

    # The engine: the testbed's own parser accepts its command line.
    tb = _parse(engine["args"])
    engine_ports = {p["name"]: p["containerPort"] for p in engine["ports"]}
    assert tb.testbed_command == "serve" and tb.port == engine_ports["http"]
    engine_svc = _find("Service", "enginetime-engine")
    assert {p["name"] for p in engine_svc["spec"]["ports"]} == {"http", "accounting", "metrics"}


def _collector_is_consistent(config: dict) -> None:
    for pipeline in config["service"]["pipelines"].values():
        for section in ("receivers", "processors", "exporters"):
            for component in pipeline.get(section, []):
                assert component in config[section], f"{component} is not defined under {section}"
    for ext in config["service"].get("extensions", []):
        assert ext in config["extensions"]
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")


def test_collector_configs_define_what_their_pipelines_use() -> None:
    compose_cfg = _docs(DEPLOY / "otel-collector.yaml")[0]
    _collector_is_consistent(compose_cfg)
    cm = _find("ConfigMap", "otel-collector")
    k8s_cfg = yaml.safe_load(cm["data"]["config.yaml"])
    _collector_is_consistent(k8s_cfg)
    assert k8s_cfg["receivers"] == compose_cfg["receivers"]
    dep = _find("Deployment", "otel-collector")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert f"--config={mount}/config.yaml" in container["args"]
    # In compose, the exporters reach services that exist, on the port they receive OTLP on.
    services = _compose()["services"]
    for name, exporter in compose_cfg["exporters"].items():
        if "endpoint" in exporter:
            host, port = exporter["endpoint"].split(":")
            assert host in services, name
    assert "--set=receivers.otlp.protocols.grpc.endpoint=0.0.0.0:4317" in services["jaeger"]["command"]
    tempo = _docs(DEPLOY / "tempo.yaml")[0]
    assert tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"


def test_compose_stack_is_wired_together() -> None:
    compose = _compose()
    services = compose["services"]
    expected = {"sidecar", "testbed", "otel-collector", "jaeger", "tempo", "prometheus", "grafana"}
    assert expected <= set(services)
    stages = set(re.findall(r"^FROM \S+ AS (\S+)", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE))
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, (name, dep)
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
            assert svc["build"]["target"] in stages, name
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)

    sidecar = _parse(["sidecar", *services["sidecar"]["command"]])
    testbed = _parse(services["testbed"]["command"])
    sessions = _parse(services["sessions"]["command"])
    assert testbed.ingest == sidecar.ingest and sidecar.ingest.startswith("unix:")
    socket_dir = str(Path(sidecar.ingest[len("unix:") :]).parent)
    for svc in ("sidecar", "testbed"):
        assert f"enginetime-run:{socket_dir}" in services[svc]["volumes"]
    assert sessions.url == f"http://testbed:{testbed.port}"
    # Prometheus scrapes the port the sidecar serves /metrics on.
    prom = _docs(DEPLOY / "prometheus.yaml")[0]
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"sidecar:{sidecar.metrics_port}"] and sidecar.metrics_host == "0.0.0.0"
    # The sidecar exports to the collector's OTLP/gRPC port.
    assert sidecar.otlp_endpoint == "http://otel-collector:4317"
    assert "4317:4317" in services["otel-collector"]["ports"]
    # Grafana gets the data sources and the dashboard.
    ds = _docs(DEPLOY / "grafana/provisioning/datasources/datasources.yaml")[0]["datasources"]
    assert {d["type"] for d in ds} == {"prometheus", "tempo", "jaeger"}
    urls = {d["type"]: d["url"] for d in ds}
    assert urls["prometheus"] == "http://prometheus:9090" and urls["tempo"] == "http://tempo:3200"


def test_dockerfile_builds_this_project() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    copied = {m.split()[0] for m in re.findall(r"^COPY (?!--from)(.+?) \S+$", text, re.MULTILINE)}
    sources = {s for line in copied for s in line.split()}
    for src in sources:
        assert (ROOT / src).exists(), src
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = {d.split("/")[0] for d in pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert package_dirs <= sources, package_dirs - sources
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in sources:
        assert f"!{src.rstrip('/')}/" in ignore or f"!{src}" in ignore, src
    # The images' default commands are valid enginetime command lines.
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)
    sidecar_stage = next(s for s in stages if s.split("\n")[0].endswith("AS sidecar"))
    entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", sidecar_stage, re.MULTILINE).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", sidecar_stage, re.MULTILINE).group(1))
    assert entry == ["enginetime", "sidecar"]
    args = _parse(entry[1:] + cmd)
    assert args.metrics_port is not None
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", sidecar_stage, re.MULTILINE).group(1).split()}
    assert exposed == {args.metrics_port, int(args.listen.rsplit(":", 1)[1])}
    testbed_stage = next(s for s in stages if s.split("\n")[0].endswith("AS testbed"))
    cmd = json.loads(re.search(r"^CMD (.+)$", testbed_stage, re.MULTILINE).group(1))
    assert _parse(cmd).testbed_command == "serve"


def _dashboard_metrics(dashboard: dict) -> set[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append(dashboard["templating"]["list"][1]["definition"])
    names = set()
    for e in exprs:
        for name in re.findall(r"\benginetime_[a-z_]+", e):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name) if "_seconds_" in name else name)
    return names


@pytest.mark.e2e
def test_dashboard_queries_metrics_the_sidecar_exposes(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/enginetime.json").read_text())
    # The Kubernetes ConfigMap is the same dashboard.
    sys.path.insert(0, str(K8S))
    try:
        import sync_dashboard
    finally:
        sys.path.remove(str(K8S))
    assert (K8S / "grafana-dashboard.yaml").read_text() == sync_dashboard.render(), (
        "deploy/k8s/grafana-dashboard.yaml is stale: run python deploy/k8s/sync_dashboard.py"
    )
    cm = _find("ConfigMap", "enginetime-grafana-dashboard")
    assert json.loads(cm["data"]["enginetime.json"]) == dashboard
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))

    # Every metric a panel queries is in a real sidecar's /metrics.
    wanted = _dashboard_metrics(dashboard)
    assert len(wanted) >= 15
    with start_sidecar(tmp_path, "--metrics-port", "0") as sidecar:
        address = metrics_address(sidecar.stdout_lines)
        t = time.time_ns() - 100_000_000
        with IngestConnection(sidecar.ingest) as conn:
            conn.send(
                hello(engine_id="dash"),
                arrived(1, "r", 8, time_ns=t),
                step(0, [1], prefill=[8], start_time_ns=t + 1_000_000),
                finished(1, time_ns=t + 3_000_000),
            )
            samples = wait_until(
                lambda: (
                    (m := scrape(address))
                    and m.get(
                        ("enginetime_request_wall_seconds_count", (("engine_id", "dash"), ("shard", "0")))
                    )
                    and m
                ),
            )
    names = {name for name, _ in samples}
    exposed = names | {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in names}
    missing = {w for w in wanted if w not in exposed}
    assert not missing, f"the dashboard queries metrics the sidecar does not expose: {sorted(missing)}"
