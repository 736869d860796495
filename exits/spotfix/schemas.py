"""Request bodies of the spot-fix API (pydantic; unknown fields and non-finite numbers are
refused, so a malformed request fails validation before it can change anything)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

MAX_CLICKS = 64
MAX_RLE_CHARS = 200_000
USER_PATTERN = r"^[A-Za-z0-9_.@+-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClickIn(_Strict):
    """One click in image pixels; the image bounds are checked against the object's image."""

    x: float = Field(allow_inf_nan=False)
    y: float = Field(allow_inf_nan=False)
    positive: StrictBool


class RleIn(_Strict):
    """COCO compressed RLE of a full-image mask."""

    size: tuple[int, int]
    counts: str = Field(min_length=1, max_length=MAX_RLE_CHARS)


class PredictIn(_Strict):
    clicks: list[ClickIn] = Field(min_length=1, max_length=MAX_CLICKS)
    prev_rle: RleIn | None = None


class DecisionIn(_Strict):
    decision: Literal["accept", "reject"]
    clicks: list[ClickIn] = Field(default_factory=list, max_length=MAX_CLICKS)
    rle: RleIn | None = None
    base: Literal["pseudo", "fix"] = "pseudo"
    revision: int | None = Field(default=None, ge=0, description="the object's revision this page loaded; "
                                 "a different current revision (decided in another tab) is refused with 409")
    user: str | None = Field(default=None, pattern=USER_PATTERN)
