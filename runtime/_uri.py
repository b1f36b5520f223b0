"""Inputs and outputs given as URIs for `segclip-run --ray` (docs/ray.md "Offline"; the command
contract of docs/architecture.md "Command contracts").

A URI is anything with a scheme that pyarrow's filesystems open (`s3://bucket/dir`,
`gs://bucket/dir`, `hdfs://...`, `file:///abs/dir`); a plain path stays a local path. Folders are
listed one level deep in sorted order with the image suffixes of `segclip-run`, like local ones.
"""

from __future__ import annotations

import re
from typing import Any

from segclip.runtime.errors import ImageError, OutputError

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")  # two letters at least: not "C:\"


def is_uri(text: str) -> bool:
    """Whether `text` names a location by URI (`scheme://...`) rather than a local path."""
    return bool(_SCHEME.match(str(text)))


def open_uri(uri: str, error: type[Exception] = ImageError) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for `uri`; `error` when no filesystem handles it."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError/ValueError by scheme
        raise error(f"cannot open {uri} ({' '.join(str(e).split())}); use a local path or a "
                    f"URI pyarrow supports (s3://, gs://, hdfs://, file://)") from e


def join(base: str, name: str) -> str:
    """`base` URI + "/" + `name`."""
    return f"{base.rstrip('/')}/{name}"


def list_images(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """The image URIs `uri` names: itself if a file, else its image files one level deep."""
    from pyarrow import fs

    filesystem, path = open_uri(uri)
    try:
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.NotFound:
            raise ImageError(f"input {uri} does not exist; pass image files or folders")
        if info.type != fs.FileType.Directory:
            return [uri]
        members = filesystem.get_file_info(fs.FileSelector(path, recursive=False))
    except OSError as e:
        raise ImageError(f"cannot list {uri} ({' '.join(str(e).split())})") from e
    names = sorted(m.base_name for m in members if m.type == fs.FileType.File
                   and not m.base_name.startswith(".")
                   and any(m.base_name.lower().endswith(s) for s in suffixes))
    if not names:
        raise ImageError(f"folder {uri} holds no images ({', '.join(suffixes)}); pass a folder "
                         f"of images or image files")
    return [join(uri, name) for name in names]


def read_bytes(uri: str) -> bytes:
    """The whole object at `uri`."""
    filesystem, path = open_uri(uri)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except (OSError, FileNotFoundError) as e:
        raise ImageError(f"cannot read {uri} ({' '.join(str(e).split())}); check the URI and "
                         f"the credentials") from e


def all_exist(uris: list[str]) -> bool:
    """Whether every URI names an existing file."""
    from pyarrow import fs

    if not uris:
        return True
    filesystem, _ = open_uri(uris[0], OutputError)
    try:
        infos = filesystem.get_file_info([open_uri(u, OutputError)[1] for u in uris])
    except OSError as e:
        raise OutputError(f"cannot check {uris[0]} ({' '.join(str(e).split())})") from e
    return all(info.type == fs.FileType.File for info in infos)


def make_dir(uri: str) -> None:
    """Create the folder `uri` (object stores: nothing to do)."""
    filesystem, path = open_uri(uri, OutputError)
    try:
        filesystem.create_dir(path, recursive=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder {uri}: {e}") from e


def upload(data: bytes, uri: str) -> None:
    """Write `data` to `uri`: to a temporary name beside it, then moved over it (object stores
    make a single PUT visible whole, so there it is written directly)."""
    filesystem, path = open_uri(uri, OutputError)
    try:
        if filesystem.type_name in ("local", "mock"):
            parent, _, name = path.rpartition("/")
            temporary = f"{parent}/.{name}.upload.tmp"
            with filesystem.open_output_stream(temporary) as stream:
                stream.write(data)
            filesystem.move(temporary, path)
        else:
            with filesystem.open_output_stream(path) as stream:
                stream.write(data)
    except OSError as e:
        raise OutputError(f"cannot write {uri}: {e}") from e


def delete(uri: str) -> None:
    """Remove `uri` if it exists (cleanup after a failed image)."""
    filesystem, path = open_uri(uri, OutputError)
    try:
        filesystem.delete_file(path)
    except (OSError, FileNotFoundError):
        return  # absent already, or not removable: the JSON (written last) is what marks done
