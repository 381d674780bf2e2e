"""Bad and hostile input to the service over a real socket: each answer is a 4xx with a JSON `error` that names the
file and what to do, never a 5xx, and the service keeps answering.

The issue's list (non-image, truncated JPEG, 16-bit TIFF, RGBA PNG, a 1x1 image, a decompression bomb, an empty
upload, the wrong field name, too many files, a body or a file over the limit), grey and tiny fields, and
Hypothesis throwing random bytes and random multipart bodies at both POST endpoints.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_service import LIMITS, MIB, serving
from PIL import Image

from blastscan.data.synthetic import draw_field
from blastscan.deploy.service import ServiceLimits, create_app
from blastscan.smear.analysis import FieldAnalyzer


def _encoded(image: np.ndarray | Image.Image, fmt: str = "PNG") -> bytes:
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _raw_png(width: int, height: int, depth: int, colour: int, rows: bytes) -> bytes:
    """A PNG written byte by byte: any bit depth, and a header that may claim more pixels than the data holds."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


@pytest.fixture(scope="module")
def crop(crops: list[Path]) -> np.ndarray:
    """A real ALL-IDB2 crop as RGB pixels."""
    return np.asarray(Image.open(crops[0]).convert("RGB"))


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    return draw_field(np.random.default_rng(7), 640, 480, kinds=["blast", "lymphocyte"]).image


@pytest.fixture(scope="module")
def client(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=60) as session:
        yield session


def _refused(answer: httpx.Response, status: int | tuple[int, ...], *words: str) -> str:
    """The answer's error message, after checking its status, that it is JSON, and that it holds `words`."""
    assert answer.status_code in ((status,) if isinstance(status, int) else status), (answer.status_code, answer.text)
    assert answer.headers["content-type"].startswith("application/json"), answer.text
    message = answer.json()["error"]
    for word in words:
        assert word in message, message
    return message


