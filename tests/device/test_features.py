"""The feature list is data from the ABI header: names, bits, default offer; Python copies none of it."""

from __future__ import annotations

import json
import subprocess

import pytest

from pyvmm import abi
from pyvmm.abi import C
from pyvmm.device.device import PvschedConfigError, PvschedDevice

ABI_DIR = abi.ABI_HEADER.parent


def test_the_json_rows_are_the_enum_cffi_reads():
    enum = abi.ffi().typeof("enum pvsched_feature").elements  # value -> name, straight from the cdef
    assert {f.mask: f"PVSCHED_F_{f.name.upper()}" for f in abi.features()} == enum
    assert C.PVSCHED_F_ALL == sum(f.mask for f in abi.features())
    assert C.PVSCHED_F_DEFAULT_OFFER == sum(f.mask for f in abi.features() if f.offered)
    assert all(f.doc for f in abi.features())


def test_a_new_row_in_the_header_needs_no_python(tmp_path):
    """Add a row to a copy of the header and rebuild there: the JSON carries it, as the device would read it."""
    for name in ("pvsched_abi.h", "testguest_boot.h", "Makefile", "cdef.mk"):
        (tmp_path / name).write_text((ABI_DIR / name).read_text())
    h = tmp_path / "pvsched_abi.h"
    text = h.read_text()
    last = text.index("\tX(RT_WAITER")
    h.write_text(text[:last] + '\tX(EXAMPLE, 5, 0, "a worked example, not offered by default") \\\n' + text[last:])
    subprocess.run(["make", "-s", "-C", str(tmp_path)], check=True)
    rows = [r for r in json.loads((tmp_path / "build" / "pvsched_features.json").read_text()) if r]
    assert {"name": "EXAMPLE", "bit": 5, "offered": 0, "doc": "a worked example, not offered by default"} in rows
    cdef = (tmp_path / "build" / "pvsched_abi.cdef").read_text()
    assert "PVSCHED_F_EXAMPLE = 1 << (5)" in cdef


def test_names_and_hex_both_parse_and_unknown_bits_show_as_hex():
    assert abi.parse_features("rt_waiter,WAKE_HINT") == C.PVSCHED_F_RT_WAITER | C.PVSCHED_F_WAKE_HINT
    assert abi.parse_features("0x1f") == abi.parse_features("1f") == 0x1F
    with pytest.raises(ValueError, match="neither hex nor feature names"):
        abi.parse_features("rt_waiter,nosuch")
    assert abi.feature_names(C.PVSCHED_F_RT_WAITER | 1 << 20) == ["rt_waiter", "unknown:0x100000"]


def test_the_device_offers_the_default_and_refuses_bits_the_header_lacks():
    assert PvschedDevice(policy=False).host_features == C.PVSCHED_F_DEFAULT_OFFER
    with pytest.raises(PvschedConfigError, match=f"knows only {C.PVSCHED_F_ALL:#x}"):
        PvschedDevice(policy=False, host_features=1 << 20)


def test_an_unknown_policy_program_is_one_line_before_anything_starts():
    with pytest.raises(PvschedConfigError, match="no BPF policy 'nope' .policies: .*rt_only"):
        PvschedDevice(policy=True, program="nope")
