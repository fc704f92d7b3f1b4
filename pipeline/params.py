"""Run parameters of the pipeline: one spec that renders the Airflow form and validates any conf."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Scoring precisions: auto (bf16 on a GPU with bf16, else fp32); fp32; bf16 autocast; int8
# through ONNX Runtime (pipeline.onnx_runtime).
PRECISIONS = ("auto", "fp32", "bf16", "int8")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("cosine", "step", "none")
CLASS_WEIGHTINGS = ("none", "balanced")
SMALL_LABEL_POLICIES = ("refuse", "exclude")


# A registered model name: safe in MLflow search filters, URLs and cache paths.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"


APPROVAL_ENV = "PIPELINE_REQUIRE_APPROVAL"


def env_flag(name: str, default: bool = False) -> bool:
    """A true/false setting of the environment (`.env`); anything else is refused by name."""
    import os

    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: expected true or false")


def deployment_default(name: str, fallback: str) -> str:
    """Where scheduled runs look: S3_BUCKET / S3_PREFIX of the deployment's environment (the
    compose file passes `.env`'s to every Airflow process, as the CLI reads them), else
    `fallback`. An empty S3_PREFIX is the bucket's root, as for the CLI."""
    import os

    value = os.environ.get(name)
    if value is None or (not value.strip("/") and name != "S3_PREFIX"):
        return fallback
    return value.strip("/")


def cli_run_key() -> str:
    """The run key of a `python -m pipeline ...` run: `cli__<UTC time>`, beside the Airflow run
    ids DAG runs use, so MLflow tags, checkpoints and SQL `run_key` columns say which it was."""
    from datetime import UTC, datetime

    return f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S.%f}"  # two runs a second apart stay two


@dataclass(frozen=True)
class ParamSpec:
    """One run parameter: JSON-schema type, default, bounds or allowed values, and help text."""

    type: str  # "string" | "integer" | "number" | "boolean"
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    enum: tuple[Any, ...] | None = None
    pattern: str | None = None
    nullable: bool = False
    section: str = "Run"

    def schema(self) -> dict[str, Any]:
        """The JSON schema Airflow's `Param` validates with (and renders as a form field)."""
        schema: dict[str, Any] = {"type": [self.type, "null"] if self.nullable else self.type}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.enum is not None:
            schema["enum"] = list(self.enum) + ([None] if self.nullable else [])
        if self.pattern is not None:
            schema["pattern"] = self.pattern
        return schema


# The scan settings (val_percent, leakage_policy, min_images_per_label, small_label_policy) are
# kept per bucket/prefix by its scans: empty keeps them, so a scheduled run (no conf) never
# re-carves val or drops an exclusion a person set.
SAVED_SCAN_DEFAULTS = "first scan"

