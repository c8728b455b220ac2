"""A replay's request (fanout/replay.py): its query parameters and the model allowlist.
Replays against a real stack: tests/test_sessions_e2e.py, tests/test_bounds.py."""

from __future__ import annotations

import pytest

from common.errors import BadRequest
from fanout.replay import ReplayParams


def test_replay_query_parameters_parse_and_models_come_from_the_allowlist() -> None:
    assert ReplayParams.parse({}) == ReplayParams("max", None, None, None)
    p = ReplayParams.parse({"speed": ["realtime"], "model": ["base.en"], "language": ["de"],
                            "interim_results": ["false"]})
    assert p == ReplayParams("realtime", "base.en", "de", False)
    for bad in ({"speed": ["fast"]}, {"language": ["e n"]}, {"model": ["a\nb"]}):
        with pytest.raises(BadRequest):
            ReplayParams.parse(bad)
    with pytest.raises(BadRequest):
        ReplayParams.parse({"model": ["other"]}, allowed_models="tiny.en, base.en")
    assert ReplayParams.parse({"model": ["base.en"]}, "tiny.en,base.en").model == "base.en"
