"""Round trip with a real PACS: Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) pushes a
study to medcad with STOW-RS, medcad analyses it and forwards SEG, SR and Parametric Map back to
Orthanc's STOW-RS, where they are found through Orthanc's REST API.

Orthanc and medcad run together in a private network namespace (``unshare -n``, loopback
only): Orthanc 1.10 cannot bind to 127.0.0.1 alone. See ``netns_scenario``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

from tests.helpers.dciodvfy import dciodvfy_errors
from tests.helpers.services import unavailable
from tests.orthanc.netns_scenario import _orthanc_binary

REPO = Path(__file__).resolve().parents[2]
CLASSES = {
    "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
    "SR": "1.2.840.10008.5.1.4.1.1.88.34",
    "OT": "1.2.840.10008.5.1.4.1.1.30",
}


def _require_peer() -> None:
    if not Path(_orthanc_binary()).exists():
        unavailable("Orthanc not found: apt-get install orthanc orthanc-dicomweb")
    plugin = subprocess.run(
        ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
    )
    if plugin.returncode != 0:
        unavailable("the Orthanc DICOMweb plugin is missing: apt-get install orthanc-dicomweb")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        unavailable("unshare/ip not found (util-linux, iproute2)")
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        unavailable(f"cannot create a network namespace: {probe.stderr.decode()[:200]}")


def test_orthanc_pushes_a_study_and_receives_the_results(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    _require_peer()
    result = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "tests.orthanc.netns_scenario",
         str(tmp_path), str(tiny_models_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())

    # Orthanc's STOW client accepted medcad's answer (it checks every instance is referenced)
    assert report["orthanc_stow_status"] == 200, report["orthanc_stow_body"]
    assert [j["status"] for j in report["jobs"]] == ["succeeded"], report["jobs"]
    assert report["jobs"][0]["instance_count"] == 3

    modalities = sorted(s["modality"] for s in report["orthanc_series"])
    assert {"CT", "SEG", "SR", "OT"} <= set(modalities), report["orthanc_series"]
    assert all(
        "not for clinical use" in (s["description"] or "")
        for s in report["orthanc_series"]
        if s["modality"] != "CT"
    )
    assert [a["outcome"] for a in report["forward_audit"]] == ["success"]

    received = {}
    for path in sorted((tmp_path / "from-orthanc").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        received.setdefault(path.name.split("-")[0], []).append(ds)
    for modality, sop_class in CLASSES.items():
        assert received.get(modality), modality
        for ds in received[modality]:
            assert ds.SOPClassUID == sop_class
            assert dciodvfy_errors(ds) == [], (modality, dciodvfy_errors(ds))
    ct_study = {ds.StudyInstanceUID for ds in received["CT"]}
    assert {ds.StudyInstanceUID for group in received.values() for ds in group} == ct_study
