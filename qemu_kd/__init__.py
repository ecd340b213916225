"""qemu-kd: key-domain protected-VM hardware emulated around real QEMU guests."""

__version__ = "0.1.0"
