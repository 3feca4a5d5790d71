"""DICOM Segmentation (BINARY) from a segmentation model's label map.

PS3.3 A.51 (Segmentation IOD), built with :class:`highdicom.seg.Segmentation`.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom

from app.registry.manifest import Label
from workers.outputs.dicom_common import (
    MANUFACTURER,
    NOT_FOR_CLINICAL_USE,
    SEG_SERIES_NUMBER,
    algorithm_identification,
    check_frame_array,
    drop_acquisition_equipment,
    label_codes,
    new_uid,
    series_description,
    sort_by_position,
)

# Label value 0 is the background class of every medcad segmentation model (argmax class 0):
# it is the absence of a segment, not a segment (PS3.3 C.8.20.2.3).
BACKGROUND_VALUE = 0


def segment_labels(labels: Sequence[Label]) -> list[Label]:
    """The labels that become segments, in segment-number order (1, 2, ...).

    Background (value 0) is dropped; the rest are ordered by label value, so segment
    number ``i`` describes the ``i``-th smallest non-background label value.
    """
    return sorted((lab for lab in labels if lab.value != BACKGROUND_VALUE), key=lambda x: x.value)


def build_segmentation(
    source_datasets: Sequence[pydicom.Dataset],
    label_maps: np.ndarray,
    labels: Sequence[Label],
    *,
    model_name: str,
    model_version: str,
    series_number: int = SEG_SERIES_NUMBER,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> pydicom.Dataset:
    """Build a BINARY DICOM Segmentation of a label map, one segment per non-background label.

    Parameters
    ----------
    source_datasets:
        The images the label map was computed on: single-frame images of one series
        (any order) or exactly one multi-frame image. Pixel data is not needed.
    label_maps:
        uint8, shape (F, H, W): axis 0 follows ``source_datasets`` (one frame per
        single-frame instance, or the frames of the multi-frame instance in frame-number
        order); H, W are the source Rows and Columns (source pixel geometry, no resampling).
        Each pixel holds a manifest label value; 0 is background.
    labels:
        The model's manifest labels. Every value present in ``label_maps`` must be one of
        them.
    model_name, model_version:
        The model, recorded as the segmentation algorithm (PS3.3 C.8.20.2, CID 7162).
    series_number, instance_number, series_instance_uid, sop_instance_uid:
        Identity of the new series and instance; UIDs default to fresh random ones.

    Returns
    -------
    pydicom.Dataset
        A Segmentation instance (SOP Class 1.2.840.10008.5.1.4.1.1.66.4) in a new series of
        the source study. highdicom sorts the frames along the slice normal and gives each
        one its Plane Position (Patient) and a Derivation Image reference to its source
        image (and frame), so the frame order of the input does not matter.

    Notes
    -----
    Empty frames are omitted (``omit_empty_frames``), the usual choice for sparse masks:
    a segment that is absent everywhere keeps its Segment Sequence item but has no frames,
    which tells a reader "searched for, not found". A Segmentation needs at least one
    frame, so when the whole label map is background the object holds one all-zero frame
    per segment, on the first source slice along the normal (or on every frame of a
    multi-frame source), and still references all source images.
    """
    label_maps = np.asarray(label_maps)
    if label_maps.dtype != np.uint8:
        raise ValueError(f"label_maps must be uint8, got {label_maps.dtype}")
    check_frame_array(label_maps, source_datasets, name="label_maps")

    described = segment_labels(labels)
    if not described:
        raise ValueError("labels have no non-background label to segment")
    # Segment numbers must run 1..S (PS3.3 C.8.20.2.3) while label values need not be
    # contiguous: a 256-entry table maps each label value to its segment number. highdicom
    # takes such a label map (F, H, W) directly and splits it into one binary frame per
    # segment and slice itself; it then needs no overlap check, which on a stacked
    # (F, H, W, S) layout was a strided sum over the whole volume.
    numbers = np.zeros(256, dtype=np.uint8)
    for number, lab in enumerate(described, start=1):
        numbers[lab.value] = number
    segments = numbers[label_maps]
    # a pixel without a segment number must be background; anything else is not a label
    stray = (segments == 0) & (label_maps != BACKGROUND_VALUE)
    if stray.any():
        unknown = sorted(np.unique(label_maps[stray]).tolist())
        raise ValueError(f"label_maps contain values {unknown} that are not manifest labels")

    algorithm = algorithm_identification(model_name, model_version)
    descriptions = []
    for number, label in enumerate(described, start=1):
        category, prop_type = label_codes(label)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label.name,
                segmented_property_category=category,
                segmented_property_type=prop_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=(
                    hd.color.CIELabColor.from_rgb(*label.color) if label.color is not None else None
                ),
            )
        )

    sources, further = list(source_datasets), []
    if not segments.any() and len(sources) > 1:
        # Nothing found anywhere: highdicom then encodes every (slice, segment) frame,
        # which for a long series is megabytes of zeros. Anchor the object on the first
        # slice along the normal instead (one empty frame per segment) and still reference
        # every slice as a source image.
        first = sort_by_position(sources)[0]
        further = sources[:first] + sources[first + 1 :]
        sources, segments = [sources[first]], segments[first : first + 1]

    seg = hd.seg.Segmentation(
        source_images=sources,
        further_source_images=further or None,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or new_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or new_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        device_serial_number=f"{model_name}:{model_version}",
        series_description=series_description("SEG", model_name, model_version),
        content_label="AI_SEGMENTATION",
        content_description=NOT_FOR_CLINICAL_USE,
        omit_empty_frames=True,
    )
    drop_acquisition_equipment(seg)
    return seg
