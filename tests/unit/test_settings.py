"""Relay settings declared once: flags, ``FEDRELAY_*`` and defaults from ``RelayConfig``.

The flags are the real ``fedrelay serve`` parser's; precedence is checked through it for a
setting of each kind (int, float, bool, list, optional str, choice).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrelay.cli import build_parser
from fedrelay.relay.config import RelayConfig, SettingsError, env_name, flag_of
from fedrelay.relay.settings_cli import given_settings
from fedrelay.relay.settings_doc import render_settings_table, with_table

DOC = Path(__file__).resolve().parents[2] / "docs/settings.md"


def configure(*flags: str, env: dict[str, str] | None = None) -> RelayConfig:
    """What ``FEDRELAY_*=... fedrelay serve <flags>`` would run with."""
    args = build_parser().parse_args(["serve", *flags])
    return RelayConfig.from_env(env or {}, **given_settings(args))


def refused(*flags: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(SettingsError) as caught:
        configure(*flags, env=env)
    return str(caught.value)


def test_defaults_are_the_relays_as_before():
    config = configure()
    assert config.host == ["127.0.0.1", "::1"] and config.port == 8765
    assert config.db.endswith("relay.db") and not config.in_memory
    assert (config.replay_size, config.replay_bytes, config.retain_events) == (1000, 8 << 20, 0)
    assert config.forget_producers_after == 30 * 86400.0
    assert (config.max_frame_bytes, config.max_events_per_frame) == (1 << 20, 1000)
    assert (config.max_queue_bytes, config.max_store_lag, config.max_connections_per_ip) == (
        4 << 20,
        200_000,
        2048,
    )
    assert config.publish_token is None and config.subscribe_token is None and config.allow_origins == []
    assert config.certfile is None and config.keyfile is None and not config.tls
    assert (config.stall_after, config.ping_interval, config.ping_timeout) == (300.0, 20.0, 20.0)
    assert config.compression is False
    assert config.alert_webhook == [] and config.alert_rule == [] and config.alerts is None
    assert config.alerting is None
    assert (config.log_level, config.log_format) == ("info", "text")


@pytest.mark.parametrize(
    ("name", "flag", "env_value", "expected_env", "flag_value", "expected_flag"),
    [
        ("port", "--port", "9000", 9000, "9001", 9001),
        ("stall_after", "--stall-after", "12.5", 12.5, "0", 0.0),
        ("max_store_lag", "--max-store-lag", "5", 5, "6", 6),
        ("subscribe_token", "--subscribe-token", "env-s", "env-s", "flag-s", "flag-s"),
        ("log_level", "--log-level", "DEBUG", "debug", "error", "error"),
        ("db", "--db", "/tmp/env.db", "/tmp/env.db", "/tmp/flag.db", "/tmp/flag.db"),
    ],
)
def test_a_flag_wins_over_the_environment_which_wins_over_the_default(
    name, flag, env_value, expected_env, flag_value, expected_flag
):
    env = {env_name(name): env_value}
    default = RelayConfig.model_fields[name].get_default(call_default_factory=True)
    assert getattr(configure(), name) == default != expected_env
    assert getattr(configure(env=env), name) == expected_env
    assert getattr(configure(flag, flag_value, env=env), name) == expected_flag


def test_bools_are_yes_no_words_in_the_environment_and_x_or_no_x_as_flags():
    for word in ("1", "true", "Yes", "on"):
        assert configure(env={"FEDRELAY_COMPRESSION": word}).compression is True
    for word in ("0", "false", "no", "OFF", ""):
        assert configure(env={"FEDRELAY_COMPRESSION": word}).compression is False
    assert configure("--compression").compression is True
    assert configure("--no-compression", env={"FEDRELAY_COMPRESSION": "yes"}).compression is False
    assert configure("--compression", env={"FEDRELAY_COMPRESSION": "no"}).compression is True


def test_lists_are_comma_separated_in_the_environment_and_repeated_flags():
    env = {"FEDRELAY_HOST": " 127.0.0.1 ,::1,,", "FEDRELAY_ALLOW_ORIGINS": "http://a.test,https://b.test"}
    config = configure(env=env)
    assert config.host == ["127.0.0.1", "::1"]
    assert config.allow_origins == ["http://a.test", "https://b.test"]
    flagged = configure("--host", "127.0.0.2,127.0.0.3", "--host", "::1", "--allow-origin", "*", env=env)
    assert flagged.host == ["127.0.0.2", "127.0.0.3", "::1"]  # --host values split on commas, as before
    assert flagged.allow_origins == ["*"]  # the flags replace the variable's list, not add to it
    rule = "no improvement of auroc for 10 rounds"
    assert configure("--alert-webhook", "https://h.test/x", "--alert-rule", rule).alert_rule == [rule]


def test_an_empty_optional_string_in_the_environment_is_unset_but_an_empty_flag_is_refused():
    assert configure(env={"FEDRELAY_PUBLISH_TOKEN": ""}).publish_token is None
    assert configure(env={"FEDRELAY_CERTFILE": ""}).certfile is None
    said = refused("--publish-token", "")
    assert said == "--publish-token is empty; leave it out to run without a token"


def test_memory_flag_is_the_in_memory_database():
    args = build_parser().parse_args(["serve", "--memory"])
    assert args.memory is True and args.db is None  # cli._serve turns it into db=":memory:"
    assert RelayConfig.from_env({}, db=":memory:").in_memory


def test_bad_values_name_the_flag_and_the_variable():
    assert refused(env={"FEDRELAY_PORT": "eighty"}) == "FEDRELAY_PORT='eighty' is not a valid int"
    assert refused(env={"FEDRELAY_STALL_AFTER": "soon"}) == "FEDRELAY_STALL_AFTER='soon' is not a valid float"
    assert (
        refused(env={"FEDRELAY_COMPRESSION": "maybe"}) == "FEDRELAY_COMPRESSION='maybe' is not a valid bool"
    )
    assert refused(env={"FEDRELAY_LOG_FORMAT": "xml"}) == (
        "FEDRELAY_LOG_FORMAT='xml' is not one of text, json"
    )
    assert (
        refused("--replay-size", "-1") == "--replay-size / FEDRELAY_REPLAY_SIZE must be a number >= 0, not -1"
    )
    assert refused(env={"FEDRELAY_MAX_QUEUE_BYTES": "10"}) == (
        "--max-queue-bytes / FEDRELAY_MAX_QUEUE_BYTES must be a number >= 1024, not 10"
    )
    assert (
        refused("--ping-timeout", "nan")
        == "--ping-timeout / FEDRELAY_PING_TIMEOUT must be a number >= 0, not nan"
    )
    assert refused("--port", "70000") == "--port / FEDRELAY_PORT must be 0-65535, not 70000"
    assert refused(env={"FEDRELAY_HOST": ","}) == "--host / FEDRELAY_HOST names no address to listen on"
    assert (
        refused("--keyfile", "k.pem")
        == "--keyfile / FEDRELAY_KEYFILE needs --certfile / FEDRELAY_CERTFILE too"
    )
    assert "no webhook" in refused("--alert-rule", "val_loss > 2")
    two = refused("--port", "-1", env={"FEDRELAY_RETAIN_EVENTS": "x"})  # every problem at once
    assert "--port / FEDRELAY_PORT must be a number >= 0" in two and "FEDRELAY_RETAIN_EVENTS='x'" in two


def test_a_bad_value_in_code_is_refused_with_the_same_words():
    with pytest.raises(SettingsError, match="must be a number, not True"):
        RelayConfig(port=True, db=":memory:")
    with pytest.raises(SettingsError, match="portt: no such setting"):
        RelayConfig(portt=1)


def test_construction_in_code_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("FEDRELAY_REPLAY_SIZE", "7")
    monkeypatch.setenv("FEDRELAY_PUBLISH_TOKEN", "from-env")
    config = RelayConfig(db=":memory:", host="127.0.0.1")
    assert config.replay_size == 7 and config.publish_token == "from-env" and config.host == ["127.0.0.1"]
    assert RelayConfig.from_env({}, db=":memory:").replay_size == 1000  # a mapping given: only that
    assert "from-env" not in repr(config)  # secrets stay out of logs and tracebacks


def test_every_setting_has_a_flag_a_variable_and_a_docstring():
    parser_flags = {
        option
        for action in build_parser()._subparsers._group_actions[0].choices["serve"]._actions
        for option in action.option_strings
    }
    for name, field in RelayConfig.model_fields.items():
        assert field.description, f"{name} needs a docstring: it is the flag's help and the docs"
        assert flag_of(name, field) in parser_flags
        assert env_name(name) == "FEDRELAY_" + name.upper()


def test_the_settings_table_in_the_docs_is_current():
    committed = DOC.read_text()
    assert with_table(committed) == committed, (
        "docs/settings.md's table is stale: regenerate it with "
        "`python -m fedrelay.relay.settings_doc docs/settings.md`"
    )
    table = render_settings_table()
    for name in RelayConfig.model_fields:
        assert f"`{env_name(name)}`" in table
    assert "| `--allow-origin` | `FEDRELAY_ALLOW_ORIGINS` |" in table
    assert "| 8 MiB |" in table and "relay.db in the user data dir" in table
