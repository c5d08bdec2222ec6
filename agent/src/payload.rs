//! Payloads: where they come from ([`PayloadSource`]: a directory, or the
//! job server), and their extraction, streamed, into the target: tar,
//! tar.zst, tar.gz and tar.xz archives ([`crate::compression`]) with modes,
//! owners, symlinks, hardlinks, xattrs and device nodes. Every entry is placed through [`Tree`], so none
//! can land outside the payload's `dest`, and no symlink, whoever made it,
//! is followed out of it. That is why a stream can be extracted before its
//! BLAKE3 is known: a payload that turns out not to match its pin has
//! changed nothing but the target, and the build fails and wipes the disk.

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
use kiln_spool::stream::{digest, HashReader, Progress};
use tar::EntryType;

use crate::compression::decompressor;
use crate::error::{check_abort, Context, Error, Result};
use crate::joblog::JobLog;
use crate::progress::{Event, Phase, Throttle};
use crate::tree::{plain_components, set_owner_mode, Tree, TreeError};

/// The read buffer between the source and the decompressor.
const READ_BUFFER: usize = 1 << 20;

/// Where a build reads its payloads: a directory for `kiln-agent build`,
/// the job server for `kiln-agent run`. Each is read once, as a stream.
pub trait PayloadSource {
    /// Before the disk is touched: every payload is there. Returns their
    /// sizes in bytes, in the job's order.
    fn check(&self, payloads: &[Payload]) -> Result<Vec<u64>>;
    /// Opens payload `i` to be read once from its start.
    fn open(&self, i: usize, p: &Payload) -> Result<Box<dyn Read + '_>>;
}

/// Payloads as files in a directory, by their name in the job.
pub struct PayloadDir<'a>(pub &'a Path);

impl PayloadSource for PayloadDir<'_> {
    /// Local files are cheap to read twice, so their pinned hashes are
    /// checked here as well, before the disk is touched.
    fn check(&self, payloads: &[Payload]) -> Result<Vec<u64>> {
        let mut sizes = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let path = self.0.join(&p.name);
            let unreadable = |e: io::Error| {
                Error::Input(format!(
                    "payloads[{i}] {:?}: cannot read {}: {e}",
                    p.name,
                    path.display()
                ))
            };
            let got = File::open(&path)
                .and_then(|f| digest(BufReader::with_capacity(READ_BUFFER, f)))
                .map_err(unreadable)?;
            if let Some(want) = &p.blake3 {
                if *want != got.blake3 {
                    return Err(Error::Input(format!(
                        "payloads[{i}] {:?}: BLAKE3 {} does not match the pinned {want}",
                        p.name, got.blake3
                    )));
                }
            }
            sizes.push(got.size);
        }
        Ok(sizes)
    }

    fn open(&self, _i: usize, p: &Payload) -> Result<Box<dyn Read + '_>> {
        let path = self.0.join(&p.name);
        let f = File::open(&path).ctx(|| format!("opening payload {}", path.display()))?;
        Ok(Box::new(f))
    }
}

