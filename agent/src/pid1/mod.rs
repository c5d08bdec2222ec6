//! The agent as PID 1 of the initramfs: mounts the pseudo filesystems,
//! loads the modules the machine's devices and the build need, waits for
//! the disk, brings up the network, then forks the run loop and reaps
//! children for as long as the machine is up. One status line per phase
//! goes to every active console. On a fatal error it prints why and starts
//! a rescue shell (`kiln.debug=1`) or reboots after a delay.
//!
//! The run loop lives in a child process so that PID 1 can reap every
//! orphan with `waitpid(-1)` without stealing the exit status of the
//! commands the build waits for.

pub mod console;
pub mod disk;
pub mod modules;
pub mod mounts;
pub mod net;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use kiln_spool::agent_config::{cmdline_words, load_agent_config, AgentConfig};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use crate::run::{default_agent_id, run, RunOptions};
use console::Console;
use modules::Loader;

/// The search path for the agent's tools: the packed mke2fs and mkfs.vfat
/// live in /sbin, busybox's applets in /bin.
pub const PATH: &str = "/sbin:/usr/sbin:/bin:/usr/bin";
pub const AGENT_CONFIG: &str = "/etc/kiln/agent.toml";
/// Scratch space on the /tmp tmpfs: payload cache, images, job logs.
pub const WORK_DIR: &str = "/tmp/kiln";
/// Filesystems the build may make and mount, with the code pages vfat uses.
pub const FS_MODULES: &[&str] = &[
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_ascii",
    "nls_utf8",
];
const REBOOT_DELAY: Duration = Duration::from_secs(10);
const DISK_TIMEOUT: Duration = Duration::from_secs(30);
/// Device modules bring new devices (a virtio PCI function brings its
/// virtio device): walk the modaliases again until nothing new loads.
const MODULE_ROUNDS: usize = 5;

/// What setup hands the run loop.
struct Ready {
    config: AgentConfig,
    disk: PathBuf,
}

/// PID 1's main. Never returns.
pub fn main() -> ! {
    std::env::set_var("PATH", PATH);
    std::env::set_var("HOME", "/root");
    let mut console = Console::stdout();
    let setup = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| setup(&mut console)));
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let debug = cmdline_debug(&cmdline);
    match setup {
        Ok(Ok(ready)) => {
            let debug = ready.config.debug || debug;
            supervise(&mut console, ready, debug)
        }
        Ok(Err(e)) => fatal(&mut console, debug, &format!("{e:#}")),
        Err(_) => fatal(&mut console, debug, "setup panicked"),
    }
}

/// Whether the kernel command line asks for the rescue shell (`kiln.debug=1`).
pub fn cmdline_debug(cmdline: &str) -> bool {
    cmdline_words(cmdline).iter().any(|w| {
        matches!(
            w.as_str(),
            "kiln.debug" | "kiln.debug=1" | "kiln.debug=true" | "kiln.debug=yes" | "kiln.debug=on"
        )
    })
}

