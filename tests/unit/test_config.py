"""Settings: precedence, validation with one line naming the setting, and generated files kept current."""

from pathlib import Path

import pytest

from pushd import settings_docs
from pushd.config import SETTINGS, Config, ConfigError, Options, build_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_the_config_dataclass():
    built = build_config({})
    for setting in SETTINGS:
        attribute = setting.name.replace("-", "_")
        if attribute not in ("cert_dir", "listen", "redis"):
            assert getattr(built, attribute) == getattr(Config(), attribute), setting.name


def test_file_then_command_line(tmp_path):
    conf = tmp_path / "pushd.conf"
    conf.write_text("[pushd]\nmax-topics = 50\nping-interval = 30\nlisten = tcp:8080\n  tcp:8081\n")
    config = build_config({"max-topics": "60"}, str(conf))
    assert config.max_topics == 60
    assert config.ping_interval == 30
    assert config.listen == ("tcp:8080", "tcp:8081")


def test_repeatable_listen_option():
    options = Options()
    options.parseOptions(["--listen", "tcp:8080", "--listen", "ssl:8443:privateKey=k:certKey=c"])
    assert build_config(options.given()).listen == ("tcp:8080", "ssl:8443:privateKey=k:certKey=c")


@pytest.mark.parametrize("given, start", [
    ({"max-topics": "0"}, "max-topics: 0 is out of range"),
    ({"max-topics": "lots"}, "max-topics: 'lots' is not a whole number"),
    ({"ping-interval": "0.5"}, "ping-interval: '0.5' is not a whole number"),
    ({"redis": "redis//x"}, "redis: 'redis//x' is not a Redis URL"),
    ({"redis": "redis://host:99999"}, "redis: 'redis://host:99999' has a bad port"),
    ({"ws-path": "ws"}, "ws-path: 'ws' is not a URL path"),
    ({"channel-prefix": "push:*"}, "channel-prefix:"),
    ({"heartbeat-ttl": "5", "heartbeat-interval": "5"}, "heartbeat-ttl: 5 must be longer"),
])
def test_bad_values_name_their_setting(given, start):
    with pytest.raises(ConfigError) as error:
        build_config(given)
    assert str(error.value).startswith(start)
    assert "\n" not in str(error.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="^config: cannot read"):
        build_config({}, str(tmp_path / "missing.conf"))
    bad = tmp_path / "bad.conf"
    bad.write_text("[pushd]\nmax-topic = 3\n")
    with pytest.raises(ConfigError, match="^max-topic: unknown key"):
        build_config({}, str(bad))
    bad.write_text("[server]\nport = 3\n")
    with pytest.raises(ConfigError, match=r"^config: unknown section \[server\]"):
        build_config({}, str(bad))
    bad.write_text("no section header\n")
    with pytest.raises(ConfigError, match="^config: .* is not a valid INI file"):
        build_config({}, str(bad))


def test_help_lists_every_setting_with_its_default():
    text = str(Options())
    for setting in SETTINGS:
        assert f"--{setting.name}" in text
    assert "[default: 1000]" in text


def test_tap_conf_and_configuration_md_are_generated_and_current():
    assert (ROOT / "tap.conf").read_text() == settings_docs.render_tap_conf()
    assert (ROOT / "docs" / "configuration.md").read_text() == settings_docs.render_configuration_md()


def test_tap_conf_loads_to_the_defaults():
    assert build_config({}, str(ROOT / "tap.conf")) == build_config({})


# -- the API issue's settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("given, start", [
    ({"api-listen": "tcp:8081"}, "api-listen: 'tcp:8081' is not loopback-only"),
    ({"api-listen": "tcp:8081:interface=0.0.0.0"}, "api-listen: "),
    ({"auth": "required"}, "auth: required needs one of jwt-secret"),
    ({"auth": "maybe"}, "auth: 'maybe' is not one of off, optional, required"),
    ({"allow-patterns": "perhaps"}, "allow-patterns: 'perhaps' is not yes or no"),
    ({"channel-prefix": "pushd:"}, "channel-prefix: 'pushd:' overlaps key-prefix"),
    ({"history-size": "-1"}, "history-size: -1 is out of range"),
])
def test_api_settings_errors_name_the_setting(given, start):
    with pytest.raises(ConfigError) as error:
        build_config(given)
    assert str(error.value).startswith(start)


def test_api_keys_are_repeatable_and_open_the_api_beyond_loopback():
    options = Options()
    options.parseOptions(["--api-key", "k1", "--api-key", "k2", "--api-listen", "tcp:8081"])
    config = build_config(options.given())
    assert config.api_key == ("k1", "k2") and config.api_listen == "tcp:8081"


@pytest.mark.parametrize("description, loopback", [
    ("tcp:8081:interface=127.0.0.1", True),
    ("tcp:8081:interface=127.0.0.2", True),
    ("tcp:8081:interface=localhost", True),
    ("tcp:8081:interface=\\:\\:1", True),
    ("unix:/run/pushd-api.sock", True),
    ("tcp:8081", False),
    ("tcp:8081:interface=10.0.0.1", False),
    ("ssl:8081:interface=0.0.0.0:privateKey=k", False),
])
def test_loopback_endpoints(description, loopback):
    from pushd.config import is_loopback_endpoint

    assert is_loopback_endpoint(description) is loopback


def test_history_rules_and_key_files_are_checked_at_start_up(tmp_path):
    from pushd.service import auth_policy, history_policies

    with pytest.raises(ConfigError, match="^history-rules: "):
        history_policies(build_config({"history-rules": "orders.*=lots/1"}))
    assert history_policies(build_config({"history-rules": "orders.*=1000/3600"})).for_topic("orders.1").size == 1000
    with pytest.raises(ConfigError, match="^jwt-public-key: "):
        auth_policy(build_config({"jwt-public-key": str(tmp_path / "missing.pem")}))
    with pytest.raises(ConfigError, match="^jwt-secret: "):
        auth_policy(build_config({"jwt-secret": "x" * 32, "jwt-jwks": str(tmp_path / "k.json")}))
    assert auth_policy(build_config({"jwt-secret": "x" * 32})).verifier is not None
