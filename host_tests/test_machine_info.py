"""The header lines benchmarks print (pilehost/machine_info.py) and the chip model's figure files."""
import json
import os
import re

from pilehost import chipmodel, machine_info


def test_cpu_model_is_a_name():
    name = machine_info.cpu_model()
    assert name and "\n" not in name


def test_cpu_model_without_proc(monkeypatch):
    def no_file(*_a, **_k):
        raise OSError("no /proc here")
    monkeypatch.setattr("builtins.open", no_file)
    assert machine_info.cpu_model() == "unknown CPU"


def test_machine_line_names_cpus_and_load():
    text = machine_info.machine()
    assert re.search(r", %d CPUs, load \d+\.\d\d$" % os.cpu_count(), text)
    assert machine_info.machine(with_platform=True).startswith(text + "; ")
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC; ", machine_info.when_and_where())


def test_save_figures_writes_the_head_lines_and_json(tmp_path, monkeypatch):
    monkeypatch.setattr(chipmodel, "OUT_DIR", str(tmp_path / "chip"))
    chipmodel.save_figures("chip-x", "make bench WHAT=x", ["a line", "b line"], {"figures": {"n": 1}})
    text = (tmp_path / "chip" / "chip-x.txt").read_text().splitlines()
    assert text[0].startswith("# make bench WHAT=x, ") and os.uname().nodename in text[0]
    assert text[1:] == ["a line", "b line"]
    assert json.loads((tmp_path / "chip" / "chip-x.json").read_text()) == {"figures": {"n": 1}}


def test_calibration_per_million():
    cal = chipmodel.Calibration(1000)
    assert cal.per_million() == "1000 instructions a pystone -> %.2f-%.2f ms per million instructions" % (
        cal.fast * 1e6, cal.slow * 1e6)
