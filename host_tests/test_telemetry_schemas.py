"""The telemetry contract (docs/telemetry.md, docs/schemas): every example validates, every kind of
mistake a pile could make is caught, and the enums agree with each other and with the firmware."""
import glob
import json
import os
import re

import pytest
from jsonschema import Draft202012Validator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_DIR = os.path.join(ROOT, "docs", "schemas")
DOC = os.path.join(ROOT, "docs", "telemetry.md")


def load_schemas():
    out = {}
    for path in sorted(glob.glob(os.path.join(SCHEMA_DIR, "*.schema.json"))):
        with open(path, encoding="utf-8") as f:
            out[os.path.basename(path)] = json.load(f)
    return out


SCHEMAS = load_schemas()
EXAMPLES = [(name, i) for name, s in SCHEMAS.items() for i in range(len(s.get("examples", [])))]
KINDS = ("status", "online", "session_started", "session_ended", "meter", "fault", "cmd_ack", "ota",
         "health")


def validator(name):
    return Draft202012Validator(SCHEMAS[name])


def schema(kind):
    return SCHEMAS["%s.v1.schema.json" % kind]


def errors(name, obj):
    return [e.message for e in validator(name).iter_errors(obj)]


def test_one_schema_per_message():
    assert sorted(SCHEMAS) == sorted("%s.v1.schema.json" % k for k in KINDS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_is_strict_draft_2020_12(name):
    s = SCHEMAS[name]
    Draft202012Validator.check_schema(s)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["additionalProperties"] is False
    assert sorted(s["required"]) == sorted(s["properties"]), "every field is required (null where absent)"
    assert s["properties"]["v"] == {"const": 1, "description": "Version of this message's schema."}
    assert s["x-topic"].startswith("evse/v1/{pile_id}/")
    assert s["x-qos"] in (0, 1) and isinstance(s["x-retain"], bool)
    assert len(s["examples"]) >= 2
    for field, spec in s["properties"].items():
        assert spec.get("description"), "%s: %s has no description" % (name, field)


@pytest.mark.parametrize("name,index", EXAMPLES)
def test_example_validates(name, index):
    assert errors(name, SCHEMAS[name]["examples"][index]) == []


@pytest.mark.parametrize("name,index", EXAMPLES)
def test_missing_field_fails(name, index):
    example = SCHEMAS[name]["examples"][index]
    for field in example:
        broken = {k: v for k, v in example.items() if k != field}
        assert errors(name, broken), "%s still valid without %s" % (name, field)


@pytest.mark.parametrize("name,index", EXAMPLES)
def test_wrong_type_fails(name, index):
    example = SCHEMAS[name]["examples"][index]
    for field, value in example.items():
        # another JSON type than the example's: no field takes an object, no nullable one a boolean
        other = True if value is None else ("1" if not isinstance(value, str) else 1)
        for wrong in ({"x": 1}, other):
            broken = dict(example, **{field: wrong})
            assert errors(name, broken), "%s accepts %s=%r" % (name, field, wrong)


@pytest.mark.parametrize("name,index", EXAMPLES)
def test_extra_field_fails(name, index):
    example = SCHEMAS[name]["examples"][index]
    assert errors(name, dict(example, note="hello"))
    assert errors(name, dict(example, V=1))


@pytest.mark.parametrize("name,index", EXAMPLES)
def test_wrong_version_fails(name, index):
    example = SCHEMAS[name]["examples"][index]
    for v in (0, 2, "1", 1.5, True, None):
        assert errors(name, dict(example, v=v)), "%s accepts v=%r" % (name, v)


def test_integer_fields_refuse_floats_and_booleans():
    example = schema("session_ended")["examples"][0]
    for field in ("energy_wh", "meter_start_wh", "duration_s", "peak_power_w", "connector"):
        assert errors("session_ended.v1.schema.json", dict(example, **{field: 9.5}))
        assert errors("session_ended.v1.schema.json", dict(example, **{field: True}))
        assert errors("session_ended.v1.schema.json", dict(example, **{field: -1}))


def test_auth_id_goes_with_the_source():
    example = schema("session_ended")["examples"][0]  # remote with an id tag
    assert errors("session_ended.v1.schema.json", dict(example, auth_id=None))
    assert errors("session_ended.v1.schema.json", dict(example, auth_source="free_vend"))
    assert errors("session_ended.v1.schema.json", dict(example, auth_id=""))


@pytest.mark.parametrize("session_id,ok", [
    ("pile-0042-17-3", True), ("A-1-1", True), ("site.3_east-9-4294967295", True),
    ("pile-0042-0-3", False),  # boots count from 1
    ("pile-0042-17-0", False),  # sessions count from 1
    ("pile-0042-017-3", False), ("pile/0042-17-3", False), ("pile 42-17-3", False), ("pile-0042-17", False),
    ("-17-3", False), ("pile+0042-17-3", False),
])
def test_session_id_format(session_id, ok):
    example = schema("session_ended")["examples"][0]
    assert (errors("session_ended.v1.schema.json", dict(example, session_id=session_id)) == []) is ok


@pytest.mark.parametrize("ts,ok", [
    ("2026-11-23T09:41:07Z", True), ("2000-01-01T00:00:00Z", True),
    ("2026-11-23T09:41:07.5Z", False), ("2026-11-23T09:41:07+01:00", False), ("2026-11-23 09:41:07Z", False),
    ("2026-13-23T09:41:07Z", False), ("2026-11-23T24:00:00Z", False), ("1700000000", False),
])
def test_time_format(ts, ok):
    example = schema("fault")["examples"][0]
    assert (errors("fault.v1.schema.json", dict(example, ts=ts)) == []) is ok


def test_offer_is_zero_or_in_the_pwm_range():
    example = schema("status")["examples"][0]
    for offer, ok in ((0, True), (0.0, True), (6, True), (6.0, True), (16.5, True), (80, True),
                      (3.0, False), (5.9, False), (80.1, False), (-1, False)):
        assert (errors("status.v1.schema.json", dict(example, offer_a=offer)) == []) is ok, offer


def test_enums_agree():
    faults = schema("fault")["properties"]["code"]["enum"]
    assert schema("status")["properties"]["faults"]["items"]["enum"] == faults
    stop_reasons = set(schema("session_ended")["properties"]["stop_reason"]["enum"])
    assert stop_reasons == {"ev_disconnected", "remote", "power_loss"} | set(faults)
    started, ended = schema("session_started")["properties"], schema("session_ended")["properties"]
    for field in started:
        assert started[field] == ended[field] or field in ("start_time", "clock_synced"), field
    patterns = {s["properties"]["session_id"]["pattern"]
                for s in SCHEMAS.values() if "session_id" in s["properties"]}
    assert len(patterns) == 1


def test_enums_cover_the_firmware():
    import charger  # firmware/charger.py (conftest puts firmware/ on the path)

    faults = set(schema("fault")["properties"]["code"]["enum"])
    assert {name for _, name in charger.FAULT_NAMES} <= faults
    states = {charger.IDLE, charger.WAITING_FOR_AUTH, charger.CHARGING, charger.SUSPENDED_EV,
              charger.SUSPENDED_EVSE, charger.FINISHING, charger.FAULT, charger.UNAVAILABLE}
    assert states == set(schema("status")["properties"]["state"]["enum"])


def test_doc_lists_every_topic_and_its_examples_validate():
    with open(DOC, encoding="utf-8") as f:
        doc = f.read()
    for name, s in SCHEMAS.items():
        assert "`%s`" % s["x-topic"].replace("{pile_id}", "<pile_id>") in doc, s["x-topic"]
        assert name in doc
    blocks = re.findall(r"```json\n(.*?)```", doc, re.S)
    assert len(blocks) >= len(SCHEMAS)
    for block in blocks:
        obj = json.loads(block)
        matching = [n for n in SCHEMAS if not errors(n, obj)]
        assert len(matching) == 1, "doc example matches %s: %s" % (matching or "no schema", block[:80])

