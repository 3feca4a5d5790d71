"""The REST API's OpenAPI description is complete: every operation names what it answers (media
type, response model), shows an example of it that the model accepts, and documents the one
error body for every error it can give (auth, role, rate limit, outage with ``Retry-After``,
unknown ids). DICOMweb routes follow PS3.18: they answer DICOM JSON, multipart/related or images,
and their errors are the same one error body."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel

from app.api import schemas as api_schemas
from app.auth import router as auth_router
from app.main import create_app

pytestmark = pytest.mark.usefixtures("sqlite_env")

SYSTEM = {"/healthz", "/readyz", "/metrics"}
ERROR_BODY = "#/components/schemas/ErrorBody"
UPLOAD_BODY = "#/components/schemas/UploadResponse"


@pytest.fixture
def app_and_spec(sqlite_env: Any) -> tuple[Any, dict[str, Any]]:
    app = create_app()
    return app, app.openapi()


def _rest_operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in spec["paths"].items():
        if path.startswith("/api/v1/") or path in SYSTEM:
            for method, operation in operations.items():
                yield path, method, operation


def _refs(schema: dict[str, Any]) -> set[str]:
    if "$ref" in schema:
        return {schema["$ref"]}
    return {ref for part in schema.get("anyOf", []) for ref in _refs(part)}


def test_every_operation_documents_its_success_with_a_media_type_and_an_example(
    app_and_spec: tuple[Any, dict[str, Any]],
) -> None:
    _, spec = app_and_spec
    schemas = spec["components"]["schemas"]
    operations = list(_rest_operations(spec))
    assert len(operations) >= 20
    for path, method, operation in operations:
        where = f"{method.upper()} {path}"
        success = {c: r for c, r in operation["responses"].items() if c.startswith("2")}
        assert success, where
        for code, response in success.items():
            content = response.get("content")
            assert content, f"{where} {code}: no media type"
            for media_type, body in content.items():
                if media_type == "application/json":
                    schema = body["schema"]
                    if "$ref" in schema:
                        name = schema["$ref"].rsplit("/", 1)[-1]
                        assert schemas[name].get("examples"), f"{where}: {name} has no example"
                    else:
                        assert "example" in body, f"{where}: JSON without a model or example"
                else:
                    assert body.get("schema") or "example" in body, f"{where}: {media_type}"

    # Every example is accepted by the model it illustrates.
    models = {
        name: value
        for module in (api_schemas, auth_router)
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, BaseModel)
    }
    checked = 0
    for name, schema in schemas.items():
        if schema.get("examples") and name in models:
            # (the description itself leaves out null values of an example)
            for example in models[name].model_json_schema()["examples"]:
                models[name].model_validate(example)
                checked += 1
    assert checked >= 10


def _assert_guarded(where: str, responses: dict[str, Any]) -> None:
    """A data route needs a key, may be refused by role, rate-limited or meet an outage; the
    last two tell the client when to come back."""
    assert {"401", "403", "429", "503"} <= set(responses), where
    for code in ("429", "503"):
        assert "Retry-After" in responses[code].get("headers", {}), f"{where} {code}"


def test_every_data_operation_documents_its_errors_in_the_one_error_body(
    app_and_spec: tuple[Any, dict[str, Any]],
) -> None:
    _, spec = app_and_spec
    for path, method, operation in _rest_operations(spec):
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        if path in SYSTEM:
            continue  # public; /readyz answers 503 with its checks, not an error body
        for code, response in responses.items():
            if code[0] in "45":
                refs = _refs(response["content"]["application/json"]["schema"])
                # An upload whose every file was refused answers the per-file outcomes instead.
                allowed = {ERROR_BODY} | ({UPLOAD_BODY} if path == "/api/v1/studies" else set())
                assert refs and refs <= allowed, f"{where} {code}: {refs}"
        _assert_guarded(where, responses)
        if "{" in path:
            assert "404" in responses, f"{where}: an unknown id is not documented"


def test_stored_downloads_document_their_media_type_and_not_modified(
    app_and_spec: tuple[Any, dict[str, Any]],
) -> None:
    _, spec = app_and_spec
    expected = {
        "/api/v1/masks/{mask_id}.png": "image/png",
        "/api/v1/masks/{mask_id}/overlay.png": "image/png",
        "/api/v1/saliency/{saliency_id}.npy": "application/octet-stream",
        "/api/v1/saliency/{saliency_id}/overlay.png": "image/png",
        "/api/v1/saliency/{saliency_id}/colorbar.png": "image/png",
        "/api/v1/artifacts/{artifact_id}": "application/dicom",
    }
    for path, media_type in expected.items():
        responses = spec["paths"][path]["get"]["responses"]
        assert list(responses["200"]["content"]) == [media_type], path
        assert "ETag" in responses["200"]["headers"], path
        assert "304" in responses, path


DICOM_JSON = "application/dicom+json"
QIDO = {
    "/dicomweb/studies",
    "/dicomweb/series",
    "/dicomweb/instances",
    "/dicomweb/studies/{study}/series",
    "/dicomweb/studies/{study}/instances",
    "/dicomweb/studies/{study}/series/{series}/instances",
}


def _dicomweb_operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, operations in spec["paths"].items():
        if path.startswith("/dicomweb/"):
            for method, operation in operations.items():
                yield path, method, operation


def _expected_dicomweb_success(path: str, method: str) -> list[str]:
    if method == "post" or path in QIDO or path.endswith("/metadata"):
        return [DICOM_JSON]
    if path.endswith("/rendered"):
        return ["image/jpeg", "image/png"]
    if path.endswith(("}", "/series/{series}")) and "/frames/" not in path and "/bulk/" not in path:
        return ['multipart/related; type="application/dicom"']
    return ['multipart/related; type="application/octet-stream"']


def test_every_dicomweb_operation_documents_its_media_types_and_examples(
    app_and_spec: tuple[Any, dict[str, Any]],
) -> None:
    _, spec = app_and_spec
    operations = list(_dicomweb_operations(spec))
    assert len(operations) >= 18
    for path, method, operation in operations:
        where = f"{method.upper()} {path}"
        expected = _expected_dicomweb_success(path, method)
        success = {c: r for c, r in operation["responses"].items() if c.startswith("2")}
        assert set(success) == ({"200", "202"} if method == "post" else {"200"}), where
        for code, response in success.items():
            assert list(response["content"]) == expected, f"{where} {code}"
            for media_type, body in response["content"].items():
                if media_type == DICOM_JSON:
                    assert body.get("example"), f"{where} {code}: DICOM JSON without an example"
                else:
                    assert body["schema"] == {"type": "string", "format": "binary"}, where


def test_every_dicomweb_operation_documents_its_errors_in_the_one_error_body(
    app_and_spec: tuple[Any, dict[str, Any]],
) -> None:
    _, spec = app_and_spec
    for path, method, operation in _dicomweb_operations(spec):
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        _assert_guarded(where, responses)
        for code, response in responses.items():
            if code[0] not in "45":
                continue
            content = response["content"]
            if method == "post" and code == "409":
                # STOW-RS: nothing stored answers the Store Instances Response (PS3.18 10.5.3)
                assert list(content) == [DICOM_JSON] and content[DICOM_JSON]["example"], where
                continue
            assert _refs(content["application/json"]["schema"]) == {ERROR_BODY}, f"{where} {code}"
            if method == "post" and code == "400":
                # ...and so does an upload none of whose parts was DICOM
                assert content[DICOM_JSON]["example"], where
            else:
                assert list(content) == ["application/json"], f"{where} {code}"
        if method == "post":
            assert {"400", "409", "413", "415", "507"} <= set(responses), where
        elif path in QIDO:
            assert {"400", "406"} <= set(responses), where
        else:
            assert "404" in responses, f"{where}: an unknown UID is not documented"
            # raw frames and bulk data have one media type and do not negotiate
            raw = "/bulk/" in path or ("/frames/" in path and not path.endswith("/rendered"))
            assert raw or "406" in responses, where


def test_key_creation_documents_the_location_of_the_new_key(
    app_and_spec: tuple[Any, dict[str, Any]],
) -> None:
    _, spec = app_and_spec
    created = spec["paths"]["/api/v1/keys"]["post"]["responses"]["201"]
    assert "Location" in created["headers"]
    one = spec["paths"]["/api/v1/keys/{prefix}"]["get"]["responses"]
    assert one["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/KeyOut")
    assert _refs(one["404"]["content"]["application/json"]["schema"]) == {ERROR_BODY}
