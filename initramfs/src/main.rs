//! kiln-initramfs: packs the agent, modules and tools into a newc cpio.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use kiln_initramfs::{Compression, Config};

/// Packs kiln's minimal OS into a compressed, reproducible initramfs.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// initramfs.toml; flags below override its fields.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where to write the image.
    #[arg(long)]
    out: PathBuf,
    /// The agent binary, installed as /init.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// lib/modules/<version>, or a directory holding lib/modules/<version>.
    #[arg(long)]
    kernel_modules: Option<PathBuf>,
    /// The agent config, installed as /etc/kiln/agent.toml.
    #[arg(long)]
    agent_config: Option<PathBuf>,
    /// zstd or gzip.
    #[arg(long)]
    compress: Option<Compression>,
    /// A static busybox.
    #[arg(long)]
    busybox: Option<PathBuf>,
    /// More modules to pack, with their dependencies (repeatable).
    #[arg(long = "module")]
    modules: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let over = |field: &mut Option<PathBuf>, flag: Option<PathBuf>| {
        if flag.is_some() {
            *field = flag;
        }
    };
    over(&mut config.agent, cli.agent);
    over(&mut config.kernel_modules, cli.kernel_modules);
    over(&mut config.agent_config, cli.agent_config);
    over(&mut config.busybox, cli.busybox);
    if cli.compress.is_some() {
        config.compress = cli.compress;
    }
    config.extra_modules.extend(cli.modules);
    let spec = config.into_spec()?;
    let report = kiln_initramfs::write_image(&spec, &cli.out)
        .with_context(|| format!("packing {}", cli.out.display()))?;
    print!("{report}");
    println!("wrote {}", cli.out.display());
    Ok(())
}
