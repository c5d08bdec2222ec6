//! kiln-e2e: the harness for kiln's end-to-end tests: a test sshd on
//! 127.0.0.1, a job server set up by `kiln-master init` and `agent-key`,
//! raw SFTP for hostile requests, the QEMU builder, process groups, serial
//! logs and `wait_until`.

pub mod binaries;
pub mod fake_image;
pub mod job_server;
pub mod kernel;
pub mod procgroup;
pub mod pxe;
pub mod qemu;
pub mod raw_sftp;
pub mod rig;
pub mod sshd;
pub mod wait;
