"""Tiny guests for VMM tests (tests/tiny_guest.py): the `guest` fixture builds one per test."""

from __future__ import annotations

import pytest
from tiny_guest import build_guest


@pytest.fixture
def guest(tmp_path):
    """guest(source, name="guest") -> Path of the built ELF."""
    return lambda source, name="guest": build_guest(tmp_path, source, name)
