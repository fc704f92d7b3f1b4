"""The drift check's statistics and verdicts on in-memory embeddings (no services)."""

from __future__ import annotations

import pytest
import torch

from pipeline import drift
from pipeline.drift import Thresholds

LABELS = ("a", "b", "c")


def _sample(n: int, *, seed: int, shift: float = 0.0, dims: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dims, generator=gen) + shift


def _reference(n: int = 200, seed: int = 0) -> drift.DriftReference:
    """A reference fitted from 2n 'val' features: labels by the first coordinate's sign."""
    features = _sample(2 * n, seed=seed, dims=16)
    predicted = (features[:, 0] > 0).long() + (features[:, 1] > 1).long()
    confidence = torch.full((2 * n,), 0.9)
    return drift.fit_reference(features, predicted, confidence, LABELS, seed=seed)


def _window(reference, features, predicted, confidence):
    projected = drift.Projector(reference.pca_mean, reference.pca_components)(features)
    return projected, predicted, confidence


def test_reference_fits_pca_on_one_half_and_keeps_the_other_half_projected():
    ref = _reference(100)
    assert ref.dims == 16  # fewer features than 32: all of them
    assert ref.embeddings.shape == (100, 16)
    assert ref.meta["n_fit"] == 100 and ref.meta["n_reference"] == 100
    assert abs(sum(ref.meta["val_label_distribution"].values()) - 1) < 1e-5


def test_reference_needs_a_few_images():
    with pytest.raises(ValueError, match="at least 8 val images"):
        drift.fit_reference(torch.zeros(5, 4), torch.zeros(5), torch.ones(5), LABELS)


def test_reference_round_trips_as_data(tmp_path):
    from pipeline import model_files

    ref = _reference(50)
    files = ref.write(tmp_path)
    digest = model_files.file_sha256(files["drift"])
    back = drift.read_reference(tmp_path, expected_sha256=digest, what="m v1")
    assert torch.equal(back.embeddings, ref.embeddings) and back.labels == LABELS
    assert drift.read_reference(tmp_path, expected_sha256=None, what="m v1") is None


def test_altered_reference_is_refused(tmp_path):
    from pipeline.errors import Refusal

    files = _reference(50).write(tmp_path)
    with pytest.raises(Refusal, match="altered after registration"):
        drift.read_reference(tmp_path, expected_sha256="0" * 64, what="m v1")
    assert files["drift"].exists()


