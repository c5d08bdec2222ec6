//! `[boot]`: the image boots by itself. GRUB is installed with the target's
//! own tools, chrooted in the entered target: for UEFI at the removable
//! fallback path `EFI/BOOT/BOOTX64.EFI` of the ESP (no NVRAM entry needed),
//! for BIOS into the whole disk's boot code (and the bios-boot partition on
//! GPT), then `update-grub` with the job's kernel arguments. The root is
//! named by filesystem UUID, which the chroot's /dev/disk/by-uuid makes
//! possible and which is checked in the written grub.cfg.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use kiln_spool::job::{Boot, Firmware, PartKind};
use kiln_spool::units::TimeLimit;

use crate::chroot::Target;
use crate::error::{Error, Result};
use crate::joblog::JobLog;
use crate::steps::{run_script, Place, Script};
use crate::tree::Tree;

/// Where kiln's GRUB settings go: sourced by grub-mkconfig after
/// /etc/default/grub.
const GRUB_DEFAULTS: &str = "etc/default/grub.d/kiln.cfg";

/// A file of the loader and the Debian package that ships it.
struct Needed {
    path: &'static str,
    package: &'static str,
    what: &'static str,
}

const GRUB_TOOLS: [Needed; 2] = [
    Needed {
        path: "usr/sbin/grub-install",
        package: "grub2-common",
        what: "grub-install",
    },
    Needed {
        path: "usr/sbin/grub-mkconfig",
        package: "grub-common",
        what: "grub-mkconfig",
    },
];
const GRUB_UEFI: Needed = Needed {
    path: "usr/lib/grub/x86_64-efi",
    package: "grub-efi-amd64-bin",
    what: "GRUB's x86_64-efi modules",
};
const GRUB_BIOS: Needed = Needed {
    path: "usr/lib/grub/i386-pc",
    package: "grub-pc-bin",
    what: "GRUB's i386-pc modules",
};

/// The loader's files the payload lacks, by package, for `firmware`.
fn missing_packages(firmware: Firmware, has: impl Fn(&str) -> bool) -> Vec<&'static Needed> {
    let mut need: Vec<&'static Needed> = GRUB_TOOLS.iter().collect();
    if firmware.uefi() {
        need.push(&GRUB_UEFI);
    }
    if firmware.bios() {
        need.push(&GRUB_BIOS);
    }
    need.into_iter().filter(|n| !has(n.path)).collect()
}

/// Checks that the target holds the loader for `firmware`; the error names
/// the packages to add to the payload.
pub fn check_loader(tree: &Tree, firmware: Firmware) -> Result<()> {
    let missing = missing_packages(firmware, |p| tree.open_file(Path::new(p)).is_ok());
    if missing.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = missing
        .iter()
        .map(|n| format!("{} (/{}, package {})", n.what, n.path, n.package))
        .collect();
    let mut packages: Vec<&str> = missing.iter().map(|n| n.package).collect();
    packages.dedup();
    Err(Error::Failed(format!(
        "[boot] firmware = {:?} needs GRUB in the payload, which lacks {}: add the package{} {} to it",
        firmware_name(firmware),
        list.join(", "),
        if packages.len() > 1 { "s" } else { "" },
        packages.join(" ")
    )))
}

fn firmware_name(f: Firmware) -> &'static str {
    match f {
        Firmware::Uefi => "uefi",
        Firmware::Bios => "bios",
        Firmware::Both => "both",
    }
}

/// kiln's lines for /etc/default/grub.d: the job's kernel arguments after
/// the payload's own, and the root by UUID. The job spec allows no quote,
/// backslash, `$` or backquote in `cmdline`, so it stays one shell word.
pub fn grub_defaults(cmdline: &str, job_id: &str) -> String {
    let mut s = format!("# kiln job {job_id}: [boot]\nGRUB_DISABLE_LINUX_UUID=false\n");
    if !cmdline.trim().is_empty() {
        s.push_str(&format!(
            "GRUB_CMDLINE_LINUX=\"${{GRUB_CMDLINE_LINUX:+$GRUB_CMDLINE_LINUX }}{}\"\n",
            cmdline.trim()
        ));
    }
    s
}

