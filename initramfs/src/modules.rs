//! Kernel modules: find them in a `lib/modules/<version>` tree, resolve the
//! dependency closure of a set of names, and write `modules.dep`,
//! `modules.alias` and `modules.softdep` for the packed set in depmod's formats.
//!
//! Dependencies come from the tree's `modules.dep` when depmod made one, else
//! from each module's `.modinfo` section (`depends=`), since Debian's package
//! ships none. Modules may be `.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz`; they are
//! decompressed so the initramfs holds plain `.ko` files that `finit_module`
//! loads without a decompressor.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why the module tree could not be read or a closure resolved.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Bad { path: PathBuf, problem: String },
    #[error("no module named {name:?} in {root} (not a file, builtin or alias)")]
    NotFound { name: String, root: PathBuf },
    #[error("module dependency cycle: {0}")]
    Cycle(String),
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> ModuleError {
    move |source| ModuleError::Io { what, source }
}

/// The fields of a module's `.modinfo` section the packer uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub name: Option<String>,
    pub depends: Vec<String>,
    pub aliases: Vec<String>,
    /// Raw `softdep=` values, e.g. `pre: crypto-crc32c`.
    pub softdeps: Vec<String>,
}

/// Module names compare with `-` and `_` as the same character; the kernel
/// and kmod use `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file path such as `kernel/fs/ext4/ext4.ko.xz`.
pub fn module_name_of(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    (!stem.is_empty()).then(|| normalize(stem))
}

/// Parses the bytes of a `.modinfo` section: NUL-separated `key=value` pairs.
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for field in section.split(|b| *b == 0) {
        let Ok(field) = std::str::from_utf8(field) else {
            continue;
        };
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = Some(normalize(value)),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(normalize),
            ),
            "alias" => info.aliases.push(value.to_owned()),
            "softdep" => info.softdeps.push(value.trim().to_owned()),
            _ => {}
        }
    }
    info
}

/// The module names of a `softdep=` value (`pre: a b post: c`), pre and post
/// together.
pub fn softdep_names(value: &str) -> Vec<String> {
    value
        .split_whitespace()
        .filter(|w| !w.ends_with(':'))
        .map(str::to_owned)
        .collect()
}

/// Parses `modules.dep`: `path: dep-path dep-path ...` per line, to module
/// names: name to dependency names, in the file's order.
pub fn parse_modules_dep(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut deps = BTreeMap::new();
    for line in text.lines() {
        let Some((module, rest)) = line.split_once(':') else {
            continue;
        };
        let Some(name) = module_name_of(module.trim()) else {
            continue;
        };
        let list = rest.split_whitespace().filter_map(module_name_of).collect();
        deps.insert(name, list);
    }
    deps
}

/// Parses `modules.alias`: `alias PATTERN NAME` lines.
pub fn parse_modules_alias(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "alias")
                .then(|| Some((words.next()?.to_owned(), normalize(words.next()?))))?
        })
        .collect()
}