def _cells(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/v1/cells", files=[("files", (name, data))])


def _field(client: httpx.Client, name: str, data: bytes) -> httpx.Response:
    return client.post("/v1/fields", files={"file": (name, data)})


def _bad_files(crop: np.ndarray, field: np.ndarray) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what the refusal says) for files both endpoints must refuse."""
    jpeg = _encoded(field, "JPEG")
    grey16 = (field.mean(axis=2) * 257).astype(np.uint16)
    side = math.isqrt(LIMITS.max_image_pixels) + 1
    return {
        "notes.jpg": (b"this is not a picture\n", "not a readable image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "cannot decode"),
        "grey16.tif": (_encoded(Image.fromarray(grey16), "TIFF"), "no colour"),
        "one_pixel.png": (_encoded(crop[:1, :1]), "too small"),
        "bomb.png": (_raw_png(side, side, 8, 2, b"\0" * 64), "decompression bomb"),
        "huge_bomb.png": (_raw_png(100_000, 100_000, 8, 2, b"\0" * 64), "decompression bomb"),
        "empty.png": (b"", "empty"),
        "blank.png": (_encoded(np.full((480, 640, 3), 230, np.uint8)), "no colour"),
    }


@pytest.mark.parametrize("endpoint", ["cells", "fields"])
def test_bad_files_are_refused_with_a_message_naming_them(
    client: httpx.Client, crop: np.ndarray, field: np.ndarray, endpoint: str
) -> None:
    post = _cells if endpoint == "cells" else _field
    for name, (data, words) in _bad_files(crop, field).items():
        _refused(post(client, name, data), 422, name, words)
    assert client.get("/healthz").status_code == 200


def test_a_field_smaller_than_a_field_or_without_colour_is_refused(client: httpx.Client, field: np.ndarray) -> None:
    _refused(_field(client, "small.png", _encoded(field[:40, :40])), 422, "small.png", "too small", "/v1/cells")
    grey = _encoded(Image.fromarray(field).convert("L"))
    _refused(_field(client, "grey.png", grey), 422, "grey.png", "no colour", "colour original")


def test_rgba_and_16_bit_colour_read_as_the_8_bit_rgb_original(client: httpx.Client, crop: np.ndarray) -> None:
    """As `blastscan.data.images.load_rgb` reads them: alpha dropped, 16-bit colour to the same 8-bit pixels."""
    h, w = crop.shape[:2]
    rgba = np.dstack([crop, np.full((h, w), 200, np.uint8)])
    wide = crop.astype(">u2") * 257
    colour16 = _raw_png(w, h, 16, 2, b"".join(b"\0" + wide[r].tobytes() for r in range(h)))
    files = [
        ("files", ("rgb.png", _encoded(crop))),
        ("files", ("rgba.png", _encoded(rgba))),
        ("files", ("colour16.png", colour16)),
    ]
    answer = client.post("/v1/cells", files=files)
    assert answer.status_code == 200, answer.text
    rgb, with_alpha, sixteen = (cell["probability"] for cell in answer.json()["cells"])
    assert with_alpha == rgb and sixteen == rgb


def test_wrong_field_name_or_no_multipart_body_says_how_to_send(client: httpx.Client, crop: np.ndarray) -> None:
    data = _encoded(crop)
    _refused(client.post("/v1/cells", files=[("image", ("a.png", data))]), 422, "named 'files'")
    _refused(client.post("/v1/fields", files=[("files", ("a.png", data))]), 422, "named 'file'")
    _refused(client.post("/v1/cells", data={"files": "a.png"}), 422, "'files'", "uploaded files")
    _refused(client.post("/v1/cells", json={"files": ["a.png"]}), 422, "named 'files'")
    _refused(client.post("/v1/fields", content=data, headers={"content-type": "image/png"}), 422, "named 'file'")
    garbled = b"--xx\r\nContent-Disposition: form-data\r\n\r\nno end"
    headers = {"content-type": "multipart/form-data; boundary=yy"}
    _refused(client.post("/v1/cells", content=garbled, headers=headers), 400, "multipart/form-data")
    _refused(client.post("/v1/fields", params={"format": "gif"}, files={"file": ("a.png", data)}), 422, "format")
    _refused(client.get("/v1/nothing"), 404, "/v1/nothing", "/docs")
    _refused(client.get("/v1/cells"), 405)


def test_too_many_files_is_refused_before_any_is_decoded(client: httpx.Client, crop: np.ndarray) -> None:
    data = _encoded(crop)
    files = [("files", (f"crop{i}.png", data)) for i in range(LIMITS.max_files + 1)]
    _refused(client.post("/v1/cells", files=files), 413, f"more than {LIMITS.max_files} files", "batches")
    answer = client.post("/v1/cells", files=files[: LIMITS.max_files])
    assert answer.status_code == 200 and len(answer.json()["cells"]) == LIMITS.max_files
    # A field is one file.
    _refused(client.post("/v1/fields", files=[("file", ("a.png", data)), ("file", ("b.png", data))]), 413)


def test_a_body_over_the_limit_is_refused_with_413_announced_or_streamed(client: httpx.Client) -> None:
    big = b"\0" * (LIMITS.max_upload_bytes + MIB)
    message = _refused(_cells(client, "big.png", big), 413, "larger than", f"{LIMITS.max_upload_bytes:,} bytes")
    _refused(_field(client, "big.png", big), 413, message)

    boundary = "blastscanboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is found by counting what arrives
        for start in range(0, len(body), 256 * 1024):
            yield body[start : start + 256 * 1024]

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    _refused(client.post("/v1/cells", content=chunks(), headers=headers), 413, "larger than")
    assert client.get("/healthz").status_code == 200


def test_a_file_over_the_file_limit_is_refused_naming_it(client: httpx.Client) -> None:
    data = b"\0" * (LIMITS.max_file_bytes + 1000)  # under the body limit, over the file limit
    _refused(_cells(client, "large.tif", data), 413, "large.tif", f"{LIMITS.max_file_bytes:,} bytes")
    _refused(_field(client, "large.tif", data), 413, "large.tif")


def test_the_default_body_limit_is_20_mib(model: tuple[FieldAnalyzer, dict]) -> None:
    assert ServiceLimits().max_upload_bytes == 20 * MIB
    with serving(create_app(*model)) as url:
        answer = httpx.post(f"{url}/v1/cells", files=[("files", ("big.png", b"\0" * (20 * MIB + 1)))], timeout=60)
        _refused(answer, 413, "20,971,520 bytes")
        assert httpx.get(f"{url}/healthz").status_code == 200


# --------------------------------------------------------------------------------------------------- fuzzing

SIGNATURES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*", b"BM", b"GIF89a", b"%!PS"]
NAMES = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=40)


@st.composite
def mutated_image(draw: st.DrawFn) -> bytes:
    """A real small PNG, JPEG or TIFF with a few bytes overwritten and maybe cut short: bytes that get past the
    format's signature into its decoder."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    picture = rng.integers(0, 255, (draw(st.integers(1, 40)), draw(st.integers(1, 40)), 3), dtype=np.uint8)
    data = bytearray(_encoded(picture, draw(st.sampled_from(["PNG", "JPEG", "TIFF", "BMP"]))))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


