"""Step-indexed data order for training (docs/official-implementation.md §3 "Data";
DistributedSampler-like sharding).

A batch is a pure function of (seed, step, rank): the run is split into phases (an optional
curriculum phase over single-object images, then the main phase over every pair); each phase
cycles epochs over its pool in the order `segclip.data.pairs.epoch_order(len(pool), seed,
epoch)`; a global batch of world_size * batch_size consecutive samples is cut, and rank r takes
its r-th slice. Incomplete batches at an epoch's end are dropped. With `colour_groups` = k the
main phase's epoch order is regrouped into runs of k images that show the same set of colours
(`grouped_order`), so a batch holds hard negatives whose captions differ in shape, not colour
(docs/synthetic-world.md, "Colour-grouped batches"). Resuming at step k therefore
only needs k. Items are (index, epoch) pairs, which `PairDataset` accepts, so crops are a
function of (seed, epoch, index) too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

from segclip.data.pairs import PairDataset, epoch_order
from segclip.errors import DataError

CURRICULUM_EPOCH_OFFSET = 1_000_000  # curriculum epochs draw other crops than the main phase's


@dataclass(frozen=True)
class Phase:
    pool: np.ndarray  # (P,) dataset indices drawn in this phase
    steps: int  # steps in this phase
    epoch_offset: int  # added to the epoch number given to the dataset
    keys: np.ndarray | None = None  # (P,) group key per pool item (colour_groups), or None
    group: int = 0  # consecutive same-key items per run (0: plain shuffling)


def grouped_order(keys: np.ndarray, group: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of range(len(keys)) made of runs of `group` items with the same key (the
    last run of a key may be shorter), runs in random order: (P,) int64."""
    base = epoch_order(len(keys), seed, epoch)  # random order inside each key
    by_key = base[np.argsort(keys[base], kind="stable")]  # (P,) keys ascending
    sorted_keys = keys[by_key]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])  # key starts
    ends = np.r_[starts[1:], len(keys)]
    runs = [by_key[i:min(i + group, end)] for start, end in zip(starts, ends)
            for i in range(start, end, group)]
    shuffle = np.random.default_rng([seed, epoch, 0xC010]).permutation(len(runs))
    return np.concatenate([runs[i] for i in shuffle]).astype(np.int64)


class StepBatchSampler(Sampler):
    """Yields this rank's batches for steps [start, total): lists of (index, epoch) pairs."""

    def __init__(self, phases: Sequence[Phase], batch_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 42, start: int = 0) -> None:
        self.phases = tuple(phases)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.seed, self.start = seed, start
        for phase in self.phases:
            if len(phase.pool) < batch_size * world_size:
                raise DataError(f"a training phase has {len(phase.pool)} samples, fewer than one "
                                f"global batch ({world_size} x {batch_size}); lower the batch "
                                "size or add data")

    @property
    def total(self) -> int:
        return sum(phase.steps for phase in self.phases)

    def steps_per_epoch(self, phase: Phase) -> int:
        return len(phase.pool) // (self.batch_size * self.world_size)

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This rank's (index, epoch) items at global `step`."""
        for phase in self.phases:
            if step < phase.steps:
                per_epoch = self.steps_per_epoch(phase)
                epoch, position = divmod(step, per_epoch)
                if phase.keys is not None and phase.group > 1:
                    order = grouped_order(phase.keys, phase.group, self.seed,
                                          epoch + phase.epoch_offset)
                else:
                    order = epoch_order(len(phase.pool), self.seed, epoch + phase.epoch_offset)
                width = self.batch_size * self.world_size
                chunk = order[position * width:(position + 1) * width]  # (world*B,)
                mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                return [(int(phase.pool[i]), epoch + phase.epoch_offset) for i in mine]
            step -= phase.steps
        raise IndexError(f"step {step} is past the end of the data plan")

    def epoch(self, step: int) -> float:
        """Fractional epoch of the phase `step` is in (for logging)."""
        for phase in self.phases:
            if step < phase.steps:
                return step / self.steps_per_epoch(phase)
            step -= phase.steps
        return float("nan")

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return (self.batch(step) for step in range(self.start, self.total))

    def __len__(self) -> int:
        return self.total - self.start


def read_objects(dataset: PairDataset, option: str) -> list[list[dict]]:
    """The object list of every pair, from the `meta.jsonl` beside each source's pairs.jsonl
    (the synthetic world writes it); `option` names the setting that needs it."""
    objects: list[list[dict]] = []
    for source in dataset.sources:
        meta_path = Path(source.origin).with_name("meta.jsonl")
        if not meta_path.is_file():
            raise DataError(f"{option} needs {meta_path} (the objects of every image, as "
                            f"`segclip-data synth` writes); set {option}=0")
        lines = [line for line in meta_path.read_text().splitlines() if line.strip()]
        if len(lines) != len(source.pairs):
            raise DataError(f"{meta_path} has {len(lines)} records for {len(source.pairs)} pairs")
        objects += [json.loads(line).get("objects", []) for line in lines]
    return objects


def colour_keys(dataset: PairDataset) -> np.ndarray:
    """(len(dataset),) int64: one id per set of object colours ("red star and blue circle" and
    "blue square and red triangle" share one)."""
    ids: dict[tuple[str, ...], int] = {}
    keys = [ids.setdefault(tuple(sorted({o["class"].split()[0] for o in objects})), len(ids))
            for objects in read_objects(dataset, "colour_groups")]
    return np.asarray(keys, dtype=np.int64)


def object_captions(dataset: PairDataset) -> None:
    """Replace every caption with one that names each object and nothing else ("a red star and
    a blue circle", from `read_objects`): no positions or counts that tell captions apart
    without shape (TrainConfig.captions = "objects")."""
    objects = read_objects(dataset, "captions=objects")
    named = [" and ".join(f"{'an' if o['class'][0] in 'aeiou' else 'a'} {o['class']}"
                          for o in found) for found in objects]
    dataset.items = [(number, pair._replace(caption=caption or pair.caption))
                     for (number, pair), caption in zip(dataset.items, named)]


def single_object_pool(dataset: PairDataset) -> np.ndarray:
    """Indices of the pairs whose image holds one object (`read_objects`)."""
    pool = [i for i, objects in enumerate(read_objects(dataset, "curriculum_steps"))
            if len(objects) == 1]
    if not pool:
        raise DataError("curriculum: no single-object images in the training data")
    return np.asarray(pool, dtype=np.int64)


def plan_phases(dataset: PairDataset, steps: int, epochs: int, curriculum_steps: int,
                batch_size: int, world_size: int, colour_groups: int = 0) -> list[Phase]:
    """The phases of a run: curriculum (if any), then `steps` (or `epochs` worth) of the rest,
    colour-grouped when `colour_groups` > 1."""
    everything = np.arange(len(dataset), dtype=np.int64)
    per_epoch = len(dataset) // (batch_size * world_size)
    main_steps = steps - curriculum_steps if steps else epochs * per_epoch
    if main_steps <= 0:
        raise DataError(f"no main-phase steps: steps={steps}, curriculum_steps="
                        f"{curriculum_steps}, epochs={epochs} x {per_epoch} steps")
    phases = []
    if curriculum_steps:
        phases.append(Phase(single_object_pool(dataset), curriculum_steps,
                            CURRICULUM_EPOCH_OFFSET))
    keys = colour_keys(dataset) if colour_groups > 1 else None
    phases.append(Phase(everything, main_steps, 0, keys, colour_groups))
    return phases