/// Quotes a word for `sh -c`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The commands that install and configure GRUB, in order.
pub fn grub_commands(firmware: Firmware, esp_mount: Option<&str>, disk: &Path) -> Vec<String> {
    let mut cmds = Vec::new();
    if firmware.uefi() {
        cmds.push(format!(
            "grub-install --target=x86_64-efi --efi-directory={} --boot-directory=/boot --removable --no-nvram",
            sh_quote(esp_mount.unwrap_or("/boot/efi"))
        ));
    }
    if firmware.bios() {
        cmds.push(format!(
            "grub-install --target=i386-pc --boot-directory=/boot {}",
            sh_quote(&disk.display().to_string())
        ));
    }
    cmds.push(
        "if command -v update-grub >/dev/null; then update-grub; else grub-mkconfig -o /boot/grub/grub.cfg; fi"
            .into(),
    );
    cmds
}

/// The loader's time limit per command: grub-mkconfig probes every kernel.
const LOADER_TIME_LIMIT: u64 = 15 * 60;

/// Installs and configures the loader in the target.
pub fn install_loader(
    boot: &Boot,
    target: &mut Target,
    job_id: &str,
    log: &JobLog,
    abort: &AtomicBool,
) -> Result<()> {
    let tree = target.tree()?;
    check_loader(&tree, boot.firmware)?;
    tree.write_file(
        Path::new(GRUB_DEFAULTS),
        grub_defaults(&boot.cmdline, job_id).as_bytes(),
        0o644,
        0,
        0,
    )
    .map_err(|e| Error::Failed(format!("writing /{GRUB_DEFAULTS}: {e}")))?;
    let disk = target.disk().clone();
    let esp = disk
        .partitions
        .iter()
        .find(|p| p.kind == PartKind::Esp)
        .and_then(|p| p.mount.clone());
    let root_uuid = disk
        .root()
        .and_then(|r| r.fs_uuid.clone())
        .ok_or_else(|| Error::Failed("[boot] needs a root filesystem with a UUID".into()))?;
    let chroot = target.enter(log)?;
    let env = chroot.env().to_vec();
    let limit = TimeLimit::from_secs(LOADER_TIME_LIMIT).unwrap_or(TimeLimit::MAX);
    for cmd in grub_commands(boot.firmware, esp.as_deref(), &disk.disk) {
        let script = Script {
            name: "boot",
            run: &cmd,
            time_limit: limit,
            job_id,
            env: &env,
        };
        let st = run_script(&script, &Place::Target(chroot), log, abort)?;
        if !st.success() {
            return Err(Error::Failed(format!(
                "installing the loader: {cmd} failed ({st}); the job log has its output"
            )));
        }
    }
    check_installed(&tree, boot.firmware, esp.as_deref(), &root_uuid)?;
    log.line(&format!(
        "boot: GRUB installed for {}, root=UUID={root_uuid}",
        firmware_name(boot.firmware)
    ));
    Ok(())
}

/// What a working install leaves: grub.cfg booting the root by UUID, and
/// for UEFI the removable loader on the ESP.
fn check_installed(
    tree: &Tree,
    firmware: Firmware,
    esp: Option<&str>,
    root_uuid: &str,
) -> Result<()> {
    let cfg = tree
        .read_optional(Path::new("boot/grub/grub.cfg"))
        .map_err(|e| Error::Failed(format!("reading /boot/grub/grub.cfg: {e}")))?
        .ok_or_else(|| Error::Failed("update-grub wrote no /boot/grub/grub.cfg".into()))?;
    check_grub_cfg(&cfg, root_uuid)?;
    if firmware.uefi() {
        let esp = esp.unwrap_or("/boot/efi").trim_matches('/');
        let loader = format!("{esp}/EFI/BOOT/BOOTX64.EFI");
        tree.open_file(Path::new(&loader))
            .map_err(|e| Error::Failed(format!("grub-install left no /{loader}: {e}")))?;
    }
    Ok(())
}

