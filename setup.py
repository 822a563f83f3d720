"""The package build's one custom step: run the components' Makefiles and ship their outputs.

pyproject.toml holds the metadata; this adds `build_native` to setuptools' build.  It runs each Makefile
listed in pyvmm/common/artifacts.py (OUTPUTS) with its outputs in the build tree, then copies the files
OUTPUTS names into the package's `<component>/build/` folders, where pyvmm looks for them at run time
(pyvmm/common/artifacts.py).  An editable install builds them in place instead, next to the sources, as
scripts/setup.sh does.  Nothing is compiled at run time.
"""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import ClassVar

from setuptools import Command, Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build import build

HERE = Path(__file__).resolve().parent
# artifacts.py imports nothing of pyvmm and nothing third-party, so it runs here on its own.
OUTPUTS: dict[str, tuple[str, ...]] = runpy.run_path(str(HERE / "pyvmm" / "common" / "artifacts.py"))["OUTPUTS"]


class build_native(Command):
    """Run the Makefiles of the BPF objects, the test guest, the native libraries and the cdefs."""

    description = "build the BPF objects, the test guest, the native libraries and the cffi cdefs (make)"
    user_options: ClassVar[list] = []

    def initialize_options(self) -> None:
        self.build_lib = None
        self.build_temp = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"), ("build_temp", "build_temp"))

    def run(self) -> None:
        for folder, names in OUTPUTS.items():
            src = HERE / "pyvmm" / folder
            if self.editable_mode:  # the outputs live next to the sources, in the Makefile's own build/
                self.spawn(["make", "-s", "-C", str(src)])
                continue
            tmp = Path(self.build_temp).resolve() / "native" / folder  # objects, vmlinux.h: not shipped
            self.mkpath(str(tmp))
            self.spawn(["make", "-s", "-C", str(src), f"BUILD={tmp}"])
            dest = Path(self.build_lib) / "pyvmm" / folder / "build"
            self.mkpath(str(dest))
            for name in names:
                self.copy_file(str(tmp / name), str(dest / name))

    def get_output_mapping(self) -> dict[str, str]:
        """Each shipped file in the build tree -> where make wrote it (nothing in an editable install)."""
        if self.editable_mode:
            return {}
        tmp = Path(self.build_temp).resolve() / "native"
        return {str(Path(self.build_lib) / "pyvmm" / folder / "build" / name): str(tmp / folder / name)
                for folder, names in OUTPUTS.items() for name in names}

    def get_outputs(self) -> list[str]:
        """The shipped files in the build tree."""
        return list(self.get_output_mapping())

    def get_source_files(self) -> list[str]:
        """None beyond MANIFEST.in, which lists the C sources, headers and Makefiles for the sdist."""
        return []


class build_with_native(build):
    """setuptools' build, with build_native first."""

    sub_commands: ClassVar[list] = [("build_native", None), *build.sub_commands]


class NativeDistribution(Distribution):
    """A distribution with native code (though no CPython extension): built and installed per platform."""

    def has_ext_modules(self) -> bool:
        """True: the shipped libraries, BPF objects and guest are machine code."""
        return True


class platform_wheel(bdist_wheel):
    """A wheel for one platform (native libraries, BPF objects, an x86 guest) but any Python 3."""

    def get_tag(self) -> tuple[str, str, str]:
        return "py3", "none", super().get_tag()[2]


setup(distclass=NativeDistribution,
      cmdclass={"build": build_with_native, "build_native": build_native, "bdist_wheel": platform_wheel})
