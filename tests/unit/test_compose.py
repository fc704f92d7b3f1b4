"""Static checks of the Docker deployment: no Docker engine here, so validate what a file can show."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
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
# Variables holding credentials: each must be required (`${VAR:?message}`) wherever it is used.
_SECRET = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|FERNET|ROOT_USER|TRACKING_USERNAME")
LOOPBACK = "127.0.0.1"
# What an operator puts in .env before `up`: .env.example's change-me values stay (check-secrets
# refuses those at run time), only the Fernet key, which compose itself requires, is filled in.
FERNET_KEY = "x" * 43 + "="


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
def dot_env(env_example: dict[str, str]) -> dict[str, str]:
    """`.env` copied from `.env.example` with the Fernet key set (compose requires it)."""
    return {**env_example, "AIRFLOW_FERNET_KEY": FERNET_KEY}


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], dot_env: dict[str, str]) -> dict[str, Any]:
    """The compose file as Docker Compose sees it with that `.env`."""
    return _interpolate_values(raw, dot_env)


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
        assert re.search(rf"{package}(\[[a-z,]+\])?=={re.escape(pins[package])}", texts["mlflow"])
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
        # What the DAG files read when parsed and run: where scheduled runs look, when they run.
        for setting in ("S3_BUCKET", "S3_PREFIX", "PIPELINE_SCHEDULE", "PIPELINE_SCHEDULE_ON"):
            assert setting in environment and setting in env_example, (name, setting)
    mysql_conn = json.loads(
        services["airflow-scheduler"]["environment"]["AIRFLOW_CONN_IMGPIPE_MYSQL"]
    )
    assert (mysql_conn["host"], mysql_conn["schema"]) == ("mysql", env_example["MYSQL_DATABASE"])


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mlflow_keeps_runs_in_mysql_and_artifacts_in_minio_behind_basic_auth(
    compose: dict[str, Any],
) -> None:
    from sqlalchemy.engine import make_url

    service = compose["services"]["mlflow"]
    assert service["command"] == ["python", "/home/mlflow/serve.py"]
    awkward = 'p"a@s/s:w%rd'
    env = {**service["environment"], "MYSQL_PASSWORD": awkward}
    argv, server_env = _load(REPO / "docker" / "mlflow" / "serve.py").server_command(env)
    assert argv[:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://mlflow/artifacts"
    assert "--serve-artifacts" in argv
    assert awkward not in " ".join(argv) and "--backend-store-uri" not in argv
    url = make_url(server_env["MLFLOW_BACKEND_STORE_URI"])
    assert (url.drivername, url.host, url.port, url.database) == (
        "mysql+pymysql",
        "mysql",
        3306,
        "mlflow",
    )
    assert url.password == awkward
    assert (
        server_env["MLFLOW_AUTH_ADMIN_USERNAME"]
        == service["environment"]["MLFLOW_TRACKING_USERNAME"]
    )
    assert (
        server_env["MLFLOW_AUTH_ADMIN_PASSWORD"]
        == service["environment"]["MLFLOW_TRACKING_PASSWORD"]
    )
    assert server_env["MLFLOW_AUTH_CONFIG_PATH"] == "/home/mlflow/basic_auth.ini"
    dockerfile = (REPO / "docker" / "mlflow" / "Dockerfile").read_text()
    assert "docker/mlflow/serve.py docker/mlflow/basic_auth.ini /home/mlflow/" in dockerfile
    ini = (REPO / "docker" / "mlflow" / "basic_auth.ini").read_text()
    assert "database_uri = sqlite:////home/mlflow/auth/" in ini
    assert "/home/mlflow/auth" in " ".join(service["volumes"])


def test_airflow_and_the_pipeline_log_in_to_mlflow(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    for name, service in compose["services"].items():
        if name.startswith("airflow-"):
            environment = service["environment"]
            assert (
                environment["MLFLOW_TRACKING_USERNAME"] == env_example["MLFLOW_TRACKING_USERNAME"]
            )
            assert (
                environment["MLFLOW_TRACKING_PASSWORD"] == env_example["MLFLOW_TRACKING_PASSWORD"]
            )


def _published(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host ip or None for every interface, container port) of each published port."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((port.get("host_ip"), str(port["target"])))
            continue
        parts = str(port).rsplit(":", 2)
        found.append((parts[0] if len(parts) == 3 else None, parts[-1]))
    return found


@pytest.mark.parametrize(
    "bind", [pytest.param(None, id="BIND_ADDRESS-unset"), pytest.param("", id="BIND_ADDRESS-empty")]
)
def test_every_published_port_binds_loopback_by_default(
    raw: dict[str, Any], dot_env: dict[str, str], bind: str | None
) -> None:
    env = {k: v for k, v in dot_env.items() if k != "BIND_ADDRESS"}
    if bind is not None:
        env["BIND_ADDRESS"] = bind
    services = _interpolate_values(raw, env)["services"]
    published = {name: _published(service) for name, service in services.items()}
    assert {name for name, ports in published.items() if ports} >= {
        "minio",
        "mysql",
        "mlflow",
        "airflow-apiserver",
    }
    assert {
        name: ports for name, ports in published.items() if any(ip != LOOPBACK for ip, _ in ports)
    } == {}
    assert dot_env["BIND_ADDRESS"] == LOOPBACK  # and .env.example keeps that default


def test_every_secret_is_required_wherever_it_is_used() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8").replace("$$", "")
    uses = [m for m in _VAR.finditer(text) if _SECRET.search(m.group(1))]
    assert {m.group(1) for m in uses} >= {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "MYSQL_PASSWORD",
        "AIRFLOW_POSTGRES_PASSWORD",
        "AIRFLOW_JWT_SECRET",
        "AIRFLOW_SECRET_KEY",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_ADMIN_PASSWORD",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }
    loose = sorted({m.group(0) for m in uses if m.group(2) != ":?" or not m.group(3).strip()})
    assert loose == []


def test_env_example_as_it_is_stops_compose_for_want_of_a_fernet_key(
    raw: dict[str, Any], env_example: dict[str, str]
) -> None:
    assert env_example["AIRFLOW_FERNET_KEY"] == ""
    with pytest.raises(KeyError, match="AIRFLOW_FERNET_KEY"):
        _interpolate_values(raw, env_example)


def test_the_pipelines_minio_account_is_not_root(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    services = compose["services"]
    root = services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert root == env_example["MINIO_ROOT_USER"]
    assert env_example["AWS_ACCESS_KEY_ID"] != root
    assert env_example["AWS_SECRET_ACCESS_KEY"] != env_example["MINIO_ROOT_PASSWORD"]
    # Only MinIO itself and the init steps see the root account.
    holders = {
        name for name, s in services.items() if "MINIO_ROOT_USER" in s.get("environment", {})
    }
    assert holders == {"minio", "minio-init", "check-secrets"}
    for name, service in services.items():
        environment = service.get("environment", {})
        if "AWS_ACCESS_KEY_ID" in environment:
            assert environment["AWS_ACCESS_KEY_ID"] != root, name
        conn = environment.get("AIRFLOW_CONN_IMGPIPE_S3")
        if conn:
            assert json.loads(conn)["login"] == env_example["AWS_ACCESS_KEY_ID"], name


def test_minio_init_gives_the_pipeline_a_user_limited_to_its_buckets(
    compose: dict[str, Any],
) -> None:
    init = compose["services"]["minio-init"]
    assert init["entrypoint"] == ["/bin/sh", "/minio-init.sh"]
    assert "./docker/minio/init.sh:/minio-init.sh:ro" in init["volumes"]
    script = (REPO / "docker" / "minio" / "init.sh").read_text()
    assert 'mc alias set root http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"' in script
    assert 'mc admin user add root "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"' in script
    assert 'mc admin policy attach root imgpipe-pipeline --user "$AWS_ACCESS_KEY_ID"' in script
    resources = set(re.findall(r'"arn:aws:s3:::([^"]+)"', script))
    buckets = {"$S3_BUCKET", "$MLFLOW_ARTIFACT_BUCKET", "$work_bucket"}
    assert resources == buckets | {f"{b}/*" for b in buckets}
    assert '"s3:*"' not in script and "admin:" not in script


def test_every_service_waits_for_check_secrets(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def waits(name: str, seen: frozenset[str] = frozenset()) -> bool:
        deps = services[name].get("depends_on", {})
        return "check-secrets" in deps or any(
            waits(dep, seen | {name}) for dep in deps if dep not in seen and dep in services
        )

    assert sorted(n for n in services if n != "check-secrets" and not waits(n)) == []
    check = services["check-secrets"]
    assert check["entrypoint"] == ["/bin/bash", "/check-secrets.sh"]
    assert "./docker/check-secrets.sh:/check-secrets.sh:ro" in check["volumes"]


def _check_secrets(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "docker" / "check-secrets.sh")],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def good_secrets(compose: dict[str, Any]) -> dict[str, str]:
    env = dict(compose["services"]["check-secrets"]["environment"])
    for name, value in env.items():
        env[name] = value.replace("change-me", "s3cr3t-value")
    return env


def test_check_secrets_passes_real_secrets(good_secrets: dict[str, str]) -> None:
    result = _check_secrets(good_secrets)
    assert result.returncode == 0, result.stderr


def test_check_secrets_refuses_every_placeholder_of_env_example(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    result = _check_secrets(compose["services"]["check-secrets"]["environment"])
    assert result.returncode == 1
    placeholders = {k for k, v in env_example.items() if "change-me" in v}
    assert placeholders
    for name in placeholders:
        assert f"{name} still holds the .env.example placeholder" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"AIRFLOW_FERNET_KEY": ""}, "AIRFLOW_FERNET_KEY is empty", id="empty-fernet"),
        pytest.param(
            {"AIRFLOW_FERNET_KEY": "not-a-key"},
            "AIRFLOW_FERNET_KEY is not a Fernet",
            id="bad-fernet",
        ),
        pytest.param(
            {"AWS_ACCESS_KEY_ID": "same", "MINIO_ROOT_USER": "same"},
            "must differ from MINIO_ROOT_USER",
            id="pipeline-user-is-root",
        ),
        pytest.param(
            {"MYSQL_PASSWORD": 'a"b'}, 'MYSQL_PASSWORD contains " or \\', id="quote-in-json"
        ),
        pytest.param(
            {"AIRFLOW_POSTGRES_PASSWORD": "a@b/c"},
            "AIRFLOW_POSTGRES_PASSWORD may hold only",
            id="url-char-in-postgres-url",
        ),
        pytest.param(
            {"MLFLOW_TRACKING_PASSWORD": "short-pw-11"},
            "MLFLOW_TRACKING_PASSWORD needs 12 characters",
            id="mlflow-refuses-short-passwords",
        ),
        pytest.param(
            {"MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 31},
            "MLFLOW_FLASK_SERVER_SECRET_KEY needs 32 characters",
            id="short-mlflow-secret-key",
        ),
    ],
)
def test_check_secrets_refuses(
    good_secrets: dict[str, str], overrides: dict[str, str], message: str
) -> None:
    result = _check_secrets({**good_secrets, **overrides})
    assert result.returncode == 1
    assert message in result.stderr


def test_env_example_is_shell_sourceable(env_example: dict[str, str]) -> None:
    result = subprocess.run(
        ["bash", "-c", 'set -aeu; . "$1"; env -0', "bash", str(REPO / ".env.example")],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    sourced = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    assert {k: sourced.get(k) for k in env_example} == env_example
