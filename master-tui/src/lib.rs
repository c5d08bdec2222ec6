//! kiln-master: the headless subcommands and the operator's TUI over a spool.

pub mod cli;
pub mod tui;
