//! How a publication's provenance and a deploy's report are shown: by
//! `kiln-master show` and `verify`, and in the TUI's image pane. Everything
//! an agent wrote is escaped ([`printable`]) before it is shown.

use kiln_spool::manifest::{Hardware, ImageManifest, PhaseTime};
use kiln_spool::master::provenance::{ImageRecord, SignatureCheck};
use kiln_spool::master::HistoryRecord;
use kiln_spool::printable::printable;
use kiln_spool::spool::image_dir;
use kiln_spool::units::human_bytes;
use kiln_spool::upload::{DeployReport, IMAGE_FILE};

/// Lines of the job file shown by `show` before it is cut short.
pub const JOB_TEXT_LINES: usize = 40;

fn esc(s: &str) -> String {
    printable(s).into_owned()
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown".into()
    } else {
        esc(s)
    }
}

/// The build machine, one labelled line each: machine, CPU, memory, disk
/// and network interfaces.
pub fn hardware_lines(h: &Hardware) -> Vec<(&'static str, String)> {
    let machine = format!("{} {}", h.vendor, h.product);
    let cpu = if h.cpus > 0 {
        format!("{} × {}", or_unknown(&h.cpu_model), h.cpus)
    } else {
        or_unknown(&h.cpu_model)
    };
    let memory = if h.memory_bytes > 0 {
        human_bytes(h.memory_bytes)
    } else {
        "unknown".into()
    };
    let disk = if h.disk_size > 0 {
        format!(
            "{}, {}",
            or_unknown(&h.disk_model),
            human_bytes(h.disk_size)
        )
    } else {
        or_unknown(&h.disk_model)
    };
    let nics = if h.nics.is_empty() {
        "none reported".into()
    } else {
        h.nics
            .iter()
            .map(|n| format!("{} {}", esc(&n.name), esc(&n.mac)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![
        ("machine", or_unknown(machine.trim())),
        ("cpu", cpu),
        ("memory", memory),
        ("disk", disk),
        ("nics", nics),
    ]
}

/// One phase: its name, when it began, and how long it took.
pub fn phase_line(p: &PhaseTime) -> String {
    let started = p.started.map(|t| format!(" from {t}")).unwrap_or_default();
    format!("{:<12} {:>9.1}s{started}", esc(&p.name), p.seconds)
}

fn row(out: &mut String, label: &str, value: impl AsRef<str>) {
    out.push_str(&format!("{label:<11}{}\n", value.as_ref()));
}

/// The `# image` section of `kiln-master show` for a published image.
pub fn format_image(
    record: &ImageRecord,
    check: &SignatureCheck,
    deployments: &[HistoryRecord],
) -> String {
    let m = &record.manifest;
    let dir = image_dir(&record.id);
    let mut out = String::from("\n# image\n");
    row(
        &mut out,
        "image",
        format!(
            "{dir}/{IMAGE_FILE}, {} ({} bytes), BLAKE3 {}",
            human_bytes(m.image_size),
            m.image_size,
            esc(&m.image_blake3)
        ),
    );
    row(
        &mut out,
        "disk",
        format!(
            "{} in all, {} ranges holding {}",
            human_bytes(m.disk_size),
            m.ranges.len(),
            human_bytes(m.data_bytes())
        ),
    );
    row(
        &mut out,
        "manifest",
        format!("BLAKE3 {}", record.manifest_blake3),
    );
    row(&mut out, "signature", check.to_string());
    let p = m.provenance.clone().unwrap_or_default();
    row(
        &mut out,
        "signer",
        if p.signer.is_empty() {
            "none recorded (published before images were signed)".into()
        } else {
            esc(&p.signer)
        },
    );
    row(
        &mut out,
        "published",
        format!(
            "{} by kiln-master {}",
            p.published.unwrap_or(record.published.published),
            or_unknown(&p.publisher_version)
        ),
    );
    row(
        &mut out,
        "agent",
        format!("{}, kiln {}", esc(&m.agent), or_unknown(&p.kiln_version)),
    );
    for (label, value) in hardware_lines(&p.hardware) {
        row(&mut out, label, value);
    }
    row(
        &mut out,
        "built",
        format!("{} to {}", m.started, m.finished),
    );
    format_payloads(&mut out, m);
    if !m.phases.is_empty() {
        out.push_str("phases\n");
        for ph in &m.phases {
            out.push_str(&format!("  {}\n", phase_line(ph)));
        }
    }
    if !m.generalized.is_empty() {
        row(
            &mut out,
            "generalized",
            format!("{} entries removed", m.generalized.len()),
        );
    }
    row(
        &mut out,
        "job file",
        format!("BLAKE3 {}", esc(&m.job_blake3)),
    );
    if !p.job_text.is_empty() {
        let lines: Vec<&str> = p.job_text.lines().collect();
        for line in lines.iter().take(JOB_TEXT_LINES) {
            out.push_str(&format!("  | {}\n", esc(line)));
        }
        if lines.len() > JOB_TEXT_LINES {
            out.push_str(&format!(
                "  ({} more lines; `show --json` has the whole file)\n",
                lines.len() - JOB_TEXT_LINES
            ));
        }
    }
    out.push_str(&format!("\n# deployments ({})\n", deployments.len()));
    for h in deployments {
        if let Some(d) = &h.deployment {
            out.push_str(&format!(
                "{}  onto {} {} ({}{}) at {}\n",
                esc(&h.entry.id),
                esc(&d.agent),
                esc(&d.disk),
                human_bytes(d.disk_size),
                if d.grown { ", grown" } else { "" },
                d.finished
            ));
        }
    }
    out
}

fn format_payloads(out: &mut String, m: &ImageManifest) {
    if m.payloads.is_empty() {
        row(out, "payloads", "none");
        return;
    }
    out.push_str("payloads\n");
    for p in &m.payloads {
        out.push_str(&format!("  {}  {}\n", esc(&p.blake3), esc(&p.name)));
    }
}

/// The `# deployment` section of `kiln-master show` for a finished deploy job.
pub fn format_deployment(d: &DeployReport) -> String {
    let mut out = String::from("\n# deployment\n");
    row(&mut out, "image", esc(&d.image));
    row(
        &mut out,
        "manifest",
        format!("BLAKE3 {}", esc(&d.manifest_blake3)),
    );
    row(
        &mut out,
        "image file",
        format!("BLAKE3 {}", esc(&d.image_blake3)),
    );
    row(&mut out, "agent", esc(&d.agent));
    row(
        &mut out,
        "target",
        format!(
            "{}, {}{}",
            esc(&d.disk),
            human_bytes(d.disk_size),
            if d.grown {
                ", last partition grown to fill it"
            } else {
                ""
            }
        ),
    );
    row(&mut out, "written", human_bytes(d.bytes_written));
    row(
        &mut out,
        "deployed",
        format!("{} to {}", d.started, d.finished),
    );
    for (label, value) in hardware_lines(&d.hardware) {
        row(&mut out, label, value);
    }
    if !d.phases.is_empty() {
        out.push_str("phases\n");
        for ph in &d.phases {
            out.push_str(&format!("  {}\n", phase_line(ph)));
        }
    }
    out
}

/// A published image for `show --json`.
pub fn image_json(
    record: &ImageRecord,
    check: &SignatureCheck,
    deployments: &[HistoryRecord],
) -> serde_json::Value {
    let (verifies, why) = match check {
        SignatureCheck::Valid(_) => (true, None),
        SignatureCheck::Missing => (false, Some(check.to_string())),
        SignatureCheck::Invalid(w) => (false, Some(w.clone())),
        SignatureCheck::Unchecked(w) => (false, Some(format!("cannot be checked: {w}"))),
    };
    serde_json::json!({
        "id": record.id,
        "manifest_blake3": record.manifest_blake3,
        "signature": {
            "present": record.signature.is_some(),
            "verifies": verifies,
            "problem": why,
        },
        "manifest": record.manifest,
        "deployments": deployments.iter().map(|h| serde_json::json!({
            "job": h.entry.id,
            "finished": h.finished.to_string(),
            "report": h.deployment,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_spool::manifest::Nic;

    #[test]
    fn hardware_is_summed_up_and_escaped() {
        let h = Hardware {
            vendor: "QEMU".into(),
            product: "PC\u{1b}[2J".into(),
            cpu_model: "EPYC".into(),
            cpus: 4,
            memory_bytes: 4 << 30,
            disk_model: String::new(),
            disk_size: 8 << 30,
            nics: vec![Nic {
                name: "ens3".into(),
                mac: "52:54:00:12:34:56".into(),
            }],
        };
        let lines = hardware_lines(&h);
        assert_eq!(lines[0], ("machine", r"QEMU PC\x1b[2J".to_string()));
        assert_eq!(lines[1].1, "EPYC × 4");
        assert_eq!(lines[2].1, "4.0 GiB");
        assert_eq!(lines[3].1, "unknown, 8.0 GiB");
        assert_eq!(lines[4].1, "ens3 52:54:00:12:34:56");
    }
}
