"""A test-only defense that just waits, step by step, so jobs can be cancelled or killed mid-run.

Imported by the service tests (pytest process) and by test workers (``celery … -I slow_defense``);
importing it registers method ``slow``. It never changes the model.
"""
from __future__ import annotations

import time

from pydantic import Field

from onp_core.data.dataset import ImageSet
from onp_core.defenses import _REGISTRY
from onp_core.defenses.base import DefenseConfig, ProgressCallback, RepairResult, Timer, report, working_copy
from onp_core.models import ImageClassifier

NAME = "slow"
_REGISTRY.setdefault(NAME, __name__)


class Config(DefenseConfig):
    steps: int = Field(100, ge=1)
    delay: float = Field(0.1, ge=0)


def repair(model: ImageClassifier, clean: ImageSet, config: Config, progress: ProgressCallback | None = None
           ) -> RepairResult:
    timer = Timer()
    for step in range(config.steps):
        report(progress, step, config.steps, "waiting", loss=1.0 / (step + 1))
        time.sleep(config.delay)
    report(progress, config.steps, config.steps, "waiting")
    return RepairResult(working_copy(model), NAME, {}, 0.0, 0.0, timer.seconds,
                        trace=[{"step": i, "loss": 1.0 / (i + 1)} for i in range(config.steps)])
