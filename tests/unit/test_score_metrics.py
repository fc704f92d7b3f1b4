"""Evaluation metrics from (true, predicted) pairs: accuracy, macro-F1, per-class, confusion."""

from __future__ import annotations

import pytest

from pipeline.report import format_report
from pipeline.score import check_labels, compute_metrics


@pytest.mark.parametrize(
    ("pairs", "accuracy", "macro_f1"),
    [
        pytest.param([], 0.0, 0.0, id="nothing-scored"),
        pytest.param([("a", "a"), ("b", "b")], 1.0, 1.0, id="perfect"),
        pytest.param([("a", "b"), ("b", "a")], 0.0, 0.0, id="all-swapped"),
        # b is never predicted: precision 0 by convention, F1 0; a: P 2/3, R 1, F1 0.8.
        pytest.param([("a", "a"), ("a", "a"), ("b", "a")], 2 / 3, 0.4, id="class-never-predicted"),
    ],
)
def test_compute_metrics(pairs, accuracy, macro_f1):
    m = compute_metrics(pairs)
    assert m["n_images"] == len(pairs)
    assert m["accuracy"] == pytest.approx(accuracy)
    assert m["macro_f1"] == pytest.approx(macro_f1)
    assert sum(m["confusion"].values()) == len(pairs)
    assert sum(c["support"] for c in m["per_class"].values()) == len(pairs)


def test_a_label_only_predicted_counts_in_macro_f1_with_zero_support():
    m = compute_metrics([("a", "a"), ("a", "c")])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_label_mismatch_names_both_lists():
    check_labels(["b", "a"], ["a", "b"], what="m v1")
    with pytest.raises(
        ValueError, match=r"\['a', 'x'\] differ from the catalog's labels \['a', 'b'\]"
    ):
        check_labels(["x", "a"], ["a", "b"], what="m v1")


def test_report_prints_metrics_classes_and_matrix():
    ev = {
        "model_name": "m",
        "model_version": "3",
        "evaluated_at": "2024-01-01 00:00:00",
        "n_images": 3,
        "n_correct": 2,
        "accuracy": 2 / 3,
        "macro_f1": 0.4,
        "classes": [
            {
                "label": "a",
                "precision_score": 2 / 3,
                "recall_score": 1.0,
                "f1_score": 0.8,
                "support": 2,
            },
            {
                "label": "b",
                "precision_score": 0.0,
                "recall_score": 0.0,
                "f1_score": 0.0,
                "support": 1,
            },
        ],
        "confusion": {("a", "a"): 2, ("b", "a"): 1},
    }
    lines = format_report(ev).splitlines()
    assert lines[0].startswith("m v3")
    assert "accuracy     0.6667  (2/3)" in lines
    assert "a          0.667   1.000   0.800        2" in lines
    # confusion rows: true label, then counts per predicted label in label order
    assert lines[-2].split() == ["a", "2", "0"]
    assert lines[-1].split() == ["b", "1", "0"]


def test_prediction_rows_mark_correctness_and_leave_inbox_out_of_the_dataset():
    import json
    from datetime import datetime

    from pipeline.model import Prediction
    from pipeline.records import ImageRecord
    from pipeline.score import _COLUMNS, prediction_rows

    when = datetime(2026, 11, 26, 5, 0)
    pred = Prediction(("cat", "dog"), (0.75, 0.25))
    records = [
        ImageRecord(1, "b", "test/cat/1.jpg", "e1", "test", "cat"),
        ImageRecord(2, "b", "test/dog/2.jpg", "e2", "test", "dog"),
        ImageRecord(3, "b", "inbox/3.jpg", "e3", "inbox", None),
    ]
    rows = prediction_rows(
        [(r, pred) for r in records],
        model_name="m",
        model_version=4,
        dataset_version="ds1",
        mlflow_run_id="run",
        run_key="manual__x",
        scored_at=when,
    )
    by_column = [dict(zip(_COLUMNS, row, strict=True)) for row in rows]
    assert [r["etag"] for r in by_column] == ["e1", "e2", "e3"]  # the content scored
    assert [r["correct"] for r in by_column] == [1, 0, None]
    assert [r["dataset_version"] for r in by_column] == ["ds1", "ds1", None]
    assert by_column[0]["predicted_label"] == "cat" and by_column[0]["confidence"] == 0.75
    assert json.loads(by_column[2]["top_k"]) == [
        {"label": "cat", "prob": 0.75},
        {"label": "dog", "prob": 0.25},
    ]
    assert {(r["image_id"], r["model_version"], r["scored_at"]) for r in by_column} == {
        (1, 4, when),
        (2, 4, when),
        (3, 4, when),
    }


def test_metrics_over_the_models_labels_include_classes_never_seen():
    pairs = [("a", "a"), ("a", "b"), ("b", "b")]
    every = compute_metrics(pairs, ["a", "b", "c"])
    assert list(every["per_class"]) == ["a", "b", "c"]
    assert every["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # a: P 1, R 1/2, F1 2/3; b: P 1/2, R 1, F1 2/3; c: 0 → macro over three classes
    assert every["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    seen = compute_metrics(pairs)
    assert list(seen["per_class"]) == ["a", "b"]
    assert seen["macro_f1"] == pytest.approx(2 / 3)