# Names are the words the form, `airflow dags trigger -c` and the REST API share.
RUN_PARAMS: dict[str, ParamSpec] = {
    "model_name": ParamSpec(
        "string",
        None,
        "Registered MLflow model of this dataset scope (its champion, versions and history);"
        " empty: MODEL_NAME of the environment. Give each bucket/prefix with other labels a"
        " name of its own.",
        pattern=MODEL_NAME_PATTERN,
        nullable=True,
    ),
    "bucket": ParamSpec(
        "string",
        deployment_default("S3_BUCKET", "images"),
        "S3 bucket holding <prefix>/<split>/<label>/<file> (default: S3_BUCKET of the deployment).",
        pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        section="Data",
    ),
    "prefix": ParamSpec(
        "string",
        deployment_default("S3_PREFIX", "datasets/demo"),
        "Key prefix inside the bucket ('' for the root; default: S3_PREFIX of the deployment).",
        # No slash or white space at either end: MySQL compares 'data ' equal to 'data'.
        pattern=r"^([^\s/]|[^\s/].*[^\s/])?$",
        section="Data",
    ),
    "val_percent": ParamSpec(
        "integer",
        None,
        "Percent of train carved into validation when there is no val/ split; empty: the"
        f" one this bucket/prefix's last scan used ({SAVED_SCAN_DEFAULTS}: 10).",
        minimum=1,
        maximum=50,
        nullable=True,
        section="Data",
    ),
    "leakage_policy": ParamSpec(
        "string",
        None,
        "Identical content in train and test: reject the test copy, or keep and report;"
        f" empty: the last scan's ({SAVED_SCAN_DEFAULTS}: reject).",
        enum=("reject", "keep"),
        nullable=True,
        section="Data",
    ),
    "allow_unseen_labels": ParamSpec(
        "boolean",
        False,
        "Train even when val/test hold labels that train lacks (reported; the model cannot"
        " predict them).",
        section="Data",
    ),
    "min_images_per_label": ParamSpec(
        "integer",
        None,
        "A label with fewer train images refuses training, or is left out (small_label_policy);"
        f" empty: the last scan's ({SAVED_SCAN_DEFAULTS}: 5).",
        minimum=1,
        maximum=100000,
        nullable=True,
        section="Data",
    ),
    "small_label_policy": ParamSpec(
        "string",
        None,
        "A label below min_images_per_label: refuse training (fix the bucket), or exclude the"
        f" label from this dataset version with a warning; empty: the last scan's"
        f" ({SAVED_SCAN_DEFAULTS}: refuse).",
        enum=SMALL_LABEL_POLICIES,
        nullable=True,
        section="Data",
    ),
    "force_delete": ParamSpec(
        "boolean",
        False,
        "Accept a scan that marks more than half of the catalogued images deleted (refused"
        " by default: an empty listing or a wrong prefix looks the same).",
        section="Data",
    ),
    "epochs": ParamSpec(
        "integer", 8, "Training epochs.", minimum=1, maximum=500, section="Training"
    ),
    "batch_size": ParamSpec(
        "integer",
        64,
        "Training batch size (at least 2: BatchNorm normalises over the batch).",
        minimum=2,
        maximum=4096,
        section="Training",
    ),
    "learning_rate": ParamSpec(
        "number", 0.001, "Initial learning rate.", minimum=1e-7, maximum=10, section="Training"
    ),
    "optimizer": ParamSpec("string", "adamw", "Optimizer.", enum=OPTIMIZERS, section="Training"),
    "lr_schedule": ParamSpec(
        "string",
        "cosine",
        "Learning-rate schedule over the epochs.",
        enum=LR_SCHEDULES,
        section="Training",
    ),
    "weight_decay": ParamSpec(
        "number", 0.0001, "Weight decay.", minimum=0, maximum=1, section="Training"
    ),
    "label_smoothing": ParamSpec(
        "number", 0.0, "Label smoothing of the loss.", minimum=0, maximum=0.5, section="Training"
    ),
    "patience": ParamSpec(
        "integer",
        0,
        "Early stopping: epochs without val accuracy improvement before stopping, keeping the"
        " best val epoch's weights (0 = off: train every epoch, keep the last).",
        minimum=0,
        maximum=500,
        section="Training",
    ),
    "train_on_val": ParamSpec(
        "boolean",
        False,
        "Train on the val images too (needs a test split: the gate then compares models on"
        " test; per-epoch val figures become in-sample). No early stopping with it.",
        section="Training",
    ),
    "class_weighting": ParamSpec(
        "string",
        "none",
        "Class-imbalance handling: none, or balanced (loss weighted by inverse class frequency).",
        enum=CLASS_WEIGHTINGS,
        section="Training",
    ),
    "freeze_backbone": ParamSpec(
        "boolean",
        False,
        "Train only the new head (use with weights=imagenet on small datasets).",
        section="Training",
    ),
    "image_size": ParamSpec(
        "integer",
        64,
        "Square input size in pixels (224 for ImageNet weights).",
        minimum=16,
        maximum=1024,
        section="Training",
    ),
    "weights": ParamSpec(
        "string",
        "none",
        "Initial weights: none, imagenet, or a path / s3:// URI of a state dict.",
        pattern=r"^(none|imagenet|s3://\S+|/\S+)$",
        section="Training",
    ),
    "augment": ParamSpec(
        "boolean",
        True,
        "Random resized crop and brightness/contrast jitter while training (no flips).",
        section="Training",
    ),
    "seed": ParamSpec(
        "integer",
        42,
        "Random seed (deterministic on CPU).",
        minimum=0,
        maximum=2**31 - 1,
        section="Training",
    ),
    "num_workers": ParamSpec(
        "integer",
        None,
        "Data-loader worker processes; empty: every core but one, at most 16.",
        minimum=0,
        maximum=64,
        nullable=True,
        section="Training",
    ),
    "compile": ParamSpec(
        "boolean",
        False,
        "torch.compile the model for training (pays off on GPU workers for long runs; the"
        " first steps wait for the compiler).",
        section="Training",
    ),
    "force_retrain": ParamSpec(
        "boolean",
        False,
        "Train even when a registered version (the champion, or one the gate kept out) was"
        " trained on the same train and val images.",
        section="Training",
    ),
    "min_accuracy": ParamSpec(
        "number",
        0.5,
        "Minimum validation accuracy for promotion to champion.",
        minimum=0,
        maximum=1,
        section="Promotion",
    ),
    "promotion_margin": ParamSpec(
        "number",
        0.0,
        "Promote unless worse than the champion by more than this (accuracy points, 0-1).",
        minimum=0,
        maximum=1,
        section="Promotion",
    ),
    "allow_label_change": ParamSpec(
        "boolean",
        False,
        "Let the gate replace a champion trained on other labels (refused otherwise: a run on"
        " another dataset must not replace its champion).",
        section="Promotion",
    ),
    "require_approval": ParamSpec(
        "boolean",
        env_flag(APPROVAL_ENV),
        "When the gate would promote, wait for a person to approve or reject in Airflow's"
        " Required Actions (or the REST API) before the champion moves. Default from"
        f" {APPROVAL_ENV} (scheduled runs use it).",
        section="Promotion",
    ),
    "approval_timeout_hours": ParamSpec(
        "number",
        24.0,
        "With require_approval: hours to wait for an answer; none by then and nothing moves"
        " (the version stays challenger, the run scores with the champion in force).",
        minimum=0.001,
        maximum=720,
        section="Promotion",
    ),
    "rollback_to": ParamSpec(
        "integer",
        None,
        "Move champion back to this earlier model version (skips training).",
        minimum=1,
        nullable=True,
        section="Promotion",
    ),
    "score_only": ParamSpec(
        "boolean",
        False,
        "Skip training; only score new images with the model behind model_ref.",
        section="Scoring",
    ),
    "model_ref": ParamSpec(
        "string",
        "champion",
        "Model to score with: an alias (champion, challenger) or a version number.",
        pattern=r"^([A-Za-z][A-Za-z0-9_-]*|[0-9]+)$",
        section="Scoring",
    ),
    "shards": ParamSpec(
        "integer",
        2,
        "Scoring shards (parallel mapped tasks).",
        minimum=1,
        maximum=256,
        section="Scoring",
    ),
    "force_rescore": ParamSpec(
        "boolean", False, "Rescore images already scored by this model version.", section="Scoring"
    ),
    "precision": ParamSpec(
        "string",
        "auto",
        "Scoring precision: auto (bf16 on a GPU, fp32 on a CPU); fp32; bf16 or int8 (ONNX"
        " Runtime, CPU) only where their agreement with fp32 was measured (bench/results).",
        enum=PRECISIONS,
        section="Scoring",
    ),
    "drift_p_value": ParamSpec(
        "number",
        0.01,
        "Drift check: the false-positive rate it accepts, i.e. how often images that look"
        " like the version's val images are still called drifted (split over its three"
        " permutation tests: embeddings, predicted labels, confidence). At least 0.003: below"
        " it the tests' 1000 permutations could never call anything drifted.",
        minimum=0.003,
        maximum=0.5,
        section="Drift",
    ),
    "drift_min_images": ParamSpec(
        "integer",
        30,
        "Drift check: fewer images scored in a subset (test, inbox) than this give 'not"
        " enough images' instead of a verdict.",
        minimum=2,
        maximum=100000,
        section="Drift",
    ),
    "drift_label_shift": ParamSpec(
        "number",
        0.15,
        "Drift check: smallest change of the predicted-label distribution against val"
        " (total variation distance, 0-1) that counts, when also significant.",
        minimum=0,
        maximum=1,
        section="Drift",
    ),
    "drift_confidence_drop": ParamSpec(
        "number",
        0.1,
        "Drift check: smallest drop of the mean top-1 confidence against val that counts,"
        " when also significant.",
        minimum=0,
        maximum=1,
        section="Drift",
    ),
}