/// Reads the `.modinfo` section of an ELF module. Only the ELF header and
/// section headers are parsed: this runs over every module of a tree when
/// aliases must be looked up.
pub fn modinfo_section(elf: &[u8]) -> Result<&[u8], String> {
    use goblin::container::{Container, Ctx, Endian};
    use goblin::elf::{Elf, SectionHeader};
    let header = Elf::parse_header(elf).map_err(|e| format!("not an ELF module: {e}"))?;
    let container =
        if header.e_ident[goblin::elf::header::EI_CLASS] == goblin::elf::header::ELFCLASS64 {
            Container::Big
        } else {
            Container::Little
        };
    let endian = Endian::from(
        header.e_ident[goblin::elf::header::EI_DATA] != goblin::elf::header::ELFDATA2MSB,
    );
    let ctx = Ctx::new(container, endian);
    let sections = SectionHeader::parse(elf, header.e_shoff as usize, header.e_shnum as usize, ctx)
        .map_err(|e| format!("reading section headers: {e}"))?;
    let bytes_of = |sh: &SectionHeader| -> Result<&[u8], String> {
        let start = sh.sh_offset as usize;
        start
            .checked_add(sh.sh_size as usize)
            .filter(|end| *end <= elf.len())
            .map(|end| &elf[start..end])
            .ok_or_else(|| "a section lies outside the file".to_owned())
    };
    let names = sections
        .get(header.e_shstrndx as usize)
        .ok_or_else(|| "no section name table".to_owned())
        .and_then(bytes_of)?;
    for sh in &sections {
        let name = names
            .get(sh.sh_name..)
            .and_then(|n| n.split(|b| *b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return bytes_of(sh);
        }
    }
    Err("no .modinfo section".to_owned())
}

/// Decompresses a module file's bytes according to its name's extension.
pub fn decompress_module(path: &Path, data: Vec<u8>) -> Result<Vec<u8>, ModuleError> {
    let name = path.to_string_lossy();
    let bad = |problem: String| ModuleError::Bad {
        path: path.to_owned(),
        problem,
    };
    if name.ends_with(".ko") {
        Ok(data)
    } else if name.ends_with(".ko.xz") {
        let mut out = Vec::new();
        lzma_rs::xz_decompress(&mut &data[..], &mut out)
            .map_err(|e| bad(format!("decompressing xz: {e}")))?;
        Ok(out)
    } else if name.ends_with(".ko.zst") {
        zstd::decode_all(&data[..]).map_err(|e| bad(format!("decompressing zstd: {e}")))
    } else if name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&data[..])
            .read_to_end(&mut out)
            .map_err(|e| bad(format!("decompressing gzip: {e}")))?;
        Ok(out)
    } else {
        Err(bad("not a kernel module file name".to_owned()))
    }
}

