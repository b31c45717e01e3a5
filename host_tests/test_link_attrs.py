"""The MQTT link's instance dict (issue 12 item 3): MicroPython grows an instance's attribute
table through the sizes of py/map.c (..., 37, 47, 59, ...), 8 bytes a slot on the 32-bit chip,
and never shrinks it. MqttLink's attributes fit in 47 slots: a 48th would make the table 59
slots (472 B) while the link is set up at the boot's heap peak, and keep the 96 B more for the
run. Every attribute a built link has is annotated in its class (link_setup.py sets them)."""
from pilehost.virtual_board import VirtualBoard

_MAX_ATTRS = 47  # py/map.c's hash_allocation_sizes step below 59


def test_the_link_s_attributes_fit_47_slots(monkeypatch):
    import mqtt_link
    import wiring
    import wiring_link

    vb = VirtualBoard(monkeypatch, config={"pile_id": "attrs-1", "mqtt": {"host": "127.0.0.1", "port": 1}})
    wiring.handover.clear()  # no load_settings: the host tests' boards
    make, args = wiring_link.link_parts(vb.board, vb.conf, vb.ctl, wiring.handover)
    link = make(**args)
    link.station = None  # main.py's, when there is Wi-Fi
    declared = mqtt_link.MqttLink.__annotations__
    assert set(vars(link)) <= set(declared), set(vars(link)) - set(declared)
    assert len(declared) <= _MAX_ATTRS, len(declared)
