"""Findings SR builder (Comprehensive 3D SR, TID 1500): content and IOD validity."""

from __future__ import annotations

import io

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from tests.helpers.dciodvfy import dciodvfy_errors, dciodvfy_report
from workers.outputs.dicom_common import NOT_FOR_CLINICAL_USE, Finding, encode
from workers.outputs.dicom_sr import ModelFindings, build_findings_sr, build_report_sr

MODEL = {"model_name": "nodule-cls", "model_version": "0.3.1"}


def reread(dataset: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(encode(dataset)))


def slice_findings(sources: list[pydicom.Dataset]) -> list[Finding]:
    """Per-slice findings with distinct probabilities, then the series aggregate."""
    findings = [
        Finding(
            label="nodule",
            probability=round(0.05 + 0.13 * i, 4),
            positive=0.05 + 0.13 * i >= 0.5,
            sop_instance_uid=str(ds.SOPInstanceUID),
            frame=None,
            level="slice",
            uncertain=0.2 <= 0.05 + 0.13 * i <= 0.8,
        )
        for i, ds in enumerate(sources)
    ]
    top = max(f.probability for f in findings)
    findings.append(Finding("nodule", top, True, None, None, "series", False))
    return findings


def content_items(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    return list(item.get("ContentSequence", []))


def text_values(group: pydicom.Dataset) -> dict[str, str]:
    """TEXT items of a measurement group, by concept code value."""
    return {
        child.ConceptNameCodeSequence[0].CodeValue: child.TextValue
        for child in content_items(group)
        if child.ValueType == "TEXT"
    }


def measurement_groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    (imaging_measurements,) = [
        item
        for item in content_items(sr)
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"  # Imaging Measurements
    ]
    return content_items(imaging_measurements)


def test_sr_fields(ct_series_factory, labels, identity, site_values):
    sources = ct_series_factory(
        orientation=(-1, 0, 0, 0, -1, 0), upload_order=[5, 2, 0, 6, 3, 1, 4]
    )
    findings = slice_findings(sources)
    sr = reread(
        build_findings_sr(
            sources, findings, labels=labels, series_number=12, instance_number=2, **MODEL
        )
    )

    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.Modality == "SR"
    assert sr.Manufacturer == "medcad"
    assert NOT_FOR_CLINICAL_USE in sr.SeriesDescription
    assert (sr.SeriesNumber, sr.InstanceNumber) == (12, 2)
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    for key, value in identity.items():
        assert str(sr[key].value) == value, key
    strings = [str(e.value) for e in sr.iterall() if e.VR in {"LO", "SH", "PN", "ST", "LT"}]
    for value in site_values:
        assert value not in strings
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in sources}

    (procedure,) = [
        item
        for item in content_items(sr)
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
    ]
    assert procedure.ConceptCodeSequence[0].CodeValue == "25045-6"  # CT unspecified body region
    device_name = [
        item.TextValue
        for item in content_items(sr)
        if item.ConceptNameCodeSequence[0].CodeValue == "121013"  # Device Observer Name
    ]
    assert device_name == ["nodule-cls 0.3.1"]

    # Read back with highdicom's TID 1500 parser.
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    assert len(report.get_observer_contexts(observer_type=codes.DCM.Device)) == 1
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(findings)
    raw_groups = measurement_groups(sr)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for finding, group, raw in zip(findings, groups, raw_groups, strict=True):
        assert group.finding_type == codes.SCT.Nodule  # fallback code for "nodule"
        (probability,) = group.get_measurements(name=codes.DCM.Probability)
        assert probability.value == pytest.approx(finding.probability)
        assert probability.unit == codes.UCUM.NoUnits
        presence = group.get_qualitative_evaluations(name=codes.SCT.Nodule)
        assert [e.value for e in presence] == [
            codes.SCT.Present if finding.positive else codes.SCT.Absent
        ]
        certainty = group.get_qualitative_evaluations(name=codes.DCM.CertaintyOfFinding)
        assert [e.value for e in certainty] == ([codes.SCT.Uncertain] if finding.uncertain else [])
        # Algorithm identification on the group: model name and version.
        assert text_values(raw)["111001"] == "nodule-cls"
        assert text_values(raw)["111003"] == "0.3.1"
        referenced = [str(s.referenced_sop_instance_uid) for s in group.source_images]
        if finding.level == "slice":
            assert referenced == [finding.sop_instance_uid]
            assert (
                group.source_images[0].referenced_sop_class_uid == by_uid[referenced[0]].SOPClassUID
            )
        else:  # about every image of the evidence, naming none
            assert referenced == []
    assert len({g.tracking_uid for g in groups}) == len(groups)
    # The measurement itself names the algorithm too (TID 300 row "Algorithm Name").
    measurement = next(c for c in content_items(raw_groups[0]) if c.ValueType == "NUM")
    assert text_values(measurement)["111001"] == "nodule-cls"


