//! kiln-master: the headless subcommands and the operator's TUI over a spool.

pub mod agent_key;
pub mod chroot;
pub mod cli;
pub mod command;
pub mod export;
pub mod init;
pub mod provenance;
pub mod show;
pub mod tui;
