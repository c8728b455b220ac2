"""A viewer socket's request (fanout/viewer.py): its query parameters. Viewers against a
real stack: tests/test_sessions_e2e.py, tests/test_sessions_viewers.py; the hub behind
them: tests/test_hub.py."""

from __future__ import annotations

import pytest

from common.errors import BadRequest
from fanout.viewer import ViewerParams


def test_viewer_query_parameters_parse_and_bad_ones_are_refused() -> None:
    p = ViewerParams.parse({"after": ["5"], "partials": ["true"], "original_timing": ["1"],
                            "speed": ["2.5"]})
    assert p == ViewerParams(5, True, True, 2.5)
    assert ViewerParams.parse({}) == ViewerParams()
    for bad in ({"after": ["-1"]}, {"after": ["x"]}, {"partials": ["maybe"]},
                {"speed": ["0"]}, {"speed": ["nan"]}):
        with pytest.raises(BadRequest):
            ViewerParams.parse(bad)
