import cProfile, pstats
import pytest
from tests.fixtures.dicom_files import bright_disc_series
from workers import runner

@pytest.mark.usefixtures("sqlite_env")
def test_prof():
    from fastapi.testclient import TestClient
    from app.main import create_app
    from tests.helpers.services import ADMIN_KEY
    with TestClient(create_app(), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
        ids = []
        for k in range(3):
            blobs, _ = bright_disc_series(n=2, seed=k)
            r = api.post("/api/v1/studies", files=[("files", (f"{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)])
            ids.append(r.json()["jobs"][0]["id"])
        runner.run_job(ids[0])
        pr = cProfile.Profile(); pr.enable()
        for j in ids[1:]:
            runner.run_job(j)
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
