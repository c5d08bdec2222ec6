//! kiln-initramfs: packs the agent, modules and tools into a newc cpio.

use clap::Parser;

/// Packs the minimal OS (not yet implemented).
#[derive(Parser)]
#[command(version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("kiln-initramfs: not yet implemented");
    std::process::exit(2);
}