def test_sr_uses_manifest_codes(ct_series, labels):
    lung = labels[1]  # carries a SNOMED CT "Lung" type code in the manifest
    finding = Finding(lung.name, 0.9, True, str(ct_series[2].SOPInstanceUID), None, "slice", False)
    sr = reread(build_findings_sr(ct_series, [finding], labels=labels, **MODEL))
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    assert group.finding_type.value == "39607008"
    assert group.finding_type.scheme_designator == "SCT"


@pytest.mark.parametrize("source", ["generated", "ct_small", "enhanced_ct"])
def test_sr_is_valid(source, ct_series, ct_small, request, labels):
    if source == "generated":
        sources = ct_series
        findings = slice_findings(sources)
    elif source == "ct_small":
        sources = [ct_small]
        findings = [
            Finding("nodule", 0.31, False, str(ct_small.SOPInstanceUID), None, "slice", True),
            Finding("nodule", 0.31, False, None, None, "series", True),
        ]
    else:
        enhanced = request.getfixturevalue("enhanced_ct")
        sources = [enhanced]
        findings = [
            Finding("nodule", 0.8, True, str(enhanced.SOPInstanceUID), 2, "slice", False),
            Finding("nodule", 0.8, True, None, None, "series", False),
        ]
    sr = build_findings_sr(sources, findings, labels=labels, **MODEL)

    assert dciodvfy_errors(sr) == []
    assert dciodvfy_report(sr).splitlines()[0] == "Comprehensive3DSR"


def test_sr_references_the_frame_of_a_multiframe_source(enhanced_ct, labels):
    uid = str(enhanced_ct.SOPInstanceUID)
    findings = [
        Finding("nodule", 0.2, False, uid, 1, "slice", False),
        Finding("nodule", 0.7, True, uid, 2, "slice", True),
        Finding("nodule", 0.7, True, None, None, "series", False),
    ]
    sr = reread(build_findings_sr([enhanced_ct], findings, labels=labels, **MODEL))
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    frames = [
        [list(s.referenced_frame_numbers or []) for s in group.source_images] for group in groups
    ]
    assert frames == [[[1]], [[2]], []]


@pytest.mark.parametrize(
    ("finding", "message"),
    [
        (Finding("nodule", 0.5, True, "1.2.3.4", None, "slice", False), "not among the sources"),
        (Finding("nodule", 0.5, True, None, None, "series", False), None),
    ],
)
def test_sr_rejects_unknown_instances(ct_series, finding, message):
    if message is None:
        assert build_findings_sr(ct_series, [finding], **MODEL) is not None
    else:
        with pytest.raises(ValueError, match=message):
            build_findings_sr(ct_series, [finding], **MODEL)


def test_finding_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="probability"):
        Finding("nodule", 1.5, True, None, None, "series", False)
    with pytest.raises(ValueError, match="sop_instance_uid"):
        Finding("nodule", 0.5, True, None, None, "slice", False)
    with pytest.raises(ValueError, match="must not name"):
        Finding("nodule", 0.5, True, "1.2.3", None, "series", False)
    with pytest.raises(ValueError, match="1-based"):
        Finding("nodule", 0.5, True, "1.2.3", 0, "slice", False)


def test_sr_rejects_a_frame_on_a_single_frame_source(ct_series):
    finding = Finding("nodule", 0.5, True, str(ct_series[0].SOPInstanceUID), 3, "slice", False)
    with pytest.raises(ValueError, match="one frame"):
        build_findings_sr(ct_series, [finding], **MODEL)


