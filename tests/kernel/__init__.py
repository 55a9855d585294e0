"""The kernel WireGuard backend on a real Linux kernel in a QEMU VM (heavy: `make test` runs it apart)."""
