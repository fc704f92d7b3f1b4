"""The promotion gate's decision table, and MLflow errors named once (never taken for "none")."""

from __future__ import annotations

import socket

import pytest

from pipeline import registry
from pipeline.errors import ServiceUnavailable

DIGITS = ("eight", "five", "four", "nine", "one", "seven", "six", "three", "two", "zero")
PHOTOS = ("cat", "dog")


@pytest.mark.parametrize(
    ("accuracy", "champion", "kwargs", "decision", "says"),
    [
        pytest.param(0.9, None, {}, "promoted", "first champion", id="first-champion"),
        pytest.param(0.4, None, {}, "challenger", "below min_accuracy", id="below-minimum"),
        pytest.param(0.8, 0.9, {}, "challenger", "worse than champion v1", id="worse"),
        pytest.param(0.8, 0.85, {"promotion_margin": 0.1}, "promoted", "margin 0.1", id="margin"),
        pytest.param(
            0.9,
            None,
            {"label_change": "label set [cat, dog]"},
            "refused",
            "allow_label_change",
            id="label-change-refused",
        ),
        pytest.param(
            0.9,
            None,
            {"label_change": "label set [cat, dog]", "allow_label_change": True},
            "promoted",
            "replaced without comparing",
            id="label-change-allowed",
        ),
        pytest.param(
            0.1,
            None,
            {"label_change": "label set [cat, dog]", "allow_label_change": True},
            "challenger",
            "below min_accuracy",
            id="label-change-allowed-but-too-weak",
        ),
        pytest.param(
            0.9,
            0.85,
            {"require_approval": True},
            "awaiting_approval",
            "vs champion v1",
            id="approval-holds-a-promotion",
        ),
        pytest.param(
            0.8,
            0.9,
            {"require_approval": True},
            "challenger",
            "worse than champion v1",
            id="approval-never-asked-for-a-challenger",
        ),
        pytest.param(
            0.9,
            None,
            {"label_change": "label set [cat, dog]", "require_approval": True},
            "refused",
            "allow_label_change",
            id="approval-never-asked-for-a-refusal",
        ),
    ],
)
def test_gate_decision(accuracy, champion, kwargs, decision, says):
    got, reason = registry.gate_decision(
        accuracy,
        champion,
        min_accuracy=0.5,
        promotion_margin=kwargs.pop("promotion_margin", 0.0),
        champion_version="1",
        **kwargs,
    )
    assert got == decision and says in reason


def test_a_label_change_names_both_label_sets_and_equal_sets_pass():
    why = registry.label_change_refusal(PHOTOS, DIGITS, model_name="digits", champion_version="3")
    assert why == (
        "label set [cat, dog] (2 labels) differs from champion digits v3's"
        " [eight, five, four, nine, one, seven, six, three, two, zero] (10 labels)"
    )
    assert (
        registry.label_change_refusal(DIGITS[::-1], DIGITS, model_name="d", champion_version="3")
        is None
    )


def test_an_unreachable_mlflow_is_an_error_naming_it_never_no_version(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on: a real connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        for call in (
            lambda: registry.find_version_by_run_key("m", "run-1"),
            lambda: registry.resolve_model_version("m", "champion"),
            lambda: registry.champion_dataset_version("m"),
        ):
            with pytest.raises(ServiceUnavailable, match=f"^MLflow at {uri}: connection refused"):
                call()
    finally:
        mlflow.set_tracking_uri(before)


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        pytest.param({"name": "m"}, "name='m'", id="plain"),
        pytest.param(
            {"name": "m", "tags.run_key": "manual__2026-01-01T00:00:00+00:00"},
            "name='m' and tags.run_key='manual__2026-01-01T00:00:00+00:00'",
            id="two-conditions",
        ),
        pytest.param({"tags.run_key": "it's"}, 'tags.run_key="it\'s"', id="single-quote"),
        pytest.param({"tags.run_key": 'say "hi"'}, "tags.run_key='say \"hi\"'", id="double-quote"),
    ],
)
def test_search_filter_quotes_each_value_with_a_quote_it_lacks(conditions, expected):
    from mlflow.utils.search_utils import SearchModelVersionUtils

    text = registry.search_filter(conditions)
    assert text == expected
    # MLflow's own parser reads back exactly the values asked for.
    parsed = SearchModelVersionUtils.parse_search_filter(text)
    assert [c["value"] for c in parsed] == list(conditions.values())


@pytest.mark.parametrize(
    "value", ["both ' and \"", "back\\slash"], ids=["both-quotes", "backslash"]
)
def test_search_filter_refuses_what_mlflow_cannot_match(value):
    with pytest.raises(ValueError, match="cannot search MLflow"):
        registry.search_filter({"tags.run_key": value})


