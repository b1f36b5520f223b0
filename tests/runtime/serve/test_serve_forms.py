"""runtime/serve/forms.py: multipart bodies parsed from memory agree with the standard library's
MIME parser (an independent reference), and malformed or oversized forms are 400 problems."""

from __future__ import annotations

import email.parser
import email.policy

import numpy as np
import pytest

pytest.importorskip("python_multipart")
urllib3 = pytest.importorskip("urllib3")

from segclip.runtime.serve.forms import MAX_FIELDS, parse_form, text_field  # noqa: E402
from segclip.runtime.serve.problems import Problem  # noqa: E402


def reference_parts(content_type: str, body: bytes) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, is_file) by the `email` package's MIME parser."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    parts = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        parts[name] = (part.get_payload(decode=True), part.get_filename() is not None)
    return parts


def random_form(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    fields: dict = {}
    for index in range(int(rng.integers(1, 6))):
        text = "".join(rng.choice(list("abc xyz\nÄé猫-_[]\"{},0.5"), int(rng.integers(0, 40))))
        fields[f"field{index}"] = text
    payload = rng.integers(0, 256, int(rng.integers(0, 5000)), dtype=np.uint8).tobytes()
    payload += b"\r\n--" + payload[:20] + b"\r\n"  # boundary-like bytes inside the file
    fields["image"] = ("photo.jpg", payload, "image/jpeg")
    return fields


@pytest.mark.parametrize("seed", range(12))
def test_parts_match_the_mime_parser(seed: int) -> None:
    body, content_type = urllib3.encode_multipart_formdata(random_form(seed))
    parts = parse_form(content_type, body)
    reference = reference_parts(content_type, body)
    assert set(parts) == set(reference)
    for name, (data, is_file) in reference.items():
        assert parts[name].data == data and parts[name].is_file == is_file, name
        if not is_file:
            assert text_field(parts, name) == data.decode("utf-8")
    assert text_field(parts, "absent") is None


def test_malformed_forms_are_400() -> None:
    good, content_type = urllib3.encode_multipart_formdata({"labels": "cat"})
    cases = [
        ("multipart/form-data", good),  # no boundary
        (content_type, b"not a multipart body at all"),
        (content_type, good.replace(b"Content-Disposition: form-data; ", b"X-Other: ")),
        (content_type, good.replace(b'name="labels"', b'filename="a.txt"')),  # no name
    ]
    many = {f"f{i}": "x" for i in range(MAX_FIELDS + 1)}
    cases.append(urllib3.encode_multipart_formdata(many)[::-1])
    files = {"a": ("a.png", b"1", "image/png"), "b": ("b.png", b"2", "image/png")}
    cases.append(urllib3.encode_multipart_formdata(files)[::-1])
    for kind, body in cases:
        with pytest.raises(Problem) as refused:
            parse_form(kind, body)
        assert refused.value.status == 400 and refused.value.detail


def test_text_fields_refuse_files_and_bad_utf8() -> None:
    body, content_type = urllib3.encode_multipart_formdata(
        {"labels": ("labels.txt", b"cat", "text/plain"), "threshold": b"\xff\xfe"})
    parts = parse_form(content_type, body)
    for name, fragment in (("labels", "not a file"), ("threshold", "UTF-8")):
        with pytest.raises(Problem) as refused:
            text_field(parts, name)
        assert refused.value.status == 400 and fragment in refused.value.detail
