//! A reproducible newc ("070701") cpio writer, the format the kernel unpacks
//! an initramfs from.
//!
//! Written here rather than taken from a crate because reproducibility is the
//! point: every header field is fixed by the archive's contents alone (entries
//! sorted by path components, mtime 0, uid/gid 0, inode numbers assigned in
//! that order), and parents are created before their children.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    node: Node,
    /// Permission bits only (e.g. 0o755); the type bits come from `node`.
    perm: u32,
}

/// An in-memory archive: paths (without a leading `/`) to entries. Missing
/// parent directories are added with mode 0755.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<Vec<String>, Entry>,
}

/// Why an entry could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArchiveError {
    #[error("archive path {0:?} is empty or not a plain relative path")]
    BadPath(String),
    #[error("archive path {path:?} is already a {existing}, cannot add it as a {new}")]
    Conflict {
        path: String,
        existing: &'static str,
        new: &'static str,
    },
    #[error("parent of archive path {0:?} is not a directory")]
    ParentNotDir(String),
}

fn kind(node: &Node) -> &'static str {
    match node {
        Node::Dir => "directory",
        Node::File(_) => "file",
        Node::Symlink(_) => "symlink",
        Node::CharDev { .. } => "character device",
    }
}

fn split(path: &str) -> Result<Vec<String>, ArchiveError> {
    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    if parts.is_empty() || parts.iter().any(|p| p == "." || p == "..") {
        return Err(ArchiveError::BadPath(path.to_owned()));
    }
    Ok(parts)
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its parents). Adding an existing directory again
    /// is a no-op.
    pub fn dir(&mut self, path: &str) -> Result<(), ArchiveError> {
        self.insert(path, Node::Dir, 0o755)
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, path: &str, data: Vec<u8>, perm: u32) -> Result<(), ArchiveError> {
        self.insert(path, Node::File(data), perm)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), ArchiveError> {
        self.insert(path, Node::Symlink(target.to_owned()), 0o777)
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        major: u32,
        minor: u32,
        perm: u32,
    ) -> Result<(), ArchiveError> {
        self.insert(path, Node::CharDev { major, minor }, perm)
    }

    /// Whether `path` is in the archive.
    pub fn contains(&self, path: &str) -> bool {
        split(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    /// Number of entries, directories included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total bytes of regular file contents.
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match &e.node {
                Node::File(d) => d.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Paths in archive order, without a leading `/`.
    pub fn paths(&self) -> impl Iterator<Item = String> + '_ {
        self.entries.keys().map(|k| k.join("/"))
    }

    fn insert(&mut self, path: &str, node: Node, perm: u32) -> Result<(), ArchiveError> {
        let parts = split(path)?;
        for depth in 1..parts.len() {
            let parent = parts[..depth].to_vec();
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(
                        parent,
                        Entry {
                            node: Node::Dir,
                            perm: 0o755,
                        },
                    );
                }
                Some(Entry {
                    node: Node::Dir, ..
                }) => {}
                Some(_) => return Err(ArchiveError::ParentNotDir(path.to_owned())),
            }
        }
        match self.entries.get(&parts) {
            Some(existing) if existing.node == Node::Dir && node == Node::Dir => Ok(()),
            Some(existing) => Err(ArchiveError::Conflict {
                path: path.to_owned(),
                existing: kind(&existing.node),
                new: kind(&node),
            }),
            None => {
                self.entries.insert(parts, Entry { node, perm });
                Ok(())
            }
        }
    }

    /// Writes the archive as newc cpio, trailer included.
    pub fn write_newc<W: Write>(&self, out: &mut W) -> io::Result<()> {
        let mut w = CountingWriter {
            inner: out,
            written: 0,
        };
        for (ino, (parts, entry)) in self.entries.iter().enumerate() {
            let name = parts.join("/");
            let (type_bits, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &entry.node {
                Node::Dir => (0o040000, 2, &[], (0, 0)),
                Node::File(d) => (0o100000, 1, d, (0, 0)),
                Node::Symlink(t) => (0o120000, 1, t.as_bytes(), (0, 0)),
                Node::CharDev { major, minor } => (0o020000, 1, &[], (*major, *minor)),
            };
            let filesize = u32::try_from(data.len()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name} is larger than newc's 4 GiB limit"),
                )
            })?;
            let header = Header {
                ino: ino as u32 + 1,
                mode: type_bits | (entry.perm & 0o7777),
                nlink,
                filesize,
                rdev,
            };
            header.write(&mut w, &name)?;
            w.write_all(data)?;
            w.pad4()?;
        }
        Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdev: (0, 0),
        }
        .write(&mut w, "TRAILER!!!")?;
        // The kernel reads in 512-byte blocks; pad like cpio(1) does.
        let rem = (w.written % 512) as usize;
        if rem != 0 {
            w.write_all(&[0u8; 512][..512 - rem])?;
        }
        Ok(())
    }

    /// The archive as newc cpio bytes.
    pub fn to_newc(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.file_bytes() as usize + self.len() * 128);
        self.write_newc(&mut out)?;
        Ok(out)
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdev: (u32, u32),
}

