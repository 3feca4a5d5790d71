"""Optional de-identification on ingest: DICOM PS3.15 Annex E, Basic Application Level
Confidentiality Profile (Table E.1-1, no options).

Enabled by ``MEDCAD_DEIDENTIFY_ON_INGEST=true``: every accepted instance is de-identified
*before* it is stored, so neither the blob store nor the database ever holds the original
identifiers. The input has already passed :func:`app.studies.validation.inspect_instance`, so
its structure and lengths are known to be sane when pydicom reads it here.

Actions, as Table E.1-1 names them:

* ``X`` remove; ``Z`` replace with a zero-length value (Type 2 attributes the image IODs need,
  such as Patient's Name, Study Date, Accession Number); ``U`` replace a UID with another one
  that is consistent within the data set and across uploads (an HMAC of the original, so a
  series uploaded in several requests stays one series); ``K`` keep.
* Attributes not listed in :data:`BASIC_PROFILE` fall back to rules by Value Representation:
  every person name (PN) is emptied, every date, time and date-time (DA/TM/DT) and every
  free-text value (LT/ST/UT) is removed, every UID (UI) that is not a DICOM-defined UID
  (root ``1.2.840.10008``) or a class/coding-scheme UID is replaced. Private attributes,
  curves (groups 50xx) and overlay data/comments (60xx,3000/4000) are removed; attributes
  unknown to the data dictionary are removed.
* The result carries Patient Identity Removed = YES, De-identification Method (Code Sequence
  113100 "Basic Application Confidentiality Profile", DCM) and Longitudinal Temporal
  Information Modified = REMOVED (PS3.15 §E.1.1, PS3.3 §C.12.1).

Not done (documented limits): the Clean Pixel Data option — an image that declares Burned In
Annotation = YES is refused instead (``burned_in_annotation``); images with text burned into
the pixels that do not declare it are not detected. No option (retain dates, patient
characteristics, device identity, UIDs, safe private) is offered.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import warnings
from collections.abc import Callable
from enum import StrEnum
from io import BytesIO
from pathlib import Path
from typing import Final

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from app.errors import IngestRejected
from app.settings import Settings, get_settings

DICOM_UID_ROOT: Final = "1.2.840.10008."
METHOD: Final = "DICOM PS3.15 E.1-1 Basic Profile (medcad)"  # LO: at most 64 characters


class Action(StrEnum):
    """Table E.1-1 action codes used here."""

    REMOVE = "X"
    ZERO = "Z"
    REPLACE_UID = "U"
    KEEP = "K"


_ZERO = """
PatientName PatientID PatientBirthDate PatientSex StudyDate StudyTime AccessionNumber StudyID
ReferringPhysicianName ContentDate ContentTime ContrastBolusAgent ContentCreatorName
PlacerOrderNumberImagingServiceRequest FillerOrderNumberImagingServiceRequest
VerifyingObserverName
"""

_REMOVE = """
IssuerOfPatientID IssuerOfPatientIDQualifiersSequence OtherPatientIDs OtherPatientIDsSequence
OtherPatientNames PatientBirthName PatientMotherBirthName PatientAddress PatientTelephoneNumbers
PatientTelecomInformation PatientAge PatientSize PatientWeight PatientBirthTime PatientComments
PatientReligiousPreference PatientInsurancePlanCodeSequence PatientPrimaryLanguageCodeSequence
PatientState PatientSexNeutered EthnicGroup Occupation MilitaryRank BranchOfService
MedicalRecordLocator MedicalAlerts Allergies SmokingStatus PregnancyStatus LastMenstrualDate
AdditionalPatientHistory CountryOfResidence RegionOfResidence InsurancePlanIdentification
SpecialNeeds ResponsiblePerson ResponsiblePersonRole ResponsibleOrganization
PatientBirthDateInAlternativeCalendar PatientDeathDateInAlternativeCalendar
PatientAlternativeCalendar ReferencedPatientSequence ReferencedPatientPhotoSequence
PatientTransportArrangements PatientInstitutionResidence ScheduledPatientInstitutionResidence
ConfidentialityConstraintOnPatientDataDescription PersonAddress PersonTelephoneNumbers
PersonTelecomInformation PersonIdentificationCodeSequence
StudyDescription AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence
PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence NameOfPhysiciansReadingStudy
PhysiciansReadingStudyIdentificationSequence ReferringPhysicianAddress
ReferringPhysicianTelephoneNumbers ReferringPhysicianIdentificationSequence
ConsultingPhysicianName ConsultingPhysicianIdentificationSequence RequestingPhysician
RequestingService ReasonForStudy RequestedProcedureDescription RequestedProcedureID
RequestedProcedureComments ReasonForTheRequestedProcedure RequestAttributesSequence
ReferencedStudySequence IssuerOfAccessionNumberSequence AdmissionID IssuerOfAdmissionIDSequence
AdmittingDate AdmittingTime DischargeDate DischargeTime DischargeDiagnosisDescription
ServiceEpisodeID ServiceEpisodeDescription IssuerOfServiceEpisodeIDSequence
CurrentPatientLocation VisitComments StudyComments OrderEnteredBy OrderEntererLocation
OrderCallbackPhoneNumber OrderCallbackTelecomInformation ImagingServiceRequestComments
ScheduledPerformingPhysicianName ScheduledProcedureStepDescription ScheduledProcedureStepID
PerformedProcedureStepID PerformedProcedureStepDescription PerformedProcedureStepStartDate
PerformedProcedureStepStartTime PerformedProcedureStepEndDate PerformedProcedureStepEndTime
CommentsOnThePerformedProcedureStep ReferencedPerformedProcedureStepSequence PerformedLocation
PerformedStationName PerformedStationAETitle ScheduledStationName ScheduledStationAETitle
ProtocolName AcquisitionProtocolName AcquisitionComments AcquisitionDeviceProcessingDescription
SeriesDate SeriesTime SeriesDescription OperatorsName OperatorIdentificationSequence
PerformingPhysicianName PerformingPhysicianIdentificationSequence InstitutionName
InstitutionAddress InstitutionalDepartmentName InstitutionalDepartmentTypeCodeSequence
InstitutionCodeSequence StationName DeviceSerialNumber DetectorID GantryID PlateID CassetteID
DerivationDescription ImageComments FrameComments IdentifyingComments ModifiedImageDescription
AcquisitionDate AcquisitionTime AcquisitionDateTime InstanceCreationDate InstanceCreationTime
OverlayDate OverlayTime CurveDate CurveTime TimezoneOffsetFromUTC
ContentSequence AcquisitionContextSequence IconImageSequence DigitalSignaturesSequence
MACParametersSequence EncryptedAttributesSequence OriginalAttributesSequence
DataSetTrailingPadding TextString TextComments StorageMediaFileSetID AnnotationGroupLabel
AnnotationGroupDescription AcquisitionFieldOfViewLabel AssertionDateTime
AuthorObserverSequence ParticipantSequence CustodialOrganizationSequence
VerifyingObserverSequence VerifyingOrganization ContentCreatorIdentificationCodeSequence
InterpretationRecorder InterpretationTranscriber InterpretationAuthor
InterpretationApproverSequence ResultsID ResultsIDIssuer InterpretationID InterpretationIDIssuer
DistributionName DistributionAddress HumanPerformerName HumanPerformerOrganization
ActualHumanPerformersSequence NamesOfIntendedRecipientsOfResults
IntendedRecipientsOfResultsIdentificationSequence ReviewerName EvaluatorName
ClinicalTrialSponsorName ClinicalTrialProtocolID ClinicalTrialProtocolName ClinicalTrialSiteID
ClinicalTrialSiteName ClinicalTrialSubjectID ClinicalTrialSubjectReadingID
ClinicalTrialTimePointID ClinicalTrialTimePointDescription ClinicalTrialCoordinatingCenterName
ClinicalTrialProtocolEthicsCommitteeName ClinicalTrialProtocolEthicsCommitteeApprovalNumber
ClinicalTrialSeriesID ClinicalTrialSeriesDescription SpecimenAccessionNumber ContainerIdentifier
"""

# Class-like UIDs identify kinds of objects, not patients or studies: kept even when private.
_KEEP = """
SOPClassUID ReferencedSOPClassUID MediaStorageSOPClassUID TransferSyntaxUID
ReferencedTransferSyntaxUIDInFile RelatedGeneralSOPClassUID OriginalSpecializedSOPClassUID
CodingSchemeUID ContextGroupExtensionCreatorUID ImplementationClassUID
ReferencedSOPClassUIDInFile SpecificCharacterSet BurnedInAnnotation
"""

# File Meta Information elements that can name the sending system.
_META_REMOVE = """
SourceApplicationEntityTitle SendingApplicationEntityTitle ReceivingApplicationEntityTitle
PrivateInformationCreatorUID PrivateInformation
"""


def _table() -> dict[int, Action]:
    table: dict[int, Action] = {}
    for words, action in ((_ZERO, Action.ZERO), (_REMOVE, Action.REMOVE), (_KEEP, Action.KEEP)):
        for keyword in words.split():
            tag = tag_for_keyword(keyword)
            if tag is None:  # a typo here would silently keep an identifier
                raise ValueError(f"unknown DICOM keyword in the profile table: {keyword}")
            table[tag] = action
    return table


BASIC_PROFILE: Final[dict[int, Action]] = _table()
_FREE_TEXT_VRS: Final = frozenset({"LT", "ST", "UT"})
_DATE_VRS: Final = frozenset({"DA", "TM", "DT"})


def replacement_uid(uid: str, key: bytes) -> str:
    """The UID that replaces ``uid``: ``2.25.<128-bit integer>`` from an HMAC of it.

    PS3.5 §B.2 (UUID-derived UIDs under ``2.25``): at most 44 characters, no leading zeros;
    the same ``uid`` and ``key`` always give the same replacement, so references between
    instances (series, frame of reference, referenced images) stay consistent.
    """
    digest = hmac.new(key, uid.encode("ascii", "replace"), hashlib.sha256).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _action(tag: int, vr: str, value_uids: list[str]) -> Action:
    known = BASIC_PROFILE.get(tag)
    if known is not None:
        return known
    if vr == "PN":
        return Action.ZERO
    if vr in _DATE_VRS or vr in _FREE_TEXT_VRS:
        return Action.REMOVE
    if vr == "UI":
        if all(u.startswith(DICOM_UID_ROOT) for u in value_uids):
            return Action.KEEP
        return Action.REPLACE_UID
    return Action.KEEP


def _is_curve_or_overlay_text(tag: int) -> bool:
    group, element = tag >> 16, tag & 0xFFFF
    if 0x5000 <= group <= 0x50FF:
        return True
    return 0x6000 <= group <= 0x60FF and group % 2 == 0 and element in (0x3000, 0x4000)


def _uids_of(element: DataElement) -> list[str]:
    value = element.value
    if value is None:
        return []
    items = [value] if isinstance(value, (str, bytes)) else list(value)
    return [text for v in items if (text := str(v).strip("\0 "))]


def clean_dataset(ds: Dataset, key: bytes) -> None:
    """Apply the Basic Profile to ``ds`` in place, recursing into the sequences it keeps."""
    for tag in list(ds.keys()):
        tag_int = int(tag)
        if tag.is_private or _is_curve_or_overlay_text(tag_int):
            del ds[tag]
            continue
        try:
            dictionary_VR(tag)
        except KeyError:  # not in the data dictionary: nothing says it is safe
            del ds[tag]
            continue
        element = ds[tag]
        vr = str(element.VR)
        uids = _uids_of(element) if vr == "UI" else []
        action = _action(tag_int, vr, uids)
        if action is Action.REMOVE:
            del ds[tag]
        elif action is Action.ZERO:
            ds[tag] = DataElement(tag, vr, Sequence() if vr == "SQ" else "")
        elif action is Action.REPLACE_UID:
            replaced = [replacement_uid(u, key) for u in uids]
            ds[tag] = DataElement(tag, "UI", replaced if len(replaced) != 1 else replaced[0])
        elif vr == "SQ":
            for item in element.value:
                clean_dataset(item, key)


def deidentify(data: bytes, *, key: bytes) -> bytes:
    """De-identify one Part 10 instance; returns the new Part 10 bytes.

    Raises ``IngestRejected("burned_in_annotation")`` (422) for an image that declares
    identifying text in its pixels (Burned In Annotation = YES, PS3.3 §C.7.6.1.1.5).
    """
    try:
        return _deidentify(data, key)
    except IngestRejected:
        raise
    except Exception as exc:  # fail closed: what cannot be cleaned is not stored
        raise IngestRejected(
            "deidentification_failed",
            f"the instance could not be de-identified ({type(exc).__name__})",
            status=422,
        ) from None


def _deidentify(data: bytes, key: bytes) -> bytes:
    with warnings.catch_warnings():
        # pydicom quotes invalid values in its warnings, and these values are patient data
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(BytesIO(data))
        burned_in = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
        if burned_in == "YES":
            raise IngestRejected(
                "burned_in_annotation",
                "the image declares Burned In Annotation = YES; de-identification cannot "
                "clean pixel data, so it is refused",
                status=422,
            )
        clean_dataset(ds, key)
        _mark(ds)
        meta = ds.file_meta
        for keyword in _META_REMOVE.split():
            if keyword in meta:
                delattr(meta, keyword)
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.preamble = bytes(128)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _mark(ds: Dataset) -> None:
    """Record what was done (PS3.15 §E.1.1, PS3.3 §C.12.1 SOP Common Module)."""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    code = Dataset()
    code.CodeValue = "113100"
    code.CodingSchemeDesignator = "DCM"
    code.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([code])
    ds.LongitudinalTemporalInformationModified = "REMOVED"


def uid_key(settings: Settings) -> bytes:
    """The HMAC key of UID replacement: from settings, else a random key kept in ``data_dir``.

    Every process that ingests (API, DICOM listener) must use the same key, or one series
    split over them would become several: on more than one machine set
    ``MEDCAD_DEIDENTIFY_UID_KEY``.
    """
    if settings.deidentify_uid_key is not None:
        return settings.deidentify_uid_key.get_secret_value().encode()
    path = Path(settings.data_dir) / "deid-uid.key"
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex())
    return key


def ingest_deidentifier() -> Callable[[bytes], bytes] | None:
    """The de-identification to apply on ingest, or None when it is switched off."""
    settings = get_settings()
    if not settings.deidentify_on_ingest:
        return None
    key = uid_key(settings)
    return lambda data: deidentify(data, key=key)
