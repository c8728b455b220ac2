"""Settings: flags beat env vars, env vars beat defaults; every field is documented."""

from __future__ import annotations

import dataclasses

from common.settings import GatewaySettings, TranscriberSettings, load, settings_table


def test_flag_beats_env_beats_default() -> None:
    env = {"PORT": "9000", "REDIS_URL": "redis://example:1/2", "MAX_QUEUE": "4"}
    s = load(GatewaySettings, ["--port", "9100"], env)
    assert s.port == 9100
    assert s.redis_url == "redis://example:1/2"
    assert s.max_queue == 4
    assert s.close_drain_timeout_s == GatewaySettings().close_drain_timeout_s


def test_booleans_and_floats_parse_from_env() -> None:
    s = load(TranscriberSettings, [], {"INTERIM_RESULTS": "false", "MIN_SILENCE_S": "0.3"})
    assert s.interim_results is False
    assert s.min_silence_s == 0.3


def test_every_setting_has_help_text() -> None:
    for cls in (GatewaySettings, TranscriberSettings):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
        assert len(settings_table(cls)) == len(dataclasses.fields(cls))


def test_configuration_doc_matches_the_code() -> None:
    from pathlib import Path

    from common.settings import configuration_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == configuration_markdown(), \
        "docs/configuration.md is stale: python -m common.settings > docs/configuration.md"
