"""pyvmm: a minimal VMM in Python that drives /dev/kvm directly."""