impl Header {
    fn write<W: Write>(&self, w: &mut CountingWriter<W>, name: &str) -> io::Result<()> {
        let fields = [
            self.ino,
            self.mode,
            0, // uid
            0, // gid
            self.nlink,
            0, // mtime
            self.filesize,
            0, // devmajor
            0, // devminor
            self.rdev.0,
            self.rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        w.write_all(header.as_bytes())?;
        w.write_all(name.as_bytes())?;
        w.write_all(&[0])?;
        w.pad4()
    }
}

struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: Write> CountingWriter<W> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.written += buf.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.write_all(&[0u8; 3][..4 - rem])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Archive {
        let mut a = Archive::new();
        a.file("init", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
            .unwrap();
        a.file("lib/modules/6.1/kernel/a.ko", vec![7; 1001], 0o644)
            .unwrap();
        a.symlink("bin/sh", "/bin/busybox").unwrap();
        a.file("bin/busybox", vec![1, 2, 3], 0o755).unwrap();
        a.dir("proc").unwrap();
        a
    }

    #[test]
    fn parents_come_before_children_in_component_order() {
        let mut a = sample();
        a.file("bin-x", vec![], 0o644).unwrap();
        let paths: Vec<String> = a.paths().collect();
        assert_eq!(
            paths,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "bin-x",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/kernel",
                "lib/modules/6.1/kernel/a.ko",
                "proc"
            ]
        );
    }

    #[test]
    fn same_entries_in_any_insertion_order_give_same_bytes() {
        let mut b = Archive::new();
        b.dir("proc").unwrap();
        b.file("bin/busybox", vec![1, 2, 3], 0o755).unwrap();
        b.symlink("bin/sh", "/bin/busybox").unwrap();
        b.file("lib/modules/6.1/kernel/a.ko", vec![7; 1001], 0o644)
            .unwrap();
        b.file("init", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
            .unwrap();
        assert_eq!(sample().to_newc().unwrap(), b.to_newc().unwrap());
    }

    #[test]
    fn conflicting_entries_are_refused() {
        let mut a = sample();
        assert!(matches!(
            a.file("bin/sh", vec![], 0o644),
            Err(ArchiveError::Conflict { .. })
        ));
        assert_eq!(
            a.file("init/x", vec![], 0o644),
            Err(ArchiveError::ParentNotDir("init/x".into()))
        );
        assert_eq!(
            a.file("../etc", vec![], 0o644),
            Err(ArchiveError::BadPath("../etc".into()))
        );
        a.dir("bin").unwrap();
    }

    #[test]
    fn header_layout_and_block_padding() {
        let bytes = sample().to_newc().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        assert_eq!(&bytes[..6], b"070701");
        // First entry: "bin", inode 1, a directory 040755, uid/gid/mtime 0.
        let field = |i: usize| &bytes[6 + 8 * i..6 + 8 * (i + 1)];
        assert_eq!(field(0), b"00000001");
        assert_eq!(field(1), b"000041ed");
        assert_eq!(field(2), b"00000000");
        assert_eq!(field(5), b"00000000");
        assert_eq!(&bytes[110..114], b"bin\0");
    }

    /// Fails the test, naming what to install, when cpio is missing.
    fn require_cpio_tool() {
        let ok = Command::new("cpio")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "the cpio tool is not installed (scripts/install-deps.sh)"
        );
    }

    fn run_cpio(args: &[&str], input: &[u8], dir: &std::path::Path) -> std::process::Output {
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning cpio");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    #[test]
    fn cpio_tool_lists_and_extracts_what_was_written() {
        require_cpio_tool();
        let mut a = sample();
        a.char_dev("dev/console", 5, 1, 0o600).unwrap();
        let bytes = a.to_newc().unwrap();
        let dir = tempfile::tempdir().unwrap();

        let listed = run_cpio(&["-t", "--quiet"], &bytes, dir.path());
        let listed: Vec<&str> = std::str::from_utf8(&listed.stdout)
            .unwrap()
            .lines()
            .collect();
        let expected: Vec<String> = a.paths().collect();
        assert_eq!(listed, expected);

        let verbose = run_cpio(&["-tv", "--quiet"], &bytes, dir.path());
        let verbose = String::from_utf8(verbose.stdout).unwrap();
        let console = verbose
            .lines()
            .find(|l| l.ends_with("dev/console"))
            .unwrap();
        assert!(console.starts_with("crw-------"), "{console}");
        assert!(
            console.contains("5,") && console.contains(" 1 "),
            "{console}"
        );
        assert!(verbose.contains("bin/sh -> /bin/busybox"), "{verbose}");

        // Extract everything but the device node (needs no privileges then).
        a = sample();
        run_cpio(&["-id", "--quiet"], &a.to_newc().unwrap(), dir.path());
        let init = std::fs::read_to_string(dir.path().join("init")).unwrap();
        assert_eq!(init, "#!/bin/sh\necho hi\n");
        let ko = std::fs::read(dir.path().join("lib/modules/6.1/kernel/a.ko")).unwrap();
        assert_eq!(ko, vec![7; 1001]);
        let link = std::fs::read_link(dir.path().join("bin/sh")).unwrap();
        assert_eq!(link.to_str(), Some("/bin/busybox"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("init"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
}
