#!/usr/bin/env bash
# One idempotent set-up step: system packages, the Python package, build outputs.
# Fast when everything is already there; safe to run again at any time.
set -euo pipefail
cd "$(dirname "$0")/.."
PWD_REPO="$(pwd -P)"

# udev: `pyvmm lab` (virtme-ng) needs udevd in the shared root to name the virtio ports that carry a
# command's output and exit status back.
APT_PACKAGES=(clang llvm libbpf-dev bpftool gcc make binutils stress-ng rt-tests
              qemu-system-x86 busybox-static cpio libcap2-bin iproute2 kmod procps libseccomp2 udev)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

PY=${PYTHON:-python3}
# Editable install: build outputs live next to their sources (its build runs the Makefiles too).
# Checked from / (not from here, where python finds the packages anyway) and against this checkout:
# another clone's editable install must not pass for this one's.
if ! (cd / && REPO="$PWD_REPO" $PY -c 'import os, pyvmm, pytest_timeout, hypothesis, elftools, importlinter
import virtme_ng
raise SystemExit(not pyvmm.__file__.startswith(os.environ["REPO"] + "/"))') 2>/dev/null \
   || [ pyproject.toml -nt .setup-stamp ]; then
    echo "setup: pip install -e .[test]" >&2
    $PY -m pip install -q -e '.[test]' >&2
    touch .setup-stamp
fi

# BPF pins (the policy's maps under /sys/fs/bpf/pvsched/<vmm-pid>/) need bpffs mounted.
if ! grep -qs ' /sys/fs/bpf bpf ' /proc/mounts; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    # mode 0700: only root may create pins (pyvmm checks its own folder whatever the mount mode is)
    $SUDO mount -t bpf -o mode=0700 bpf /sys/fs/bpf || echo "setup: cannot mount bpffs at /sys/fs/bpf" >&2
fi

# Build outputs from source, next to it (make skips what is up to date): every component folder that
# pyvmm/common/artifacts.py lists, the same list a wheel's build (setup.py) runs.
for dir in $($PY -c 'import runpy; print(*runpy.run_path("pyvmm/common/artifacts.py")["OUTPUTS"])'); do
    make -s -C "pyvmm/$dir" >&2
done
