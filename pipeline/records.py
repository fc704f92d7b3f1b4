"""Small record types shared by the catalog stage and the torch side (data, training, scoring)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageRecord:
    """One member of a dataset version, as training and scoring need it."""

    image_id: int
    bucket: str
    object_key: str
    etag: str
    subset: str
    label: str | None
    size: int | None = None  # bytes, as catalogued (checks cached copies)
