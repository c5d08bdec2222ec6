//! kiln-agent: builds images on a machine's disk.

use clap::Parser;

/// Builds OS images on this machine's disk (the build engine lands in a later change).
#[derive(Parser)]
#[command(version)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("kiln-agent: no commands yet");
    std::process::exit(2);
}
