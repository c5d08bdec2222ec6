//! The network: every wired NIC gets its link up and a DHCP lease from
//! busybox udhcpc (bounded, with retries); then a default route is awaited.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// Wired Ethernet NICs in a sysfs `class/net` directory: type 1 (Ethernet),
/// backed by a device (not a bridge or tunnel), and not wireless.
pub fn wired_nics(sys_class_net: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(sys_class_net)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let dir = sys_class_net.join(&name);
            let ty = std::fs::read_to_string(dir.join("type")).ok()?;
            let wired = ty.trim() == "1"
                && dir.join("device").exists()
                && !dir.join("wireless").exists()
                && !dir.join("phy80211").exists();
            wired.then_some(name)
        })
        .collect();
    out.sort();
    out
}

/// The interface of the default route in `/proc/net/route` text, if any.
pub fn default_route(proc_net_route: &str) -> Option<String> {
    proc_net_route.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Iface Destination Gateway Flags ... Mask
        (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// How hard to try.
#[derive(Debug, Clone)]
pub struct NetOptions {
    pub attempts: u32,
    /// DHCP discovers per attempt (udhcpc's `-t`), two seconds apart (`-T 2`).
    pub discovers: u32,
    pub route_timeout: Duration,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            attempts: 3,
            discovers: 5,
            route_timeout: Duration::from_secs(10),
        }
    }
}

/// Brings every wired NIC up and asks for a lease on each, in parallel,
/// retrying the ones without a lease; then waits for a default route.
/// `say` gets one line per NIC outcome. Returns the default route's NIC.
pub fn bring_up(opts: &NetOptions, say: &mut dyn FnMut(&str)) -> Result<String> {
    let nics = wired_nics(Path::new("/sys/class/net"));
    if nics.is_empty() {
        bail!("no wired network interface (none in /sys/class/net with a device)");
    }
    let _ = Command::new("/bin/ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let mut pending = nics.clone();
    for attempt in 1..=opts.attempts.max(1) {
        for nic in &pending {
            let ok = Command::new("/bin/ip")
                .args(["link", "set", nic, "up"])
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                say(&format!("net: {nic}: could not set the link up"));
            }
        }
        let children: Vec<_> = pending
            .iter()
            .filter_map(|nic| {
                let child = Command::new("/bin/udhcpc")
                    .args([
                        "-i",
                        nic,
                        "-q",
                        "-n",
                        "-f",
                        "-t",
                        &opts.discovers.to_string(),
                        "-T",
                        "2",
                        "-s",
                        "/etc/udhcpc/default.script",
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn();
                match child {
                    Ok(c) => Some((nic.clone(), c)),
                    Err(e) => {
                        say(&format!("net: {nic}: starting udhcpc: {e}"));
                        None
                    }
                }
            })
            .collect();
        let mut still = Vec::new();
        for (nic, child) in children {
            match child.wait_with_output() {
                Ok(out) if out.status.success() => {
                    say(&format!("net: {nic}: lease {}", address_of(&nic)))
                }
                Ok(out) => {
                    let err = String::from_utf8_lossy(&out.stderr);
                    let last = err.lines().last().unwrap_or("").trim().to_string();
                    say(&format!(
                        "net: {nic}: no lease (attempt {attempt} of {}): {last}",
                        opts.attempts
                    ));
                    still.push(nic);
                }
                Err(e) => {
                    say(&format!("net: {nic}: udhcpc: {e}"));
                    still.push(nic);
                }
            }
        }
        let got_any = still.len() < pending.len();
        pending = still;
        if pending.is_empty() || (got_any && route_now().is_some()) {
            break;
        }
    }
    let deadline = Instant::now() + opts.route_timeout;
    loop {
        if let Some(nic) = route_now() {
            return Ok(nic);
        }
        if Instant::now() >= deadline {
            bail!(
                "no default route after DHCP on {} ({} attempts)",
                nics.join(", "),
                opts.attempts
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn route_now() -> Option<String> {
    default_route(&std::fs::read_to_string("/proc/net/route").unwrap_or_default())
}

/// The NIC's IPv4 address as `ip -4 -o addr` prints it, for the console.
fn address_of(nic: &str) -> String {
    Command::new("/bin/ip")
        .args(["-4", "-o", "addr", "show", "dev", nic])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(3)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(no address)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_names_its_interface() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                    eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                    eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route(text).as_deref(), Some("eth0"));
        let no_default = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n\
                          eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n";
        assert_eq!(default_route(no_default), None);
        assert_eq!(default_route(""), None);
    }

    #[test]
    fn wired_nics_have_a_device_and_ethernet_type() {
        let tmp = tempfile::tempdir().unwrap();
        let n = tmp.path();
        let nic = |name: &str, ty: &str, device: bool, wireless: bool| {
            let d = n.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("type"), format!("{ty}\n")).unwrap();
            if device {
                std::fs::create_dir(d.join("device")).unwrap();
            }
            if wireless {
                std::fs::create_dir(d.join("wireless")).unwrap();
            }
        };
        nic("lo", "772", false, false);
        nic("eth1", "1", true, false);
        nic("eth0", "1", true, false);
        nic("br0", "1", false, false);
        nic("wlan0", "1", true, true);
        assert_eq!(wired_nics(n), ["eth0", "eth1"]);
    }
}
