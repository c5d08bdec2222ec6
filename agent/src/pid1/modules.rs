//! Kernel modules: the depmod index files the initramfs carries
//! (`modules.dep`, `modules.alias`, `modules.softdep`, `modules.builtin`),
//! matching devices' modaliases against the alias globs, the load order with
//! dependencies, and `finit_module`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// A module name as the kernel compares it: dashes are underscores.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a path in `modules.dep` (`kernel/fs/ext4/ext4.ko` is `ext4`).
pub fn name_of(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

/// The parsed index files of one `lib/modules/<version>` directory.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    /// name → (path relative to the modules directory, dependency paths as listed).
    pub deps: BTreeMap<String, (String, Vec<String>)>,
    /// (glob, module name), in file order.
    pub aliases: Vec<(String, String)>,
    /// name → soft dependencies to load first (module names or aliases).
    pub softdeps: BTreeMap<String, Vec<String>>,
    pub builtin: BTreeSet<String>,
}

impl ModuleIndex {
    /// Parses the texts of the four index files (missing ones as empty).
    pub fn parse(dep: &str, alias: &str, softdep: &str, builtin: &str) -> Self {
        let mut idx = ModuleIndex::default();
        for line in dep.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let deps = rest.split_whitespace().map(str::to_string).collect();
            idx.deps.insert(name_of(path), (path.to_string(), deps));
        }
        for line in alias.lines() {
            let mut w = line.split_whitespace();
            if let (Some("alias"), Some(glob), Some(module)) = (w.next(), w.next(), w.next()) {
                idx.aliases.push((glob.to_string(), normalize(module)));
            }
        }
        for line in softdep.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("softdep") {
                continue;
            }
            let Some(module) = w.next() else { continue };
            let mut pre = Vec::new();
            let mut in_pre = false;
            for word in w {
                match word {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    other if in_pre => pre.push(other.to_string()),
                    _ => {}
                }
            }
            idx.softdeps
                .entry(normalize(module))
                .or_default()
                .extend(pre);
        }
        for line in builtin.lines() {
            let line = line.trim();
            if !line.is_empty() {
                idx.builtin.insert(name_of(line));
            }
        }
        idx
    }

    /// Reads the index files from `dir` (`/lib/modules/<version>`).
    pub fn load(dir: &Path) -> Result<Self> {
        let read = |name: &str, required: bool| -> Result<String> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(t) => Ok(t),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(String::new())
                }
                Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
            }
        };
        Ok(Self::parse(
            &read("modules.dep", true)?,
            &read("modules.alias", false)?,
            &read("modules.softdep", false)?,
            &read("modules.builtin", false)?,
        ))
    }

    /// The modules whose alias globs match `modalias`, in file order, without repeats.
    pub fn matching(&self, modalias: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (glob, module) in &self.aliases {
            if glob_match(glob, modalias) && !out.contains(module) {
                out.push(module.clone());
            }
        }
        out
    }

    /// Resolves a name from a softdep or a request: a module, or an alias
    /// (`crypto-crc32c`) naming one. None when it is unknown or built in.
    pub fn resolve(&self, name: &str) -> Option<String> {
        let n = normalize(name);
        if self.deps.contains_key(&n) {
            return Some(n);
        }
        if self.builtin.contains(&n) {
            return None;
        }
        self.matching(name)
            .into_iter()
            .find(|m| self.deps.contains_key(m))
    }

    /// The paths to load for `module`, in order: its soft dependencies, its
    /// dependencies from the last listed to the first, then itself. Modules
    /// in `loaded` (or built in) and repeats are left out.
    pub fn load_order(&self, module: &str, loaded: &BTreeSet<String>) -> Result<Vec<String>> {
        let mut order = Vec::new();
        let mut seen = loaded.clone();
        self.push_order(&normalize(module), &mut seen, &mut order, 0)?;
        Ok(order)
    }

    fn push_order(
        &self,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if seen.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if depth > 16 {
            bail!("module dependencies nest deeper than 16 at {name}");
        }
        let Some((path, deps)) = self.deps.get(name) else {
            bail!("module {name} is not in modules.dep");
        };
        seen.insert(name.to_string());
        if let Some(pre) = self.softdeps.get(name) {
            for soft in pre {
                // A soft dependency is a wish, not a requirement.
                if let Some(m) = self.resolve(soft) {
                    let _ = self.push_order(&m, seen, order, depth + 1);
                }
            }
        }
        for dep in deps.iter().rev() {
            let dn = name_of(dep);
            if !seen.contains(&dn) && !self.builtin.contains(&dn) {
                seen.insert(dn.clone());
                order.push(dep.clone());
            }
        }
        order.push(path.clone());
        Ok(())
    }
}

