"""Settings read from the environment (and the repo's `.env` file), validated with clear errors."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = REPO_ROOT / ".env"

_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def parse_env_text(text: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Parse `KEY=VALUE` lines; `#` comments, optional quotes and `${OTHER}` references.

    References resolve against earlier lines of the same text, then `base`.
    """
    values: dict[str, str] = {}
    lookup = dict(base or {})
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ConfigError(f"line {number}: expected KEY=VALUE, got {raw!r}")
        key, value = match.group(1), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            quote, value = value[0], value[1:-1]
            if quote == "'":
                values[key] = lookup[key] = value
                continue
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        value = _REF.sub(lambda m: lookup.get(m.group(1), ""), value)
        values[key] = lookup[key] = value
    return values


def load_env_file(path: str | Path | None = None, *, override: bool = False) -> dict[str, str]:
    """Read an env file into `os.environ` (existing variables win unless `override`).

    A missing file is not an error: the environment alone may hold everything.
    """
    env_path = Path(path) if path else Path(os.environ.get("PIPELINE_ENV_FILE", DEFAULT_ENV_FILE))
    if not env_path.is_file():
        return {}
    try:
        values = parse_env_text(env_path.read_text(encoding="utf-8"), base=dict(os.environ))
    except ConfigError as exc:
        raise ConfigError(f"{env_path}: {exc}") from None
    for key, value in values.items():
        if override or key not in os.environ:
            os.environ[key] = value
    return values


