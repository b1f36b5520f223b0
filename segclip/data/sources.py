"""Image–caption pair sources (docs/official-implementation.md §3 "Data"): the formats
`segclip-train --data` accepts.

- `pairs.jsonl`: one `{"image": PATH, "caption": TEXT}` per line (the synthetic world's format);
- CSV/TSV with a header naming columns `image` and `caption` (open_clip's `filepath`/`title` too);
- COCO captions JSON: Karpathy `dataset_coco.json` (split == "train" only, each caption its own
  sample) or the plain `captions_*.json` (`images` + `annotations`);
- webdataset-style tar shards (img2dataset layout: `KEY.jpg` + `KEY.txt` members), read with the
  stdlib `tarfile`: members are indexed once and then read by byte offset.

A folder is read as `pairs.jsonl` in it, else `train/pairs.jsonl` (a synthetic world's root), else
its `*.tar` shards. Relative image paths resolve against the source's root (the file's folder
unless `image_root` is given); each image has a cache key (its path relative to the root without
suffix, or `SHARD/KEY` in a tar), under which superpixels are cached in `ROOT/superpixels/`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from segclip.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_COLUMNS = ("image", "filepath")
CAPTION_COLUMNS = ("caption", "title")
SUPERPIXEL_DIR = "superpixels"
MAX_PIXELS = 100_000_000  # = segclip.runtime.images.DEFAULT_MAX_PIXELS (decompression bombs)


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a file, or a member of an uncompressed tar shard."""

    key: str  # cache key, posix, no suffix: "images/000001" or "shard-00000/000000001"
    path: Path  # the image file, or the tar shard holding it
    member: str = ""  # member name inside the shard ("" for a plain file)
    offset: int = -1  # byte offset of the member's data in the shard
    size: int = -1  # byte size of the member's data

    def describe(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)


class Pair(NamedTuple):
    image: ImageRef
    caption: str


@dataclass(frozen=True)
class PairSource:
    origin: Path  # the file or folder the pairs were read from
    root: Path  # relative image paths resolve here; superpixels are cached under it
    pairs: tuple[Pair, ...]

    @property
    def superpixel_dir(self) -> Path:
        return self.root / SUPERPIXEL_DIR

    def images(self) -> list[ImageRef]:
        """Unique images in first-seen order (a COCO image has five captions)."""
        return list(dict.fromkeys(pair.image for pair in self.pairs))


def _decode(image: Image.Image, ref: ImageRef) -> Image.Image:
    """RGB pixels of an opened image, refused from its header when it is too large."""
    if image.width * image.height > MAX_PIXELS:
        raise DataError(f"image {ref.describe()} has {image.width}x{image.height} pixels, over "
                        f"the limit of {MAX_PIXELS:,}; downscale it or drop it from the data")
    return image.convert("RGB")


def read_image(ref: ImageRef) -> Image.Image:
    """Decode an image as RGB; a missing, truncated, corrupt or too large (`MAX_PIXELS`, checked
    before decoding) one raises `DataError` naming it."""
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: our limit is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if ref.member:
                with open(ref.path, "rb") as shard:
                    shard.seek(ref.offset)
                    data = shard.read(ref.size)
                if len(data) != ref.size:
                    raise DataError(
                        f"image {ref.describe()} is truncated: {len(data)} of {ref.size} bytes"
                    )
                with Image.open(io.BytesIO(data)) as image:
                    return _decode(image, ref)
            with Image.open(ref.path) as image:
                return _decode(image, ref)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"image {ref.describe()} not found") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {ref.describe()}: {e}") from e


def _file_ref(root: Path, name: str, origin: str) -> ImageRef:
    if not isinstance(name, str) or not name:
        raise DataError(f"{origin}: image must be a non-empty path string, got {name!r}")
    path = Path(name) if Path(name).is_absolute() else root / name
    try:
        key = path.relative_to(root).with_suffix("").as_posix()
    except ValueError:  # outside the root: a stable key from the absolute path
        key = "external/" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20]
    return ImageRef(key=key, path=path)


def _pair(root: Path, image: object, caption: object, origin: str) -> Pair:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{origin}: caption must be a non-empty string, got {caption!r}")
    return Pair(_file_ref(root, image, origin), caption.strip())  # type: ignore[arg-type]


