//! Payloads: hash checks before the disk is touched, and extraction of
//! tar, tar.zst and tar.gz archives into the target with modes, owners,
//! symlinks, hardlinks, xattrs and device nodes. Every entry is placed
//! through [`Tree`], so none can land outside the payload's `dest`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kiln_spool::job::Payload;
use kiln_spool::manifest::PayloadHash;
use tar::EntryType;

use crate::error::{check_abort, Context, Error, Result};
use crate::joblog::JobLog;
use crate::progress::{Event, Phase, Throttle};
use crate::tree::{plain_components, set_owner_mode, Tree, TreeError};

/// BLAKE3 of a file, streamed.
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Checks that every payload exists and matches its pinned hash; returns
/// the hash of each (the ones seen, for payloads pinned by none).
pub fn check_payloads(payloads: &[Payload], dir: &Path) -> Result<Vec<PayloadHash>> {
    let mut out = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let path = dir.join(&p.name);
        let got = hash_file(&path).map_err(|e| {
            Error::Input(format!(
                "payloads[{i}] {:?}: cannot read {}: {e}",
                p.name,
                path.display()
            ))
        })?;
        if let Some(want) = &p.blake3 {
            if *want != got {
                return Err(Error::Input(format!(
                    "payloads[{i}] {:?}: BLAKE3 is {got}, the job pins {want}",
                    p.name
                )));
            }
        }
        out.push(PayloadHash {
            name: p.name.clone(),
            blake3: got,
        });
    }
    Ok(out)
}

/// Counts the bytes read through it, for progress.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Opens an archive and undoes its compression, recognised by magic bytes.
fn open_archive(path: &Path, count: Arc<AtomicU64>) -> Result<Box<dyn Read>> {
    let mut f = File::open(path).ctx(|| format!("opening payload {}", path.display()))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .ctx(|| format!("reading payload {}", path.display()))?;
    drop(f);
    let f = File::open(path).ctx(|| format!("opening payload {}", path.display()))?;
    let counted = BufReader::with_capacity(1 << 20, Counting { inner: f, count });
    Ok(if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(counted)
                .ctx(|| format!("starting zstd for payload {}", path.display()))?,
        )
    } else if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(counted))
    } else {
        Box::new(counted)
    })
}

