"""What the pipeline takes from the registry: its own versions only, weights checked by digest;
and the standard pyfunc model users load by alias (real MySQL, S3 and MLflow)."""

from __future__ import annotations

import json
import logging

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline import catalog, model_files, registry, train
from pipeline.data import EvalPreset
from pipeline.demo_data import render_digits
from pipeline.errors import Refusal
from pipeline.model import predict
from pipeline.store import ObjectStore
from pipeline.train_plan import TrainParams
from pipeline.upload import upload_tree

TINY = TrainParams(epochs=1, batch_size=16, image_size=32, num_workers=0, augment=False)


@pytest.fixture
def trained(db, store, mlflow_names, tmp_path):
    """A digits dataset and one version trained on it by the pipeline: (dataset, version)."""
    render_digits(tmp_path / "digits", size=32, per_label=5, inbox=0)
    upload_tree(store, tmp_path / "digits", "ds")
    dataset = catalog.scan(db, store, "ds", val_percent=30)["dataset_version"]
    result = train.train_model(
        db,
        store,
        dataset,
        TINY,
        model_name=mlflow_names["model_name"],
        run_key="manual__own",
        cache_dir=tmp_path / "cache",
        checkpoint_store=train.LocalCheckpointStore(tmp_path / "ckpt"),
    )
    return dataset, result["model_version"]


def loaded_label_map(tags: dict[str, str]) -> dict[str, int]:
    return json.loads(tags["label_map"])


def _gate(db, store, name, version, cache_dir, **kwargs):
    return registry.promote(
        db,
        store,
        name,
        version,
        min_accuracy=0.0,
        promotion_margin=1.0,
        actor="pytest",
        cache_dir=cache_dir,
        **kwargs,
    )


def test_only_the_pipelines_own_versions_are_gated_unless_a_person_names_one(
    trained, db, store, mlflow_names, tmp_path, caplog
):
    name = mlflow_names["model_name"]
    dataset, own = trained
    # Never gated (as when its run's gate failed for good): a later run that skips training on
    # its dataset gates it, as does the gate run alone.
    assert registry.version_to_gate(db, name, run_key="next", dataset_version=dataset) == own
    assert registry.version_to_gate(db, name, run_key="alone", dataset_version=None) == own
    assert _gate(db, store, name, own, tmp_path / "c1")["decision"] == "promoted"
    assert registry.version_to_gate(db, name, run_key="next", dataset_version=dataset) is None

    # Logged and registered from a notebook's run in another experiment, with the pipeline's
    # own file format and every tag (a colleague, another job, an attacker with MLflow access).
    model = registry.load_model(name, own, cache_dir=tmp_path / "c1")
    tags = registry.version_tags(name, own)
    notebook = mlflow.set_experiment(f"{name}-notebook").experiment_id
    try:
        registered = []
        for run_key in ("notebook", "scheduled__2099-01-01T00:00:00+00:00"):
            with mlflow.start_run(experiment_id=notebook):
                registered.append(
                    train.log_and_register(
                        model.module,
                        model_name=name,
                        label_map=loaded_label_map(tags),
                        image_size=model.image_size,
                        dataset_version=tags["dataset_version"],
                        run_key=run_key,
                    )
                )
    finally:
        MlflowClient().delete_experiment(notebook)
    foreign, future = registered

    # The nightly gate's fallback skips them, naming them; a future run does not "reuse" one.
    with caplog.at_level(logging.WARNING, logger="pipeline.registry"):
        assert registry.newest_ungated_version(db, name) is None
        assert registry.version_to_gate(db, name, run_key="next", dataset_version=dataset) is None
        assert (
            registry.find_version_by_run_key(name, "scheduled__2099-01-01T00:00:00+00:00") is None
        )
    assert f"ignoring {name} v{foreign}: not registered by this pipeline" in caplog.text
    assert f"ignoring {name} v{future}: not registered by this pipeline" in caplog.text
    assert registry.find_version_by_run_key(name, "manual__own") == own

    # Handed to the gate without intent: refused before anything is loaded; champion stays.
    cache = tmp_path / "c2"
    with pytest.raises(Refusal, match=f"v{foreign} was not registered by this pipeline"):
        _gate(db, store, name, foreign, cache)
    assert not (cache / "models").exists()
    assert registry.resolve_model_version(name) == own

    # A person names it (`promote --model-version N`): gated, and the decision says so.
    decision = _gate(db, store, name, foreign, cache, explicit=True)
    assert decision["decision"] == "promoted"
    assert decision["reason"].startswith("explicit promotion of a version from outside")
    assert registry.resolve_model_version(name) == str(foreign)


