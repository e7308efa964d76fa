"""The synthetic dataset's options (`SyntheticReIDConfig`) and where a generated copy is cached."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ...cache import cache_dir, fingerprint
from ..errors import ReIDDatasetError

GENERATOR_VERSION = 1  # bump when the rendering changes, so cached copies are regenerated


@dataclass(frozen=True)
class SyntheticReIDConfig:
    """Size and seed of the synthetic dataset (the defaults suit a few-minute CPU demo).

    Attributes:
        num_train_identities / num_test_identities: disjoint identity sets.
        num_cameras: cameras (>= 2).
        images_per_identity_per_camera: images of an identity in each camera it appears in (>= 2, so
            every query has a gallery image of the same identity from another camera).
        min_cameras_per_identity: each identity is seen by a random subset of at least this many cameras.
        num_distractors: gallery images of pid 0 (people outside both identity sets).
        image_size: ``(height, width)`` of the written images.
        image_format: ``"jpg"`` or ``"png"``.
        seed: everything is a function of the config, this included.
    """

    num_train_identities: int = 60
    num_test_identities: int = 40
    num_cameras: int = 4
    images_per_identity_per_camera: int = 4
    min_cameras_per_identity: int = 2
    num_distractors: int = 20
    image_size: tuple[int, int] = (128, 64)
    image_format: str = "jpg"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        problems = []
        if self.num_train_identities < 1 or self.num_test_identities < 1:
            problems.append("num_train_identities and num_test_identities must be >= 1")
        if self.num_train_identities + self.num_test_identities > 9999:
            problems.append("at most 9999 identities (4-digit pids)")
        if not 2 <= self.num_cameras <= 99:
            problems.append(f"num_cameras must be in [2, 99], got {self.num_cameras}")
        if not 2 <= self.min_cameras_per_identity <= self.num_cameras:
            problems.append(f"min_cameras_per_identity must be in [2, num_cameras], got {self.min_cameras_per_identity}")
        if self.images_per_identity_per_camera < 2:
            problems.append("images_per_identity_per_camera must be >= 2 (one query, the rest gallery)")
        if self.num_distractors < 0:
            problems.append("num_distractors must be >= 0")
        if len(self.image_size) != 2 or min(self.image_size) < 16:
            problems.append(f"image_size must be (height, width) with both >= 16, got {self.image_size}")
        if self.image_format not in ("jpg", "png"):
            problems.append(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if problems:
            raise ReIDDatasetError("synthetic dataset: " + "; ".join(problems))

    @classmethod
    def from_options(cls, **options) -> SyntheticReIDConfig:
        """Build from keyword options, rejecting unknown ones by name."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise ReIDDatasetError(f"synthetic dataset: unknown option(s) {unknown}; it accepts {names}")
        return cls(**options)

    def to_dict(self) -> dict:
        """JSON-ready options plus the generator version."""
        return {**asdict(self), "image_size": list(self.image_size), "generator_version": GENERATOR_VERSION}

    def fingerprint(self) -> str:
        """Short hash naming the cache folder of this config."""
        return fingerprint(self.to_dict())


def default_synthetic_root(config: SyntheticReIDConfig) -> Path:
    """``$CCAFL_HF_CACHE/synthetic/<fingerprint>`` (default cache ``~/.cache/ccafl_hf``)."""
    return cache_dir("synthetic", config.fingerprint())
