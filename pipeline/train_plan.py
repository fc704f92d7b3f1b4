"""What a training run is asked to do, without torch: its params, the CLI's flags, and whether to train.

The DAG's `check_dataset` task and `python -m pipeline train`'s argument parsing use these, so
this module imports nothing heavier than the catalog (no torch, torchvision, mlflow, numpy or
PIL); `pipeline.train` does the training.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any

from pipeline import catalog, registry
from pipeline.db import Database
from pipeline.errors import Refusal
from pipeline.params import CLASS_WEIGHTINGS, LR_SCHEDULES, OPTIMIZERS
from pipeline.store import add_location_arguments


@dataclass(frozen=True)
class TrainParams:
    """Training hyper-parameters; the names are the run params' names."""

    epochs: int = 8
    batch_size: int = 64
    learning_rate: float = 0.001
    optimizer: str = "adamw"
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0001
    label_smoothing: float = 0.0
    image_size: int = 64
    weights: str = "none"
    freeze_backbone: bool = False
    augment: bool = True
    patience: int = 0
    train_on_val: bool = False
    class_weighting: str = "none"
    seed: int = 42
    num_workers: int | None = None  # None: pipeline.data.default_num_workers()
    compile: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainParams:
        """Validated params; unknown names and values are refused with the allowed list."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(
                f"unknown training parameter(s) {unknown}; expected: {', '.join(names)}"
            )
        params = cls(**values)
        for name, allowed in (
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", LR_SCHEDULES),
            ("class_weighting", CLASS_WEIGHTINGS),
        ):
            if getattr(params, name) not in allowed:
                raise ValueError(
                    f"unknown {name} {getattr(params, name)!r}; expected one of: {', '.join(allowed)}"
                )
        for name, low in (("epochs", 1), ("batch_size", 2), ("image_size", 16), ("num_workers", 0)):
            value = getattr(params, name)
            if name == "num_workers" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not params.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {params.learning_rate!r}")
        if params.train_on_val and params.patience:
            raise ValueError(
                "train_on_val trains on the val images, so early stopping cannot use them:"
                " set patience to 0"
            )
        if not 0 <= params.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {params.label_smoothing!r}")
        return params


def params_from_run(run_params: dict[str, Any]) -> dict[str, Any]:
    """The training subset of a DAG run's params (or CLI arguments)."""
    names = {f.name for f in fields(TrainParams)}
    return {k: v for k, v in run_params.items() if k in names and v is not None}


# Run params `decide_training` takes (besides the dataset and the model name).
DECISION_PARAMS = (
    "allow_label_change",
    "min_images_per_label",
    "allow_unseen_labels",
    "score_only",
    "rollback_to",
    "force_retrain",
)


def training_decision(
    dataset: dict[str, Any],
    *,
    champion_dataset_version: str | None,
    trained_version: str | None = None,
    min_images_per_label: int | None = None,
    allow_unseen_labels: bool = False,
    score_only: bool = False,
    rollback_to: int | None = None,
    force_retrain: bool = False,
) -> tuple[bool, str]:
    """Whether a run should train on `dataset` (a `catalog.get_dataset` row), and why.

    Runs that never train (score_only, rollback_to) don't look at the dataset; otherwise an
    untrainable dataset raises `Refusal` naming every problem, even when training would be
    skipped, so a bad bucket is reported the night it appears. `trained_version`: a version
    already trained on this dataset (`registry.version_trained_on`): not trained again.
    """
    if score_only:
        return False, "score_only: no training"
    if rollback_to is not None:
        return False, f"rollback_to {rollback_to}: no training"
    problems = catalog.check_dataset(
        dataset,
        min_images_per_label=min_images_per_label,
        allow_unseen_labels=allow_unseen_labels,
    )
    if problems:
        raise Refusal(
            f"dataset {dataset.get('dataset_version')} not trainable: " + "; ".join(problems)
        )
    if force_retrain:
        return True, "force_retrain"
    if champion_dataset_version == dataset["dataset_version"]:
        return False, (
            f"dataset {dataset['dataset_version']} unchanged since the champion was trained:"
            " skipping training"
        )
    if trained_version is not None:
        return False, (
            f"dataset {dataset['dataset_version']} already trained: v{trained_version} was"
            " trained on its train and val images (the gate decided on it): skipping training;"
            " force_retrain trains again"
        )
    if champion_dataset_version is None:
        return True, "no champion yet"
    return True, f"dataset changed since the champion ({champion_dataset_version})"


def decide_training(
    db: Database,
    dataset: dict[str, Any],
    model_name: str,
    *,
    allow_label_change: bool = False,
    min_images_per_label: int | None = None,
    **decision: Any,
) -> tuple[bool, str]:
    """A run's whole training decision on `dataset`, as the DAG's check_dataset and `python -m
    pipeline train` make it: `training_decision` with the prefix's minimum per label, the
    champion's dataset and a version already trained on it; a run that will train is refused
    before hours of training when its labels are not the champion's (`allow_label_change`).
    `decision`: the other `DECISION_PARAMS` (`training_decision`'s).
    """
    looks_at_models = not (
        decision.get("score_only")
        or decision.get("rollback_to") is not None
        or decision.get("force_retrain")
    )
    should_train, why = training_decision(
        dataset,
        champion_dataset_version=registry.champion_dataset_version(model_name),
        trained_version=registry.version_trained_on(db, model_name, dataset["dataset_version"])
        if looks_at_models
        else None,
        min_images_per_label=catalog.min_images_per_label(db, dataset, min_images_per_label),
        **decision,
    )
    if should_train:
        registry.check_label_scope(
            model_name, dataset["label_map"], allow_label_change=allow_label_change
        )
    return should_train, why


# ----------------------------------------------------------------------------- CLI


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m pipeline train`'s flags: the location, the decision's, and one per TrainParams field."""
    defaults = TrainParams()
    add_location_arguments(parser)
    parser.add_argument("--dataset-version", help="default: the latest scan of bucket/prefix")
    parser.add_argument("--run-key", help="retry key: the same key resumes/reuses (default: new)")
    parser.add_argument("--force-retrain", action="store_true")
    parser.add_argument(
        "--min-images-per-label",
        type=int,
        help="refuse labels with fewer train images (default: the prefix's saved setting)",
    )
    parser.add_argument(
        "--allow-label-change",
        action="store_true",
        help="train even when the labels differ from the champion's (the gate then replaces it)",
    )
    parser.add_argument(
        "--allow-unseen-labels",
        action="store_true",
        help="train even when val/test hold labels that train lacks",
    )
    for f in fields(TrainParams):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, type=_bool, default=default, metavar="true|false")
        elif default is None:  # num_workers: empty means automatic
            parser.add_argument(flag, type=int, default=None, help="default: automatic")
        else:
            parser.add_argument(flag, type=type(default), default=default)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
