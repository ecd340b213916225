"""The qemu-kd guest agent: runs inside the guest, started by its init."""

__version__ = "0.1.0"
