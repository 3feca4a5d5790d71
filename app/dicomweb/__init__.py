"""DICOMweb: STOW-RS, QIDO-RS and WADO-RS (PS3.18) over the ingest service and the results."""
