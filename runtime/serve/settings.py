"""Limits and batching knobs of `segclip-serve` (docs/serve.md "Errors")."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from segclip.runtime.errors import RuntimeSegclipError
from segclip.runtime.images import DEFAULT_MAX_PIXELS

OUTPUTS = ("label_map", "masks", "scores", "overlay")


class ServeConfigError(RuntimeSegclipError, ValueError):
    """A `segclip-serve` option is out of range or its API key file is unusable."""


@dataclass(frozen=True)
class ServeSettings:
    """What the app enforces and how the local engine batches."""

    max_batch: int = 16  # images per image-tower call across requests
    max_wait_ms: float = 5.0  # longest a batch waits for more requests while others arrive
    queue: int = 64  # jobs waiting for the engine; more get 503
    timeout_s: float = 30.0  # per request, queue wait included; past it 504
    max_body_mb: float = 20.0  # request body limit (413)
    max_pixels: int = DEFAULT_MAX_PIXELS  # image limit, read from the header (413)
    max_labels: int = 1000  # labels per request or label set (422)
    max_label_chars: int = 200  # characters per label (422)
    label_sets: int = 1024  # registered label sets kept (least recently used dropped)
    api_keys: frozenset[str] = frozenset()  # empty: no key needed
    retry_after_s: int = 1  # Retry-After of a 503

    def __post_init__(self) -> None:
        checks = {"max_batch": self.max_batch >= 1, "max_wait_ms": self.max_wait_ms >= 0,
                  "queue": self.queue >= 1, "timeout_s": self.timeout_s > 0,
                  "max_body_mb": self.max_body_mb > 0, "max_pixels": self.max_pixels >= 1,
                  "max_labels": self.max_labels >= 1, "max_label_chars": self.max_label_chars >= 1,
                  "label_sets": self.label_sets >= 1, "retry_after_s": self.retry_after_s >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ServeConfigError(f"{name.replace('_', '-')} must be positive, got "
                                       f"{getattr(self, name)!r}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def limits(self) -> dict[str, float | int]:
        """The limits a client may need to know (GET /v1/model)."""
        return {"max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms,
                "queue": self.queue, "timeout_s": self.timeout_s,
                "max_body_mb": self.max_body_mb, "max_pixels": self.max_pixels,
                "max_labels": self.max_labels, "max_label_chars": self.max_label_chars,
                "label_sets": self.label_sets}


def read_api_keys(path: str | os.PathLike) -> frozenset[str]:
    """API keys of a file: one per line, blank lines and `#` comments ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ServeConfigError(f"API key file {path} does not exist; check the path") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ServeConfigError(f"cannot read API key file {path}: {e}") from e
    keys = frozenset(line.strip() for line in text.splitlines()
                     if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ServeConfigError(f"API key file {path} holds no key; put one key per line")
    return keys
