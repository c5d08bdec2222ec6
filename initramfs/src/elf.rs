//! Shared-library closure of dynamically linked tools, found by reading
//! their ELF headers (`PT_INTERP`, `DT_NEEDED`, `DT_RUNPATH`/`DT_RPATH`) the
//! way the dynamic loader searches, without running anything.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

/// Why a tool's libraries could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an ELF file: {problem}")]
    NotElf { path: PathBuf, problem: String },
    #[error("{path} needs {lib}, found in none of {searched}")]
    Missing {
        path: PathBuf,
        lib: String,
        searched: String,
    },
}

/// The dynamic-linking facts of one ELF file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Linking {
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
    pub runpath: Vec<String>,
}

/// Reads the dynamic-linking facts from ELF bytes.
pub fn linking(data: &[u8]) -> Result<Linking, String> {
    let elf = goblin::elf::Elf::parse(data).map_err(|e| e.to_string())?;
    let mut runpath: Vec<String> = elf
        .runpaths
        .iter()
        .chain(elf.rpaths.iter())
        .flat_map(|r| r.split(':'))
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect();
    runpath.dedup();
    Ok(Linking {
        interpreter: elf.interpreter.map(str::to_owned),
        needed: elf.libraries.iter().map(|l| (*l).to_owned()).collect(),
        runpath,
    })
}

/// Library directories searched after a file's runpath, as Debian's amd64
/// loader does without an `ld.so.cache`.
pub const DEFAULT_LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// The files a set of executables needs at run time besides themselves: the
/// dynamic loader and every library in the `DT_NEEDED` closure. Keys are the
/// paths the loader opens (where they belong in the initramfs), values the
/// host files to read (symlinks are followed when reading).
pub fn closure(executables: &[PathBuf]) -> Result<BTreeMap<String, PathBuf>, ElfError> {
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut by_soname: BTreeMap<String, String> = BTreeMap::new();
    let mut queue: VecDeque<PathBuf> = executables.iter().cloned().collect();
    while let Some(path) = queue.pop_front() {
        let data = std::fs::read(&path).map_err(|source| ElfError::Read {
            path: path.clone(),
            source,
        })?;
        let link = linking(&data).map_err(|problem| ElfError::NotElf {
            path: path.clone(),
            problem,
        })?;
        if let Some(interp) = &link.interpreter {
            if !found.contains_key(interp) {
                found.insert(interp.clone(), PathBuf::from(interp));
            }
        }
        let origin = path.parent().unwrap_or(Path::new("/"));
        for lib in &link.needed {
            if by_soname.contains_key(lib) {
                continue;
            }
            let dirs: Vec<String> = link
                .runpath
                .iter()
                .map(|r| r.replace("$ORIGIN", &origin.to_string_lossy()))
                .chain(DEFAULT_LIB_DIRS.iter().map(|d| d.to_string()))
                .collect();
            let hit = dirs
                .iter()
                .map(|d| format!("{}/{lib}", d.trim_end_matches('/')))
                .find(|candidate| Path::new(candidate).exists());
            let Some(hit) = hit else {
                return Err(ElfError::Missing {
                    path: path.clone(),
                    lib: lib.clone(),
                    searched: dirs.join(", "),
                });
            };
            by_soname.insert(lib.clone(), hit.clone());
            found.insert(hit.clone(), PathBuf::from(&hit));
            queue.push_back(PathBuf::from(hit));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic_tool() -> Option<PathBuf> {
        ["/usr/sbin/mke2fs", "/sbin/mke2fs", "/bin/ls", "/usr/bin/ls"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    }

    #[test]
    fn a_dynamic_tool_needs_libc_and_the_loader() {
        let tool = dynamic_tool()
            .expect("no dynamically linked mke2fs or ls on this host (scripts/install-deps.sh)");
        let link = linking(&std::fs::read(&tool).unwrap()).unwrap();
        assert_eq!(
            link.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert!(link.needed.iter().any(|l| l == "libc.so.6"), "{link:?}");

        let files = closure(&[tool]).unwrap();
        assert!(
            files.contains_key("/lib64/ld-linux-x86-64.so.2"),
            "{files:?}"
        );
        assert!(files.keys().any(|k| k.ends_with("/libc.so.6")), "{files:?}");
        for host in files.values() {
            assert!(host.exists(), "{host:?}");
        }
    }

    #[test]
    fn a_static_binary_needs_nothing() {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "busybox-static is not installed (scripts/install-deps.sh)"
        );
        let link = linking(&std::fs::read(busybox).unwrap()).unwrap();
        assert_eq!(link, Linking::default());
    }

    #[test]
    fn garbage_is_not_elf() {
        assert!(linking(b"#!/bin/sh\n").is_err());
    }
}