@pytest.mark.parametrize(
    ("outcome", "reviewer", "comment", "says", "lacks"),
    [
        (
            "approved",
            "alice",
            " looks right ",
            "approved by alice: looks right (gate: acc 0.9",
            "awaiting",
        ),
        ("rejected", "bob", "", "rejected by bob (gate: acc 0.9", "awaiting"),
        ("timed_out", None, "", "approval timed out: nobody answered, nothing moved", "awaiting"),
    ],
)
def test_review_reason_names_the_reviewer_and_keeps_the_gate_reason(
    outcome, reviewer, comment, says, lacks
):
    reason = registry.review_reason(outcome, reviewer, comment, "acc 0.9 vs 0.8; awaiting approval")
    assert says in reason and lacks not in reason


class _Memberships:
    """`catalog.dataset_images` over an in-memory {(dataset, subset): [image ids]}."""

    def __init__(self, members: dict[tuple[str, str], list[int]]) -> None:
        self.members = members

    def dataset_images(self, db, dataset_version, subsets):
        from pipeline.records import ImageRecord

        if not any(dataset == dataset_version for dataset, _ in self.members):
            raise LookupError(f"unknown dataset version {dataset_version}")

        return [
            ImageRecord(i, "b", f"{subset}/a/{i}.png", "e", subset, "a")
            for subset in subsets
            for i in self.members.get((dataset_version, subset), [])
        ]

    def trained_members(self, db, dataset_version, subsets, *, among):
        trained = {r.image_id for r in self.dataset_images(db, dataset_version, subsets)}
        return trained & {i for (d, _), ids in self.members.items() if d == among for i in ids}


@pytest.mark.parametrize(
    ("champion_tags", "split", "ids", "note"),
    [
        pytest.param(None, "val", [5, 6, 7], "", id="no-champion"),
        pytest.param(
            {"dataset_version": "d1", "gate_split": "val"},
            "val",
            [6, 7],
            " (1 val image left out: champion v3 trained on them)",
            id="champion-trained-on-one-of-them",
        ),
        pytest.param(
            {"dataset_version": "d2", "gate_split": "test"},
            "test",
            [8, 9],
            " (val left out: champion v3 trained on them)",
            id="champion-trained-on-val",
        ),
        pytest.param({"gate_split": "val"}, "val", [5, 6, 7], "", id="champion-without-lineage"),
        pytest.param(
            {"dataset_version": "elsewhere", "gate_split": "val"},
            "val",
            [5, 6, 7],
            "",
            id="champion-from-another-catalog",
        ),
    ],
)
def test_the_gate_leaves_out_the_images_the_champion_trained_on(champion_tags, split, ids, note):
    catalog = _Memberships(
        {
            ("d2", "train"): [1, 2],
            ("d2", "val"): [5, 6, 7],
            ("d2", "test"): [8, 9],
            ("d1", "train"): [1, 5],  # val_percent changed: image 5 was train in d1
        }
    )
    tags = {"dataset_version": "d2", "gate_split": "val"}
    records, got_split, got_note = registry.gate_images(None, catalog, tags, champion_tags, "3")
    assert ([r.image_id for r in records], got_split, got_note) == (ids, split, note)


def test_the_gate_refuses_when_the_champion_trained_on_every_image_it_could_compare_on():
    catalog = _Memberships({("d", "train"): [1], ("d", "val"): [2], ("d", "test"): [3]})
    champion = {"dataset_version": "d", "gate_split": "test"}
    catalog.members[("d", "train")] = [1, 3]  # test images trained on too (another prefix layout)
    with pytest.raises(registry.Refusal, match="champion v4 was trained on every val and test"):
        registry.gate_images(None, catalog, {"dataset_version": "d"}, champion, "4")


HOSTILE = [
    "gate: new label zz ![](https:evil.example?beacon) [checklist](https:evil.example)",
    "label `x` | forged cell | <img src=x onerror=alert(1)> **bold** _it_ ~~del~~ # h",
    "run \\[escaped\\] and a trailing backslash \\",
    "two\n\n## Verified by ML platform: safe to approve",
]


@pytest.mark.parametrize(
    "value", [pytest.param(v, id=f"hostile-{i}") for i, v in enumerate(HOSTILE)]
)
def test_markdown_text_shows_a_value_as_written_in_the_reviewers_table(value):
    """What `approval_request` puts in its table cells: CommonMark + tables, as the Airflow
    UI's Markdown renders it, finds no link, image, HTML, heading or extra cell in it."""
    from markdown_it import MarkdownIt

    document = f"| | |\n|---|---|\n| gate | {registry.markdown_text(value)} |\n"
    tokens = MarkdownIt("commonmark").enable("table").enable("strikethrough").parse(document)
    cells = [t for t in tokens if t.type == "inline"]
    assert len(cells) == 4  # header (2) and one row (2): no forged cell
    kinds = {child.type for t in cells for child in t.children or []}
    assert kinds <= {"text", "softbreak"}, kinds
    shown = "".join(child.content for child in cells[-1].children)
    assert shown == " ".join(value.split())
