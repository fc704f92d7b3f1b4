"""Static checks of the Docker deployment: no Docker engine here, so validate what a file can show."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pipeline.config import parse_env_text

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.airflow.yml"
# The Compose Specification's schema as embedded in Docker Compose v2.40.3 (compose-go).
SCHEMA_FILE = Path(__file__).parent / "data" / "compose-spec.json"
DOCKERFILES = sorted((REPO / "docker").glob("*/Dockerfile"))

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}; `$$` is a literal `$`.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
_ESCAPED = "\x00"


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute variables the way Compose does (the subset this file uses)."""

    def sub(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3) or ""
        value = env.get(name)
        missing = value is None or (op is not None and op.startswith(":") and value == "")
        if op and op.endswith("?") and missing:
            raise KeyError(f"${{{name}}} is required: {arg}")
        if op and op.endswith("-") and missing:
            return arg
        if value is None:
            raise KeyError(f"${{{name}}} is not set and has no default")
        return value

    return _VAR.sub(sub, text.replace("$$", _ESCAPED)).replace(_ESCAPED, "$")


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return parse_env_text((REPO / ".env.example").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


def _interpolate_values(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {key: _interpolate_values(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_values(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], env_example: dict[str, str]) -> dict[str, Any]:
    """The compose file as Docker Compose sees it with `.env` copied from `.env.example`."""
    return _interpolate_values(raw, env_example)


def _dockerfile_healthcheck(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if not build:
        return False
    dockerfile = REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
    return re.search(r"^HEALTHCHECK\s+(?!NONE)", dockerfile.read_text(), re.M) is not None


def _healthcheck(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck")
    if check is not None:
        return bool(check.get("test")) and not check.get("disable", False)
    return _dockerfile_healthcheck(service)


def _one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart", "no") == "no"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        pytest.param("${A}", {"A": "x"}, "x", id="plain"),
        pytest.param("${A:-d}", {"A": ""}, "d", id="colon-default-on-empty"),
        pytest.param("${A-d}", {"A": ""}, "", id="default-only-when-unset"),
        pytest.param("$${A} ${A:?need}", {"A": "x"}, "${A} x", id="escaped-dollar"),
    ],
)
def test_interpolate_follows_compose_rules(text: str, env: dict[str, str], expected: str) -> None:
    assert interpolate(text, env) == expected


@pytest.mark.parametrize(
    "text",
    [pytest.param("${B}", id="unset"), pytest.param("${A:?set A}", id="required-empty")],
)
def test_interpolate_rejects_missing_variables(text: str) -> None:
    with pytest.raises(KeyError):
        interpolate(text, {"A": ""})


def test_compose_file_conforms_to_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(compose)
    ]
    assert errors == []


def test_every_variable_is_in_env_example(env_example: dict[str, str]) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8").replace("$$", "")
    used = {m.group(1) for m in _VAR.finditer(text)}
    assert used, "the compose file should take its settings from .env"
    assert sorted(used - env_example.keys()) == []


def test_no_credentials_in_yaml(env_example: dict[str, str]) -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    secrets = {
        value
        for key, value in env_example.items()
        if value and re.search(r"PASSWORD|SECRET|ACCESS_KEY|FERNET", key)
    }
    assert secrets and [s for s in secrets if s in text] == []


def test_no_pip_additional_requirements() -> None:
    for path in [COMPOSE_FILE, *DOCKERFILES]:
        assert "_PIP_ADDITIONAL_REQUIREMENTS" not in path.read_text(), path


def test_build_contexts_dockerfiles_and_bind_mounts_exist(compose: dict[str, Any]) -> None:
    missing = []
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = REPO / build.get("context", ".")
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                missing.append(f"{name}: build {build}")
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")) and not (REPO / source).exists():
                missing.append(f"{name}: volume {volume}")
    assert missing == []


def test_named_volumes_hold_the_state(compose: dict[str, Any]) -> None:
    named = {
        name: dict(v.split(":")[:2] for v in service.get("volumes", []))
        for name, service in compose["services"].items()
    }
    for name, volumes in named.items():
        for source in volumes:
            assert source.startswith((".", "/")) or source in compose["volumes"], (name, source)
    targets = {name: set(volumes.values()) for name, volumes in named.items()}
    assert "/var/lib/mysql" in targets["mysql"]
    assert "/data" in targets["minio"]
    assert "/var/lib/postgresql/data" in targets["postgres"]
    assert "/opt/airflow/logs" in targets["airflow-scheduler"]


def test_every_service_has_healthcheck_or_is_one_shot(compose: dict[str, Any]) -> None:
    services = compose["services"]
    awaited = {
        dep
        for service in services.values()
        for dep, spec in service.get("depends_on", {}).items()
        if spec["condition"] == "service_completed_successfully"
    }
    for name, service in services.items():
        if _one_shot(service):
            assert name in awaited, f"one-shot {name} is not awaited by any service"
            assert "healthcheck" not in service, name
        else:
            assert _healthcheck(service), name


def test_depends_on_waits_for_health_or_completion(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must name conditions"
        for dep, spec in depends_on.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec["condition"] == "service_healthy":
                assert _healthcheck(services[dep]), f"{name} -> {dep}"
            else:
                assert spec["condition"] == "service_completed_successfully", f"{name} -> {dep}"
                assert _one_shot(services[dep]), f"{name} -> {dep}"


def test_service_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service.get("image", "")
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: image {image!r} has no pinned tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_base_images_are_pinned(dockerfile: Path) -> None:
    bases = re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", dockerfile.read_text(), re.M)
    assert bases
    for base in bases:
        tag = base.rsplit("/", 1)[-1].partition(":")[2]
        assert re.search(r"\d", tag) and "$" not in base, f"{dockerfile}: FROM {base}"


def test_dockerfiles_pin_the_versions_of_requirements_txt() -> None:
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    texts = {p.parent.name: p.read_text() for p in DOCKERFILES}
    for package in ("torch", "torchvision"):
        assert f"{package}=={pins[package]}" in texts["airflow"]
    assert f"apache/airflow:{pins['apache-airflow']}-" in texts["airflow"]
    for package in ("mlflow", "boto3"):
        assert f"{package}=={pins[package]}" in texts["mlflow"]
    assert f"PyMySQL[rsa]=={pins['PyMySQL']}" in texts["mlflow"]


def test_airflow_services_share_the_local_stacks_connection_ids(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    services = compose["services"]
    airflow = [name for name in services if name.startswith("airflow-")]
    expected = {
        env_example["PIPELINE_S3_CONN_ID"]: ("aws", "endpoint_url", "http://minio:9000"),
        env_example["PIPELINE_MYSQL_CONN_ID"]: ("mysql", "charset", "utf8mb4"),
    }
    for name in airflow:
        environment = services[name]["environment"]
        assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        for conn_id, (conn_type, extra_key, extra_value) in expected.items():
            conn = json.loads(environment[f"AIRFLOW_CONN_{conn_id.upper()}"])
            assert conn["conn_type"] == conn_type and conn["login"] and conn["password"]
            assert conn["extra"][extra_key] == extra_value
    mysql_conn = json.loads(
        services["airflow-scheduler"]["environment"]["AIRFLOW_CONN_IMGPIPE_MYSQL"]
    )
    assert (mysql_conn["host"], mysql_conn["schema"]) == ("mysql", env_example["MYSQL_DATABASE"])


def test_mlflow_keeps_runs_in_mysql_and_artifacts_in_minio(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["mlflow"]["command"])
    assert "mysql+pymysql://" in command and "@mysql:3306/" in command
    assert '--artifacts-destination "s3://${MLFLOW_ARTIFACT_BUCKET}/artifacts"' in command
    assert "--serve-artifacts" in command
