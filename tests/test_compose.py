"""The deployment files stay valid and in step with the code.

``docker-compose config`` (the v1 Debian package: no daemon needed) validates and resolves
docker-compose.yml with and without the GPU override; the resolved config is then checked
against the code: commands parse with the real CLI, every INSPECTOR_* variable is a
Settings field with a valid value, the healthcheck path is a route of the app, the api
image's requirements carry no torch and cover everything ``service`` imports, the grace
periods cover the job timeout. The Kubernetes examples in deploy/k8s are held to the same.

YAML: PyYAML when importable, else the interpreter that runs docker-compose v1 (a Python
program that depends on PyYAML) converts it to JSON, so the project needs no YAML package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from itertools import takewhile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from schemas import keys
from schemas.kinds import KINDS
from schemas.settings import Settings
from service.auth import KeyRing, hash_key

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
K8S = ROOT / "deploy" / "k8s"
TORCH_STACK = {"torch", "torchvision", "captum", "onnxruntime"}
# Compose refuses to start without API keys; the tests supply one (a real hashed entry).
TEST_KEY = "compose-test-key"
TEST_KEYS_ENTRY = f"compose-test:{hash_key(TEST_KEY)}"


def _load_requirements_script() -> Any:
    """docker/requirements.py (what the images install from), imported by path."""
    spec = importlib.util.spec_from_file_location("docker_requirements", ROOT / "docker" / "requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


requirements = _load_requirements_script().requirements

DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose (v1) not installed: `make tools` installs the Debian package",
)


def _yaml_to_json_python() -> str | None:
    """A Python interpreter that can import yaml: this one, or the one running docker-compose v1."""
    try:
        import yaml  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    if DOCKER_COMPOSE is None:
        return None
    first = Path(DOCKER_COMPOSE).read_bytes()[:200].split(b"\n", 1)[0].decode(errors="replace")
    if not first.startswith("#!"):
        return None
    interpreter = first[2:].strip().split()
    ok = subprocess.run([*interpreter, "-c", "import yaml"], capture_output=True).returncode == 0
    return " ".join(interpreter) if ok else None


YAML_PYTHON = _yaml_to_json_python()


def load_yaml_documents(text: str) -> list[Any]:
    if YAML_PYTHON is None:
        pytest.skip("no YAML parser: neither PyYAML nor docker-compose v1's interpreter")
    code = "import json, sys, yaml; json.dump(list(yaml.safe_load_all(sys.stdin)), sys.stdout)"
    out = subprocess.run([*YAML_PYTHON.split(), "-c", code], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in json.loads(out.stdout) if d is not None]


def compose(
    *files: Path, args: tuple[str, ...] = ("config",), api_keys: str | None = TEST_KEYS_ENTRY
) -> subprocess.CompletedProcess[str]:
    # A clean environment: the defaults written in the file are what is checked, not this shell's.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    if api_keys is not None:
        env["API_KEYS"] = api_keys
    cmd = [DOCKER_COMPOSE or "docker-compose", "--project-directory", str(ROOT)]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    out = compose(COMPOSE)
    assert out.returncode == 0, out.stderr
    return load_yaml_documents(out.stdout)[0]


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    out = compose(COMPOSE, GPU_OVERRIDE)
    assert out.returncode == 0, out.stderr
    return load_yaml_documents(out.stdout)[0]


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += load_yaml_documents(path.read_text())
    return docs


def seconds(duration: str | int) -> float:
    """Compose/Go durations as compose prints them: '3600s', '1h30m', '1m0s', '90'."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms|us)?", duration)
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "": 1.0}
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * scale[u] for n, u in parts)


def settings_of(env: dict[str, str]) -> Settings:
    """Settings built from the INSPECTOR_* entries of a container environment (validated)."""
    fields = {k.removeprefix("INSPECTOR_").lower(): v for k, v in env.items() if k.startswith("INSPECTOR_")}
    unknown = sorted(set(fields) - set(Settings.model_fields))
    assert not unknown, f"INSPECTOR_ variables that are not Settings fields: {unknown}"
    return Settings.model_validate(fields)


