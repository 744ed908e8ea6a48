"""Deployment files agree with the code: compose, Kubernetes manifests, Dockerfile and docs.

`docker build` and `docker compose up` need a Docker engine, which CI machines do not have, so
these tests read the files instead: YAML structure, settings names (from the Settings class),
CLI arguments (parsed by the real `lungcam` parser), images, GPU reservations, and a grep-level
look at the Dockerfile. `docker compose config` runs where the compose v2 CLI is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dev dependency there)
    import tomli as tomllib

from shared.settings import Settings
from worker.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
K8S_DIR = DEPLOY / "k8s"
DOCS = ROOT / "docs" / "deployment.md"

# What `docker compose` refuses to run without (`${VAR:?...}` in the compose file); dummies here.
COMPOSE_SECRETS = {
    "POSTGRES_PASSWORD": "dummypgpassword",
    "LUNGCAM_API_TOKEN": "dummy-api-token",
    "AWS_ACCESS_KEY_ID": "dummy-access-key",
    "AWS_SECRET_ACCESS_KEY": "dummy-secret-key",
}
# Settings without which a multi-host deployment does not work (each would silently fall back to
# an embedded, host-local default, or refuse every request in the API token's case).
DEPLOYMENT_SETTINGS = ("broker_url", "database_url", "store_url", "s3_endpoint_url", "models", "api_token")
SECRET_NAMES = (
    "POSTGRES_PASSWORD",
    "LUNGCAM_API_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
)

# LUNGCAM_ followed by words: no trailing underscore, so "LUNGCAM_<FIELD>" in prose is not a name.
LUNGCAM_NAME = re.compile(r"\bLUNGCAM_[A-Z0-9]+(?:_[A-Z0-9]+)*\b")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
GPU_WORKER = re.compile(r"^worker-gpu(\d+)$")


def env_name(field: str) -> str:
    """The environment variable of a Settings field."""
    return "LUNGCAM_" + field.upper()


SETTING_ENV_NAMES = frozenset(env_name(field) for field in Settings.model_fields)


# --- helpers -----------------------------------------------------------------------------------


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ substitution, recursively."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3) or ""
        current = env.get(name)
        if operator in (":-", "-"):
            return current if current or (operator == "-" and current is not None) else argument
        if operator in (":?", "?"):
            if not current:
                raise KeyError(f"{name}: {argument}")
            return current
        return current or ""

    return _VARIABLE.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def load_compose() -> dict[str, Any]:
    """The compose file as written (anchors and merge keys resolved, variables not)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def lungcam_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the lungcam image."""
    return {
        name: service
        for name, service in compose["services"].items()
        if "/lungcam:" in service.get("image", "") or "lungcam}:" in service.get("image", "")
    }


def k8s_files() -> list[Path]:
    return sorted(K8S_DIR.glob("*.yaml")) + sorted(K8S_DIR.glob("*.yml"))


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every non-empty YAML document of every file under deploy/k8s."""
    documents = []
    for path in k8s_files():
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                documents.append((path, document))
    return documents


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _path, document in k8s_documents() if document.get("kind") == kind]


