"""What a weight conversion did: which keys it used, filled, left out or could not place."""

from __future__ import annotations

from dataclasses import dataclass, field

from segclip.config import ModelConfig


@dataclass(frozen=True)
class LoadReport:
    """The outcome of mapping a foreign state dict onto a SegCLIP model.

    `loaded`, `missing` and `shape_mismatch` use segclip parameter names; `unexpected` and
    `ignored` use the names found in the source file.
    """

    source: str
    loaded: tuple[str, ...]  # our parameters/buffers filled from the file
    missing: tuple[str, ...] = ()  # ours, left at their fresh initialisation
    unexpected: tuple[str, ...] = ()  # source keys with no place in the model
    ignored: tuple[str, ...] = ()  # source keys dropped on purpose (metadata, training-only)
    config: ModelConfig | None = None  # the model's config (inferred from shapes where converted)
    notes: tuple[str, ...] = field(default=())  # facts worth telling the user

    def summary(self, limit: int = 8) -> str:
        """A few human-readable lines: counts, then the first `limit` names of each list."""
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors"]
        for label, names in (("missing (kept fresh initialisation)", self.missing),
                             ("unexpected (not used)", self.unexpected),
                             ("ignored", self.ignored)):
            if names:
                lines.append(f"  {label}: {len(names)}: {_preview(names, limit)}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _preview(names: tuple[str, ...], limit: int) -> str:
    """The names themselves when few, else a count per top-level module (`group.*: 31`)."""
    if len(names) <= limit:
        return ", ".join(names)
    counts: dict[str, int] = {}
    for name in names:
        head = name.split(".", 1)[0]
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{head}.*: {n}" for head, n in counts.items())