def _weights_key(settings, name: str, version: str) -> tuple[ObjectStore, str]:
    """Where the artifact store holds `version`'s weights file."""
    model_id = MlflowClient().get_model_version(name, version).source.removeprefix("models:/")
    artifacts = ObjectStore(settings.s3, settings.mlflow_artifact_bucket)
    keys = [
        o.key
        for o in artifacts.iter_objects("")
        if model_id in o.key and o.key.endswith(model_files.WEIGHTS_FILE)
    ]
    assert len(keys) == 1, keys
    return artifacts, keys[0]


def test_weights_altered_after_registration_are_refused_naming_the_version(
    trained, settings, mlflow_names, tmp_path
):
    name = mlflow_names["model_name"]
    _, version = trained
    loaded = registry.load_model(name, version, cache_dir=tmp_path / "c1")
    assert isinstance(loaded.module, torch.nn.Module)

    artifacts, key = _weights_key(settings, name, version)
    original = artifacts.get_bytes(key)
    tampered = bytearray(original)
    tampered[-64:] = bytes(64)  # zero the tail of the last tensor: still a valid file
    artifacts.put_bytes(key, bytes(tampered))
    with pytest.raises(Refusal, match=f"{name} v{version}: weights.safetensors has SHA-256"):
        registry.load_model(name, version, cache_dir=tmp_path / "c2")

    # The local cache is checked too: a copy altered there is never used. It is downloaded
    # again, and refused when the artifact store's copy does not match either.
    local = model_files.find_file(
        tmp_path / "c1" / "models" / registry.safe_name(name) / version, model_files.WEIGHTS_FILE
    )
    local.write_bytes(bytes(tampered))
    with pytest.raises(Refusal, match="altered after registration"):
        registry.load_model(name, version, cache_dir=tmp_path / "c1")
    artifacts.put_bytes(key, original)
    local.write_bytes(bytes(tampered))
    registry.load_model(name, version, cache_dir=tmp_path / "c1")
    assert local.read_bytes() == original


def test_the_pyfunc_model_loads_by_alias_and_agrees_with_the_pipelines_scorer(
    trained, db, store, mlflow_names, tmp_path
):
    name = mlflow_names["model_name"]
    dataset, version = trained
    _gate(db, store, name, version, tmp_path / "c1")
    loaded = registry.load_model(name, "champion", cache_dir=tmp_path / "c1")
    records = catalog.dataset_images(db, dataset, ["test"])[:7]
    preset = EvalPreset(loaded.image_size)
    batch = torch.stack([preset.from_bytes(store.get_bytes(r.object_key)) for r in records])
    assert batch.dtype == torch.uint8
    ours = predict(loaded.module, batch, loaded.labels)

    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    inputs = (batch.float() / 255).numpy()  # the pyfunc's input: float RGB in [0, 1]
    for size in (1, 3, len(records)):  # any batch size
        logits = np.concatenate(
            [pyfunc.predict(inputs[i : i + size]) for i in range(0, len(inputs), size)]
        )
        assert logits.shape == (len(records), len(loaded.labels))
        assert [loaded.labels[i] for i in logits.argmax(1)] == [p.label for p in ours]