def _read_jsonl(path: Path, root: Path) -> list[Pair]:
    pairs = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or "image" not in record or "caption" not in record:
                raise DataError(f'{path}:{number}: expected {{"image": ..., "caption": ...}}')
            pairs.append(_pair(root, record["image"], record["caption"], f"{path}:{number}"))
    return pairs


def _read_table(path: Path, root: Path, delimiter: str) -> list[Pair]:
    with open(path, encoding="utf-8", newline="") as table:
        reader = csv.DictReader(table, delimiter=delimiter)
        header = reader.fieldnames or []
        image_col = next((c for c in IMAGE_COLUMNS if c in header), None)
        caption_col = next((c for c in CAPTION_COLUMNS if c in header), None)
        if image_col is None or caption_col is None:
            raise DataError(f"{path}: header {header} needs columns 'image' and 'caption' "
                            f"(or 'filepath' and 'title')")
        return [_pair(root, row[image_col], row[caption_col], f"{path}:{number}")
                for number, row in enumerate(reader, 2)]


def _read_coco(path: Path, root: Path) -> list[Pair]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: not a COCO captions file (no 'images' list)")
    try:
        if "annotations" not in data:  # Karpathy split file
            pairs = []
            for image in images:
                if image.get("split") != "train":
                    continue
                name = "/".join(p for p in (image.get("filepath", ""), image["filename"]) if p)
                for sentence in image["sentences"]:
                    pairs.append(_pair(root, name, sentence["raw"], f"{path}: {name}"))
            return pairs
        names = {image["id"]: image["file_name"] for image in images}
        return [_pair(root, names[a["image_id"]], a["caption"], f"{path}: annotation {a['id']}")
                for a in data["annotations"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: malformed COCO captions entry (missing {e})") from e


def _read_shard(path: Path) -> list[Pair]:
    images: dict[str, tarfile.TarInfo] = {}
    texts: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:") as shard:
            for member in shard:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                key = f"{folder}/{stem}" if folder else stem
                if "." + ext.lower() in IMAGE_SUFFIXES:
                    images[key] = member
                elif ext.lower() == "txt":
                    texts[key] = shard.extractfile(member).read().decode("utf-8")  # type: ignore
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read tar shard {path} (uncompressed .tar expected): {e}") from e
    pairs = []
    for key, member in images.items():
        if key in texts and texts[key].strip():
            ref = ImageRef(f"{path.stem}/{key}", path, member.name, member.offset_data, member.size)
            pairs.append(Pair(ref, texts[key].strip()))
    return pairs


def _check_files(pairs: list[Pair], origin: Path) -> None:
    for ref in dict.fromkeys(pair.image for pair in pairs):
        if not ref.member and not ref.path.is_file():
            raise DataError(f"{origin}: image {ref.path} not found (key {ref.key!r}); "
                            "fix the path or pass the image folder as image_root")


def read_source(data: str | Path, image_root: str | Path | None = None) -> PairSource:
    """Read the pairs of one source (file or folder; see the module docstring)."""
    origin = Path(data)
    if not origin.exists():
        raise DataError(f"data path {origin} does not exist")
    shards: list[Path] = []
    if origin.is_dir():
        if (origin / "pairs.jsonl").is_file():
            origin = origin / "pairs.jsonl"
        elif (origin / "train" / "pairs.jsonl").is_file():
            origin = origin / "train" / "pairs.jsonl"
        else:
            shards = sorted(origin.glob("*.tar"))
            if not shards:
                raise DataError(f"{origin} holds no pairs.jsonl, train/pairs.jsonl or *.tar shards")
    elif origin.suffix == ".tar":
        shards = [origin]
    if shards:
        pairs = [pair for shard in shards for pair in _read_shard(shard)]
        root = shards[0].parent
    else:
        root = Path(image_root) if image_root is not None else origin.parent
        readers = {".jsonl": _read_jsonl, ".json": _read_coco,
                   ".csv": lambda p, r: _read_table(p, r, ","),
                   ".tsv": lambda p, r: _read_table(p, r, "\t")}
        if origin.suffix.lower() not in readers:
            raise DataError(f"{origin}: unsupported data file; use .jsonl, .csv, .tsv, .json "
                            "(COCO captions), .tar shards or a folder of them")
        try:
            pairs = readers[origin.suffix.lower()](origin, root)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {origin}: {e}") from e
        _check_files(pairs, origin)
    if not pairs:
        raise DataError(f"{origin} holds no image-caption pairs")
    return PairSource(origin=origin, root=root, pairs=tuple(pairs))