fn setup(console: &mut Console) -> Result<Ready> {
    let t0 = Instant::now();
    mounts::mount_all(Path::new("/")).context("mounting the pseudo filesystems")?;
    *console = Console::open();
    console.line(&format!(
        "kiln-agent {} as PID 1: mounted {}",
        env!("CARGO_PKG_VERSION"),
        mounts::MOUNTS
            .iter()
            .map(|m| m.target)
            .collect::<Vec<_>>()
            .join(" ")
    ));

    let cmdline = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    let mut config = load_agent_config(Path::new(AGENT_CONFIG)).map_err(|e| anyhow!("{e}"))?;
    config
        .apply_cmdline(&cmdline)
        .map_err(|e| anyhow!("/proc/cmdline: {e}"))?;
    console.line(&format!(
        "config: {AGENT_CONFIG} with the command line: {} server(s) ({}), disk {}, debug {}",
        config.servers.len(),
        config
            .servers
            .iter()
            .map(|s| s.address.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        config.disk,
        if config.debug { "on" } else { "off" }
    ));

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?;
    let dir = Path::new("/lib/modules").join(release.trim());
    let loader = Loader::open(&dir)?;
    let mut loaded = Vec::new();
    for _ in 0..MODULE_ROUNDS {
        let (new, failed) = loader.load_for_devices(Path::new("/sys/devices"));
        for f in failed {
            console.line(&format!("modules: {f}"));
        }
        if new.is_empty() {
            break;
        }
        loaded.extend(new);
    }
    console.line(&format!(
        "modules: {} loaded for the devices: {}",
        loaded.len(),
        loaded.join(" ")
    ));
    let mut fs_loaded = Vec::new();
    for m in FS_MODULES {
        match loader.index.resolve(m) {
            Some(_) => fs_loaded.extend(loader.load(m).with_context(|| format!("loading {m}"))?),
            None if loader.index.builtin.contains(*m) => {}
            None => console.line(&format!("modules: {m} is neither packed nor built in")),
        }
    }
    console.line(&format!(
        "modules: filesystems ready ({})",
        if fs_loaded.is_empty() {
            "built in".to_string()
        } else {
            fs_loaded.join(" ")
        }
    ));

    let deadline = Instant::now() + DISK_TIMEOUT;
    let disk = loop {
        if let Some(d) = disk::choose(&config.disk, Path::new("/sys/block")) {
            break d;
        }
        if Instant::now() >= deadline {
            return Err(anyhow!("no disk for disk = {:?} after {}s (candidates: /sys/block without loop, ram and removable devices)", config.disk, DISK_TIMEOUT.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    console.line(&format!("disk: {} ({})", disk.display(), disk_size(&disk)));

    let nic = net::bring_up(&net::NetOptions::default(), &mut |l| console.line(l))?;
    console.line(&format!("net: default route via {nic}"));
    console.line(&format!("ready after {:.1}s", t0.elapsed().as_secs_f64()));
    Ok(Ready { config, disk })
}

fn disk_size(dev: &Path) -> String {
    let name = dev
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| format!("{} MiB", (sectors * 512) >> 20))
        .unwrap_or_else(|| "size unknown".into())
}

/// Forks the run loop and reaps every child; the run loop ending is fatal.
fn supervise(console: &mut Console, ready: Ready, debug: bool) -> ! {
    let agent_id = ready.config.id.clone().unwrap_or_else(default_agent_id);
    console.line(&format!(
        "agent {agent_id}: asking the job servers for work"
    ));
    // SAFETY: PID 1 has no other threads here; the child only runs the
    // loop and exits.
    let worker = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let opts = RunOptions {
                config: ready.config,
                agent_id,
                disk: ready.disk,
                work_dir: PathBuf::from(WORK_DIR),
                once: false,
                upload: Default::default(),
                session: Default::default(),
            };
            let stop = AtomicBool::new(false);
            crate::run::reboot_after_deploy(true);
            let mut out = Console::open();
            let r = run(&opts, &stop, &mut |l| out.line(l));
            let code = match r {
                Ok(_) => 0,
                Err(e) => {
                    out.line(&format!("run loop: {e:#}"));
                    1
                }
            };
            std::process::exit(code)
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => fatal(console, debug, &format!("forking the run loop: {e}")),
    };
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == worker => fatal(
                console,
                debug,
                &format!("the run loop ended (exit status {code})"),
            ),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == worker => {
                fatal(console, debug, &format!("the run loop was killed by {sig}"))
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => fatal(console, debug, &format!("waiting for children: {e}")),
        }
    }
}

/// Prints the reason, then keeps a rescue shell on the console (debug) or
/// reboots after a delay. Reaps children meanwhile.
fn fatal(console: &mut Console, debug: bool, reason: &str) -> ! {
    console.line(&format!("FATAL: {reason}"));
    if debug {
        loop {
            console.line("kiln.debug=1: rescue shell on the console; exit it for a new one");
            match console::rescue_shell() {
                Ok(shell) => reap_until(Some(shell), None),
                Err(e) => {
                    console.line(&format!("starting the rescue shell: {e:#}"));
                    reap_until(None, Some(Instant::now() + REBOOT_DELAY));
                }
            }
        }
    }
    console.line(&format!(
        "rebooting in {}s (kiln.debug=1 keeps a rescue shell instead)",
        REBOOT_DELAY.as_secs()
    ));
    reap_until(None, Some(Instant::now() + REBOOT_DELAY));
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // reboot(2) only returns on failure; a PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Reaps children until `until` exits or the deadline passes.
fn reap_until(until: Option<Pid>, deadline: Option<Instant>) {
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, _)) | Ok(WaitStatus::Signaled(pid, _, _))
                if Some(pid) == until =>
            {
                return
            }
            Ok(WaitStatus::StillAlive) | Err(_) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_comes_from_the_command_line() {
        assert!(cmdline_debug("console=ttyS0 kiln.debug=1"));
        assert!(cmdline_debug("kiln.debug quiet"));
        assert!(!cmdline_debug("kiln.debug=0"));
        assert!(!cmdline_debug("console=ttyS0 kiln.disk=/dev/vda"));
    }

    #[test]
    fn the_packed_tools_come_first_on_the_path() {
        let dirs: Vec<&str> = PATH.split(':').collect();
        assert_eq!(dirs[0], "/sbin");
        assert!(dirs.contains(&"/bin"));
    }
}
