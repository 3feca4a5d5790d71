"""Decoding real DICOM files to float32 modality frames.

Reference values come from an independent route: the stored integers (pydicom's
``pixel_array``) transformed by the formula the standard gives, or the same image stored
under another transfer syntax."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from app.errors import IngestRejected
from app.studies.validation import IngestLimits, inspect_instance
from tests.fixtures import dicom_corpus as corpus
from tests.fixtures.dicom_files import CANARY_BIRTH, CANARY_ID, CANARY_NAME
from workers.pipeline.decode import DecodedImage, DecodeError, decode_frames

DECODE_ERROR_CODES = {
    "no_pixel_data", "missing_transfer_syntax", "unsupported_transfer_syntax",
    "invalid_pixel_module", "decoded_size_over_budget", "decode_failed", "shape_mismatch",
    "unsupported_photometric", "invalid_palette", "invalid_modality_lut", "non_finite_pixels",
}  # fmt: skip


def _read(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _decode(name: str) -> DecodedImage:
    return decode_frames(_read(name))


def _accepted_files() -> list[tuple[Path, bytes]]:
    """Every shipped test file that ingest accepts, as the bytes ingest would store."""
    out = []
    paths = sorted({Path(p) for p in get_testdata_files() + get_charset_files()})
    for path in paths:
        if not path.is_file():
            continue
        try:
            inspected = inspect_instance(path.read_bytes(), limits=IngestLimits())
        except IngestRejected:
            continue
        out.append((path, inspected.normalized_bytes))
    return out


ACCEPTED = _accepted_files()


def test_most_shipped_images_are_accepted() -> None:
    assert len(ACCEPTED) > 100


@pytest.mark.parametrize(
    ("path", "stored"), ACCEPTED, ids=[f"{p.parent.name}/{p.name}" for p, _ in ACCEPTED]
)
def test_every_accepted_file_decodes_to_finite_frames_or_a_specific_error(
    path: Path, stored: bytes
) -> None:
    ds = pydicom.dcmread(io.BytesIO(stored))
    try:
        decoded = decode_frames(ds)
    except DecodeError as exc:
        assert exc.code in DECODE_ERROR_CODES
        return
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    assert decoded.frames.dtype == np.float32
    assert decoded.frames.shape == (frames, ds.Rows, ds.Columns)
    assert np.isfinite(decoded.frames).all()
    assert decoded.frames.flags["C_CONTIGUOUS"]
    center, width = decoded.window
    assert np.isfinite(center) and width > 0
    assert len(decoded.image_positions) == frames == len(decoded.image_orientations)


def test_the_known_corrupt_jpeg_fails_with_a_specific_code() -> None:
    # JPEG-lossy.dcm is accepted by the header checks; its entropy-coded data is damaged
    with pytest.raises(DecodeError) as caught:
        _decode("JPEG-lossy.dcm")
    assert caught.value.code == "decode_failed"


# --------------------------------------------------------------------------------------
# Modality LUT / rescale
# --------------------------------------------------------------------------------------


def test_ct_frames_are_hounsfield_units() -> None:
    ds = _read("CT_small.dcm")
    decoded = decode_frames(ds)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    assert decoded.units == "HU"
    assert decoded.modality == "CT"
    np.testing.assert_array_equal(decoded.frames[0], expected.astype(np.float32))
    assert decoded.frames.min() < -500  # air is negative HU once the intercept is applied


def test_modality_lut_sequence_is_applied() -> None:
    ds = _read("mlut_18.dcm")
    decoded = decode_frames(ds)
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = item.LUTDescriptor
    lut = (
        np.frombuffer(item.LUTData, dtype="<u2")
        if isinstance(item.LUTData, bytes)
        else (np.asarray(item.LUTData))
    )
    index = np.clip(ds.pixel_array.astype(np.int64) - first, 0, (entries or 65536) - 1)
    np.testing.assert_array_equal(decoded.frames[0], lut[index].astype(np.float32))


def test_enhanced_ct_uses_per_frame_functional_groups() -> None:
    ds = _read("eCT_Supplemental.dcm")
    decoded = decode_frames(ds)
    stored = ds.pixel_array
    for f in range(int(ds.NumberOfFrames)):
        group = ds.PerFrameFunctionalGroupsSequence[f]
        transform = group.get("PixelValueTransformationSequence") or (
            ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
        )
        slope, intercept = float(transform[0].RescaleSlope), float(transform[0].RescaleIntercept)
        np.testing.assert_array_equal(
            decoded.frames[f], (stored[f] * slope + intercept).astype(np.float32)
        )
        position = tuple(float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient)
        assert decoded.image_positions[f] == position
    assert decoded.image_positions[0] != decoded.image_positions[1]
    shared = ds.SharedFunctionalGroupsSequence[0]
    spacing = tuple(float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    assert decoded.pixel_spacing == spacing


def test_non_finite_rescale_is_refused() -> None:
    ds = corpus.ct_dataset()
    ds.RescaleSlope = 1e38
    ds.RescaleIntercept = 1e38
    with pytest.raises(DecodeError) as caught:
        decode_frames(pydicom.dcmread(io.BytesIO(corpus.to_part10(ds))))
    assert caught.value.code == "non_finite_pixels"


# --------------------------------------------------------------------------------------
# MONOCHROME1, windows
# --------------------------------------------------------------------------------------


def _mono(photometric: str, stored: np.ndarray, window: tuple[float, float]) -> Dataset:
    ds = corpus.ct_dataset()
    ds.Modality = "CR"
    ds.PhotometricInterpretation = photometric
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -100
    ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return pydicom.dcmread(io.BytesIO(corpus.to_part10(ds)))


def test_monochrome1_is_inverted_so_higher_is_brighter() -> None:
    stored = corpus.ct_pixels() % 4096
    mono1 = decode_frames(_mono("MONOCHROME1", stored, (1500.0, 800.0)))
    # the same picture stored the MONOCHROME2 way: stored values mirrored in 0..4095
    mono2 = decode_frames(_mono("MONOCHROME2", 4095 - stored, (2 * 4095 - 200 - 1500.0, 800.0)))
    np.testing.assert_array_equal(mono1.frames, mono2.frames)
    assert mono1.window == pytest.approx(mono2.window)
    assert mono1.window_source == "header"
    # range is kept: modality values of stored 0 and 4095 are -100 and 8090
    assert mono1.frames.min() >= -100 and mono1.frames.max() <= 8090


def test_monochrome1_radiograph_decodes_inverted() -> None:
    ds = _read("RG3_UNCI.dcm")  # MONOCHROME1 from pydicom-data, no rescale
    decoded = decode_frames(ds)
    lo, hi = 0, 2 ** int(ds.BitsStored) - 1
    np.testing.assert_array_equal(
        decoded.frames[0], (lo + hi - ds.pixel_array.astype(np.float64)).astype(np.float32)
    )


def test_percentile_window_when_the_header_has_none() -> None:
    ds = _read("emri_small.dcm")
    assert "WindowCenter" not in ds
    decoded = decode_frames(ds)
    low, high = np.percentile(decoded.frames, [0.5, 99.5])
    assert decoded.window_source == "percentile"
    assert decoded.window == pytest.approx(((low + high) / 2, high - low))


# --------------------------------------------------------------------------------------
# Transfer syntaxes: the same image under different encodings decodes identically
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "other"),
    [
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
        ("MR_small.dcm", "MR_small_implicit.dcm"),
        ("MR_small.dcm", "MR_small_RLE.dcm"),
        ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
        ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
        ("emri_small.dcm", "emri_small_big_endian.dcm"),
        ("emri_small.dcm", "emri_small_RLE.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm"),
        ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm"),
        ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG lossless SV1, RGB
        ("SC_rgb.dcm", "SC_rgb_rle.dcm"),
        ("SC_rgb_2frame.dcm", "SC_rgb_rle_2frame.dcm"),
        ("SC_rgb.dcm", "SC_rgb_expb.dcm"),
        ("US1_UNCR.dcm", "US1_J2KR.dcm"),  # JPEG 2000 lossless, YBR_RCT
        ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"),  # palette colour
    ],
)
def test_lossless_encodings_decode_identically(reference: str, other: str) -> None:
    a, b = _decode(reference), _decode(other)
    assert b.frames.shape == a.frames.shape
    np.testing.assert_array_equal(b.frames, a.frames)


@pytest.mark.parametrize(
    ("reference", "lossy", "tolerance"),
    [
        ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", 2.5),  # JPEG baseline, YBR_FULL
        ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cy+s2.dcm", 2.5),  # JPEG baseline, YBR_FULL_422
        ("SC_rgb.dcm", "SC_rgb_gdcm_KY.dcm", 2.5),  # JPEG 2000 lossy
        ("US1_UNCI.dcm", "US1_J2KI.dcm", 2.5),  # JPEG 2000 lossy, YBR_ICT
    ],
)
def test_lossy_encodings_decode_close_to_the_original(
    reference: str, lossy: str, tolerance: float
) -> None:
    a, b = _decode(reference), _decode(lossy)
    assert b.frames.shape == a.frames.shape
    assert float(np.abs(b.frames - a.frames).mean()) < tolerance


def test_jpeg_lossless_and_extended_decode() -> None:
    for name in ("JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG-LL.dcm", "JPGExtended.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        decoded = decode_frames(ds)
        np.testing.assert_array_equal(decoded.frames[0], ds.pixel_array.astype(np.float32))


def test_deflated_decodes_like_the_original() -> None:
    ds = _read("MR_small.dcm")
    deflated = _read("MR_small.dcm")
    deflated.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    deflated.save_as(out, enforce_file_format=True)
    stored = inspect_instance(out.getvalue(), limits=IngestLimits()).normalized_bytes
    decoded = decode_frames(pydicom.dcmread(io.BytesIO(stored)))
    np.testing.assert_array_equal(decoded.frames, decode_frames(ds).frames)


def test_encoded_by_our_own_encoders_round_trip() -> None:
    ds = corpus.ct_dataset(frames=3)
    reference = decode_frames(pydicom.dcmread(io.BytesIO(corpus.to_part10(ds)))).frames
    for syntax in (RLELossless, JPEGLSLossless):
        encoded = corpus.ct_dataset(frames=3)
        encoded.compress(syntax, generate_instance_uid=False)
        stored = inspect_instance(corpus.to_part10(encoded, syntax), limits=IngestLimits())
        decoded = decode_frames(pydicom.dcmread(io.BytesIO(stored.normalized_bytes)))
        np.testing.assert_array_equal(decoded.frames, reference)


# --------------------------------------------------------------------------------------
# Colour policy
# --------------------------------------------------------------------------------------


def test_rgb_becomes_bt601_luminance() -> None:
    ds = _read("SC_rgb.dcm")
    decoded = decode_frames(ds)
    rgb = ds.pixel_array.astype(np.float64)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(decoded.frames[0], expected, atol=1e-3)
    assert decoded.colour_policy == "bt601_luma"
    assert decoded.photometric_interpretation == "RGB"


def test_ybr_full_luminance_is_its_y_channel_and_matches_the_rgb_original() -> None:
    ds = _read("SC_ybr_full_uncompressed.dcm")
    decoded = decode_frames(ds)
    raw = pydicom.pixels.pixel_array(ds, raw=True)
    np.testing.assert_array_equal(decoded.frames[0], raw[..., 0].astype(np.float32))
    rgb = _decode("SC_rgb.dcm")
    # the encoder rounded Y to 8 bits; the RGB route weights already-rounded samples
    assert float(np.abs(decoded.frames - rgb.frames).max()) <= 2.0


def test_ybr_full_422_native_is_upsampled() -> None:
    decoded = _decode("SC_ybr_full_422_uncompressed.dcm")
    assert decoded.frames.shape == (1, 100, 100)
    assert float(np.abs(decoded.frames - _decode("SC_rgb.dcm").frames).mean()) < 1.0


def test_palette_colour_goes_through_its_lookup_tables() -> None:
    ds = _read("OBXXXX1A.dcm")
    decoded = decode_frames(ds)
    rgb = pydicom.pixels.apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_allclose(decoded.frames[0], expected, rtol=1e-6)


def test_multiframe_colour_keeps_frames_apart() -> None:
    ds = _read("SC_rgb_2frame.dcm")
    decoded = decode_frames(ds)
    assert decoded.frames.shape == (2, ds.Rows, ds.Columns)
    assert not np.array_equal(decoded.frames[0], decoded.frames[1])


# --------------------------------------------------------------------------------------
# Geometry and errors
# --------------------------------------------------------------------------------------


def test_geometry_metadata() -> None:
    ds = corpus.ct_dataset(frames=1)
    decoded = decode_frames(pydicom.dcmread(io.BytesIO(corpus.to_part10(ds))))
    assert decoded.pixel_spacing == (0.7, 0.7)
    assert decoded.pixel_spacing_source == "PixelSpacing"
    assert decoded.image_positions == ((-100.0, -100.0, 12.5),)
    assert decoded.image_orientations == ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0),)
    assert decoded.slice_thickness == 2.0
    assert decoded.window == (40.0, 400.0)


def test_imager_pixel_spacing_is_the_fallback() -> None:
    ds = corpus.ct_dataset()
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.15, 0.2]
    decoded = decode_frames(pydicom.dcmread(io.BytesIO(corpus.to_part10(ds))))
    assert decoded.pixel_spacing == (0.15, 0.2)
    assert decoded.pixel_spacing_source == "ImagerPixelSpacing"


def _stored(ds: Dataset) -> Dataset:
    return pydicom.dcmread(io.BytesIO(corpus.to_part10(ds)))


def test_errors_have_specific_codes() -> None:
    no_pixels = corpus.ct_dataset()
    del no_pixels.PixelData
    cases: list[tuple[Dataset, str, int]] = [
        (_stored(no_pixels), "no_pixel_data", 1 << 30),
        (_stored(corpus.ct_dataset()), "decoded_size_over_budget", 1000),
    ]
    short = corpus.ct_dataset()
    short.PixelData = short.PixelData[:-512]
    cases.append((_stored(short), "decode_failed", 1 << 30))
    hsv = corpus.ct_dataset()
    hsv.PhotometricInterpretation = "HSV"
    cases.append((_stored(hsv), "unsupported_photometric", 1 << 30))
    no_meta = _stored(corpus.ct_dataset())
    del no_meta.file_meta.TransferSyntaxUID
    cases.append((no_meta, "missing_transfer_syntax", 1 << 30))
    for ds, code, budget in cases:
        with pytest.raises(DecodeError) as caught:
            decode_frames(ds, max_decoded_bytes=budget)
        assert caught.value.code == code, caught.value.detail


def test_a_codec_panic_is_contained_and_other_plugins_are_tried() -> None:
    ds = pydicom.dcmread(io.BytesIO(corpus.rle_that_panics_pylibjpeg()))
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    try:
        decoder.as_array(ds, raw=True, decoding_plugin="pylibjpeg")
    except Exception:
        pytest.skip("pylibjpeg-rle now reports this input with an ordinary exception")
    except BaseException as exc:  # the Rust panic this test is about
        assert not isinstance(exc, Exception)
    else:
        pytest.skip("pylibjpeg-rle no longer fails on this input")
    decoded = decode_frames(ds)  # must neither raise the panic nor fail
    expected = decoder.as_array(ds, raw=True, decoding_plugin="pydicom")[0]
    np.testing.assert_array_equal(decoded.frames[0], expected.astype(np.float32) - 1024)


def test_decoding_never_logs_or_warns_phi(caplog: pytest.LogCaptureFixture) -> None:
    stored = [
        inspect_instance(build(), limits=IngestLimits()).normalized_bytes
        for build in corpus.ACCEPTED_ODDITIES.values()
    ]
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in stored:
            decode_frames(pydicom.dcmread(io.BytesIO(data)))
    text = "\n".join([r.getMessage() for r in caplog.records] + [str(w.message) for w in caught])
    for canary in (CANARY_NAME, CANARY_ID, CANARY_BIRTH):
        assert canary not in text


def test_rle_whose_header_lies_about_geometry_fails_to_decode() -> None:
    # RLE has no geometry of its own, so ingest cannot see this lie; decoding must refuse it
    ds = pydicom.dcmread(io.BytesIO(corpus.rle_header_lies(64, 128)))
    with pytest.raises(DecodeError) as caught:
        decode_frames(ds)
    assert caught.value.code in {"decode_failed", "shape_mismatch"}
