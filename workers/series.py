"""A stored series decoded for analysis: frames in modality units, sorted along the slice normal.

``decode_series`` reads each instance's blob, decodes its frames (pydicom + pylibjpeg codecs,
``workers.pipeline.decode``) and keeps the headers without Pixel Data: the DICOM outputs are
built from those headers (PS3.3 C.7.6.2 Image Plane geometry, the study and series identity).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from numpy.typing import NDArray

from app.db.records import InstanceRecord
from app.errors import PipelineError
from app.storage import BlobStore
from workers.pipeline.decode import decode_frames


@dataclass
class SourceFrame:
    """One frame of the series, in slice order."""

    sop_instance_uid: str
    frame: int  # 0-based frame within its instance
    dataset_index: int


@dataclass
class DecodedSeries:
    """A series decoded to modality units, frames sorted along the slice normal."""

    frames: NDArray[np.float32]  # (F, H, W)
    refs: list[SourceFrame]
    datasets: list[pydicom.Dataset]  # headers, in the same order as their first frame
    slice_spacing_mm: float | None = None  # distance between neighbouring frames, if known


def _sort_key(row: InstanceRecord) -> tuple[float, int, str]:
    position = row.slice_position if row.slice_position is not None else 0.0
    return (position, row.instance_number or 0, row.sop_instance_uid)


def decode_series(rows: list[InstanceRecord], store: BlobStore) -> DecodedSeries:
    """Decode every instance of a series, keeping the largest group of equal-shaped frames."""
    rows = sorted(rows, key=_sort_key)
    datasets: list[pydicom.Dataset] = []
    stacks: list[NDArray[np.float32]] = []
    refs: list[SourceFrame] = []
    for row in rows:
        ds = pydicom.dcmread(io.BytesIO(store.get(row.blob_sha256)))
        decoded = decode_frames(ds)
        index = len(datasets)
        if "PixelData" in ds:
            del ds.PixelData  # outputs need the header only; frees memory early
        datasets.append(ds)
        for f in range(decoded.frames.shape[0]):
            stacks.append(decoded.frames[f])
            refs.append(SourceFrame(row.sop_instance_uid, f, index))
    if not stacks:
        raise PipelineError("empty_series", "the series has no decodable frames")
    shapes = [s.shape for s in stacks]
    common = max(set(shapes), key=shapes.count)
    keep = [i for i, s in enumerate(shapes) if s == common]
    frames = np.stack([stacks[i] for i in keep]).astype(np.float32, copy=False)
    kept_refs = [refs[i] for i in keep]
    positions = [rows[r.dataset_index].slice_position for r in kept_refs if r.frame == 0]
    return DecodedSeries(
        frames=frames,
        refs=kept_refs,
        datasets=datasets,
        slice_spacing_mm=slice_spacing(positions, datasets[kept_refs[0].dataset_index]),
    )


def slice_spacing(positions: list[float | None], header: pydicom.Dataset) -> float | None:
    """Distance between neighbouring frames along the slice normal, in mm.

    The median step between the distinct positions of single-frame instances (their Image
    Position projected on the normal, PS3.3 C.7.6.2.1.1); for a single frame or a multi-frame
    instance, Spacing Between Slices (0018,0088), else Slice Thickness (0018,0050); else None.
    """
    known = sorted({p for p in positions if p is not None})
    if len(known) >= 2 and len(known) == len(positions):
        step = float(np.median(np.diff(known)))
        if step > 0:
            return step
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        try:  # a malformed DS raises on access already, not only in float()
            value = float(header.get(keyword) or 0)
        except (TypeError, ValueError, OverflowError):
            continue
        if value > 0:
            return value
    return None
