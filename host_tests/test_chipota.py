"""A signed update's steps on the chip model (pilehost/chipota.py, sim/chip_ota.py; figures:
`make bench WHAT=ota`): the run is cut where it says, and on the chip's instruction counts no
step of the update but the signature check comes near it: the part a power cut left is hashed
again in slices, the chunks and the switch are small."""
from pilehost import chipmodel, chipota


def test_the_update_on_the_chip_model_is_cut_per_step_and_sliced(chip_binary):
    steps, files, manifest = chipota.run(chip_binary, chipota.bench_key())
    by = {}
    for s in steps:
        name = "chunk" if s["step"].startswith("chunk ") else s["step"].split(" (")[0]
        by.setdefault(name, []).append(s)
    verify = by["RSA verify"][0]["ir"]
    pow_ = by["pow(s, 65537, n), one C call"][0]["ir"]
    assert 0.9 * verify < pow_ < verify  # the check is the pow, one C call
    manifest_step = by["manifest step"][0]["ir"]
    assert manifest_step > verify
    slices = by["rehash slice"]
    assert len(slices) >= chipota._ota_constants()[1] // 768 // 8  # MAX_FILE's part, 8 chunks a step
    for name, items in by.items():
        if name in ("manifest step", "resume step", "parse_manifest", "RSA verify", "SHA-256 of 64 KiB",
                    "pow sample") or name.startswith("pow("):
            continue
        for s in items:  # every other step of the update: a small fraction of the check
            assert s["ir"] < verify / 10, (name, s["ir"], verify)
    switch = by["switch"][0]
    assert [m[0] for m in switch["meta"]].count("rename") == 1  # release.json: one atomic write
    cal = chipmodel.Calibration(57000)
    lines, figures = chipota.report(steps, files, manifest, cal, 0, out=lambda text: None)
    assert figures["longest"]["step"].startswith(("manifest step", "resume step"))
