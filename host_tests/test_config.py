"""config.json and board files: every problem names the file and key."""
import glob
import json
import os

import pytest
from pilehost.virtual_board import ROOT, board_dict

import config


def test_defaults():
    conf = config.parse_config({})
    assert conf.standard == "iec" and conf.max_current_a == 32 and conf.free_vend is False
    assert conf.rcd_retry_s == 300 and conf.rcd_max_trips == 6 and conf.wdt_timeout_ms >= 1000


@pytest.mark.parametrize("data, key", [
    ({"max_current_a": "lots"}, "max_current_a"),
    ({"max_current_a": 5}, "max_current_a"),
    ({"max_current_a": 81}, "max_current_a"),
    ({"max_curent_a": 16}, "max_curent_a"),
    ({"standard": "sae"}, "standard"),
    ({"free_vend": 1}, "free_vend"),
    ({"wdt_timeout_ms": 500}, "wdt_timeout_ms"),
    ({"rcd_max_trips": True}, "rcd_max_trips"),
])
def test_bad_config_names_the_key(data, key):
    with pytest.raises(config.ConfigError) as e:
        config.parse_config(data)
    assert "'%s'" % key in str(e.value) and "config.json" in str(e.value)


def test_config_must_be_an_object():
    with pytest.raises(config.ConfigError, match="JSON object"):
        config.parse_config([1, 2])


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "config.json"
    bad.write_text('{"max_current_a": 16,')
    with pytest.raises(config.ConfigError, match="not valid JSON"):
        config.load_config(str(bad))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "boards", "*.json"))))
def test_every_board_file_is_valid(path):
    with open(path) as f:
        board = config.parse_board(json.load(f))
    assert board.name == os.path.basename(path)[:-5]


def test_example_config_is_valid():
    with open(os.path.join(ROOT, "config.example.json")) as f:
        config.parse_config(json.load(f))


def _broken(mutate):
    board = board_dict()
    mutate(board)
    with pytest.raises(config.ConfigError) as e:
        config.parse_board(board)
    return str(e.value)


def test_board_errors_name_the_key():
    assert "'contactor'" in _broken(lambda b: b["pins"].pop("contactor"))
    assert "'pilot_pwm'" in _broken(lambda b: b["pins"].update(pilot_pwm=-1))
    assert "'relay'" in _broken(lambda b: b["pins"].update(relay=5))
    assert "'uv_at_plus_12v'" in _broken(lambda b: b["pilot_adc"].update(uv_at_plus_12v=9000000))
    assert "0.5 V" in _broken(lambda b: b["pilot_adc"].update(uv_at_plus_12v=300000))
    assert "'tethered_cable_a'" in _broken(lambda b: b["pins"].update(pp_adc=None))
    assert "'ratings'" in _broken(lambda b: b.pop("ratings"))
    assert "'colour'" in _broken(lambda b: b.update(colour="red"))


SECRET_HEX = "0f" * 32


def test_mqtt_section_defaults_and_absence():
    assert config.parse_config({}).mqtt is None
    m = config.parse_config({"mqtt": {"host": "192.0.2.7", "secret": SECRET_HEX}}).mqtt
    assert (m.host, m.port, m.username, m.password, m.tls_ca) == ("192.0.2.7", 1883, None, None, None)
    assert m.tls_server_name is None
    assert (m.keepalive_s, m.status_interval_s, m.meter_interval_s) == (60, 60, 10)
    assert m.secret == SECRET_HEX


@pytest.mark.parametrize("mqtt, key", [
    ({}, "host"),
    ({"host": ""}, "host"),
    ({"host": "10.0.0.1", "port": 0}, "port"),
    ({"host": "10.0.0.1", "keepalive_s": 5}, "keepalive_s"),
    ({"host": "10.0.0.1", "meter_interval_s": 1}, "meter_interval_s"),
    ({"host": "10.0.0.1", "color": "red"}, "color"),
    ({"host": "10.0.0.1", "password": "pw"}, "password"),
    ({"host": "10.0.0.1", "tls_ca": ""}, "tls_ca"),
    ({"host": "10.0.0.1", "tls_ca": True}, "tls_ca"),
    ({"host": "10.0.0.1", "tls_ca": "ca.pem", "tls_server_name": ""}, "tls_server_name"),
    ({"host": "10.0.0.1", "tls_server_name": "broker.example"}, "tls_server_name"),
])
def test_mqtt_errors_name_the_key(mqtt, key):
    with pytest.raises(config.ConfigError, match=key):
        config.parse_config({"mqtt": mqtt})


def test_tls_ca_turns_tls_on_with_its_port():
    m = config.parse_config({"mqtt": {"host": "10.0.0.1", "tls_ca": "ca.pem"}}).mqtt
    assert (m.tls_ca, m.port, m.tls_server_name) == ("ca.pem", 8883, None)  # IANA: secure-mqtt
    m = config.parse_config({"mqtt": {"host": "10.0.0.1", "tls_ca": "ca.pem", "port": 1883,
                                      "tls_server_name": "broker.example"}}).mqtt
    assert (m.port, m.tls_server_name) == (1883, "broker.example")
    assert config.parse_config({"mqtt": {"host": "10.0.0.1", "port": 8883}}).mqtt.tls_ca is None


def test_tls_server_name_without_tls_ca_says_what_is_missing():
    with pytest.raises(config.ConfigError, match="'tls_server_name' needs 'tls_ca'"):
        config.parse_config({"mqtt": {"host": "10.0.0.1", "tls_server_name": "b.example"}})


@pytest.mark.parametrize("secret", ["abc", "zz" * 32, "0f" * 15, 1234567890123456789012345678901234])
def test_a_bad_secret_or_password_is_never_echoed(secret):
    with pytest.raises(config.ConfigError) as e:
        config.parse_config({"mqtt": {"host": "10.0.0.1", "secret": secret}})
    assert str(secret) not in str(e.value) and "secret" in str(e.value)
    with pytest.raises(config.ConfigError) as e:
        config.parse_config({"mqtt": {"host": "10.0.0.1", "username": "u", "password": ["hunter2"]}})
    assert "hunter2" not in str(e.value)