def test_lesion_groups_carry_volume_peak_probability_and_the_slices_spanned(ct_series, labels):
    spanned = [str(ds.SOPInstanceUID) for ds in ct_series[2:5]]
    lesions = [
        Finding("nodule", 0.97, True, spanned[1], None, "lesion", False, number=1,
                volume_mm3=812.5, extent=tuple((uid, None) for uid in spanned)),
        Finding("nodule", 0.55, True, spanned[0], None, "lesion", True, number=2,
                volume_mm3=None, extent=((spanned[0], None),)),
    ]
    sr = reread(build_findings_sr(ct_series, lesions, labels=labels, **MODEL))
    assert dciodvfy_errors(sr) == []
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["nodule 1", "nodule 2"]
    first, second = groups
    (probability,) = first.get_measurements(name=codes.DCM.Probability)
    assert probability.value == pytest.approx(0.97) and probability.derivation == codes.SCT.Maximum
    (volume,) = first.get_measurements(name=codes.SCT.Volume)
    assert volume.value == pytest.approx(812.5) and volume.unit == codes.UCUM.CubicMillimeter
    assert [str(s.referenced_sop_instance_uid) for s in first.source_images] == spanned
    assert second.get_measurements(name=codes.SCT.Volume) == []  # unknown geometry
    certainty = second.get_qualitative_evaluations(name=codes.DCM.CertaintyOfFinding)
    assert [e.value for e in certainty] == [codes.SCT.Uncertain]


def test_absent_structure_is_a_series_group_without_a_probability(ct_series, labels):
    absent = Finding("nodule", None, False, None, None, "series", False)
    sr = reread(build_findings_sr(ct_series, [absent], labels=labels, **MODEL))
    assert dciodvfy_errors(sr) == []
    (group,) = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    assert group.get_measurements() == []
    presence = group.get_qualitative_evaluations(name=codes.SCT.Nodule)
    assert [e.value for e in presence] == [codes.SCT.Absent]
    assert group.source_images == []  # the whole series: the evidence and the Image Library


def test_lesion_findings_need_their_number_and_extent():
    with pytest.raises(ValueError, match="number and its extent"):
        Finding("nodule", 0.9, True, "1.2.3", None, "lesion", False)


def test_one_report_holds_every_models_findings_each_naming_its_algorithm(ct_series, labels):
    uid = str(ct_series[1].SOPInstanceUID)
    parts = [
        ModelFindings("unet", "1.0.0", [Finding(
            "nodule", 0.99, True, uid, None, "lesion", False, number=1, volume_mm3=300.0,
            extent=((uid, None),))], labels),
        ModelFindings("segnet", "1.0.0", [Finding("nodule", None, False, None, None, "series", False)]),
        ModelFindings("classifier", "2.1.0", [Finding("nodule", 0.93, True, None, None, "series", False)]),
    ]
    ds = build_report_sr(ct_series, parts)
    assert dciodvfy_errors(ds) == []
    sr = reread(ds)
    assert sr.SeriesDescription.startswith("SR unet+segnet+classifier")
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    assert len(groups) == 3
    algorithms = [text_values(raw)["111001"] for raw in measurement_groups(sr)]
    versions = [text_values(raw)["111003"] for raw in measurement_groups(sr)]
    assert list(zip(algorithms, versions, strict=True)) == [
        ("unet", "1.0.0"), ("segnet", "1.0.0"), ("classifier", "2.1.0")
    ]
    library = [
        item for item in content_items(sr)
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
    ]
    assert len(library) == 1  # described once, whatever the number of models


def library_images(sr: pydicom.Dataset) -> list[str]:
    """SOP Instance UIDs the Image Library (TID 1600) describes, in document order."""
    (library,) = [
        item for item in content_items(sr)
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
    ]
    return [
        str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for group in content_items(library)
        for entry in content_items(group)
        if entry.ValueType == "IMAGE"
    ]


def test_library_describes_the_images_the_groups_reference_and_evidence_lists_all(ct_series):
    uids = [str(ds.SOPInstanceUID) for ds in ct_series]
    findings = [
        Finding("nodule", 0.9, True, None, None, "series", False, extent=((uids[3], None),)),
        Finding("nodule", 0.9, True, uids[3], None, "slice", False),
        Finding("nodule", 0.6, True, uids[1], None, "slice", True),
    ]
    sr = reread(build_findings_sr(ct_series, findings, **MODEL))
    assert library_images(sr) == [uids[1], uids[3]]  # source order, each once
    evidence = [
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]
    assert sorted(evidence) == sorted(uids)
    (series_group, *_) = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_image_measurement_groups()
    assert [str(s.referenced_sop_instance_uid) for s in series_group.source_images] == [uids[3]]
    # nothing named (a segmenter that found nothing): the library describes every image
    absent = Finding("nodule", None, False, None, None, "series", False)
    assert library_images(reread(build_findings_sr(ct_series, [absent], **MODEL))) == uids
