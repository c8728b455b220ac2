"""The worker's model cache (transcriber/inference.py): the worker's own model for its own
name, other models loaded on demand and at most MAX_EXTRA_MODELS kept, oldest dropped."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from common.metrics import worker_metrics
from common.settings import TranscriberSettings
from transcriber.config import WorkerConfig
from transcriber.inference import Inference


class Counting(Inference):
    """Loads a stand-in object per name instead of a Whisper model."""

    loads: list[str]

    def _load_whisper(self, name: str, tail_frames: int) -> Any:
        self.loads.append(name)
        return object()


def cache(keep: int) -> Counting:
    s = dataclasses.replace(TranscriberSettings(), model="tiny.en", max_extra_models=keep)
    inference = Counting(s, WorkerConfig.from_settings(s), worker_metrics(), model=object())
    inference.loads = []
    return inference


@pytest.mark.parametrize(("keep", "loads"), [
    (0, ["base.en", "base.en", "small.en", "base.en"]),  # 0: loaded for one session only
    (1, ["base.en", "small.en", "base.en"]),  # small.en pushed base.en out
    (2, ["base.en", "small.en"]),
])
def test_other_models_are_kept_up_to_the_setting(keep: int, loads: list[str]) -> None:
    async def run() -> None:
        inference = cache(keep)
        try:
            own = await inference.model_for("tiny.en")
            assert own is inference.model and await inference.model_for("") is own
            for name in ("base.en", "base.en", "small.en", "base.en"):
                assert await inference.model_for(name) is not own
            assert inference.loads == loads
        finally:
            inference.executor.shutdown()

    asyncio.run(run())