def _get(env: dict[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise ConfigError(f"{name} is not set; add it to .env (see .env.example)")
        return default
    return value


def _port(env: dict[str, str], name: str, default: str) -> int:
    raw = _get(env, name, default)
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a port number 1-65535, got {raw!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{name} must be a port number 1-65535, got {raw!r}")
    return port


def _url(env: dict[str, str], name: str, default: str | None = None) -> str:
    raw = _get(env, name, default)
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"{name} must be an http(s) URL like http://127.0.0.1:9000, got {raw!r}")
    try:
        parsed.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ConfigError(f"{name} has a malformed port: {raw!r}") from None
    return raw.rstrip("/")


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IDENT = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _bucket(env: dict[str, str], name: str, default: str) -> str:
    raw = _get(env, name, default)
    if not _BUCKET.match(raw):
        raise ConfigError(
            f"{name} must be a bucket name (3-63 chars of a-z, 0-9, '.', '-'), got {raw!r}"
        )
    return raw


def _model_name(env: dict[str, str], name: str, default: str) -> str:
    from pipeline.params import MODEL_NAME_PATTERN

    raw = _get(env, name, default)
    if not re.fullmatch(MODEL_NAME_PATTERN, raw):
        raise ConfigError(
            f"{name} must be a registered model name (1-200 chars of A-Z, a-z, 0-9, '_', '.', '-',"
            f" starting with a letter or digit), got {raw!r}"
        )
    return raw


def _identifier(env: dict[str, str], name: str, default: str | None = None) -> str:
    raw = _get(env, name, default)
    if not _IDENT.match(raw):
        raise ConfigError(f"{name} must be 1-64 chars of A-Z, a-z, 0-9, '_', got {raw!r}")
    return raw


def work_bucket(env: dict[str, str] | None = None, *, image_bucket: str | None = None) -> str:
    """The bucket the pipeline owns for its own state (checkpoints): PIPELINE_WORK_BUCKET.

    Default: MLFLOW_ARTIFACT_BUCKET. Never the bucket images are uploaded to (`image_bucket`):
    whoever may upload images must not be able to plant what training loads back.
    """
    e = dict(os.environ if env is None else env)
    bucket = _bucket(e, "PIPELINE_WORK_BUCKET", _bucket(e, "MLFLOW_ARTIFACT_BUCKET", "mlflow"))
    if image_bucket is not None and bucket == image_bucket:
        raise ConfigError(
            f"PIPELINE_WORK_BUCKET {bucket!r} is the image bucket: whoever may upload images "
            "could plant checkpoints there; set PIPELINE_WORK_BUCKET (default: "
            "MLFLOW_ARTIFACT_BUCKET) to a bucket only the pipeline writes"
        )
    return bucket


@dataclass(frozen=True)
class MySQLSettings:
    """Where the project's MySQL database lives and who we are there."""

    host: str
    port: int
    user: str
    password: str
    database: str
    # PyMySQL's `ssl` options (ca, cert, key, check_hostname, verify_mode); None: no TLS.
    ssl: dict[str, Any] | None = field(default=None, hash=False)
    unix_socket: str | None = None

    def sqlalchemy_uri(self, database: str | None = None) -> str:
        """A `mysql+pymysql://` URI (password URL-quoted), for MLflow's backend store."""
        from urllib.parse import quote

        return (
            f"mysql+pymysql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{database or self.database}?charset=utf8mb4"
        )


@dataclass(frozen=True)
class S3Settings:
    """An S3-compatible endpoint (MinIO, SeaweedFS, AWS) and its credentials.

    An empty `endpoint_url` means AWS S3 in `region`. `session_token` comes with temporary
    credentials (an assumed role); `verify` is False (no TLS verification) or a CA bundle path.
    `credentials`, when given, is a botocore credentials object (the Airflow provider's, for an
    assumed role or an instance profile: `RefreshableCredentials`): the clients sign every
    request with its current keys, renewed before they expire, so a six-hour training outlives
    an hour-long role session; the static keys above are then only what it held at the start.
    """

    endpoint_url: str
    access_key_id: str
    secret_access_key: str = field(repr=False)  # never in a log line or an assertion message
    region: str
    bucket: str
    prefix: str
    session_token: str | None = field(default=None, repr=False)
    verify: bool | str = True
    # Compared by identity: stores share clients (`store.shared_clients`) only with the same
    # credentials object (the Airflow adapter keeps one per connection and process).
    credentials: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Settings:
    """Every address and credential the pipeline needs, from one env file."""

    mysql: MySQLSettings
    s3: S3Settings
    mlflow_tracking_uri: str
    mlflow_artifact_bucket: str
    mlflow_database: str
    work_bucket: str
    model_name: str
    cache_dir: Path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Build settings from `env` (default: `os.environ`), raising ConfigError on bad values."""
        e = dict(os.environ if env is None else env)
        prefix = e.get("S3_PREFIX", "").strip("/")
        image_bucket = _bucket(e, "S3_BUCKET", "images")
        return cls(
            mysql=MySQLSettings(
                host=_get(e, "MYSQL_HOST", "127.0.0.1"),
                port=_port(e, "MYSQL_PORT", "3306"),
                user=_get(e, "MYSQL_USER"),
                password=e.get("MYSQL_PASSWORD", ""),
                database=_identifier(e, "MYSQL_DATABASE"),
            ),
            s3=S3Settings(
                endpoint_url=_url(e, "S3_ENDPOINT_URL", "http://127.0.0.1:9000"),
                access_key_id=_get(e, "AWS_ACCESS_KEY_ID"),
                secret_access_key=_get(e, "AWS_SECRET_ACCESS_KEY"),
                region=_get(e, "AWS_DEFAULT_REGION", "us-east-1"),
                bucket=image_bucket,
                prefix=prefix,
                session_token=e.get("AWS_SESSION_TOKEN") or None,
                verify=e.get("AWS_CA_BUNDLE") or True,
            ),
            mlflow_tracking_uri=_url(e, "MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
            mlflow_artifact_bucket=_bucket(e, "MLFLOW_ARTIFACT_BUCKET", "mlflow"),
            mlflow_database=_identifier(e, "MLFLOW_DATABASE", "mlflow"),
            work_bucket=work_bucket(e, image_bucket=image_bucket),
            model_name=_model_name(e, "MODEL_NAME", "image-classifier"),
            cache_dir=Path(_get(e, "PIPELINE_CACHE_DIR", str(REPO_ROOT / ".local" / "cache"))),
        )


def load_settings(env_file: str | Path | None = None) -> Settings:
    """Load the env file into the process environment, then validate it into Settings."""
    load_env_file(env_file)
    return Settings.from_env()


CACHE_MAX_GB_ENV = "PIPELINE_CACHE_MAX_GB"


def cache_max_bytes(env: dict[str, str] | None = None) -> int | None:
    """The image cache's budget in bytes from `PIPELINE_CACHE_MAX_GB` (unset or empty: none)."""
    raw = (os.environ if env is None else env).get(CACHE_MAX_GB_ENV, "").strip()
    if not raw:
        return None
    try:
        gigabytes = float(raw)
    except ValueError:
        gigabytes = -1.0
    if not gigabytes >= 0 or gigabytes == float("inf"):
        raise ConfigError(
            f"{CACHE_MAX_GB_ENV} must be a number of gigabytes >= 0 (empty: no limit), got {raw!r}"
        )
    return int(gigabytes * 1e9)


def pause_point(env: str) -> None:
    """Sleep the seconds the variable `env` names: a fault test's pause point, where it kills a
    real process or ends its connection (unset in every deployment)."""
    pause = float(os.environ.get(env) or 0)
    if pause > 0:
        logging.getLogger(__name__).warning("%s=%s: pausing", env, pause)
        time.sleep(pause)
