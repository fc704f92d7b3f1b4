"""Configuration parsing: env files, references, and errors that name the variable."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, Settings, load_env_file, parse_env_text

BASE = {
    "MYSQL_USER": "u",
    "MYSQL_PASSWORD": "p@ss:/word",
    "MYSQL_DATABASE": "imgpipe",
    "AWS_ACCESS_KEY_ID": "k",
    "AWS_SECRET_ACCESS_KEY": "s",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("A=1\nB=two", {"A": "1", "B": "two"}, id="plain"),
        pytest.param("# c\n\nexport A=1", {"A": "1"}, id="comments-and-export"),
        pytest.param("A='x y # z'", {"A": "x y # z"}, id="single-quotes-literal"),
        pytest.param('A="x y"', {"A": "x y"}, id="double-quotes"),
        pytest.param("A=1 # note", {"A": "1"}, id="inline-comment"),
        pytest.param("A=h\nB=${A}:9000", {"A": "h", "B": "h:9000"}, id="reference"),
        pytest.param("B='${A}'", {"B": "${A}"}, id="no-reference-in-single-quotes"),
        pytest.param("A=", {"A": ""}, id="empty-value"),
        pytest.param("S=0 2 * * *", {"S": "0 2 * * *"}, id="cron-with-spaces"),
    ],
)
def test_parse_env_text(text, expected):
    assert parse_env_text(text) == expected


def test_reference_falls_back_to_base_environment():
    assert parse_env_text("B=${HOSTX}/x", base={"HOSTX": "h"}) == {"B": "h/x"}


def test_malformed_line_names_the_line():
    with pytest.raises(ConfigError, match="line 2"):
        parse_env_text("A=1\nthis is not an assignment")


def test_load_env_file_keeps_existing_environment(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text("PIPE_TEST_A=from-file\nPIPE_TEST_B=from-file\n")
    monkeypatch.setenv("PIPE_TEST_A", "from-env")
    monkeypatch.delenv("PIPE_TEST_B", raising=False)
    load_env_file(env_file)
    import os

    assert os.environ["PIPE_TEST_A"] == "from-env"
    assert os.environ["PIPE_TEST_B"] == "from-file"


def test_missing_env_file_is_not_an_error(tmp_path):
    assert load_env_file(tmp_path / "absent.env") == {}


def test_settings_defaults_and_values():
    s = Settings.from_env({**BASE, "S3_PREFIX": "/datasets/demo/"})
    assert s.mysql.host == "127.0.0.1" and s.mysql.port == 3306
    assert s.s3.endpoint_url == "http://127.0.0.1:9000"
    assert s.s3.prefix == "datasets/demo"
    assert s.mlflow_tracking_uri == "http://127.0.0.1:5000"


def test_sqlalchemy_uri_quotes_the_password():
    uri = Settings.from_env(BASE).mysql.sqlalchemy_uri("mlflow")
    assert uri.startswith("mysql+pymysql://u:p%40ss%3A%2Fword@127.0.0.1:3306/mlflow")


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        pytest.param({"MYSQL_PORT": "abc"}, "MYSQL_PORT", id="port-not-a-number"),
        pytest.param({"MYSQL_PORT": "70000"}, "MYSQL_PORT", id="port-out-of-range"),
        pytest.param({"S3_ENDPOINT_URL": "127.0.0.1:9000"}, "S3_ENDPOINT_URL", id="url-no-scheme"),
        pytest.param({"S3_ENDPOINT_URL": "http://h:x"}, "S3_ENDPOINT_URL", id="url-bad-port"),
        pytest.param({"MLFLOW_TRACKING_URI": "ftp://h"}, "MLFLOW_TRACKING_URI", id="mlflow-scheme"),
        pytest.param({"S3_BUCKET": "Bad_Bucket"}, "S3_BUCKET", id="bucket-name"),
        pytest.param({"MYSQL_DATABASE": "x-y;drop"}, "MYSQL_DATABASE", id="database-name"),
        pytest.param({"MYSQL_USER": ""}, "MYSQL_USER", id="required-missing"),
        pytest.param({"AWS_SECRET_ACCESS_KEY": ""}, "AWS_SECRET_ACCESS_KEY", id="secret-missing"),
        pytest.param({"MODEL_NAME": "m' or name='x"}, "MODEL_NAME", id="model-name-quote"),
        pytest.param({"MODEL_NAME": "a/b"}, "MODEL_NAME", id="model-name-slash"),
    ],
)
def test_bad_values_name_the_variable(overrides, variable):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({**BASE, **overrides})


def test_env_example_reads_the_same_in_a_shell_and_in_the_pipeline():
    """`set -a; . ./.env` (a shell, systemd, docker compose) and the pipeline agree on every value."""
    import json
    import subprocess

    from pipeline.config import REPO_ROOT

    example = REPO_ROOT / ".env.example"
    script = (
        "set -a; . ./.env.example; set +a; "
        'python3 -c "import json, os, sys; print(json.dumps(dict(os.environ)))"'
    )
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    shell = json.loads(result.stdout)
    parsed = parse_env_text(example.read_text(encoding="utf-8"))
    assert parsed["PIPELINE_SCHEDULE"] == "0 2 * * *"
    assert {k: shell.get(k) for k in parsed} == parsed


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param({}, "mlflow", id="default-mlflow-artifact-bucket"),
        pytest.param({"MLFLOW_ARTIFACT_BUCKET": "artifacts"}, "artifacts", id="follows-artifacts"),
        pytest.param({"PIPELINE_WORK_BUCKET": "imgpipe-work"}, "imgpipe-work", id="explicit"),
        pytest.param({"PIPELINE_WORK_BUCKET": ""}, "mlflow", id="empty-means-default"),
    ],
)
def test_work_bucket(overrides, expected):
    assert Settings.from_env({**BASE, **overrides}).work_bucket == expected


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"PIPELINE_WORK_BUCKET": "images"}, id="explicit"),
        pytest.param({"S3_BUCKET": "mlflow"}, id="images-in-the-artifact-bucket"),
    ],
)
def test_the_work_bucket_is_never_the_image_bucket(overrides):
    with pytest.raises(ConfigError, match="PIPELINE_WORK_BUCKET .* is the image bucket"):
        Settings.from_env({**BASE, **overrides})