FILE_BYTES = st.one_of(
    st.builds(lambda head, tail: head + tail, st.sampled_from(SIGNATURES), st.binary(max_size=2000)),
    mutated_image(),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    endpoint=st.sampled_from(["/v1/cells", "/v1/fields"]),
    name=NAMES,
    field_name=st.sampled_from(["files", "file", "image", ""]),
    data=FILE_BYTES,
)
def test_random_files_never_get_a_5xx(service: str, endpoint: str, name: str, field_name: str, data: bytes) -> None:
    answer = httpx.post(f"{service}{endpoint}", files=[(field_name, (name, data))], timeout=60)
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        assert answer.json()["error"]


PART_HEADER = st.sampled_from(
    [
        b'Content-Disposition: form-data; name="files"; filename="a.png"',
        b'Content-Disposition: form-data; name="file"; filename="a.png"',
        b'Content-Disposition: form-data; name="files"',
        b"Content-Disposition: form-data",
        b"Content-Disposition: attachment; filename*=UTF-8''%ff%fe",
        b"Content-Type: image/png",
        b'Content-Disposition: form-data; name="files"; filename="' + b"\xff" * 3 + b'"',
    ]
)


@st.composite
def multipart_body(draw: st.DrawFn) -> tuple[bytes, str]:
    """A multipart body that is sometimes well formed, sometimes not, and the Content-Type it is sent with."""
    boundary = draw(st.sampled_from(["b0undary", "x", "-----", "a" * 70]))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        headers = b"\r\n".join(draw(st.lists(PART_HEADER, max_size=3)))
        parts.append(b"--" + boundary.encode() + b"\r\n" + headers + b"\r\n\r\n" + draw(FILE_BYTES) + b"\r\n")
    body = b"".join(parts) + draw(st.sampled_from([b"--" + boundary.encode() + b"--\r\n", b"", b"--"]))
    if draw(st.booleans()):
        body = draw(st.binary(max_size=500)) + body
    content_type = draw(
        st.sampled_from(
            [
                f"multipart/form-data; boundary={boundary}",
                f"multipart/form-data; boundary={boundary}x",
                "multipart/form-data",
                "application/octet-stream",
                "text/plain",
            ]
        )
    )
    return body, content_type


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(endpoint=st.sampled_from(["/v1/cells", "/v1/fields"]), request=multipart_body())
def test_random_multipart_bodies_never_get_a_5xx(service: str, endpoint: str, request: tuple[bytes, str]) -> None:
    body, content_type = request
    answer = httpx.post(f"{service}{endpoint}", content=body, headers={"content-type": content_type}, timeout=60)
    assert answer.status_code < 500, answer.text
    if answer.status_code >= 400:
        assert answer.json()["error"]