def route_paths(app: Any) -> set[str]:
    """Paths the app serves: its OpenAPI paths plus plain routes (docs, schema)."""
    return set(app.openapi()["paths"]) | {r.path for r in app.routes if isinstance(getattr(r, "path", None), str)}


def longest_job_s(settings: Settings, queues: list[str]) -> int:
    """The longest a job on these queues may run: the job timeout or a kind's own budget."""
    budgets = [spec.timeout_s for spec in KINDS.values() if spec.queue in queues and spec.timeout_s]
    return max([settings.job_timeout_s, *budgets])


def cli_accepts(command: list[str]) -> None:
    """``python -m MODULE ARGS``: the module exists and its argparse CLI accepts ARGS."""
    assert command[:2] == ["python", "-m"], command
    module = command[2]
    out = subprocess.run(
        [sys.executable, "-m", *command[2:], "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, f"`python -m {module}` rejects {command[3:]}: {out.stderr}"


# --- docker-compose.yml ------------------------------------------------------------------------


@needs_compose
def test_compose_files_are_valid() -> None:
    for files in ((COMPOSE,), (COMPOSE, GPU_OVERRIDE)):
        out = compose(*files, args=("config", "-q"))
        assert out.returncode == 0, f"{[f.name for f in files]}: {out.stderr}"


@needs_compose
def test_worker_and_prepare_commands_parse_with_the_real_cli(base: dict[str, Any]) -> None:
    services = base["services"]
    worker, prepare = services["worker"]["command"], services["prepare"]["command"]
    assert worker[:4] == ["python", "-m", "workers", "worker"]
    assert prepare == ["python", "-m", "workers", "prepare"]
    queues = worker[worker.index("--queues") + 1 :]
    assert set(queues) == set(keys.QUEUES), "a compose worker serves every queue"
    for command in (worker, prepare):
        cli_accepts(command)
    assert "build" in services["worker"] and "Dockerfile.worker" in services["worker"]["build"]["dockerfile"]


@needs_compose
@pytest.mark.parametrize("config", ["base", "gpu"])
def test_inspector_variables_are_settings_fields(config: str, request: pytest.FixtureRequest) -> None:
    services = request.getfixturevalue(config)["services"]
    redis_password = _flag(services["redis"]["command"], "--requirepass")
    for name in ("api", "worker", "prepare"):
        s = settings_of(services[name].get("environment", {}))
        assert s.redis_url == f"redis://:{redis_password}@redis:6379/0", name
    assert settings_of(services["worker"]["environment"]).device == ("cuda" if config == "gpu" else "auto")


@needs_compose
def test_api_keys_are_required_and_reach_the_api(base: dict[str, Any]) -> None:
    refused = compose(COMPOSE, api_keys=None)
    assert refused.returncode != 0 and "API_KEYS" in refused.stderr, "compose must not start an open API"
    ring = KeyRing(settings_of(base["services"]["api"]["environment"]))
    tenant = ring.lookup(TEST_KEY)
    assert ring.enabled and tenant is not None and tenant.name == "compose-test"
    assert ring.lookup("some-other-key") is None


@needs_compose
def test_api_healthcheck_is_a_route_that_answers(base: dict[str, Any]) -> None:
    from fastapi.testclient import TestClient

    from service.main import app

    api = base["services"]["api"]
    probe = " ".join(api["healthcheck"]["test"])
    m = re.search(r"http://(?:127\.0\.0\.1|localhost):8000(/[\w/-]*)", probe)
    assert m, probe
    assert m.group(1) in route_paths(app)
    # /readyz (ready = a warm worker per queue) answers without Redis too: 503, not an error page
    answer = TestClient(app).get(m.group(1))
    assert answer.status_code == 503 and answer.json()["ready"] is False
    assert any(p.split(":")[-1] == "8000" for p in _ports(api)), "the api publishes port 8000"
    assert "Dockerfile.api" in api["build"]["dockerfile"]
    assert "--port 8000" in " ".join(_dockerfile_cmd(ROOT / "docker" / "Dockerfile.api"))


@needs_compose
def test_workers_scale_and_shut_down_gracefully(base: dict[str, Any]) -> None:
    worker = base["services"]["worker"]
    assert "container_name" not in worker and not _ports(worker), "--scale worker=N needs both absent"
    command = worker["command"]
    longest = longest_job_s(settings_of(worker["environment"]), command[command.index("--queues") + 1 :])
    assert seconds(worker["stop_grace_period"]) >= longest, "SIGKILL would cut a running job short"
    assert "deploy" not in worker, "the base file must run on CPU-only hosts"
    for name in ("api", "worker"):
        deps = base["services"][name]["depends_on"]
        assert deps["prepare"]["condition"] == "service_completed_successfully"
        assert deps["redis"]["condition"] == "service_healthy"
    mounts = {name: _mounts(base["services"][name]) for name in ("api", "worker", "prepare")}
    models_dir = str(settings_of(worker["environment"]).models_dir)
    for name, m in mounts.items():
        assert m.get(models_dir, ("", ""))[0] == "models", f"{name} mounts the shared models volume"
    assert mounts["prepare"][models_dir][1] == "rw" and mounts["api"][models_dir][1] == "ro"


@needs_compose
def test_redis_is_durable_private_and_password_protected(base: dict[str, Any]) -> None:
    redis = base["services"]["redis"]
    assert redis["image"].split(":") == ["redis", "7"]
    command = redis["command"]
    assert _flag(command, "--appendonly") == "yes"
    assert _flag(command, "--appendfsync") == "everysec"
    assert re.fullmatch(r"(\d+ \d+ ?)+", _flag(command, "--save")), "RDB snapshots on"
    assert _flag(command, "--maxmemory-policy") == "noeviction"
    assert _flag(command, "--requirepass")
    assert not _ports(redis), "Redis must not be published on the host"
    assert _mounts(redis)["/data"][0] == "redis-data"
    assert "redis-data" in base["volumes"] and "models" in base["volumes"]


@needs_compose
def test_gpu_override_reserves_one_nvidia_gpu_with_cuda_torch(base: dict[str, Any], gpu: dict[str, Any]) -> None:
    worker = gpu["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    cpu_index = base["services"]["worker"]["build"]["args"]["TORCH_INDEX_URL"]
    gpu_index = worker["build"]["args"]["TORCH_INDEX_URL"]
    assert cpu_index.endswith("/whl/cpu") and gpu_index != cpu_index
    assert worker["image"] == gpu["services"]["prepare"]["image"] != base["services"]["worker"]["image"]
    assert worker["command"] == base["services"]["worker"]["command"]


# --- images ------------------------------------------------------------------------------------


def test_api_image_installs_no_torch_and_covers_what_service_imports() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile.api").read_text()
    assert re.search(r"requirements\.py service\b", dockerfile)
    assert not re.search(r"worker|\.\[", _run_lines(dockerfile)), "the api image installs the service extra only"
    names = {canonicalize_name(Requirement(r).name) for r in requirements("service")}
    assert not names & TORCH_STACK
    assert _copied_packages("api") == {"schemas", "service"}, "no worker code in the api image"
    _assert_imports_covered(["service.main"], requirements("service"), shipped=_copied_packages("api"))


def test_worker_image_pins_match_pyproject_and_cover_what_workers_import() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile.worker").read_text()
    run = _run_lines(dockerfile)
    assert "requirements.py worker --only torch torchvision" in run and '--index-url "${TORCH_INDEX_URL}"' in run
    pins = {str(canonicalize_name(Requirement(r).name)): str(Requirement(r).specifier) for r in requirements("worker")}
    assert pins["torch"] == "==2.14.1"
    assert metadata.version("torch").split("+")[0] == "2.14.1"
    _assert_imports_covered(
        ["workers.__main__", "workers.tasks", "workers.worker"],
        requirements("worker"),
        shipped=_copied_packages("worker"),
    )


def test_worker_image_allocator_settings_match_the_makefile_and_engine() -> None:
    import workers.engine

    makefile = (ROOT / "Makefile").read_text()
    make = dict(re.findall(r"^export (MALLOC_\w+) \?= (\S+)", makefile, flags=re.M))
    assert make, "the Makefile sets the allocator variables for `make run`"
    image = dict(re.findall(r"\b(MALLOC_\w+)=(\S+)", (ROOT / "docker" / "Dockerfile.worker").read_text()))
    assert image == make
    engine = getattr(workers.engine, "ALLOCATOR_ENV", None)  # what `inspector worker` sets
    if engine is not None:
        assert image == {k: v for k, v in engine.items() if k.startswith("MALLOC_")}


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in ("api", "worker"):
        for src in re.findall(r"^COPY (\S+)", (ROOT / "docker" / f"Dockerfile.{name}").read_text(), flags=re.M):
            assert (ROOT / src).exists(), f"Dockerfile.{name} copies missing {src}"
            assert not any(Path(src).match(p) or src.split("/")[0] == p for p in ignored), (name, src)


# --- deploy/k8s --------------------------------------------------------------------------------


def test_k8s_workers_and_keda_scalers_match_the_queues(k8s: list[dict[str, Any]]) -> None:
    from rq import Queue

    config = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "ConfigMap"}["inspector-config"]["data"]
    settings = settings_of(config)
    deployments = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "Deployment"}
    scaled = [d for d in k8s if d["kind"] == "ScaledObject"]
    assert {so["spec"]["scaleTargetRef"]["name"] for so in scaled} == {f"worker-{q}" for q in keys.QUEUES}
    auths = {d["metadata"]["name"] for d in k8s if d["kind"] == "TriggerAuthentication"}
    from workers.registry import EFFICIENTNET_LITE  # the built-in models (digits-cnn trains on first use)

    predict_lists = {keys.predict_queue_key(m) for m in [*EFFICIENTNET_LITE, "digits-cnn"]}
    for so in scaled:
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]["spec"]["template"]["spec"]
        (container,) = target["containers"]
        command = container["command"]
        cli_accepts(command)
        served = list(takewhile(lambda a: not a.startswith("--"), command[command.index("--queues") + 1 :]))
        expected = {Queue.redis_queue_namespace_prefix + q for q in served}
        if "high" in served and "--no-predict" not in command:  # high workers also drain predicts
            expected |= predict_lists
        triggers = so["spec"]["triggers"]
        assert {t["metadata"]["listName"] for t in triggers} == expected, so["metadata"]["name"]
        for t in triggers:
            assert t["type"] == "redis" and t["authenticationRef"]["name"] in auths
        assert so["spec"]["minReplicaCount"] >= 1, "/readyz needs a worker on every queue"
        assert target["terminationGracePeriodSeconds"] >= longest_job_s(settings, served)


