"""The `pyvmm` command, above the library: boot, status, policy, bench and lab."""
