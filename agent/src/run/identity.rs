//! Who this agent is when its config does not say.

/// The agent's id when the config gives none: from the first wired NIC's
/// MAC address, else the DMI serial number, else the host name.
pub fn default_agent_id() -> String {
    let mut macs: Vec<(String, String)> = std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let mac = std::fs::read_to_string(e.path().join("address"))
                .ok()?
                .trim()
                .to_string();
            (name != "lo" && !mac.is_empty() && mac != "00:00:00:00:00:00").then_some((name, mac))
        })
        .collect();
    macs.sort();
    if let Some((_, mac)) = macs.first() {
        return format!("mac-{}", mac.replace(':', ""));
    }
    let sanitize = |s: &str| -> String {
        s.trim()
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(48)
            .collect()
    };
    if let Ok(serial) = std::fs::read_to_string("/sys/class/dmi/id/product_serial") {
        let s = sanitize(&serial);
        if s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric()) {
            return format!("sn-{s}");
        }
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default();
    let h = sanitize(&host);
    if h.is_empty() {
        "agent".into()
    } else {
        format!("host-{h}")
    }
}
