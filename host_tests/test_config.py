"""config.json and board files: every problem names the file and key."""
import glob
import json
import os

import pytest
from virtual_board import ROOT, board_dict

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
