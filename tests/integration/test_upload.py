"""Uploading a local tree (and the demo digits) to the real S3 endpoint."""

from __future__ import annotations

import hashlib

from pipeline import catalog, demo_data, upload


def test_demo_digits_are_deterministic_and_laid_out(tmp_path):
    a = demo_data.render_digits(tmp_path / "a", size=16, fmt="png", inbox=3, per_label=5)
    b = demo_data.render_digits(tmp_path / "b", size=16, fmt="png", inbox=3, per_label=5)
    assert (a["train"], a["test"], a["inbox"]) == (40, 10, 3)
    assert {k: v for k, v in a.items() if k != "out_dir"} == {
        k: v for k, v in b.items() if k != "out_dir"
    }
    assert a["labels"] == list(demo_data.DIGIT_NAMES)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert files_a == files_b and len(files_a) == 53
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert {p.parts[0] for p in files_a} == {"train", "test", "inbox"}
    assert all(p.parts[1] in demo_data.DIGIT_NAMES for p in files_a if p.parts[0] != "inbox")
    for label in demo_data.DIGIT_NAMES:
        assert a["counts"]["test"][label] == 1 and a["counts"]["train"][label] == 4


def test_upload_skips_unchanged_files_and_scan_accepts_the_result(tmp_path, store, db):
    local = tmp_path / "digits"
    demo_data.render_digits(local, size=24, fmt="jpeg", inbox=2, per_label=3)
    puts: list[str] = []
    put_bytes = store.put_bytes

    def recorded(key: str, data: bytes, **options) -> str:
        puts.append(key)
        return put_bytes(key, data, **options)

    store.put_bytes = recorded
    first = upload.upload_tree(store, local, "sets/digits", workers=4)
    assert first == {"files": 32, "uploaded": 32, "skipped": 0, "not_utf8": []}
    assert len(puts) == 32

    again = upload.upload_tree(store, local, "sets/digits/", workers=4)
    assert again == {"files": 32, "uploaded": 0, "skipped": 32, "not_utf8": []}
    assert len(puts) == 32

    changed = (
        local
        / "train"
        / "zero"
        / next(iter(sorted(p.name for p in (local / "train" / "zero").iterdir())))
    )
    changed.write_bytes(changed.read_bytes() + b"\0")
    third = upload.upload_tree(store, local, "sets/digits", workers=4)
    assert third["uploaded"] == 1 and puts[-1] == f"sets/digits/train/zero/{changed.name}"
    obj = store.head(puts[-1])
    assert obj.etag == hashlib.md5(changed.read_bytes()).hexdigest()

    summary = catalog.scan(db, store, "sets/digits", val_percent=0)
    assert summary["ok"] == 32 and summary["rejected"] == 0
    assert summary["counts"]["train"]["seven"] == 2 and summary["inbox"] == 2


def test_files_whose_names_are_not_utf8_are_left_out_and_listed(tmp_path, store):
    """A Latin-1 name from an old archive: the other files are uploaded, this one is named."""
    import os

    local = tmp_path / "tree"
    (local / "train" / "cat").mkdir(parents=True)
    (local / "train" / "cat" / "ok.png").write_bytes(b"fine")
    latin1 = os.fsencode(local / "train" / "cat") + b"/caf\xe9.png"
    with open(latin1, "wb") as f:
        f.write(b"data")
    result = upload.upload_tree(store, local, "names", workers=2)
    assert (result["files"], result["uploaded"]) == (2, 1)
    assert result["not_utf8"] == [ascii("train/cat/caf\udce9.png")]
    assert [o.key for o in store.iter_objects("names/")] == ["names/train/cat/ok.png"]


def test_objects_whose_etag_is_no_md5_are_compared_not_rewritten(tmp_path, store):
    """An object another tool uploaded in parts (ETag `<md5 of md5s>-2`; SSE-KMS ETags are no
    MD5 either) holding the file's bytes is left alone: rewriting it would give it a new ETag,
    and the next scan a new dataset version to train on. Same size, other bytes: uploaded."""
    import io
    import random

    local = tmp_path / "tree"
    (local / "train" / "a").mkdir(parents=True)
    big = random.Random(7).randbytes(6 * 1024 * 1024)  # over the 5 MiB minimum part size
    (local / "train" / "a" / "big.png").write_bytes(big)
    (local / "train" / "a" / "other.png").write_bytes(big)
    for name, data in (("big.png", big), ("other.png", big[::-1])):
        store.minio.put_object(
            store.bucket,
            f"parts/train/a/{name}",
            io.BytesIO(data),
            len(data),
            part_size=5 * 1024 * 1024,
        )
    before = store.head("parts/train/a/big.png").etag
    assert before.endswith("-2")

    result = upload.upload_tree(store, local, "parts", workers=2)
    assert result == {"files": 2, "uploaded": 1, "skipped": 1, "not_utf8": []}
    assert store.head("parts/train/a/big.png").etag == before
    assert store.get_bytes("parts/train/a/other.png") == big


def test_cli_demo_data_upload_migrate_and_scan(tmp_path, store, db, monkeypatch, capsys):
    from pipeline.__main__ import main

    monkeypatch.setenv("MYSQL_DATABASE", db.name)
    monkeypatch.setenv("S3_BUCKET", store.bucket)
    monkeypatch.setenv("S3_PREFIX", "cli/digits")
    out = tmp_path / "demo"
    assert main(["demo-data", str(out), "--size", "16", "--inbox", "2", "--per-label", "3"]) == 0
    assert main(["upload", str(out), "--workers", "4"]) == 0
    assert "32 uploaded, 0 skipped" in capsys.readouterr().out
    assert main(["migrate"]) == 0
    assert "schema is up to date" in capsys.readouterr().out
    assert main(["scan", "--val-percent", "0", "--leakage-policy", "keep"]) == 0
    printed = capsys.readouterr().out
    version = catalog.latest_dataset(db, store.bucket, "cli/digits")["dataset_version"]
    assert f"dataset_version  {version}  (changed: True)" in printed
    assert "seven" in printed and "GETs" in printed