/// The payloads phase: streams each payload from `source` into its `dest`
/// under `target`, hashing what passes, and fails on the first payload
/// whose BLAKE3 does not match its pin. `sizes` are from
/// [`PayloadSource::check`]; progress counts source bytes over all payloads.
pub fn apply_payloads(
    source: &dyn PayloadSource,
    payloads: &[Payload],
    sizes: &[u64],
    target: &Path,
    log: &JobLog,
    events: &mut dyn FnMut(&Event),
    abort: &AtomicBool,
) -> Result<Vec<PayloadHash>> {
    let read = Arc::new(AtomicU64::new(0));
    let mut progress = Reading {
        read: read.clone(),
        throttle: Throttle::new(Phase::Payloads, sizes.iter().sum()),
        events,
    };
    let mut out = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        check_abort(abort)?;
        (progress.events)(&Event {
            phase: Phase::Payloads,
            kind: crate::progress::EventKind::Message(format!("{} into {}", p.name, p.dest)),
        });
        let src = source.open(i, p)?;
        let mut hashed = HashReader::new(Progress::new(src, read.clone()));
        let extracted = extract(
            &mut hashed,
            &p.name,
            target,
            &p.dest,
            log,
            &mut progress,
            abort,
        );
        if matches!(extracted, Err(Error::Aborted)) {
            return Err(Error::Aborted);
        }
        // The hash covers the whole stream, past the archive's end too.
        drain(&mut hashed, abort).ctx(|| format!("reading payload {:?}", p.name))?;
        let got = hashed.digest().blake3;
        if let Some(want) = &p.blake3 {
            if got != *want {
                // A corrupt stream usually breaks the archive first: the
                // hash is the reason, the archive's error the symptom.
                let stopped = match &extracted {
                    Err(e) => format!("; extraction stopped: {}", e.one_line()),
                    Ok(()) => String::new(),
                };
                return Err(Error::Failed(format!(
                    "payloads[{i}] {:?}: BLAKE3 {got} does not match the pinned {want}{stopped}",
                    p.name
                )));
            }
        }
        extracted?;
        progress.tick();
        out.push(PayloadHash {
            name: p.name.clone(),
            blake3: got,
        });
    }
    Ok(out)
}

/// The payloads phase's progress: source bytes read, over all payloads.
struct Reading<'e> {
    read: Arc<AtomicU64>,
    throttle: Throttle,
    events: &'e mut dyn FnMut(&Event),
}

impl Reading<'_> {
    fn tick(&mut self) {
        self.throttle
            .update(self.read.load(Ordering::Relaxed), self.events);
    }
}

/// Reads `r` to its end, one buffer at a time.
fn drain(r: &mut dyn Read, abort: &AtomicBool) -> io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if abort.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "aborted"));
        }
        if r.read(&mut buf)? == 0 {
            return Ok(());
        }
    }
}

/// Undoes an archive's compression, recognised by its magic bytes.
fn decompress<'a>(src: impl Read + 'a, name: &str) -> Result<Box<dyn Read + 'a>> {
    let (_, r) = decompressor(src).ctx(|| format!("reading payload {name:?}"))?;
    Ok(r)
}

