"""Parametric Map of a saliency (or uncertainty) map, pixel-aligned with the source images.

PS3.3 A.75 (Parametric Map IOD), built with :class:`highdicom.pm.ParametricMap`. Stored
values are float32 (Float Pixel Data) and map 1:1 to real-world values through a Real World
Value Mapping (PS3.3 C.7.6.16.2.11) with unit "no units" and, where DICOM has one, a
quantity code from CID 7180.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from workers.outputs.dicom_common import (
    MANUFACTURER,
    NOT_FOR_CLINICAL_USE,
    PMAP_SERIES_NUMBER,
    check_frame_array,
    drop_acquisition_equipment,
    new_uid,
    series_description,
)

# Quantity Definition (CID 7180) per saliency method. DICOM has no concept for per-pixel
# predictive entropy, so that map carries no quantity code rather than a made-up one.
_QUANTITIES: dict[str, Code | None] = {
    "cam": codes.DCM.ClassActivation,  # (130402, DCM, "Class activation")
    "gradcam": codes.DCM.GradientWeightedClassActivation,  # (130403, DCM)
    "occlusion": codes.DCM.Saliency,  # (130404, DCM, "Saliency")
    "rise": codes.DCM.Saliency,
    "entropy": None,
    "tta_std": codes.SCT.StandardDeviation,  # (386136009, SCT, "Standard Deviation")
}

_EXPLANATIONS: dict[str, str] = {
    "cam": "class activation map",
    "gradcam": "gradient-weighted class activation map",
    "occlusion": "occlusion sensitivity",
    "rise": "RISE saliency",
    "entropy": "per-pixel predictive entropy",
    "tta_std": "largest std of any class probability over flips",
}


def real_world_value_mapping(
    method: str, model_name: str, model_version: str, value_range: tuple[float, float]
) -> hd.pm.RealWorldValueMapping:
    """The identity Real World Value Mapping of one saliency method's float values.

    LUT Label (SH, 16 chars) is the method name in upper case; LUT Explanation (LO) names
    the method and the model.
    """
    low, high = float(value_range[0]), float(value_range[1])
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"value_range must be finite with low < high, got {value_range!r}")
    what = _EXPLANATIONS.get(method, f"{method} saliency")
    return hd.pm.RealWorldValueMapping(
        lut_label=method.upper()[:16],
        lut_explanation=f"{what}, {model_name} {model_version}"[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(low, high),  # floats: stored values are floating point
        slope=1.0,
        intercept=0.0,
        quantity_definition=_QUANTITIES.get(method, codes.DCM.Saliency),
    )


def build_parametric_map(
    source_datasets: Sequence[pydicom.Dataset],
    maps: np.ndarray,
    *,
    method: str,
    model_name: str,
    model_version: str,
    value_range: tuple[float, float],
    series_number: int = PMAP_SERIES_NUMBER,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> pydicom.Dataset:
    """Build a Parametric Map of a saliency method's maps.

    Parameters
    ----------
    source_datasets:
        The images the maps explain: single-frame images of one series (any order) or
        exactly one multi-frame image.
    maps:
        float32, shape (F, H, W), finite: axis 0 follows ``source_datasets`` (or the
        frames of the multi-frame source in frame-number order), H, W are the source Rows
        and Columns — the same pixel grid as the source.
    method:
        Saliency method name as in the manifest (``cam``, ``occlusion``, ``rise``,
        ``entropy``, ``tta_std``); selects the quantity code and the LUT label.
    model_name, model_version:
        The model whose output is explained.
    value_range:
        (low, high) of the real-world values, e.g. the manifest's saliency
        ``display_range``; it is the range the value mapping covers and the default
        display window.
    series_number, instance_number, series_instance_uid, sop_instance_uid:
        Identity of the new series and instance; UIDs default to fresh random ones.

    Returns
    -------
    pydicom.Dataset
        A Parametric Map instance (SOP Class 1.2.840.10008.5.1.4.1.1.30) in a new series
        of the source study. highdicom sorts the frames along the slice normal; each frame
        keeps the plane position of, and a derivation reference to, its source image.
    """
    maps = np.asarray(maps)
    if maps.dtype != np.float32:
        raise ValueError(f"maps must be float32, got {maps.dtype}")
    check_frame_array(maps, source_datasets, name="maps")
    if not np.all(np.isfinite(maps)):
        raise ValueError("maps contain NaN or infinite values")
    mapping = real_world_value_mapping(method, model_name, model_version, value_range)
    low, high = float(value_range[0]), float(value_range[1])

    pmap = hd.pm.ParametricMap(
        source_images=list(source_datasets),
        pixel_array=maps,
        series_instance_uid=series_instance_uid or new_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or new_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name,
        software_versions=model_version,
        device_serial_number=f"{model_name}:{model_version}",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[
            # One-item lists: highdicom 0.28 splits a plain explanation string into
            # characters, a list keeps it whole.
            hd.VOILUTTransformation(
                window_center=[(low + high) / 2.0],
                window_width=[high - low],
                window_explanation=[f"{method} display range"],
            )
        ],
        series_description=series_description(f"PM {method}", model_name, model_version),
        content_label=method.upper()[:16],
        content_description=NOT_FOR_CLINICAL_USE,
    )
    # General Series Laterality (0020,0060) is Type 2C: required, possibly empty, when the
    # body part is paired and no Image/Frame Laterality is present. highdicom leaves it
    # out and dciodvfy flags its absence, so carry the source series' value over (the map
    # shows the same body part) or say "unknown" with an empty value.
    pmap.Laterality = str(source_datasets[0].get("Laterality", "") or "")
    drop_acquisition_equipment(pmap)
    return pmap
