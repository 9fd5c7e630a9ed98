"""The model manifest: the small JSON document that says how to rebuild and feed a model.

Weights files (safetensors, state_dict .pt) carry tensors only; everything needed to
turn them back into a working classifier — architecture, classes, input shape and
input normalisation — lives here, so loading never has to run uploaded code.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ModelManifest(BaseModel):
    """Architecture name + shapes + normalisation. ``arch='exported'`` means a ``.pt2`` program."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(description="registry name, or 'exported' for a torch.export program")
    num_classes: int = Field(ge=2, le=10_000)
    input_shape: tuple[int, int, int] = Field(description="C, H, W of one input image")
    mean: tuple[float, ...] | None = Field(default=None, description="per-channel mean applied inside the model")
    std: tuple[float, ...] | None = Field(default=None, description="per-channel std applied inside the model")
    class_names: list[str] | None = None
    format_version: int = 1

    @field_validator("input_shape")
    @classmethod
    def _check_shape(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = v
        if c not in (1, 3):
            raise ValueError(f"input_shape channels must be 1 or 3, got {c}")
        if not (8 <= h <= 512 and 8 <= w <= 512):
            raise ValueError(f"input_shape height/width must be within 8..512, got {h}x{w}")
        return v

    @model_validator(mode="after")
    def _check_norm(self) -> "ModelManifest":
        c = self.input_shape[0]
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != c or len(self.std) != c:
                raise ValueError(f"mean/std need {c} values (one per channel)")
            if any(s <= 0 for s in self.std):
                raise ValueError("std values must be positive")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError("class_names length must equal num_classes")
        return self

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelManifest":
        return cls.model_validate(json.loads(Path(path).read_text()))