def test_a_missing_or_relabelled_reference_of_a_version_registered_with_one_is_refused(tmp_path):
    """Deleting the reference file (or rewriting its labels, which the digest does not cover)
    turned the version's drift checks off without a word: "no reference", or every prediction
    dropped as of an unknown label, hence no drift."""
    import json

    from pipeline import model_files
    from pipeline.errors import Refusal

    files = _reference(50).write(tmp_path)
    digest = model_files.file_sha256(files["drift"])
    assert drift.read_reference(tmp_path, expected_sha256=digest, what="m v1", labels=LABELS)
    meta_path = next(p for p in files.values() if p.suffix == ".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(meta | {"labels": ["zzz", "yyy", "xxx"]}))
    with pytest.raises(Refusal, match="names other labels than the version's"):
        drift.read_reference(tmp_path, expected_sha256=digest, what="m v1", labels=LABELS)
    files["drift"].unlink()
    with pytest.raises(Refusal, match="registered with a drift reference, but"):
        drift.read_reference(tmp_path, expected_sha256=digest, what="m v1", labels=LABELS)


def test_same_distribution_is_rarely_flagged():
    """20 fresh windows from the reference's distribution at drift_p_value 0.05: about one
    false alarm is expected; more than three would contradict the documented rate."""
    ref = _reference(150, seed=100)
    flagged = []
    for seed in range(20):
        features = _sample(120, seed=seed, dims=16)
        predicted = (features[:, 0] > 0).long() + (features[:, 1] > 1).long()
        window = _window(ref, features, predicted, torch.full((120,), 0.9))
        verdict = drift.compare(ref, *window, Thresholds(p_value=0.05), seed=seed)
        assert verdict["status"] == drift.CHECKED
        flagged.append(verdict["drifted"])
    assert sum(flagged) <= 3


def test_p_values_are_uniform_enough_under_the_null():
    """Permutation p-values of same-distribution windows: about uniform, so P(p <= a) ~ a."""
    ref = _reference(100, seed=7)
    ps = []
    for seed in range(40):
        features = _sample(60, seed=1000 + seed, dims=16)
        projected, _, _ = _window(ref, features, torch.zeros(60), torch.zeros(60))
        stats = drift.permutation_tests(
            ref.embeddings,
            projected,
            ref.predicted,
            torch.zeros(60, dtype=torch.long),
            ref.confidence,
            torch.full((60,), 0.9),
            n_classes=3,
            permutations=200,
            seed=seed,
        )
        ps.append(stats["mmd_p_value"])
    assert sum(p <= 0.1 for p in ps) <= 10  # expected 4
    assert sum(p >= 0.5 for p in ps) >= 10  # expected 20


@pytest.mark.parametrize(
    ("shift", "label_of", "confidence", "reasons"),
    [
        pytest.param(3.0, None, 0.9, {"embeddings"}, id="shifted-embeddings"),
        pytest.param(0.0, 2, 0.9, {"labels"}, id="one-label-only"),
        pytest.param(0.0, None, 0.5, {"confidence"}, id="confidence-drop"),
    ],
)
def test_clear_shifts_are_flagged_with_their_reason(shift, label_of, confidence, reasons):
    ref = _reference(150)
    features = _sample(100, seed=5, dims=16) + shift
    predicted = (features[:, 0] > 0).long() + (features[:, 1] > 1).long()
    if label_of is not None:
        predicted = torch.full((100,), label_of)
    window = _window(ref, features, predicted, torch.full((100,), confidence))
    verdict = drift.compare(ref, *window, Thresholds())
    assert verdict["drifted"] is True
    assert reasons <= set(verdict["reasons"]), verdict
    assert verdict["mmd_p_value"] > 0


def test_the_strictest_p_value_the_form_allows_still_flags_a_clear_shift():
    """With drift_p_value 0.001 no test could ever fire (its smallest p-value, 1/1001, is above
    a third of it): the form's minimum is one the permutations can reach."""
    from pipeline.params import RUN_PARAMS, ParamError, validate_params

    strictest = RUN_PARAMS["drift_p_value"].minimum
    ref = _reference(150)
    features = _sample(100, seed=5, dims=16) + 5.0
    window = _window(ref, features, torch.full((100,), 2), torch.full((100,), 0.3))
    verdict = drift.compare(ref, *window, Thresholds(p_value=strictest))
    assert verdict["drifted"] is True, verdict
    with pytest.raises(ParamError, match="drift_p_value=0.001 is below the minimum"):
        validate_params({"drift_p_value": 0.001})


@pytest.mark.parametrize("n", [0, 1, 29], ids=["empty", "one", "below-min"])
def test_small_window_says_not_enough_images(n):
    ref = _reference(50)
    window = _window(ref, _sample(n, seed=1, dims=16), torch.zeros(n).long(), torch.ones(n))
    verdict = drift.compare(ref, *window, Thresholds(min_images=30))
    assert verdict["status"] == drift.NOT_ENOUGH and verdict["drifted"] is False
    assert verdict["message"].startswith("not enough images")
    assert "mmd_p_value" not in verdict


def test_label_shift_needs_its_effect_size_too():
    """A significant but small label shift below drift_label_shift is not drift."""
    ref = _reference(150)
    features = _sample(100, seed=3, dims=16)
    predicted = (features[:, 0] > 0).long() + (features[:, 1] > 1).long()
    window = _window(ref, features, predicted, torch.full((100,), 0.9))
    verdict = drift.compare(ref, *window, Thresholds(label_shift=1.0))
    assert "labels" not in verdict["reasons"]


def test_thresholds_take_the_run_params():
    from pipeline.params import validate_params

    t = Thresholds.from_params(validate_params({"drift_p_value": 0.05}))
    assert t == Thresholds(p_value=0.05)


def test_embedding_rows_are_float32_bytes():
    from types import SimpleNamespace

    records = [SimpleNamespace(image_id=i, subset="inbox") for i in (7, 9)]
    rows = drift.embedding_rows(
        records,
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        model_name="m",
        model_version=1,
        run_key=None,
        created_at=None,
    )
    assert [r[3] for r in rows] == [7, 9] and rows[0][2] == ""
    assert torch.frombuffer(bytearray(rows[1][5]), dtype=torch.float32).tolist() == [3.0, 4.0]
