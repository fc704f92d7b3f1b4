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
