"""A run's fidelity in a planned search: its rung, how many training images (a stratified, seeded subset of the
training split) and how many epochs. Every trial of a planned search records it, so a replay or an export trains
on the very same images (and checks the subset's hash against the trial's recorded split hash)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pipeline.data.loading import PreparedData
from pipeline.spec import studies
from pipeline.spec.errors import DataError

FULL = -1  # the rung of a full-fidelity run (the champion phase's)


@dataclass(frozen=True)
class Fidelity:
    rung: int  # 0, 1, ... or FULL
    images: int  # training images (the whole split: full)
    epochs: int
    subset_seed: int  # the subset's seed: the same images for every configuration of a study

    def data(self, prepared: PreparedData) -> PreparedData:
        """The data a run of this fidelity trains on: `images` of the training split, the validation split whole."""
        return prepared.training_subset(self.images, self.subset_seed)

    def params(self, params: dict[str, Any]) -> dict[str, Any]:
        return {**params, "epochs": self.epochs}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, recorded: dict[str, Any]) -> Fidelity:
        return cls(**{k: recorded[k] for k in ("rung", "images", "epochs", "subset_seed")})


def subset_seed(spec: studies.StudySpec) -> int:
    return studies.derive_seed(spec.seed, "rung subset")


def recorded_data(fidelity: dict[str, Any] | None, split_hash: str | None, prepared: PreparedData,
                  what: str) -> PreparedData:
    """The data a recorded run trained on: its rung's subset (checked against its recorded split hash)."""
    if fidelity is None:
        return prepared
    data = Fidelity.from_dict(fidelity).data(prepared)
    if split_hash is not None and data.split_hash != split_hash:
        raise DataError(f"{what} trained on a subset of hash {split_hash}, but the same subset of today's data has "
                        f"hash {data.split_hash}; the training split changed since (val_size, the pictures)")
    return data