/// Orders `roots` and everything they depend on so that each module comes
/// after its dependencies. `deps_of(name)` gives a module's direct
/// dependencies, or `None` when the name needs no loading (builtin).
/// Deterministic: dependencies are visited in sorted order.
pub fn load_order<F>(roots: &[String], mut deps_of: F) -> Result<Vec<String>, ModuleError>
where
    F: FnMut(&str) -> Result<Option<Vec<String>>, ModuleError>,
{
    #[derive(PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<F>(
        name: &str,
        deps_of: &mut F,
        marks: &mut HashMap<String, Mark>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ModuleError>
    where
        F: FnMut(&str) -> Result<Option<Vec<String>>, ModuleError>,
    {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                stack.push(name.to_owned());
                return Err(ModuleError::Cycle(stack.join(" -> ")));
            }
            None => {}
        }
        let Some(mut deps) = deps_of(name)? else {
            marks.insert(name.to_owned(), Mark::Done);
            return Ok(());
        };
        marks.insert(name.to_owned(), Mark::Visiting);
        stack.push(name.to_owned());
        deps.sort();
        deps.dedup();
        for dep in &deps {
            visit(dep, deps_of, marks, stack, order)?;
        }
        stack.pop();
        marks.insert(name.to_owned(), Mark::Done);
        order.push(name.to_owned());
        Ok(())
    }

    let mut marks = HashMap::new();
    let mut order = Vec::new();
    let mut sorted: Vec<String> = roots.iter().map(|r| normalize(r)).collect();
    sorted.sort();
    sorted.dedup();
    for root in &sorted {
        visit(root, &mut deps_of, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

/// One module chosen for the initramfs.
#[derive(Debug, Clone)]
pub struct PackedModule {
    pub name: String,
    /// Path relative to `lib/modules/<version>`, always ending in `.ko`.
    pub rel_path: String,
    /// The plain ELF module.
    pub data: Vec<u8>,
    pub info: ModInfo,
}

/// The modules chosen for an initramfs, in load order (dependencies first).
#[derive(Debug, Clone)]
pub struct ModuleSet {
    pub version: String,
    pub modules: Vec<PackedModule>,
    /// Direct dependencies of each packed module (names, all packed).
    pub deps: BTreeMap<String, Vec<String>>,
    /// Requested or softdep names that are built into the kernel.
    pub builtin: Vec<String>,
    /// The tree's `modules.builtin`, copied as is when present.
    pub builtin_list: Option<String>,
}

impl ModuleSet {
    /// `modules.dep` in depmod's format: for each module its whole
    /// dependency closure, users before what they use, so loading the list
    /// from its last entry to its first and then the module itself works.
    pub fn modules_dep(&self) -> String {
        let position: HashMap<&str, usize> = self
            .modules
            .iter()
            .enumerate()
            .map(|(i, m)| (m.name.as_str(), i))
            .collect();
        let path_of: HashMap<&str, &str> = self
            .modules
            .iter()
            .map(|m| (m.name.as_str(), m.rel_path.as_str()))
            .collect();
        let mut out = String::new();
        for m in &self.modules {
            let mut closure = BTreeSet::new();
            let mut todo = vec![m.name.as_str()];
            while let Some(n) = todo.pop() {
                for d in self.deps.get(n).into_iter().flatten() {
                    if closure.insert(d.as_str()) {
                        todo.push(d);
                    }
                }
            }
            let mut closure: Vec<&str> = closure.into_iter().collect();
            closure.sort_by_key(|n| std::cmp::Reverse(position[n]));
            out.push_str(&m.rel_path);
            out.push(':');
            for d in closure {
                out.push(' ');
                out.push_str(path_of[d]);
            }
            out.push('\n');
        }
        out
    }

    /// `modules.alias`: `alias PATTERN NAME` for every alias of every packed
    /// module, modules in load order, aliases in `.modinfo` order.
    pub fn modules_alias(&self) -> String {
        let mut out = String::from("# Aliases extracted from modules themselves.\n");
        for m in &self.modules {
            for a in &m.info.aliases {
                out.push_str(&format!("alias {a} {}\n", m.name));
            }
        }
        out
    }

    /// `modules.softdep`: `softdep NAME pre: ... post: ...` as the modules
    /// declare them.
    pub fn modules_softdep(&self) -> String {
        let mut out = String::from("# Soft dependencies extracted from modules themselves.\n");
        for m in &self.modules {
            for s in &m.info.softdeps {
                out.push_str(&format!("softdep {} {s}\n", m.name));
            }
        }
        out
    }

    /// Total bytes of the packed (decompressed) modules.
    pub fn bytes(&self) -> u64 {
        self.modules.iter().map(|m| m.data.len() as u64).sum()
    }
}

/// A `lib/modules/<version>` directory.
pub struct ModuleTree {
    root: PathBuf,
    version: String,
    /// Module name to its path relative to `root`, as found on disk.
    files: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
    builtin_list: Option<String>,
    dep_file: Option<BTreeMap<String, Vec<String>>>,
    /// Alias to module names: from `modules.alias`, or filled by scanning
    /// every module's `.modinfo` the first time an alias is needed.
    aliases: Option<Vec<(String, String)>>,
    cache: HashMap<String, (Vec<u8>, ModInfo)>,
}

impl ModuleTree {
    /// Opens a module tree. `dir` may be `lib/modules/<version>` itself, a
    /// `lib/modules` holding one version, or a root holding `lib/modules`
    /// with one version (such as the kernel cache of `fetch-kernel.sh`).
    pub fn open(dir: &Path) -> Result<Self, ModuleError> {
        let root = find_version_dir(dir)?;
        let version = root
            .file_name()
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files = BTreeMap::new();
        walk_modules(&root, &root, &mut files)?;
        if files.is_empty() {
            return Err(ModuleError::Bad {
                path: root,
                problem: "holds no kernel modules (*.ko, *.ko.xz, *.ko.zst)".to_owned(),
            });
        }
        let read_opt = |name: &str| -> Result<Option<String>, ModuleError> {
            let p = root.join(name);
            match std::fs::read_to_string(&p) {
                Ok(t) => Ok(Some(t)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err(format!("reading {}", p.display()))(e)),
            }
        };
        let builtin_list = read_opt("modules.builtin")?;
        let builtin = builtin_list
            .iter()
            .flat_map(|t| t.lines().filter_map(module_name_of))
            .collect();
        let dep_file = read_opt("modules.dep")?.map(|t| parse_modules_dep(&t));
        let aliases = read_opt("modules.alias")?.map(|t| parse_modules_alias(&t));
        Ok(Self {
            root,
            version,
            files,
            builtin,
            builtin_list,
            dep_file,
            aliases,
            cache: HashMap::new(),
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the dependencies come from a `modules.dep` (else `.modinfo`).
    pub fn has_modules_dep(&self) -> bool {
        self.dep_file.is_some()
    }

    fn load(&mut self, name: &str) -> Result<&(Vec<u8>, ModInfo), ModuleError> {
        if !self.cache.contains_key(name) {
            let rel = &self.files[name];
            let path = self.root.join(rel);
            let raw =
                std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
            let data = decompress_module(&path, raw)?;
            let info =
                parse_modinfo(modinfo_section(&data).map_err(|problem| ModuleError::Bad {
                    path: path.clone(),
                    problem,
                })?);
            self.cache.insert(name.to_owned(), (data, info));
        }
        Ok(&self.cache[name])
    }

    fn direct_deps(&mut self, name: &str) -> Result<Vec<String>, ModuleError> {
        if let Some(deps) = self.dep_file.as_ref().and_then(|d| d.get(name)) {
            // modules.dep lists the whole closure; that is fine for ordering.
            return Ok(deps.clone());
        }
        Ok(self.load(name)?.1.depends.clone())
    }

    fn alias_table(&mut self) -> Result<&[(String, String)], ModuleError> {
        if self.aliases.is_none() {
            let names: Vec<String> = self.files.keys().cloned().collect();
            let mut table = Vec::new();
            for name in names {
                let rel = self.files[&name].clone();
                let path = self.root.join(&rel);
                let raw =
                    std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
                let data = decompress_module(&path, raw)?;
                if let Ok(section) = modinfo_section(&data) {
                    for a in parse_modinfo(section).aliases {
                        table.push((a, name.clone()));
                    }
                }
            }
            self.aliases = Some(table);
        }
        Ok(self.aliases.as_deref().unwrap_or_default())
    }

    /// What a name stands for: itself when a module file or builtin has that
    /// name, else the modules that declare it as an alias (exact match).
    fn resolve_name(&mut self, name: &str) -> Result<Vec<String>, ModuleError> {
        let n = normalize(name);
        if self.files.contains_key(&n) || self.builtin.contains(&n) {
            return Ok(vec![n]);
        }
        let found: BTreeSet<String> = self
            .alias_table()?
            .iter()
            .filter(|(a, _)| a == name)
            .map(|(_, m)| m.clone())
            .collect();
        Ok(found.into_iter().collect())
    }

    /// Chooses `names` and their dependency closure, softdeps included.
    /// A requested name that is neither a module, builtin nor an alias is an
    /// error; a softdep that resolves to nothing is skipped.
    pub fn select(&mut self, names: &[String]) -> Result<ModuleSet, ModuleError> {
        let mut roots = BTreeSet::new();
        for name in names {
            let resolved = self.resolve_name(name)?;
            if resolved.is_empty() {
                return Err(ModuleError::NotFound {
                    name: name.clone(),
                    root: self.root.clone(),
                });
            }
            roots.extend(resolved);
        }

        // Softdeps may pull in more modules, whose own softdeps may pull in
        // more: grow the root set until it stops changing.
        let mut order;
        loop {
            let root_list: Vec<String> = roots.iter().cloned().collect();
            order = load_order(&root_list, |n| {
                if self.builtin.contains(n) && !self.files.contains_key(n) {
                    return Ok(None);
                }
                if !self.files.contains_key(n) {
                    return Err(ModuleError::NotFound {
                        name: n.to_owned(),
                        root: self.root.clone(),
                    });
                }
                self.direct_deps(n).map(Some)
            })?;
            let mut grown = false;
            for n in order.clone() {
                let softdeps: Vec<String> = self
                    .load(&n)?
                    .1
                    .softdeps
                    .iter()
                    .flat_map(|s| softdep_names(s))
                    .collect();
                for s in softdeps {
                    for r in self.resolve_name(&s)? {
                        grown |= roots.insert(r);
                    }
                }
            }
            if !grown {
                break;
            }
        }

        let builtin = roots
            .iter()
            .filter(|r| !self.files.contains_key(*r))
            .cloned()
            .collect();
        let mut modules = Vec::new();
        let mut deps = BTreeMap::new();
        for name in order {
            let direct = self.load(&name)?.1.depends.clone();
            let direct: Vec<String> = match self.dep_file.as_ref().and_then(|d| d.get(&name)) {
                Some(from_file) => from_file.clone(),
                None => direct,
            }
            .into_iter()
            .filter(|d| self.files.contains_key(d))
            .collect();
            deps.insert(name.clone(), direct);
            let (data, info) = self.load(&name)?.clone();
            let rel = &self.files[&name];
            let rel_path = match rel.find(".ko") {
                Some(i) => format!("{}.ko", &rel[..i]),
                None => rel.clone(),
            };
            modules.push(PackedModule {
                name,
                rel_path,
                data,
                info,
            });
        }
        Ok(ModuleSet {
            version: self.version.clone(),
            modules,
            deps,
            builtin,
            builtin_list: self.builtin_list.clone(),
        })
    }
}

fn find_version_dir(dir: &Path) -> Result<PathBuf, ModuleError> {
    let is_version = |d: &Path| d.join("kernel").is_dir() || d.join("modules.order").is_file();
    if is_version(dir) {
        return Ok(dir.to_owned());
    }
    for base in [dir.join("lib/modules"), dir.to_owned()] {
        let Ok(read) = std::fs::read_dir(&base) else {
            continue;
        };
        let mut versions: Vec<PathBuf> = read
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && is_version(p))
            .collect();
        versions.sort();
        match versions.len() {
            0 => continue,
            1 => return Ok(versions.remove(0)),
            _ => {
                return Err(ModuleError::Bad {
                    path: base,
                    problem: format!(
                        "holds several kernel versions ({}); name one",
                        versions
                            .iter()
                            .filter_map(|v| v.file_name())
                            .map(|v| v.to_string_lossy())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
            }
        }
    }
    Err(ModuleError::Bad {
        path: dir.to_owned(),
        problem: "is not a lib/modules/<version> directory and holds none".to_owned(),
    })
}

fn walk_modules(
    root: &Path,
    dir: &Path,
    files: &mut BTreeMap<String, String>,
) -> Result<(), ModuleError> {
    let read = std::fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
    let mut entries: Vec<_> = read
        .collect::<Result<_, _>>()
        .map_err(io_err(format!("listing {}", dir.display())))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let ty = entry
            .file_type()
            .map_err(io_err(format!("reading the type of {}", path.display())))?;
        if ty.is_dir() {
            walk_modules(root, &path, files)?;
        } else if let Some(rel) = path.strip_prefix(root).ok().and_then(|r| r.to_str()) {
            if let Some(name) = module_name_of(rel) {
                // The first of several same-named modules wins, as with depmod's
                // search order (updates/ sorts after kernel/, and is rare).
                files.entry(name).or_insert_with(|| rel.to_owned());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    #[test]
    fn modinfo_fields_are_parsed_and_names_normalised() {
        let section = b"license=GPL\0alias=fs-ext4\0softdep=pre: crypto-crc32c\0alias=ext3\0depends=jbd2,mbcache,crc-16\0name=ext4\0\0\0";
        let info = parse_modinfo(section);
        assert_eq!(info.name.as_deref(), Some("ext4"));
        assert_eq!(info.depends, ["jbd2", "mbcache", "crc_16"]);
        assert_eq!(info.aliases, ["fs-ext4", "ext3"]);
        assert_eq!(info.softdeps, ["pre: crypto-crc32c"]);
        assert_eq!(parse_modinfo(b"depends=\0").depends, Vec::<String>::new());
        assert_eq!(
            softdep_names("pre: a b-c post: d"),
            ["a", "b-c", "d"].map(String::from)
        );
    }

    #[test]
    fn module_names_come_from_any_compressed_file_name() {
        assert_eq!(
            module_name_of("kernel/a/t10-pi.ko").as_deref(),
            Some("t10_pi")
        );
        assert_eq!(
            module_name_of("kernel/a/ext4.ko.xz").as_deref(),
            Some("ext4")
        );
        assert_eq!(module_name_of("x.ko.zst").as_deref(), Some("x"));
        assert_eq!(module_name_of("modules.dep"), None);
        assert_eq!(module_name_of("kernel/a/notes.txt"), None);
    }

    #[test]
    fn modules_dep_and_alias_files_parse() {
        let dep = "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\nkernel/net/core/failover.ko.xz:\n";
        let parsed = parse_modules_dep(dep);
        assert_eq!(parsed["virtio_net"], ["net_failover", "failover"]);
        assert!(parsed["failover"].is_empty());
        let alias =
            "# comment\nalias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\nalias fs-vfat vfat\n";
        assert_eq!(
            parse_modules_alias(alias),
            [
                (
                    "pci:v00001AF4d*sv*sd*bc*sc*i*".to_string(),
                    "virtio_pci".to_string()
                ),
                ("fs-vfat".to_string(), "vfat".to_string())
            ]
        );
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let g = graph(&[
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
            ("net_failover", &["failover"]),
            ("failover", &[]),
            ("virtio", &["virtio_ring"]),
            ("virtio_ring", &[]),
        ]);
        let roots = ["virtio_net".to_string(), "virtio_blk".to_string()];
        let order = load_order(&roots, |n| Ok(g.get(n).cloned())).unwrap();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        for (name, deps) in &g {
            let at = order.iter().position(|o| o == name).unwrap();
            for d in deps {
                assert!(
                    order.iter().position(|o| o == d).unwrap() < at,
                    "{d} before {name}"
                );
            }
        }
    }

    #[test]
    fn builtins_are_left_out_and_cycles_named() {
        let g = graph(&[("sd_mod", &["scsi_mod", "crc_t10dif"]), ("scsi_mod", &[])]);
        let order = load_order(&["sd_mod".into()], |n| Ok(g.get(n).cloned())).unwrap();
        assert_eq!(order, ["scsi_mod", "sd_mod"]);

        let cyc = graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        let err = load_order(&["a".into()], |n| Ok(cyc.get(n).cloned())).unwrap_err();
        assert_eq!(err.to_string(), "module dependency cycle: a -> b -> c -> a");
    }

    fn packed(name: &str, rel: &str, aliases: &[&str]) -> PackedModule {
        PackedModule {
            name: name.into(),
            rel_path: rel.into(),
            data: vec![],
            info: ModInfo {
                aliases: aliases.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            },
        }
    }

    #[test]
    fn generated_modules_dep_lists_closure_users_first() {
        let set = ModuleSet {
            version: "6.1".into(),
            modules: vec![
                packed("failover", "kernel/net/core/failover.ko", &[]),
                packed("net_failover", "kernel/drivers/net/net_failover.ko", &[]),
                packed(
                    "virtio_net",
                    "kernel/drivers/net/virtio_net.ko",
                    &["virtio:d00000001v*"],
                ),
            ],
            deps: graph(&[
                ("failover", &[]),
                ("net_failover", &["failover"]),
                ("virtio_net", &["net_failover"]),
            ]),
            builtin: vec![],
            builtin_list: None,
        };
        assert_eq!(
            set.modules_dep(),
            "kernel/net/core/failover.ko:\n\
             kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
             kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n"
        );
        assert!(set
            .modules_alias()
            .ends_with("alias virtio:d00000001v* virtio_net\n"));
        // What we write, we read back the same.
        assert_eq!(
            parse_modules_dep(&set.modules_dep())["virtio_net"],
            ["net_failover", "failover"]
        );
    }
}