/// fnmatch(3) without flags, as modprobe matches aliases: `*`, `?`, and
/// bracket sets with ranges and `!` or `^` negation.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matcher with one backtrack point for the last `*`.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = bracket(&p, pi, t[ti]) {
                        if matched {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Matches `c` against the bracket set starting at `p[start] == '['`.
/// Returns (matched, index after `]`), or None when the set is not closed.
fn bracket(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

/// Names of the loaded modules from `/proc/modules` text.
pub fn parse_loaded(proc_modules: &str) -> BTreeSet<String> {
    proc_modules
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(normalize)
        .collect()
}

/// Every `modalias` file's content under `root` (`/sys/devices`), without
/// following symlinks, sorted and without repeats.
pub fn modaliases(root: &Path) -> Vec<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name() == "modalias" {
                if let Ok(text) = std::fs::read_to_string(e.path()) {
                    let text = text.trim();
                    if !text.is_empty() {
                        out.insert(text.to_string());
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// Loads modules from `dir` (`/lib/modules/<version>`) with finit_module.
pub struct Loader {
    pub dir: PathBuf,
    pub index: ModuleIndex,
}

impl Loader {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            index: ModuleIndex::load(dir)?,
        })
    }

    fn loaded() -> BTreeSet<String> {
        parse_loaded(&std::fs::read_to_string("/proc/modules").unwrap_or_default())
    }

    /// Loads `module` with its dependencies; returns the modules it loaded.
    pub fn load(&self, module: &str) -> Result<Vec<String>> {
        let order = self.index.load_order(module, &Self::loaded())?;
        let mut done = Vec::new();
        for rel in order {
            let path = self.dir.join(&rel);
            finit_module(&path).with_context(|| format!("loading {}", path.display()))?;
            done.push(name_of(&rel));
        }
        Ok(done)
    }

    /// One pass over the devices: loads every module a modalias under
    /// `sys_devices` asks for. Returns what was loaded and what failed.
    pub fn load_for_devices(&self, sys_devices: &Path) -> (Vec<String>, Vec<String>) {
        let mut loaded = Vec::new();
        let mut failed = Vec::new();
        let mut tried = BTreeSet::new();
        for alias in modaliases(sys_devices) {
            for m in self.index.matching(&alias) {
                if !tried.insert(m.clone()) || !self.index.deps.contains_key(&m) {
                    continue;
                }
                match self.load(&m) {
                    Ok(names) => loaded.extend(names),
                    Err(e) => failed.push(format!("{m}: {e:#}")),
                }
            }
        }
        (loaded, failed)
    }
}

/// finit_module(2) with no parameters. A module that is already there counts as loaded.
pub fn finit_module(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = CString::default();
    // SAFETY: the fd is open for the whole call and params is a valid C string.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/crypto/crc32c_generic.ko:
kernel/fs/nls/nls-cp437.ko:
";
    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000001v* virtio_net
alias virtio:d00000002v* virtio_blk
alias crypto-crc32c crc32c_generic
alias fs-ext4 ext4
alias nls-cp437 nls-cp437
";
    const SOFTDEP: &str = "softdep ext4 pre: crypto-crc32c\n";
    const BUILTIN: &str = "kernel/drivers/block/loop.ko\n";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(DEP, ALIAS, SOFTDEP, BUILTIN)
    }

    #[test]
    fn globs_match_as_modprobe_does() {
        assert!(glob_match(
            "pci:v00001AF4d*sv*sd*bc*sc*i*",
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
        ));
        assert!(!glob_match(
            "pci:v00001AF4d*sv*sd*bc*sc*i*",
            "pci:v00008086d00001000sv00001AF4sd00000001bc02sc00i00"
        ));
        assert!(glob_match(
            "virtio:d00000002v*",
            "virtio:d00000002v00001AF4"
        ));
        assert!(!glob_match(
            "virtio:d00000002v*",
            "virtio:d00000001v00001AF4"
        ));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match(
            "usb:v*p*d*dc*dsc*dp*ic08isc06ip50in*",
            "usb:v0781p5567d0100dc00dsc00dp00ic08isc06ip50in00"
        ));
        assert!(glob_match("x[0-9A-F]y", "x7y"));
        assert!(glob_match("x[!0-9]y", "xzy"));
        assert!(!glob_match("x[!0-9]y", "x5y"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a", ""));
        assert!(glob_match("a*b*c", "aXXbYYbZc"));
        assert!(!glob_match("a*b*c", "aXXbYYbZ"));
    }

    #[test]
    fn names_compare_with_dashes_as_underscores() {
        let idx = index();
        assert_eq!(name_of("kernel/fs/nls/nls-cp437.ko"), "nls_cp437");
        assert_eq!(name_of("kernel/fs/ext4/ext4.ko.zst"), "ext4");
        assert!(idx.deps.contains_key("nls_cp437"));
        assert_eq!(idx.resolve("nls-cp437").as_deref(), Some("nls_cp437"));
    }

    #[test]
    fn dependencies_load_from_the_last_listed_to_the_first_then_the_module() {
        let idx = index();
        let order = idx.load_order("virtio_pci", &BTreeSet::new()).unwrap();
        let names: Vec<String> = order.iter().map(|p| name_of(p)).collect();
        assert_eq!(
            names,
            [
                "virtio",
                "virtio_ring",
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_pci"
            ]
        );
        // What is loaded is left out.
        let loaded: BTreeSet<String> = ["virtio".to_string(), "virtio_ring".to_string()].into();
        let order = idx.load_order("virtio_blk", &loaded).unwrap();
        assert_eq!(order, ["kernel/drivers/block/virtio_blk.ko"]);
    }

    #[test]
    fn soft_dependencies_come_first_resolved_through_aliases() {
        let idx = index();
        let names: Vec<String> = idx
            .load_order("ext4", &BTreeSet::new())
            .unwrap()
            .iter()
            .map(|p| name_of(p))
            .collect();
        assert_eq!(
            names,
            ["crc32c_generic", "crc16", "mbcache", "jbd2", "ext4"]
        );
    }

    #[test]
    fn built_in_and_unknown_modules() {
        let idx = index();
        assert!(idx.load_order("loop", &BTreeSet::new()).unwrap().is_empty());
        let err = idx.load_order("nosuch", &BTreeSet::new()).unwrap_err();
        assert!(err.to_string().contains("nosuch"), "{err}");
        assert_eq!(idx.resolve("loop"), None);
        assert_eq!(
            idx.resolve("crypto-crc32c").as_deref(),
            Some("crc32c_generic")
        );
    }

    #[test]
    fn devices_ask_for_modules_through_their_modaliases() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let pci = d.join("pci0000:00/0000:00:03.0");
        std::fs::create_dir_all(pci.join("virtio0")).unwrap();
        std::fs::write(
            pci.join("modalias"),
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00\n",
        )
        .unwrap();
        std::fs::write(pci.join("virtio0/modalias"), "virtio:d00000001v00001AF4\n").unwrap();
        std::fs::write(d.join("pci0000:00/modalias"), "\n").unwrap();
        let aliases = modaliases(d);
        assert_eq!(aliases.len(), 2);
        let idx = index();
        let wanted: Vec<String> = aliases.iter().flat_map(|a| idx.matching(a)).collect();
        assert_eq!(wanted, ["virtio_pci", "virtio_net"]);
    }

    #[test]
    fn proc_modules_lists_loaded_names() {
        let loaded = parse_loaded(
            "virtio_net 69632 0 - Live 0x0\nnet_failover 20480 1 virtio_net, Live 0x0\n",
        );
        assert!(loaded.contains("virtio_net") && loaded.contains("net_failover"));
    }
}
