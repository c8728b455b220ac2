"""Settings: flags beat env vars, env vars beat defaults; every field is documented, and
declared once, in one group per concern."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from common.settings import (
    GROUPS,
    SERVICES,
    AccessSettings,
    FanoutSettings,
    GatewaySettings,
    ListenSettings,
    MessageLimitSettings,
    RedisSettings,
    SessionsApiSettings,
    TranscriberSettings,
    add_arguments,
    configuration_markdown,
    groups_of,
    load,
    settings_table,
)

SERVICE_CLASSES = [cls for _, cls in SERVICES]


def own_fields(cls: type) -> set[str]:
    """The fields written in ``cls``'s own body (not inherited)."""
    return set(inspect.get_annotations(cls))


def test_flag_beats_env_beats_default() -> None:
    env = {"PORT": "9000", "REDIS_URL": "redis://example:1/2", "SEND_QUEUE": "4"}
    s = load(GatewaySettings, ["--port", "9100"], env)
    assert s.port == 9100
    assert s.redis_url == "redis://example:1/2"
    assert s.send_queue == 4
    assert s.close_drain_timeout_s == GatewaySettings().close_drain_timeout_s


def test_booleans_and_floats_parse_from_env() -> None:
    s = load(TranscriberSettings, [], {"INTERIM_RESULTS": "false", "MIN_SILENCE_S": "0.3"})
    assert s.interim_results is False
    assert s.min_silence_s == 0.3


def test_env_names_that_are_not_the_field_name_still_work() -> None:
    assert load(GatewaySettings, [], {"STT_MODEL": "base.en"}).model_name == "base.en"
    assert load(TranscriberSettings, [], {"STT_MODEL_PATH": "/m"}).model == "/m"
    assert load(TranscriberSettings, ["--model", "/n"], {"STT_MODEL_PATH": "/m"}).model == "/n"


@pytest.mark.parametrize("cls", SERVICE_CLASSES, ids=lambda c: c.__name__)
def test_every_setting_has_help_text(cls: type) -> None:
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"
    assert len(settings_table(cls)) == len(dataclasses.fields(cls))


def test_no_two_groups_declare_the_same_field() -> None:
    seen: dict[str, str] = {}
    for g in GROUPS:
        # a group is a leaf: it inherits no other group's fields
        assert {f.name for f in dataclasses.fields(g)} == own_fields(g), g.__name__
        for name in own_fields(g):
            assert name not in seen, f"{name} is declared by {seen[name]} and {g.__name__}"
            seen[name] = g.__name__


@pytest.mark.parametrize("cls", [*SERVICE_CLASSES, AccessSettings, SessionsApiSettings],
                         ids=lambda c: c.__name__)
def test_service_settings_are_their_groups_and_nothing_else(cls: type) -> None:
    """Each field of a service comes from exactly one of its groups; the service's own body
    only gives a group's field another default (same help, same env var)."""
    from_groups = [name for g in groups_of(cls) for name in own_fields(g)]
    assert sorted(from_groups) == sorted(f.name for f in dataclasses.fields(cls))
    for name in own_fields(cls):
        field = next(f for f in dataclasses.fields(cls) if f.name == name)
        group = field.metadata["group"]
        assert group in groups_of(cls)
        original = next(f for f in dataclasses.fields(group) if f.name == name)
        assert field.metadata["help"] == original.metadata["help"]
        assert field.metadata["env"] == original.metadata["env"]


def test_services_are_accepted_where_a_group_union_is_expected() -> None:
    for cls in (GatewaySettings, FanoutSettings):
        assert issubclass(cls, SessionsApiSettings)
        assert issubclass(cls, AccessSettings)
        assert issubclass(cls, RedisSettings)
    assert issubclass(TranscriberSettings, RedisSettings)
    assert not issubclass(TranscriberSettings, AccessSettings)


def test_fanout_keeps_its_own_defaults() -> None:
    assert FanoutSettings().port == 8766 and GatewaySettings().port == ListenSettings().port
    assert FanoutSettings().max_message_bytes == 65536
    assert GatewaySettings().max_message_bytes == MessageLimitSettings().max_message_bytes
    assert load(FanoutSettings, [], {"PORT": "9001"}).port == 9001


def test_groups_can_be_built_alone_by_keyword() -> None:
    assert RedisSettings(redis_url="redis://h:1/0", redis_retries=0).redis_retries == 0
    access = AccessSettings(auth="off", rate_limit_ip_per_s=0.0)
    assert access.auth == "off" and access.rate_limit_ip_burst == 30.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        access.auth = "required"  # type: ignore[misc]


def test_removed_settings_are_gone() -> None:
    """The gateway never read RETENTION_S (the transcriber applies it when it closes a
    session)."""
    assert "retention_s" not in {f.name for f in dataclasses.fields(GatewaySettings)}
    assert TranscriberSettings().retention_s == 86400
    with pytest.raises(SystemExit):
        load(GatewaySettings, ["--retention-s", "5"], {})


def test_help_says_what_a_setting_does_not_how_it_was_measured() -> None:
    """How a default was chosen is in docs/benchmarks.md ("Settings history")."""
    history = re.compile(r"measured|benchmark|\bwas\b|\bwere\b|\d\s?%|\d+(\.\d+)?-\d+(\.\d+)?x")
    for g in GROUPS:
        for f in dataclasses.fields(g):
            assert not history.search(f.metadata["help"]), f"{g.__name__}.{f.name}"


def test_help_is_listed_by_group() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, GatewaySettings)
    text = parser.format_help()
    for g in groups_of(GatewaySettings):
        assert f"\n{GROUPS[g]}:" in text
    assert "Model:" not in text.replace("Models (gateway):", "")  # a transcriber group


def test_configuration_doc_matches_the_code() -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == configuration_markdown(), \
        "docs/configuration.md is stale: python -m common.settings > docs/configuration.md"


def test_transport_bound_is_a_multiple_of_the_message_limit_and_never_below_it() -> None:
    assert GatewaySettings().ws_max_size == 2 * GatewaySettings().max_message_bytes
    assert FanoutSettings().ws_max_size == 2 * 65536
    assert GatewaySettings(transport_max_bytes=5 << 20).ws_max_size == 5 << 20
    assert GatewaySettings(max_message_bytes=1000, transport_max_bytes=10).ws_max_size == 1000