/// Extracts one payload archive into `dest` (a directory inside `target`).
pub fn apply_payload(
    archive: &Path,
    name: &str,
    target: &Path,
    dest: &str,
    log: &JobLog,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<()> {
    let refuse = |what: String| Error::Failed(format!("payload {name:?}: {what}"));
    let target_tree = Tree::open(target).ctx(|| format!("opening target {}", target.display()))?;
    let dest_rel = PathBuf::from(dest.trim_start_matches('/'));
    let dest_fd = target_tree
        .dir(&dest_rel)
        .map_err(|e| refuse(format!("dest {dest:?}: {e}")))?;
    let dest_path = target.join(&dest_rel);
    drop(dest_fd);
    let tree = Tree::open(&dest_path).ctx(|| format!("opening {}", dest_path.display()))?;
    let total = std::fs::metadata(archive)
        .ctx(|| format!("reading {}", archive.display()))?
        .len();
    let count = Arc::new(AtomicU64::new(0));
    let reader = open_archive(archive, count.clone())?;
    let mut ar = tar::Archive::new(reader);
    let mut throttle = Throttle::new(Phase::Payloads, total);
    let mut dir_times: BTreeMap<PathBuf, u64> = BTreeMap::new();
    let mut entries = 0u64;
    let entries_iter = ar
        .entries()
        .map_err(|e| refuse(format!("reading the archive: {e}")))?;
    for entry in entries_iter {
        check_abort(abort)?;
        let mut entry = entry.map_err(|e| refuse(format!("reading the archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| refuse(format!("an entry has an unreadable name: {e}")))?
            .into_owned();
        let r = apply_entry(&tree, &mut entry, &path, &mut dir_times, abort);
        match r {
            Ok(()) => {}
            Err(EntryError::Tree(e)) => return Err(refuse(format!("entry {path:?}: {e}"))),
            Err(EntryError::Other(e)) => return Err(refuse(format!("entry {path:?}: {e}"))),
            Err(EntryError::Aborted) => return Err(Error::Aborted),
        }
        entries += 1;
        throttle.update(count.load(Ordering::Relaxed), events);
    }
    // Directory times last: creating their children changed them.
    for (path, mtime) in dir_times.iter().rev() {
        if let Ok(slot) = tree.slot(path) {
            let _ = slot.set_mtime(*mtime);
        }
    }
    throttle.update(total, events);
    log.line(&format!("payload {name:?}: {entries} entries into {dest}"));
    Ok(())
}

enum EntryError {
    Tree(TreeError),
    Other(String),
    Aborted,
}

impl From<TreeError> for EntryError {
    fn from(e: TreeError) -> Self {
        EntryError::Tree(e)
    }
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> EntryError + '_ {
    move |e| EntryError::Other(format!("{what}: {e}"))
}

fn apply_entry<R: Read>(
    tree: &Tree,
    entry: &mut tar::Entry<R>,
    path: &Path,
    dir_times: &mut BTreeMap<PathBuf, u64>,
    abort: &AtomicBool,
) -> std::result::Result<(), EntryError> {
    let header = entry.header().clone();
    let kind = header.entry_type();
    let mode = header.mode().map_err(io_err("reading mode"))? & 0o7777;
    let uid = header.uid().map_err(io_err("reading uid"))? as u32;
    let gid = header.gid().map_err(io_err("reading gid"))? as u32;
    let mtime = header.mtime().unwrap_or(0);
    let comps = plain_components(path)?;
    let rel: PathBuf = comps.iter().collect();
    let xattrs = read_xattrs(entry);

    if kind == EntryType::Directory && comps.is_empty() {
        // `./`: the archive's root is `dest` itself.
        let f = File::from(tree.dir(Path::new(""))?);
        set_owner_mode(&f, uid, gid, mode).map_err(io_err("setting owner and mode"))?;
        set_xattrs(&f, &xattrs)?;
        return Ok(());
    }
    if comps.is_empty() {
        return Err(EntryError::Other("has an empty name".into()));
    }
    match kind {
        EntryType::Directory => {
            let slot = tree.slot(&rel)?;
            match slot.kind().map_err(io_err("inspecting"))? {
                Some(libc::S_IFDIR) | Some(libc::S_IFLNK) | None => {}
                Some(_) => slot.remove_non_dir().map_err(io_err("replacing"))?,
            }
            // A symlink to a directory inside the tree is kept (as with
            // tar's --keep-directory-symlink); one leading out is refused.
            let f = File::from(tree.dir(&rel)?);
            set_owner_mode(&f, uid, gid, mode).map_err(io_err("setting owner and mode"))?;
            set_xattrs(&f, &xattrs)?;
            dir_times.insert(rel, mtime);
        }
        EntryType::Regular | EntryType::Continuous => {
            let slot = tree.slot(&rel)?;
            slot.remove_non_dir().map_err(io_err("replacing"))?;
            let mut f = slot.create_file().map_err(io_err("creating"))?;
            copy_data(entry, &mut f, abort)?;
            set_owner_mode(&f, uid, gid, mode).map_err(io_err("setting owner and mode"))?;
            set_xattrs(&f, &xattrs)?;
            let t = libc::timespec {
                tv_sec: mtime as _,
                tv_nsec: 0,
            };
            // SAFETY: futimens reads two timespecs for an open descriptor.
            unsafe { libc::futimens(f.as_raw_fd(), [t, t].as_ptr()) };
        }
        EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| EntryError::Other("symlink without a target".into()))?
                .into_owned();
            let slot = tree.slot(&rel)?;
            slot.remove_non_dir().map_err(io_err("replacing"))?;
            slot.symlink(&target).map_err(io_err("creating symlink"))?;
            slot.lchown(uid, gid).map_err(io_err("setting owner"))?;
            let _ = slot.set_mtime(mtime);
        }
        EntryType::Link => {
            let target = entry
                .link_name()
                .map_err(io_err("reading link target"))?
                .ok_or_else(|| EntryError::Other("hardlink without a target".into()))?
                .into_owned();
            let src = tree.slot(&target)?;
            let slot = tree.slot(&rel)?;
            slot.remove_non_dir().map_err(io_err("replacing"))?;
            // SAFETY: linkat with valid dirfds and names; flags 0 never
            // follows a symlink at the source.
            let r = unsafe {
                libc::linkat(
                    src.fd(),
                    src.name.as_ptr(),
                    slot.fd(),
                    slot.name.as_ptr(),
                    0,
                )
            };
            if r != 0 {
                return Err(EntryError::Other(format!(
                    "linking to {target:?}: {}",
                    io::Error::last_os_error()
                )));
            }
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let major = header.device_major().ok().flatten().unwrap_or(0);
            let minor = header.device_minor().ok().flatten().unwrap_or(0);
            let ftype = match kind {
                EntryType::Char => libc::S_IFCHR,
                EntryType::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            let slot = tree.slot(&rel)?;
            slot.remove_non_dir().map_err(io_err("replacing"))?;
            let dev = libc::makedev(major, minor);
            // SAFETY: mknodat with a valid dirfd and name.
            let r = unsafe {
                libc::mknodat(
                    slot.fd(),
                    slot.name.as_ptr(),
                    ftype | mode as libc::mode_t,
                    dev,
                )
            };
            if r != 0 {
                return Err(EntryError::Other(format!(
                    "creating device node: {}",
                    io::Error::last_os_error()
                )));
            }
            slot.lchown(uid, gid).map_err(io_err("setting owner"))?;
            // SAFETY: fchmodat on the node just made (chown cleared set-id bits).
            unsafe { libc::fchmodat(slot.fd(), slot.name.as_ptr(), mode as libc::mode_t, 0) };
            let _ = slot.set_mtime(mtime);
        }
        EntryType::XGlobalHeader
        | EntryType::XHeader
        | EntryType::GNULongName
        | EntryType::GNULongLink => {}
        other => {
            return Err(EntryError::Other(format!(
                "has an unsupported type {other:?}"
            )))
        }
    }
    Ok(())
}

fn copy_data<R: Read>(
    entry: &mut tar::Entry<R>,
    f: &mut File,
    abort: &AtomicBool,
) -> std::result::Result<(), EntryError> {
    use std::io::Write;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if abort.load(Ordering::Relaxed) {
            return Err(EntryError::Aborted);
        }
        let n = entry.read(&mut buf).map_err(io_err("reading data"))?;
        if n == 0 {
            return Ok(());
        }
        f.write_all(&buf[..n]).map_err(io_err("writing data"))?;
    }
}

/// The entry's extended attributes, from PAX `SCHILY.xattr.*` records.
fn read_xattrs<R: Read>(entry: &mut tar::Entry<R>) -> Vec<(CString, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                if let Ok(c) = CString::new(name) {
                    out.push((c, ext.value_bytes().to_vec()));
                }
            }
        }
    }
    out
}

fn set_xattrs(f: &File, xattrs: &[(CString, Vec<u8>)]) -> std::result::Result<(), EntryError> {
    for (name, value) in xattrs {
        // SAFETY: fsetxattr reads the name and value buffers.
        let r = unsafe {
            libc::fsetxattr(
                f.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr() as *const libc::c_void,
                value.len(),
                0,
            )
        };
        if r != 0 {
            return Err(EntryError::Other(format!(
                "setting xattr {}: {}",
                String::from_utf8_lossy(name.as_bytes()),
                io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// The path of a payload in the payload directory.
pub fn payload_path(dir: &Path, p: &Payload) -> PathBuf {
    dir.join(&p.name)
}
