//! kiln-e2e: the harness for kiln's end-to-end tests: a test sshd on
//! 127.0.0.1, the QEMU builder, process groups, serial logs and `wait_until`.

pub mod kernel;
pub mod procgroup;
pub mod pxe;
pub mod qemu;
pub mod sshd;
pub mod wait;