/// The kernel lines of grub.cfg name the root by its UUID, not by the
/// build machine's device name.
pub fn check_grub_cfg(cfg: &str, root_uuid: &str) -> Result<()> {
    let kernels: Vec<&str> = cfg
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("linux"))
        .collect();
    if kernels.is_empty() {
        return Err(Error::Failed(
            "grub.cfg has no kernel: the payload has no kernel in /boot".into(),
        ));
    }
    let want = format!("root=UUID={root_uuid}");
    if let Some(bad) = kernels
        .iter()
        .find(|l| !l.split_whitespace().any(|w| w == want))
    {
        return Err(Error::Failed(format!(
            "grub.cfg does not boot the root by UUID ({want}): {bad}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_loader_names_its_package() {
        let only_tools = |p: &str| p.starts_with("usr/sbin/");
        let m: Vec<&str> = missing_packages(Firmware::Both, only_tools)
            .iter()
            .map(|n| n.package)
            .collect();
        assert_eq!(m, ["grub-efi-amd64-bin", "grub-pc-bin"]);
        let m: Vec<&str> = missing_packages(Firmware::Bios, |p| p != "usr/lib/grub/i386-pc")
            .iter()
            .map(|n| n.package)
            .collect();
        assert_eq!(m, ["grub-pc-bin"]);
        assert!(missing_packages(Firmware::Uefi, |p| p != "usr/lib/grub/i386-pc").is_empty());
        let m: Vec<&str> = missing_packages(Firmware::Uefi, |_| false)
            .iter()
            .map(|n| n.package)
            .collect();
        assert_eq!(m, ["grub2-common", "grub-common", "grub-efi-amd64-bin"]);
    }

    #[test]
    fn kernel_arguments_follow_the_payloads_own() {
        let d = grub_defaults("console=ttyS0,115200 console=tty0", "j");
        assert!(d.contains(
            "GRUB_CMDLINE_LINUX=\"${GRUB_CMDLINE_LINUX:+$GRUB_CMDLINE_LINUX }console=ttyS0,115200 console=tty0\"\n"
        ));
        assert!(!grub_defaults("", "j").contains("GRUB_CMDLINE_LINUX="));
    }

    #[test]
    fn both_firmwares_install_twice_then_configure_once() {
        let c = grub_commands(Firmware::Both, Some("/boot/efi"), Path::new("/dev/vda"));
        assert_eq!(c.len(), 3);
        assert!(c[0].contains("--target=x86_64-efi --efi-directory='/boot/efi'"));
        assert!(c[0].contains("--removable --no-nvram"));
        assert!(c[1].ends_with("--target=i386-pc --boot-directory=/boot '/dev/vda'"));
        assert!(c[2].contains("update-grub"));
        assert_eq!(
            grub_commands(Firmware::Uefi, None, Path::new("/dev/sda")).len(),
            2
        );
    }

    #[test]
    fn grub_cfg_must_name_the_root_by_uuid() {
        let good = "menuentry 'Debian' {\n\tlinux\t/boot/vmlinuz-6.1 root=UUID=abc ro quiet\n}\n";
        check_grub_cfg(good, "abc").unwrap();
        let bad = "\tlinux /boot/vmlinuz root=/dev/vda2 ro\n";
        let e = check_grub_cfg(bad, "abc").unwrap_err().to_string();
        assert!(e.contains("root=/dev/vda2"), "{e}");
        assert!(check_grub_cfg("set timeout=5\n", "abc").is_err());
    }
}
