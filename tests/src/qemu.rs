//! A QEMU builder and VM guard (filled in with the minimal OS).
