"""Settings of ``bloodcell curate``; defaults chosen by measurement (docs/curation.md)."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from ..data.sources import DEFAULT_MAX_PIXELS


class SplitConfig(BaseModel):
    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self):
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"split fractions must add up to 1, got {self.train + self.val + self.test:g}")
        return self


class CurateConfig(BaseModel):
    """Settings of ``bloodcell curate``; defaults chosen by measurement (see README)."""

    near_dhash: int = Field(10, ge=0, le=32, description="with near_similarity none: max dHash distance (bits of 64) "
                            "of near duplicates")
    near_phash: int = Field(10, ge=0, le=32, description="with near_similarity none: max pHash distance (bits of 64) "
                            "of near duplicates")
    near_similarity: float | None = Field(
        0.9, ge=0, le=1, description="near duplicates, also copies re-encoded, re-lit, shifted, cropped and resized at "
        "once: aligned cross-correlation at 64 px at least this (copies measured above 0.93, distinct PBC cells below "
        "0.79: docs/curation.md); none: close in both hashes instead (faster, misses combined edits)")
    near_neighbours: int = Field(10, ge=1, le=100, description="nearest images by layout checked per image")
    near_turns: bool = Field(False, description="also find copies turned by quarter turns or mirrored (8x the search)")
    max_copies: int = Field(
        10, ge=2, description="a picture found this many times or more is a contaminant, not a cell capture"
    )
    outlier_mads: float = Field(
        18.0, gt=0, description="contaminant if its outlier score (MADs above the dataset's typical) reaches this"
    )
    outlier_neighbours: int = Field(50, ge=1, description="k of the k-nearest-neighbour outlier score")
    split: SplitConfig = SplitConfig()
    write_images: bool = True
    workers: int = Field(2, ge=1)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
