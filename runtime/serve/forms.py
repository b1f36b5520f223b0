"""`multipart/form-data` bodies of `POST /v1/segment` into their fields (docs/serve.md "API").

The body is already in memory (read under `--max-body-mb`), so its parts are collected as
bytes straight from python-multipart's parser callbacks: no spooled temporary files, no
framework form objects. What a part is follows RFC 7578: its `Content-Disposition` names it,
and a `filename` parameter makes it a file. Fields are text (UTF-8), files are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from segclip.runtime.serve.problems import Problem

MAX_FIELDS = 16  # text parts per body
MAX_FILES = 1  # file parts per body


@dataclass(frozen=True)
class Part:
    """One part of a form: its name, its bytes, and whether it was sent as a file."""

    name: str
    data: bytes
    is_file: bool


class _Collector:
    """python-multipart callbacks that keep every part's headers and bytes."""

    def __init__(self) -> None:
        self.parts: list[Part] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._field = b""
        self._value = b""
        self._chunks: list[bytes] = []
        self._fields = self._files = 0

    def on_part_begin(self) -> None:
        self._headers, self._chunks = [], []

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers.append((self._field.lower(), self._value))
        self._field = self._value = b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        disposition = next((v for k, v in self._headers if k == b"content-disposition"), None)
        if disposition is None:
            raise Problem(400, "a multipart part has no Content-Disposition header")
        _, options = parse_options_header(disposition)
        if b"name" not in options:
            raise Problem(400, "a multipart part's Content-Disposition has no name")
        is_file = b"filename" in options
        if is_file:
            self._files += 1
            if self._files > MAX_FILES:
                raise Problem(400, f"the body holds more than {MAX_FILES} file part")
        else:
            self._fields += 1
            if self._fields > MAX_FIELDS:
                raise Problem(400, f"the body holds more than {MAX_FIELDS} text fields")
        self.parts.append(Part(options[b"name"].decode("utf-8", "replace"),
                               b"".join(self._chunks), is_file))


def parse_form(content_type: str, body: bytes) -> dict[str, Part]:
    """The parts of a multipart body by name (a repeated name keeps its last part); a
    malformed body is a 400 problem."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise Problem(400, "the multipart Content-Type has no boundary")
    collector = _Collector()
    callbacks = {name: getattr(collector, name) for name in (
        "on_part_begin", "on_header_field", "on_header_value", "on_header_end",
        "on_part_data", "on_part_end")}
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise Problem(400, f"the multipart body does not parse: {e}") from None
    return {part.name: part for part in collector.parts}


def text_field(parts: dict[str, Part], name: str) -> str | None:
    """A text field's value (None when absent); 400 if it was sent as a file or is not UTF-8."""
    part = parts.get(name)
    if part is None:
        return None
    if part.is_file:
        raise Problem(400, f"multipart field {name!r} must be text, not a file")
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise Problem(400, f"multipart field {name!r} is not UTF-8 text") from None
