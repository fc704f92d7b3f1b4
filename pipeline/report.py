"""Evaluation report: the champion's (or a version's) test metrics as terminal tables."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.db import Database


def load_evaluation(db: Database, model_name: str, model_version: str | int) -> dict[str, Any]:
    """The stored evaluation of a version; LookupError (naming what to run) when there is none."""
    key = (model_name, int(model_version))
    head = db.query(
        "SELECT n_images, n_correct, accuracy, macro_f1, evaluated_at FROM evaluations"
        " WHERE model_name = %s AND model_version = %s",
        key,
    )
    if not head:
        raise LookupError(
            f"{model_name} v{model_version} has no evaluation yet: run `python -m pipeline score"
            f" --model-version {model_version}` (or the DAG's score_images/evaluate_model) first"
        )
    classes = db.query(
        "SELECT label, precision_score, recall_score, f1_score, support FROM evaluation_classes"
        " WHERE model_name = %s AND model_version = %s ORDER BY label",
        key,
    )
    cells = db.query(
        "SELECT true_label, predicted_label, n FROM confusion_matrix"
        " WHERE model_name = %s AND model_version = %s",
        key,
    )
    return {
        "model_name": model_name,
        "model_version": str(model_version),
        **head[0],
        "classes": classes,
        "confusion": {(c["true_label"], c["predicted_label"]): int(c["n"]) for c in cells},
    }


def format_report(ev: dict[str, Any]) -> str:
    """Headline numbers, per-class table and confusion matrix (rows: true, columns: predicted)."""
    lines = [
        f"{ev['model_name']} v{ev['model_version']}  (evaluated {ev['evaluated_at']})",
        f"test images  {ev['n_images']}",
        f"accuracy     {ev['accuracy']:.4f}  ({ev['n_correct']}/{ev['n_images']})",
        f"macro-F1     {ev['macro_f1']:.4f}",
        "",
    ]
    labels = [c["label"] for c in ev["classes"]]
    width = max([len("label"), *(len(lb) for lb in labels)])
    lines.append(f"{'label':<{width}}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}")
    for c in ev["classes"]:
        lines.append(
            f"{c['label']:<{width}}  {c['precision_score']:>9.3f}  {c['recall_score']:>6.3f}"
            f"  {c['f1_score']:>6.3f}  {c['support']:>7}"
        )
    cell = max(4, *(len(lb) for lb in labels), *(len(str(n)) for n in ev["confusion"].values()))
    lines += ["", "confusion matrix (rows: true label, columns: predicted label)"]
    lines.append(" " * width + "  " + " ".join(f"{lb:>{cell}}" for lb in labels))
    for t in labels:
        row = " ".join(f"{ev['confusion'].get((t, p), 0):>{cell}}" for p in labels)
        lines.append(f"{t:<{width}}  {row}")
    return "\n".join(lines)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-version", help="a registered version (default: the champion)")


def cli_report(args: argparse.Namespace, settings: Any) -> int:
    from pipeline import registry

    version = args.model_version or registry.resolve_model_version(settings.model_name)
    ev = load_evaluation(Database(settings.mysql), settings.model_name, version)
    print(format_report(ev))
    return 0