/// Extracts one archive stream into `dest` (a directory inside `target`),
/// and reads the decompressed stream to its end.
fn extract(
    src: &mut dyn Read,
    name: &str,
    target: &Path,
    dest: &str,
    log: &JobLog,
    progress: &mut Reading,
    abort: &AtomicBool,
) -> Result<()> {
    let refuse = |what: String| Error::Failed(format!("payload {name:?}: {what}"));
    let target_tree = Tree::open(target).ctx(|| format!("opening target {}", target.display()))?;
    let dest_rel = PathBuf::from(dest.trim_start_matches('/'));
    let dest_fd = target_tree
        .dir(&dest_rel)
        .map_err(|e| refuse(format!("dest {dest:?}: {e}")))?;
    // The fd was resolved beneath the target: the tree starts there, not
    // at a path that a symlink could redirect.
    let tree = Tree::from_fd(dest_fd, target.join(&dest_rel));
    let mut ar = tar::Archive::new(decompress(src, name)?);
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
        let mut copied = || progress.tick();
        let r = apply_entry(&tree, &mut entry, &path, &mut dir_times, &mut copied, abort);
        match r {
            Ok(()) => {}
            Err(EntryError::Tree(e)) => return Err(refuse(format!("entry {path:?}: {e}"))),
            Err(EntryError::Other(e)) => return Err(refuse(format!("entry {path:?}: {e}"))),
            Err(EntryError::Aborted) => return Err(Error::Aborted),
        }
        entries += 1;
        progress.tick();
    }
    // Directory times last: creating their children changed them.
    for (path, mtime) in dir_times.iter().rev() {
        if let Ok(slot) = tree.slot(path) {
            let _ = slot.set_mtime(*mtime);
        }
    }
    // What follows the archive's end still has to decompress.
    drain(&mut ar.into_inner(), abort)
        .map_err(|e| refuse(format!("reading past the archive's end: {e}")))?;
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
    copied: &mut dyn FnMut(),
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
            copy_data(entry, &mut f, copied, abort)?;
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
    copied: &mut dyn FnMut(),
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
        copied();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Payloads held in memory, handed out a few bytes per read, as a
    /// network stream may.
    struct Trickle(Vec<(Vec<u8>, usize)>);

    struct Chunks<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Chunks<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    impl PayloadSource for Trickle {
        fn check(&self, _: &[Payload]) -> Result<Vec<u64>> {
            Ok(self.0.iter().map(|(d, _)| d.len() as u64).collect())
        }

        fn open(&self, i: usize, _: &Payload) -> Result<Box<dyn Read + '_>> {
            let (data, step) = &self.0[i];
            Ok(Box::new(Chunks { data, step: *step }))
        }
    }

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn pinned(name: &str, data: &[u8]) -> Payload {
        Payload {
            name: name.into(),
            blake3: Some(blake3::hash(data).to_hex().to_string()),
            dest: "/".into(),
        }
    }

    fn apply(source: &Trickle, payloads: &[Payload], target: &Path) -> Result<Vec<PayloadHash>> {
        let sizes = source.check(payloads)?;
        let mut events = Vec::new();
        let r = apply_payloads(
            source,
            payloads,
            &sizes,
            target,
            &JobLog::discard(),
            &mut |e| events.push(e.clone()),
            &AtomicBool::new(false),
        );
        // Progress counts source bytes and ends at their total.
        if r.is_ok() {
            let last = events.iter().rev().find_map(|e| match e.kind {
                crate::progress::EventKind::Progress { done, total } => Some((done, total)),
                _ => None,
            });
            let total: u64 = sizes.iter().sum();
            assert_eq!(last, Some((total, total)));
        }
        r
    }

    #[test]
    fn a_stream_read_a_few_bytes_at_a_time_is_extracted_and_hashed() {
        let target = tempfile::tempdir().unwrap();
        let plain = archive(&[("etc/os-release", b"NAME=kiln\n")]);
        let zst = zstd::encode_all(&archive(&[("srv/app", &[7u8; 100_000])])[..], 3).unwrap();
        let source = Trickle(vec![(plain.clone(), 3), (zst.clone(), 1000)]);
        let payloads = [pinned("os.tar", &plain), pinned("app.tar.zst", &zst)];
        let hashes = apply(&source, &payloads, target.path()).unwrap();
        assert_eq!(
            std::fs::read(target.path().join("etc/os-release")).unwrap(),
            b"NAME=kiln\n"
        );
        assert_eq!(
            std::fs::read(target.path().join("srv/app")).unwrap(),
            vec![7u8; 100_000]
        );
        let got: Vec<&str> = hashes.iter().map(|h| h.blake3.as_str()).collect();
        assert_eq!(
            got,
            [
                payloads[0].blake3.as_deref().unwrap(),
                payloads[1].blake3.as_deref().unwrap()
            ]
        );
    }

    #[test]
    fn a_stream_that_does_not_match_its_pin_fails_naming_the_payload() {
        let target = tempfile::tempdir().unwrap();
        let good = archive(&[("a", &[1u8; 5000])]);
        let mut bad = good.clone();
        // A byte of the file's data: the archive still reads, the hash differs.
        bad[512 + 100] ^= 0xff;
        let source = Trickle(vec![(bad, 4096)]);
        let e = apply(&source, &[pinned("os.tar", &good)], target.path())
            .unwrap_err()
            .one_line();
        assert!(
            e.starts_with("payloads[0] \"os.tar\": BLAKE3 ")
                && e.contains("does not match the pinned"),
            "{e}"
        );

        // A compressed stream that breaks: the hash is named as the reason.
        let zst = zstd::encode_all(&good[..], 3).unwrap();
        let mut broken = zst.clone();
        let at = broken.len() / 2;
        broken[at] ^= 0xff;
        let source = Trickle(vec![(broken, 4096)]);
        let e = apply(&source, &[pinned("os.tar.zst", &zst)], target.path())
            .unwrap_err()
            .one_line();
        assert!(
            e.starts_with("payloads[0] \"os.tar.zst\": BLAKE3 ")
                && e.contains("does not match the pinned"),
            "{e}"
        );
    }
}
