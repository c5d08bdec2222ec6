//! Boots Debian's kernel with an initramfs made by kiln-initramfs, directly
//! and over PXE (iPXE and QEMU's TFTP). The initramfs's /init is a busybox
//! script standing in for the agent: it loads modules with busybox insmod in
//! the order the packed modules.dep gives, checks the virtio disks, takes a
//! DHCP lease with udhcpc and the packed script, makes and mounts ext4 and
//! vfat with the packed mke2fs and mkfs.vfat, and powers off.

use std::path::Path;
use std::time::Duration;

use kiln_e2e::kernel::kernel;
use kiln_e2e::pxe::{pxe_dir, BOOT_SCRIPT};
use kiln_e2e::qemu::{create_disk, require_qemu, DiskFormat, Qemu};
use kiln_initramfs::{Config, Spec};

/// Generous for TCG on a loaded 2-core machine; a boot takes seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);
const MARKER: &str = "KILN-BOOT-MARKER";
const CMDLINE: &str = "console=ttyS0,115200 panic=-1 loglevel=4";

/// The stand-in /init. `load NAME` resolves NAME's line in modules.dep and
/// insmods its dependencies from the last to the first, then the module.
/// Debian's busybox runs its own applets before files on PATH, so the packed
/// tools are called by their full paths.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
M=/lib/modules/$(uname -r)
say() { echo "KILN-BOOT: $*"; }
fail() { say "FAILED: $*"; poweroff -f; }
loaded() { grep -q "^$1 " /proc/modules; }
load() {
	# File names may spell a module's underscores as dashes.
	pat=$(echo "$1" | sed 's/_/[-_]/g')
	line=$(grep "/$pat\.ko:" $M/modules.dep) || fail "$1 is not in modules.dep"
	rev=""
	for d in ${line#*:}; do rev="$d $rev"; done
	for d in $rev; do
		n=${d##*/}; n=${n%.ko}; n=$(echo "$n" | tr - _)
		loaded "$n" || insmod "$M/$d" || fail "insmod $d for $1"
	done
	loaded "$1" || insmod "$M/${line%%:*}" || fail "insmod $1"
	say "loaded $1"
}
say "init running on $(uname -r)"
for m in virtio_pci virtio_blk virtio_net; do load $m; done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vdb ] && break; sleep 1; done
for d in vda vdb; do
	[ -e /sys/block/$d ] || fail "no disk $d"
	say "disk $d $(cat /sys/block/$d/size) sectors"
done
ls /sys/class/net | grep -q eth0 && say "nic eth0 present"
# udhcpc with the packed default.script; the link must be up first.
ip link set eth0 up
udhcpc -i eth0 -n -q -t 5 -T 2 2>&1 || fail "udhcpc on eth0"
say "lease $(ip -4 -o addr show dev eth0 | awk '{print $4}') $(ip -4 route show default)"
# ext4 declares a soft dependency on crc32c (modules.softdep); load it first.
grep -q "^softdep ext4 pre: crypto-crc32c" $M/modules.softdep && load crc32c_generic
load ext4
/sbin/mke2fs -q -F -t ext4 -L kiln /dev/vda || fail "mke2fs"
mkdir -p /mnt/a && mount -t ext4 /dev/vda /mnt/a || fail "mount ext4"
echo ext4-works > /mnt/a/probe && umount /mnt/a && mount -t ext4 -o ro /dev/vda /mnt/a
say "ext4 says $(cat /mnt/a/probe)"
umount /mnt/a
for m in vfat nls_cp437 nls_iso8859_1 nls_ascii nls_utf8; do load $m; done
/sbin/mkfs.vfat -n KILNESP /dev/vdb >/dev/null || fail "mkfs.vfat"
mkdir -p /mnt/b && mount -t vfat /dev/vdb /mnt/b || fail "mount vfat"
echo vfat-works > /mnt/b/probe.txt && umount /mnt/b && mount -t vfat -o ro /dev/vdb /mnt/b
say "vfat says $(cat /mnt/b/probe.txt)"
say "KILN-BOOT-MARKER done"
poweroff -f
"#;

/// Packs the stand-in /init with the default modules and tools.
fn initramfs(dir: &Path) -> std::path::PathBuf {
    let k = kernel().expect("fetching the kernel with scripts/fetch-kernel.sh");
    let init = dir.join("init.sh");
    std::fs::write(&init, INIT).unwrap();
    let spec: Spec = Config {
        agent: Some(init),
        kernel_modules: Some(k.modules.clone()),
        ..Config::default()
    }
    .into_spec()
    .unwrap();
    let out = dir.join("initramfs.img");
    let report = kiln_initramfs::write_image(&spec, &out).expect("packing the initramfs");
    eprint!("{report}");
    out
}

fn disks(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let a = dir.join("a.qcow2");
    let b = dir.join("b.img");
    create_disk(&a, 64, DiskFormat::Qcow2).unwrap();
    create_disk(&b, 48, DiskFormat::Raw).unwrap();
    (a, b)
}

fn check_console(serial: &str) {
    for expected in [
        "KILN-BOOT: loaded virtio_pci",
        "KILN-BOOT: loaded virtio_blk",
        "KILN-BOOT: loaded virtio_net",
        // 64 MiB and 48 MiB in 512-byte sectors.
        "KILN-BOOT: disk vda 131072 sectors",
        "KILN-BOOT: disk vdb 98304 sectors",
        "KILN-BOOT: nic eth0 present",
        // QEMU's user network hands out 10.0.2.15 with the host at 10.0.2.2.
        "KILN-BOOT: lease 10.0.2.15/24 default via 10.0.2.2 dev eth0",
        "KILN-BOOT: ext4 says ext4-works",
        "KILN-BOOT: vfat says vfat-works",
    ] {
        assert!(serial.contains(expected), "console lacks {expected:?}");
    }
    assert!(!serial.contains("FAILED"), "the guest reported a failure");
}

#[test]
fn direct_kernel_boot_loads_modules_and_sees_the_disks() {
    require_qemu();
    let tmp = tempfile::tempdir().unwrap();
    let image = initramfs(tmp.path());
    let (a, b) = disks(tmp.path());
    let k = kernel().unwrap();
    let vm = Qemu::new("direct")
        .memory_mib(512)
        .kernel(&k.vmlinuz, &image, CMDLINE)
        .disk(&a)
        .disk(&b)
        .user_net()
        .spawn()
        .unwrap();
    let serial = vm
        .wait_for_serial(BOOT_TIMEOUT, &format!("{MARKER} done"))
        .unwrap();
    check_console(&serial);
    vm.wait_exit(Duration::from_secs(30))
        .expect("the guest powers off after the marker");
}

#[test]
fn pxe_boot_through_ipxe_and_tftp() {
    require_qemu();
    let tmp = tempfile::tempdir().unwrap();
    let image = initramfs(tmp.path());
    let (a, b) = disks(tmp.path());
    let k = kernel().unwrap();
    let tftp = pxe_dir(&tmp.path().join("tftp"), &k.vmlinuz, &image, CMDLINE).unwrap();
    let script = std::fs::read_to_string(tftp.join(BOOT_SCRIPT)).unwrap();
    assert!(
        script.starts_with("#!ipxe\nkernel vmlinuz console=ttyS0"),
        "{script}"
    );
    let vm = Qemu::new("pxe")
        .memory_mib(512)
        .pxe(&tftp, BOOT_SCRIPT)
        .disk(&a)
        .disk(&b)
        .spawn()
        .unwrap();
    let serial = vm
        .wait_for_serial(BOOT_TIMEOUT, &format!("{MARKER} done"))
        .unwrap();
    check_console(&serial);
    vm.wait_exit(Duration::from_secs(30))
        .expect("the guest powers off after the marker");
}

#[test]
fn a_dropped_vm_leaves_no_qemu_behind() {
    require_qemu();
    // No disk and no kernel: the firmware finds nothing to boot and waits.
    let vm = Qemu::new("idle").memory_mib(128).spawn().unwrap();
    let pid = vm.pid();
    let running = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    assert!(running(pid), "qemu did not start: {}", vm.qemu_output());
    assert!(vm.exit_status().unwrap().is_none());
    drop(vm);
    assert!(!running(pid), "qemu {pid} survived its guard");
}
