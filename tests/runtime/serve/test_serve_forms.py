"""runtime/serve/forms.py: multipart bodies parsed from memory agree with the standard library's
MIME parser (an independent reference), and malformed or oversized forms are 400 problems; the
label texts of parsed requests are validated once per text."""

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


def test_label_texts_are_validated_once_per_text_and_settings() -> None:
    """parse_segment keeps validated label texts: the same text gives the same labels without
    validating again; refusals are raised every time; limits come from each settings."""
    from segclip.runtime.serve import requests
    from segclip.runtime.serve.settings import ServeSettings

    def parse(labels: str, settings: ServeSettings):
        body, kind = urllib3.encode_multipart_formdata(
            {"image": ("a.png", b"png", "image/png"), "labels": labels})
        return requests.parse_segment(kind, body, settings)

    requests._cached_text_labels.cache_clear()
    roomy, tight = ServeSettings(), ServeSettings(max_labels=2)
    first, again = parse("cat\ndog\nsky", roomy), parse("cat\ndog\nsky", roomy)
    assert first.labels == again.labels == ("cat", "dog", "sky")
    assert requests._cached_text_labels.cache_info().hits == 1
    for _ in range(2):
        with pytest.raises(Problem) as refused:
            parse("cat\ndog\nsky", tight)  # same text, other limits: refused, not the cached
        assert refused.value.status == 422 and "limit of 2" in refused.value.detail
        with pytest.raises(Problem) as refused:
            parse("cat\nCAT", roomy)
        assert refused.value.status == 422 and "duplicate" in refused.value.detail
    long_text = "\n".join(f"label number {i:03d} {'x' * 40}" for i in range(400))  # > 16 K
    assert len(long_text) > requests.LABEL_TEXT_CHARS
    size = requests._cached_text_labels.cache_info().currsize
    assert len(parse(long_text, roomy).labels) == 400
    assert requests._cached_text_labels.cache_info().currsize == size  # too long to keep
