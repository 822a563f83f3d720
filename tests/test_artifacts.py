"""Build outputs are found, never built, at run time; a checkout whose sources changed after a build says so once."""

from __future__ import annotations

import logging
import os

import pytest

from pyvmm.common import artifacts


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A package tree of one component, device/, with a Makefile, two sources and its two outputs."""
    dev = tmp_path / "device"
    (dev / "build").mkdir(parents=True)
    for name in ("Makefile", "guardian.c", "guardian.h"):
        (dev / name).write_text("")
    for name in artifacts.OUTPUTS["device"]:
        (dev / "build" / name).write_text("")
    monkeypatch.setattr(artifacts, "PKG", tmp_path)
    monkeypatch.setattr(artifacts, "ROOT", tmp_path)
    monkeypatch.setattr(artifacts, "_warned", set())
    return dev


def _age(path, seconds: float) -> None:
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))


def test_a_missing_output_is_one_line_naming_setup(tree):
    (tree / "build" / "guardian.cdef").unlink()
    with pytest.raises(artifacts.BuildError, match=r"guardian_cdef is not built .*run scripts/setup.sh"):
        artifacts.ensure_built("guardian_cdef")


def test_stale_only_when_a_source_is_newer_than_every_output_of_its_folder(tree, caplog):
    caplog.set_level(logging.WARNING, "pyvmm.artifacts")
    # make rebuilt only the library after a change to guardian.c: the cdef, which does not depend on it, is older
    _age(tree / "build" / "guardian.cdef", 100)
    artifacts.ensure_built("guardian_cdef")
    assert not caplog.records
    for out in artifacts.OUTPUTS["device"]:  # no make since the change: everything is older
        _age(tree / "build" / out, 100)
    artifacts.ensure_built("guardian_cdef")
    artifacts.ensure_built("guardian_cdef")
    assert [r.getMessage() for r in caplog.records] == [
        "pyvmm: device/build/guardian.cdef is older than its sources: run scripts/setup.sh to rebuild it"]


def test_a_shared_header_counts_only_where_the_makefile_names_it(tree, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "pyvmm.artifacts")
    header = tree.parent / "abi" / "pvsched_abi.h"
    header.parent.mkdir()
    header.write_text("")
    monkeypatch.setattr(artifacts, "SHARED_SOURCES", (header,))
    for p in [tree / n for n in ("Makefile", "guardian.c", "guardian.h")]:
        _age(p, 200)
    for out in artifacts.OUTPUTS["device"]:
        _age(tree / "build" / out, 100)  # built after the folder's own sources, before the shared header
    artifacts.ensure_built("guardian")
    assert not caplog.records  # this Makefile does not name the header: make would rebuild nothing
    (tree / "Makefile").write_text("guardian.o: ../abi/pvsched_abi.h\n")
    _age(tree / "Makefile", 200)
    artifacts.ensure_built("guardian")
    assert len(caplog.records) == 1