def pod_containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Containers (and init containers) of a Deployment, Job, ... document."""
    spec = document.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def deployment(name: str) -> dict[str, Any]:
    matches = [d for d in k8s_kind("Deployment") if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one Deployment {name}, found {len(matches)}"
    return matches[0]


def repository(image: str) -> str:
    """The repository part of an image reference (without :tag or @digest)."""
    image = image.split("@", 1)[0]
    head, _, tail = image.rpartition(":")
    return head if head and "/" not in tail else image


def lungcam_argv_ok(argv: list[str]) -> None:
    """Fail unless argv is accepted by the real `lungcam` argument parser."""
    try:
        build_parser().parse_args([str(arg) for arg in argv])
    except SystemExit as exc:  # argparse exits on bad arguments
        pytest.fail(f"`lungcam {' '.join(map(str, argv))}` is rejected by worker.cli (exit {exc.code})")


def compose_cli() -> list[str] | None:
    """The compose v2 command (`docker compose`, or a standalone v2 `docker-compose`), if installed."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        # Compose v1 (Python) predates parts of the Compose Specification this file uses (`name:`).
        probe = subprocess.run(["docker-compose", "version", "--short"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 and probe.stdout.strip().lstrip("v").startswith("2"):
            return ["docker-compose"]
    return None


def compose_env(**overrides: str) -> dict[str, str]:
    """The environment for a compose subprocess: ours without LUNGCAM_*/COMPOSE_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUNGCAM_", "COMPOSE_", "DOCKER_"))}
    env.update(COMPOSE_SECRETS)
    env.update(overrides)
    return env


def code_lines(markdown: str) -> list[str]:
    """Lines of fenced code blocks (continuations joined) plus inline `code` spans."""
    lines: list[str] = []
    in_block = False
    pending = ""
    for line in markdown.splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            lines.append(pending.strip())
            pending = ""
    lines += re.findall(r"`([^`\n]+)`", markdown)
    return lines


# --- compose -----------------------------------------------------------------------------------


def test_compose_config_is_accepted_by_docker_compose(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("the Docker Compose v2 CLI (`docker compose` plugin) is not installed on this machine")
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    command = [
        *cli,
        "--env-file",
        str(empty_env_file),
        "-f",
        str(COMPOSE_FILE),
        "--profile",
        "gpu",
        "--profile",
        "cpu",
        "config",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=compose_env(), timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == set(load_compose()["services"])
    assert resolved["services"]["api"]["environment"]["LUNGCAM_API_TOKEN"] == COMPOSE_SECRETS["LUNGCAM_API_TOKEN"]

    # A missing secret must stop compose rather than start services with an empty password.
    without = compose_env()
    del without["POSTGRES_PASSWORD"]
    refused = subprocess.run(command, capture_output=True, text=True, env=without, timeout=120)
    assert refused.returncode != 0
    assert "POSTGRES_PASSWORD" in refused.stderr


def test_compose_has_the_services_with_health_checks_and_ordering() -> None:
    compose = load_compose()
    services = compose["services"]
    assert {"redis", "postgres", "s3", "s3-init", "migrate", "api", "worker-gpu0", "worker-gpu1", "worker-cpu"} <= set(
        services
    )
    assert services["redis"]["image"].startswith("redis:7")
    assert (
        "redis-cli" in services["redis"]["healthcheck"]["test"] and "ping" in services["redis"]["healthcheck"]["test"]
    )
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "minio" in services["s3"]["image"]
    assert "mc mb" in " ".join(services["s3-init"]["command"])
    assert "lungcam/lungcam" in " ".join(services["s3-init"]["command"]), (
        "s3-init must create the bucket of LUNGCAM_STORE_URL"
    )

    api = services["api"]
    assert api["command"][:1] == ["api"] and "0.0.0.0" in api["command"]
    assert any("/readyz" in part for part in api["healthcheck"]["test"])
    for name, service in lungcam_services(compose).items():
        if name in ("migrate",):
            continue
        depends = service["depends_on"]
        for dependency in ("redis", "postgres"):
            assert depends[dependency]["condition"] == "service_healthy", f"{name} must wait for {dependency}"
        for one_shot in ("s3-init", "migrate"):
            assert depends[one_shot]["condition"] == "service_completed_successfully", (
                f"{name} must wait for {one_shot}"
            )
    # Named volumes for the stateful services and the model cache.
    assert {"postgres-data", "minio-data", "model-cache"} <= set(compose["volumes"])
    assert any(v.startswith("postgres-data:") for v in services["postgres"]["volumes"])
    assert any(v.startswith("minio-data:") for v in services["s3"]["volumes"])


def test_compose_lungcam_commands_parse_with_the_real_cli() -> None:
    for service in lungcam_services(load_compose()).values():
        if "entrypoint" in service:
            continue  # the migrate one-shot runs python; see test_migration_one_liners_run
        lungcam_argv_ok(service["command"])


def test_compose_gpu_workers_each_reserve_one_distinct_gpu() -> None:
    """worker-gpuN reserves host GPU N and nothing else, and runs `worker --gpu 0`.

    The reservation makes that GPU the container's only one, and CUDA numbers it 0 inside the
    container whatever its host index (as with one GPU per Kubernetes pod); `--gpu N` with N > 0
    would hide it and leave the worker on the CPU.
    """
    services = load_compose()["services"]
    gpu_workers = {name: service for name, service in services.items() if GPU_WORKER.match(name)}
    assert len(gpu_workers) >= 2
    seen: list[str] = []
    for name, service in gpu_workers.items():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: one device entry"
        device = devices[0]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert "count" not in device, f"{name}: reserve by device_ids, not count"
        assert [str(i) for i in device["device_ids"]] == [GPU_WORKER.match(name).group(1)], f"{name}: device_ids"
        seen += [str(i) for i in device["device_ids"]]
        assert service["command"] == ["worker", "--gpu", "0"], f"{name}: the container's one GPU is index 0"
        assert service.get("profiles") == ["gpu"]
        assert service["image"].endswith("-gpu")
        assert service["build"]["args"]["VARIANT"] == "gpu"
    assert len(seen) == len(set(seen)), f"GPU workers share a device: {seen}"

    cpu = services["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["command"] == ["worker", "--gpu", "none"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu"


def test_compose_settings_come_from_one_shared_anchor() -> None:
    compose = load_compose()
    shared = compose["x-lungcam-env"]
    for field in DEPLOYMENT_SETTINGS:
        assert env_name(field) in shared, f"x-lungcam-env lacks {env_name(field)}"
    for name, service in lungcam_services(compose).items():
        assert service["environment"] == shared, f"{name} must use the shared x-lungcam-env"
    resolved = interpolate(shared, COMPOSE_SECRETS)
    assert resolved["LUNGCAM_BROKER_URL"] == "redis://redis:6379/0"
    assert resolved["LUNGCAM_DATABASE_URL"] == (
        f"postgresql+psycopg://lungcam:{COMPOSE_SECRETS['POSTGRES_PASSWORD']}@postgres:5432/lungcam"
    )
    assert resolved["LUNGCAM_STORE_URL"] == "s3://lungcam"
    assert resolved["LUNGCAM_S3_ENDPOINT_URL"] == "http://s3:9000"
    # The settings parse, and name what the services in this file are.
    settings = Settings(
        **{key[len("LUNGCAM_") :].lower(): value for key, value in resolved.items() if key.startswith("LUNGCAM_")}
    )
    assert settings.resolved_store_url() == "s3://lungcam"
    assert (
        settings.api_token is not None and settings.api_token.get_secret_value() == COMPOSE_SECRETS["LUNGCAM_API_TOKEN"]
    )


def test_compose_secrets_are_never_hard_coded() -> None:
    compose = load_compose()
    environments = [compose["x-lungcam-env"]] + [
        service.get("environment") or {} for service in compose["services"].values()
    ]
    for environment in environments:
        assert isinstance(environment, dict), "use the mapping form for environment"
        for key, value in environment.items():
            if key in SECRET_NAMES:
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), (
                    f"{key} must be a required ${{...}} reference, not {value!r}"
                )
    database_url = compose["x-lungcam-env"]["LUNGCAM_DATABASE_URL"]
    assert "${POSTGRES_PASSWORD" in database_url
    with pytest.raises(KeyError):
        interpolate(compose["x-lungcam-env"], {})


# --- Kubernetes ----------------------------------------------------------------------------------


def test_k8s_manifests_parse_and_are_named() -> None:
    files = {path.name for path in k8s_files()}
    assert {"namespace.yaml", "configmap.yaml", "secret.example.yaml", "api.yaml", "worker.yaml"} <= files
    documents = k8s_documents()
    assert documents
    for path, document in documents:
        for key in ("apiVersion", "kind"):
            assert document.get(key), f"{path.name}: a document without {key}"
        assert document.get("metadata", {}).get("name"), f"{path.name}: a {document['kind']} without metadata.name"
    namespaces = {d["metadata"]["name"] for d in k8s_kind("Namespace")}
    for path, document in documents:
        if document["kind"] not in ("Namespace", "Kustomization"):
            assert document["metadata"].get("namespace") in namespaces, (
                f"{path.name}: {document['kind']} outside the namespace"
            )


def test_k8s_kustomization_lists_existing_files_but_not_the_example_secret() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S_DIR / resource).is_file(), f"kustomization lists missing {resource}"
    assert "secret.example.yaml" not in kustomization["resources"]


def test_k8s_secret_example_holds_placeholders_only() -> None:
    (secret,) = k8s_kind("Secret")
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    for key in ("LUNGCAM_API_TOKEN", "LUNGCAM_DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert key in values
        assert "REPLACE-ME" in values[key], f"{key} must be an obvious placeholder"


def test_k8s_settings_cover_a_deployment_and_are_referenced() -> None:
    (configmap,) = k8s_kind("ConfigMap")
    (secret,) = k8s_kind("Secret")
    provided = set(configmap["data"]) | set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for field in DEPLOYMENT_SETTINGS:
        assert env_name(field) in provided, f"no {env_name(field)} in the ConfigMap or Secret"
    assert not set(configmap["data"]) & {"LUNGCAM_API_TOKEN", "LUNGCAM_DATABASE_URL", "AWS_SECRET_ACCESS_KEY"}, (
        "secrets in the ConfigMap"
    )
    for kind in ("Deployment", "Job"):
        for document in k8s_kind(kind):
            for container in pod_containers(document):
                refs = container.get("envFrom", [])
                assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in refs, (
                    f"{document['metadata']['name']}: envFrom ConfigMap"
                )
                assert {"secretRef": {"name": secret["metadata"]["name"]}} in refs, (
                    f"{document['metadata']['name']}: envFrom Secret"
                )


def test_k8s_api_probes_and_service() -> None:
    api = deployment("lungcam-api")
    (container,) = pod_containers(api)
    lungcam_argv_ok(container["args"])
    assert container["args"][0] == "api" and "0.0.0.0" in container["args"]
    port = int(container["args"][container["args"].index("--port") + 1])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert [p["containerPort"] for p in container["ports"]] == [port]
    services = [s for s in k8s_kind("Service") if s["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]]
    assert services, "no Service selects the API pods"


def test_k8s_worker_owns_one_gpu_and_shuts_down_warm() -> None:
    worker = deployment("lungcam-worker-gpu")
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["worker", "--gpu", "0"], "the pod's one GPU is index 0"
    lungcam_argv_ok(container["args"])
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert pod["terminationGracePeriodSeconds"] >= 60, "give a batch time to finish on SIGTERM"
    assert container["image"].endswith("-gpu")


def test_k8s_pods_run_as_the_images_non_root_user() -> None:
    uid = re.search(r"^USER\s+(\d+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    for kind in ("Deployment", "Job"):
        for document in k8s_kind(kind):
            security = document["spec"]["template"]["spec"]["securityContext"]
            assert security["runAsNonRoot"] is True
            assert str(security["runAsUser"]) == uid


# --- images, settings and commands across files ------------------------------------------------------


def test_compose_and_k8s_name_the_same_images() -> None:
    compose_images = {interpolate(s["image"], COMPOSE_SECRETS) for s in lungcam_services(load_compose()).values()}
    k8s_images = {c["image"] for kind in ("Deployment", "Job") for d in k8s_kind(kind) for c in pod_containers(d)}
    assert {repository(image) for image in compose_images} == {repository(image) for image in k8s_images}
    assert len({repository(image) for image in compose_images}) == 1, "one repository; the variant is in the tag"
    # Compose also has a CPU worker (profile `cpu`); Kubernetes runs GPU workers only.
    assert k8s_images <= compose_images, "same tags for the API and the GPU workers"
    assert any(image.endswith("-gpu") for image in k8s_images) and any(
        not image.endswith("-gpu") for image in k8s_images
    )


def test_the_api_and_migrate_job_run_the_api_image_without_tensorflow() -> None:
    """The API image is built from `lungcam[api]` (ROLE=api); workers from `lungcam[worker]`."""
    services = load_compose()["services"]
    for name in ("api", "migrate"):
        assert services[name]["image"].endswith("-api}") or services[name]["image"].endswith("-api"), name
        assert services[name]["build"]["args"]["ROLE"] == "api"
    for name in ("worker-gpu0", "worker-gpu1", "worker-cpu"):
        assert services[name]["build"]["args"]["ROLE"] == "worker"
    api_images = {
        c["image"]
        for d in k8s_kind("Deployment") + k8s_kind("Job")
        for c in pod_containers(d)
        if c["args"][0] in ("api", "migrate")
    }
    assert api_images and all(image.endswith("-api") for image in api_images)
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG ROLE=worker$", text, re.MULTILINE) and "extras.py" in text
    sys.path.insert(0, str(DEPLOY))
    try:
        from extras import requirements
    finally:
        sys.path.remove(str(DEPLOY))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    api = requirements(project, ["api"])
    worker = requirements(project, ["worker"])
    assert not [r for r in api if r.split("[")[0].split(">")[0].split("<")[0] in ("tensorflow", "keras")], api
    assert any(r.startswith("tensorflow") for r in worker) and set(api) <= set(worker)


@pytest.mark.parametrize(
    "path",
    [COMPOSE_FILE, DEPLOY / ".env.example", DOCKERFILE, DOCS, *sorted(K8S_DIR.glob("*.yaml"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_lungcam_variable_is_a_real_setting(path: Path) -> None:
    names = set(LUNGCAM_NAME.findall(path.read_text()))
    unknown = sorted(names - SETTING_ENV_NAMES)
    assert not unknown, f"{path.name} uses {unknown}, which no field of shared.settings.Settings reads"


def test_docs_name_the_deployment_settings_and_real_commands() -> None:
    text = DOCS.read_text()
    for field in DEPLOYMENT_SETTINGS + ("visibility_timeout_s",):
        assert env_name(field) in text
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    for line in code_lines(text):
        # `lungcam` in command position (start of a line or span, or after && ; |), not `kubectl -n lungcam`.
        for match in re.finditer(r"(?:^|&&|;|\|)\s*lungcam\s+([a-z][a-z-]*)", line):
            assert match.group(1) in subcommands, f"docs use `lungcam {match.group(1)}`, which is no subcommand: {line}"
    # Commands run through the compose/docker image (entrypoint `lungcam`) parse too.
    for line in code_lines(text):
        for pattern in (r"\bapi (ingest .*)$", r"\bapi (results .*)$", r"lungcam:[\w.]+-gpu (worker .*)$"):
            match = re.search(pattern, line)
            if match:
                lungcam_argv_ok(shlex.split(match.group(1)))


def test_docs_trainer_command_parses_if_the_trainer_cli_exists() -> None:
    from trainer import cli as trainer_cli

    parser_factory = trainer_cli.build_parser
    commands = [line for line in code_lines(DOCS.read_text()) if line.startswith("lungcam-train ")]
    assert commands, "docs/deployment.md shows how to publish a bundle with lungcam-train"
    for line in commands:
        try:
            parser_factory().parse_args(shlex.split(line)[1:])
        except SystemExit as exc:
            pytest.fail(f"`{line}` is rejected by trainer.cli (exit {exc.code})")


def test_compose_and_kubernetes_migrate_with_lungcam_migrate(tmp_path: Path) -> None:
    """The compose `migrate` service and the k8s Job both run `lungcam migrate`, which really migrates."""
    migrate = load_compose()["services"]["migrate"]
    assert migrate["command"] == ["migrate"] and "entrypoint" not in migrate  # the image's entrypoint is lungcam
    jobs = [container for job in k8s_kind("Job") for container in pod_containers(job)]
    assert jobs and all(container["args"] == ["migrate"] and "command" not in container for container in jobs)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNGCAM_")}
    env["LUNGCAM_DATABASE_URL"] = f"sqlite:///{tmp_path / 'migrated.sqlite'}"
    env["LUNGCAM_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "migrate"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import sqlalchemy as sa

    engine = sa.create_engine(env["LUNGCAM_DATABASE_URL"])
    try:
        assert {"scans", "predictions", "batches", "alembic_version"} <= set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


# --- Dockerfile (grep level: no engine to build with here) -----------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for parts in (line.strip().split(None, 1) for line in joined.splitlines() if line.strip())
    ]


def test_dockerfile_entrypoint_user_and_environment() -> None:
    instructions = dockerfile_instructions()
    entrypoints = [args for instruction, args in instructions if instruction == "ENTRYPOINT"]
    assert entrypoints and entrypoints[-1].replace(" ", "") == '["lungcam"]'
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"
    env_text = " ".join(args for instruction, args in instructions if instruction == "ENV")
    for setting in ("PYTHONUNBUFFERED=1", "TF_CPP_MIN_LOG_LEVEL=2", "LUNGCAM_DATA_DIR=/data"):
        assert setting in env_text
    assert any(instruction == "VOLUME" and "/data" in args for instruction, args in instructions)
    froms = [args for instruction, args in instructions if instruction == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    assert any(instruction == "COPY" and args.startswith("--from=") for instruction, args in instructions)


def test_dockerfile_installs_the_project_with_real_extras() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE)
    assert re.search(r"pip install\b[^\n]*\s\.(\s|$)", text, re.MULTILINE), "pip install . (the project itself)"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # One image per role: the role's extra plus postgres; the GPU variant adds the gpu extra.
    (roles,) = re.findall(r"^\s*([\w|]+)\) extras=\"\$ROLE postgres\"", text, re.MULTILINE)
    assert set(roles.split("|")) == {"api", "worker", "train"}
    assert re.search(r"^\s*gpu\).*extras=\"\$extras gpu\"", text, re.MULTILINE)
    assert {"api", "worker", "train", "postgres", "gpu"} <= set(extras)


def test_dockerfile_copies_exist_and_pass_the_dockerignore() -> None:
    ignore = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "allow-list: exclude everything first"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "**/.env" in ignore
    for instruction, args in dockerfile_instructions():
        if instruction != "COPY" or args.startswith("--from="):
            continue
        *sources, _destination = [part for part in args.split() if not part.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert source.rstrip("/") in allowed or source.split("/")[0] in allowed, (
                f"COPY {source}: excluded by {DOCKERIGNORE.name}"
            )
    # Everything a `pip install .` needs is in the image: the package folders setuptools finds.
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in includes:
        assert pattern.rstrip("*") in allowed


def test_k8s_dicom_listen_and_send_run_the_cpu_worker_image() -> None:
    """The PACS programs have manifests like the rest (issue 21): the listener with a Service, one sender."""
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    assert "pacs.yaml" in kustomization["resources"]
    listen, send = deployment("lungcam-dicom-listen"), deployment("lungcam-dicom-send")
    for document, command in ((listen, "dicom-listen"), (send, "dicom-send")):
        (container,) = pod_containers(document)
        lungcam_argv_ok(container["args"])
        assert container["args"][0] == command
        assert not container["image"].endswith(("-gpu", "-api")), "the pacs extra is in the CPU worker image"
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})
    (listener,) = pod_containers(listen)
    port = int(listener["args"][listener["args"].index("--port") + 1])
    assert [p["containerPort"] for p in listener["ports"]] == [port]
    assert listener["readinessProbe"]["tcpSocket"]["port"] == "dicom"
    (service,) = [s for s in k8s_kind("Service") if s["spec"]["selector"] == listen["spec"]["selector"]["matchLabels"]]
    assert service["spec"]["ports"][0]["port"] == port
    # The peer allow-list must see the modality's address, not a node's.
    assert service["spec"].get("externalTrafficPolicy") == "Local"
    assert send["spec"]["replicas"] == 1 and send["spec"]["strategy"]["type"] == "Recreate", (
        "one sender per destination"
    )
    (configmap,) = k8s_kind("ConfigMap")
    for name in (
        "LUNGCAM_DICOM_DESTINATION",
        "LUNGCAM_DICOM_ALLOWED_AETS",
        "LUNGCAM_DICOM_ALLOWED_PEERS",
        "LUNGCAM_DICOM_IDLE_TIMEOUT_S",
        "LUNGCAM_DICOM_MAX_ASSOCIATIONS",
    ):
        assert name in configmap["data"], name
