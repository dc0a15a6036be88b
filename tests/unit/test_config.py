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
    ({"api-listen": "tcp:8081:127.0.0.1:interface=127.0.0.1"},
     "api-listen: 'tcp:8081:127.0.0.1:interface=127.0.0.1': tcp: multiple values for argument 'interface'"),
    ({"api-listen": "tcp:8081:interface=127.0.0.1:bind=1"},
     "api-listen: 'tcp:8081:interface=127.0.0.1:bind=1': tcp: got an unexpected keyword argument 'bind'"),
    ({"allowed-origins": "https://app.example.com/"},
     "allowed-origins: 'https://app.example.com/': an origin has no path, query or fragment (write https://"),
    ({"allowed-origins": "https://*.example.com, example.org"},
     "allowed-origins: 'example.org' is not an origin pattern"),
    ({"api-cors-origins": "* https://a.example"}, "api-cors-origins: * allows every origin; give it alone"),
    ({"api-cors-origins": "https://a.*.example"}, "api-cors-origins: 'https://a.*.example': '*' may only"),
    ({"listen-backlog": "0"}, "listen-backlog: 0 is out of range (must be between 1 and 65535)"),
    ({"listen-backlog": "many"}, "listen-backlog: 'many' is not a whole number"),
    ({"max-request-size": "100"}, "max-request-size: 100 is out of range (must be between 1024 and 1048576)"),
    ({"handshake-timeout": "0.5"}, "handshake-timeout: '0.5' is not a whole number"),
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
    # What Twisted binds: the last of two equal keywords wins, and the interface may be given by position.
    ("tcp:8081:interface=127.0.0.1:interface=0.0.0.0", False),
    ("tcp:8081:interface=0.0.0.0:interface=127.0.0.1", True),
    ("tcp:8081:0.0.0.0", False),
    ("tcp:8081:127.0.0.1", True),
    ("tcp:8081:interface=127.0.0.1:interface=", False),
    ("tcp:8081:interface=127.0.0.1.nip.io", False),
    ("tcp:8081:interface=::ffff:127.0.0.1", False),
    ("ssl:8081:privateKey=k:interface=127.0.0.1", True),
    ("ssl:8081:privateKey=interface=127.0.0.1", False),
    ("tcp6:8081:interface=\\:\\:1", True),
    ("tcp6:8081", False),
    ("tls:/etc/pushd/certs:port=8081:interface=127.0.0.1", True),
    ("tls:/etc/pushd/certs:port=8081", False),
    ("haproxy:tcp:8081:interface=127.0.0.1", True),
    ("haproxy:tcp:8081", False),
    ("systemd:domain=INET:index=0", False),
    ("stdio:", False),
    ("TCP:8081:interface=127.0.0.1", False),  # Twisted knows no TCP: type (types are case-sensitive)
    ("unix:/run/pushd-api.sock:mode=600:lockfile=0", True),
    ("unix:/run/interface=127.0.0.1", False),  # a keyword _parseUNIX does not take: Twisted refuses it
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


def test_the_duplicate_interface_case_is_refused_without_a_key_and_binds_what_the_check_says():
    from twisted.internet import endpoints

    description = "tcp:8081:interface=127.0.0.1:interface=0.0.0.0"
    with pytest.raises(ConfigError) as error:
        build_config({"api-listen": description})
    assert str(error.value) == (f"api-listen: {description!r} is not loopback-only; set api-key to serve the HTTP "
                                "API beyond this machine (or give one interface=127.0.0.1)")
    # Twisted's own reading of it, which the check follows: the last interface= wins.
    assert endpoints.serverFromString(None, description)._interface == "0.0.0.0"


def test_origin_settings_are_parsed_once_into_policies():
    config = build_config({"allowed-origins": "http://127.0.0.1:8000", "api-cors-origins": "*"})
    assert config.allowed_origins.allows_handshake("http://127.0.0.1:8000", "localhost:8443")
    assert not config.allowed_origins.allows_handshake("https://evil.example", "localhost:8443")
    assert config.api_cors_origins.allow_any
    defaults = build_config({})
    assert defaults.listen_backlog == 1024
    assert not defaults.api_cors_origins.matches("http://127.0.0.1:8081")
    assert defaults.allowed_origins.allows_handshake("https://localhost:8443", "localhost:8443")


def test_upgrade_request_bounds_default_to_16_kib_and_5_seconds():
    defaults = build_config({})
    assert (defaults.max_request_size, defaults.handshake_timeout) == (16384, 5)
    assert build_config({"max-request-size": "65536"}).max_request_size == 65536