_PY_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,)}


class ParamError(ValueError):
    """A run parameter is unknown or out of bounds; the message names it and the allowed values."""


def validate_params(conf: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults filled in and every value checked, as the trigger form does.

    `airflow dags test -c` and the REST API pass conf unvalidated, so the first task calls this.
    """
    conf = dict(conf or {})
    unknown = sorted(set(conf) - set(RUN_PARAMS))
    if unknown:
        raise ParamError(
            f"unknown parameter(s) {unknown}; expected some of: {', '.join(RUN_PARAMS)}"
        )
    values: dict[str, Any] = {}
    errors: list[str] = []
    for name, spec in RUN_PARAMS.items():
        value = conf.get(name, spec.default)
        if value == "" and spec.nullable:
            value = None  # an emptied form field, or "" in conf: the param's "empty" meaning
        if value is None:
            if not spec.nullable:
                errors.append(f"{name} must not be empty")
            values[name] = None
            continue
        if spec.type == "integer" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if (
            isinstance(value, bool)
            and spec.type != "boolean"
            or not isinstance(value, _PY_TYPES[spec.type])
        ):
            errors.append(f"{name} must be a {spec.type}, got {value!r}")
            continue
        if spec.enum is not None and value not in spec.enum:
            errors.append(
                f"{name}={value!r} is not allowed; expected one of: {', '.join(map(str, spec.enum))}"
            )
        if spec.minimum is not None and value < spec.minimum:
            errors.append(f"{name}={value!r} is below the minimum {spec.minimum}")
        if spec.maximum is not None and value > spec.maximum:
            errors.append(f"{name}={value!r} is above the maximum {spec.maximum}")
        # As JSON Schema (the form) reads it: `$` is the end of the string, not before a "\n".
        if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
            errors.append(f"{name}={value!r} does not match {spec.pattern}")
        values[name] = value
    if errors:
        raise ParamError("invalid parameters: " + "; ".join(errors))
    return values
