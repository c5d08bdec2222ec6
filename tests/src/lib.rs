//! The QEMU harness for kiln's end-to-end scenarios (filled in with the minimal OS).
