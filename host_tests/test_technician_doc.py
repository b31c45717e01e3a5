"""docs/technician.md against what it describes: the pin table is tools/pin_table.py's output
for boards/ref-esp32.json, and its fault table explains every code the pile can report."""
import json
import os
import re

import charger as ch
import pytest

from pilehost import ROOT
from pilehost import pin_table

DOC = os.path.join(ROOT, "docs", "technician.md")
BOARD = os.path.join(ROOT, "boards", "ref-esp32.json")


@pytest.fixture(scope="module")
def doc():
    with open(DOC) as f:
        return f.read()


def load_board():
    with open(BOARD) as f:
        return json.load(f)


def doc_pin_table(doc):
    m = re.search(r"<!-- pin-table: boards/ref-esp32\.json[^>]*-->\n(.*?)<!-- end pin-table -->", doc, re.S)
    assert m, "no pin-table markers in docs/technician.md"
    return m.group(1)


def fault_rows(doc):
    """The first cell of each row of the table under '## Fault codes': {code: whole row}."""
    section = doc.split("## Fault codes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_]+)` \|", line)
        if m:
            rows[m.group(1)] = line
    return rows


def firmware_codes():
    """Fault names (charger.FAULT_NAMES), the stop reasons the controller sets on its own, and
    the codes the fault message's schema lets the cloud receive."""
    codes = {name for _bit, name in ch.FAULT_NAMES}
    with open(os.path.join(ROOT, "firmware", "controller.py")) as f:
        codes |= set(re.findall(r'stop_session\(now_ms, "([a-z_]+)"\)', f.read()))
    with open(os.path.join(ROOT, "docs", "schemas", "fault.v1.schema.json")) as f:
        codes |= set(json.load(f)["properties"]["code"]["enum"])
    return codes


def test_the_pin_table_is_the_generators_output_for_the_reference_board(doc):
    assert doc_pin_table(doc) == pin_table.table(load_board())


def test_the_pin_table_names_every_pin_of_the_board():
    text = pin_table.table(load_board())
    for key, gpio in load_board()["pins"].items():
        if key in pin_table.SETTINGS:
            assert "UART %d" % gpio in text
        else:
            assert "| %s | `%s` |" % (gpio, key) in text


def test_the_pin_table_refuses_a_pin_it_does_not_know():
    board = load_board()
    board["pins"]["fan"] = 5
    with pytest.raises(ValueError, match="fan"):
        pin_table.table(board)


def test_the_pin_table_shows_what_is_not_fitted():
    board = load_board()
    board["pins"]["contactor_feedback"] = None
    board["pins"]["pp_adc"] = None
    board["ratings"]["tethered_cable_a"] = 16
    text = pin_table.table(board)
    assert "| — | `contactor_feedback` |" in text and "cannot be detected" in text
    assert "tethered cable, 16 A" in text


def test_the_command_line_prints_the_table(capsys):
    assert pin_table.main([BOARD]) == 0
    assert capsys.readouterr().out == pin_table.table(load_board())
    assert pin_table.main([]) == 2


def test_every_fault_code_is_in_the_fault_table(doc):
    rows = fault_rows(doc)
    codes = firmware_codes()
    assert {"welded", "rcd_lockout", "meter_failure"} <= codes  # what this test reads is there
    assert sorted(codes - set(rows)) == []
    assert sorted(set(rows) - codes) == []  # no row for a code that is gone


def test_latched_faults_say_how_the_technician_clears_them(doc):
    rows = fault_rows(doc)
    latched = [name for bit, name in ch.FAULT_NAMES if bit & ch.LATCHED_FAULTS]
    assert latched
    for name in latched:
        assert "make clear-fault FAULT=%s" % name in rows[name]