def test_k8s_env_probes_and_redis(k8s: list[dict[str, Any]]) -> None:
    from service.main import app

    routes = route_paths(app)
    secrets = {d["metadata"]["name"] for d in k8s if d["kind"] == "Secret"}
    config = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "ConfigMap"}["inspector-config"]["data"]
    for d in k8s:
        if d["kind"] not in ("Deployment", "Job"):
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            env = {**config, **{e["name"]: e.get("value", "") for e in c.get("env", [])}}
            settings_of(env)
            if "INSPECTOR_REDIS_URL" in env:
                assert env["INSPECTOR_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"
            if d["metadata"]["name"] == "inspector-api":  # auth on: keys from a Secret
                (keys_env,) = [e for e in c["env"] if e["name"] == "INSPECTOR_API_KEYS"]
                assert keys_env["valueFrom"]["secretKeyRef"]["name"] in secrets
            for probe in ("readinessProbe", "livenessProbe"):
                if "httpGet" in c.get(probe, {}):
                    assert c[probe]["httpGet"]["path"] in routes, (d["metadata"]["name"], probe)
    (redis,) = [d for d in k8s if d["kind"] == "StatefulSet"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert _flag(args, "--appendonly") == "yes" and _flag(args, "--maxmemory-policy") == "noeviction"


@needs_compose
def test_api_and_workers_share_the_data_volume(base: dict[str, Any]) -> None:
    """Uploaded data sets: the api writes them, workers read them and write maps.npy."""
    for name in ("api", "worker"):
        service = base["services"][name]
        data_dir = str(settings_of(service["environment"]).data_dir)
        assert _mounts(service).get(data_dir) == ("data", "rw"), f"{name} mounts the data volume at {data_dir}"
    assert "data" in base["volumes"]


def test_k8s_api_and_workers_share_a_read_write_many_data_claim(k8s: list[dict[str, Any]]) -> None:
    claims = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "PersistentVolumeClaim"}
    assert claims["inspector-data"]["spec"]["accessModes"] == ["ReadWriteMany"]
    config = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "ConfigMap"}["inspector-config"]["data"]
    data_dir = str(settings_of(config).data_dir)
    deployments = [d for d in k8s if d["kind"] == "Deployment" and d["metadata"]["name"] != "redis"]
    assert len(deployments) >= 4  # the api and a worker per queue
    for d in deployments:
        spec = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        (c,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        assert data_dir in mounts and not mounts[data_dir].get("readOnly"), d["metadata"]["name"]
        claim = volumes[mounts[data_dir]["name"]]["persistentVolumeClaim"]["claimName"]
        assert claim == "inspector-data", d["metadata"]["name"]


# --- helpers -----------------------------------------------------------------------------------


def _flag(command: list[str], flag: str) -> str:
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def _ports(service: dict[str, Any]) -> list[str]:
    """Published ports as 'host:container' strings (compose v1 prints the short syntax)."""
    return [
        str(p["published"]) + ":" + str(p["target"]) if isinstance(p, dict) else str(p)
        for p in service.get("ports", [])
    ]


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """container path -> (source, 'rw'|'ro')."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = (v["source"], "ro" if v.get("read_only") else "rw")
        else:
            src, dst, *mode = v.split(":")
            out[dst] = (src, mode[0] if mode else "rw")
    return out


def _copied_packages(image: str) -> set[str]:
    """Project packages a Dockerfile copies into /app."""
    text = (ROOT / "docker" / f"Dockerfile.{image}").read_text()
    return set(re.findall(r"^COPY (schemas|service|workers) ", text, flags=re.M))


def _run_lines(dockerfile: str) -> str:
    """The text of a Dockerfile's RUN instructions, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    return "\n".join(line for line in joined.splitlines() if line.lstrip().startswith("RUN "))


def _dockerfile_cmd(path: Path) -> list[str]:
    joined = re.sub(r"\\\n", " ", path.read_text())
    (cmd,) = [line for line in joined.splitlines() if line.startswith("CMD ")]
    return json.loads(cmd.removeprefix("CMD "))


def _closure(reqs: list[str]) -> set[str]:
    """Installed distributions that ``reqs`` pull in (transitively, extras not requested skipped)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in reqs]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            extras_ok = r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (req.extras or {""}))
            if extras_ok:
                todo.append(Requirement(str(r).split(";")[0]))
    return seen


def _assert_imports_covered(modules: list[str], reqs: list[str], shipped: set[str]) -> None:
    """The modules import in an interpreter that sees only what the image installs.

    A fresh interpreter whose first import finder refuses every top-level module of an
    installed distribution that ``reqs`` do not pull in (transitively): what the image lacks
    raises ImportError, so optional imports (redis tries opentelemetry) fall back exactly as
    they would there, and a missing requirement fails here instead of in the container.
    ``shipped``: the project packages the Dockerfile copies in.
    """
    installed = _closure(reqs)
    provided = metadata.packages_distributions()
    # Top-level modules of installed distributions (this project's own packages included)
    # that the image would not have.
    others = {m for m, dists in provided.items() if not any(canonicalize_name(d) in installed for d in dists)}
    absent = sorted((others | {"schemas", "service", "workers"}) - shipped)
    code = f"""
import importlib, importlib.abc, sys
absent = set({absent!r})
class NotInImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed in the image)", name=name)
        return None
sys.meta_path.insert(0, NotInImage())
for m in {modules!r}:
    importlib.import_module(m)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, f"{modules} need more than the image installs:\n{out.stderr[-2000:]}"
