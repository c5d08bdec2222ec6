//! A deploy job's side of the spool: the published image it writes, read
//! from `images/<id>/` as hostile input (sizes capped, text checked), and
//! the `deployed.toml` it leaves in its upload directory when done.

use std::io;

use crate::agent::uploader::{ensure_held, UploadError};
use crate::lease::{check_token, Lease};
use crate::names::check_job_id;
use crate::signature::MAX_SIGNATURE;
use crate::spool::{image_dir, incoming_dir, read_at_most, SpoolFs};
use crate::untrusted::MAX_UPLOAD_RECORD;
use crate::upload::{DeployReport, DEPLOYED, IMAGE_FILE, JOB_LOG, MANIFEST, SIGNATURE};

/// Largest manifest an agent reads: the same cap the master puts on one.
pub const MAX_MANIFEST: u64 = MAX_UPLOAD_RECORD;

/// A published image's manifest and signature, as the job server has them.
#[derive(Debug, Clone)]
pub struct PublishedFiles {
    /// `images/<id>/manifest.toml`, byte for byte: the signature covers
    /// these bytes.
    pub manifest: Vec<u8>,
    pub manifest_path: String,
    /// `images/<id>/manifest.toml.sig`.
    pub signature: String,
    pub signature_path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PublishedError {
    #[error("{path} is not on the job server: no image {image:?} is published there")]
    Missing { image: String, path: String },
    #[error("{path}: {problem}")]
    Bad { path: String, problem: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

/// The path of a published image's compressed image file.
pub fn image_file_path(image: &str) -> String {
    format!("{}/{IMAGE_FILE}", image_dir(image))
}

/// Reads the manifest and signature of the image published as `image`.
/// Neither is trusted yet: the caller checks the signature.
pub fn fetch_published(fs: &dyn SpoolFs, image: &str) -> Result<PublishedFiles, PublishedError> {
    check_job_id(image).map_err(|problem| PublishedError::Bad {
        path: image_dir(image),
        problem: format!("image id {problem}"),
    })?;
    let dir = image_dir(image);
    let manifest_path = format!("{dir}/{MANIFEST}");
    let signature_path = format!("{dir}/{SIGNATURE}");
    let manifest = read_capped(fs, image, &manifest_path, MAX_MANIFEST)?;
    let signature = read_capped(fs, image, &signature_path, MAX_SIGNATURE)?;
    let signature = String::from_utf8(signature).map_err(|_| PublishedError::Bad {
        path: signature_path.clone(),
        problem: "is not UTF-8 text".into(),
    })?;
    Ok(PublishedFiles {
        manifest,
        manifest_path,
        signature,
        signature_path,
    })
}

fn read_capped(
    fs: &dyn SpoolFs,
    image: &str,
    path: &str,
    max: u64,
) -> Result<Vec<u8>, PublishedError> {
    let io = |source: io::Error| PublishedError::Io {
        what: format!("reading {path}"),
        source,
    };
    match fs.size(path).map_err(io)? {
        None => {
            return Err(PublishedError::Missing {
                image: image.to_string(),
                path: path.to_string(),
            })
        }
        Some(n) if n > max => {
            return Err(PublishedError::Bad {
                path: path.to_string(),
                problem: format!("is {n} bytes, more than the {max} allowed"),
            })
        }
        Some(_) => {}
    }
    let r = fs.open_read(path).map_err(io)?;
    read_at_most(r, path, max).map_err(|e| {
        if e.kind() == io::ErrorKind::InvalidData {
            PublishedError::Bad {
                path: path.to_string(),
                problem: format!("is larger than {max} bytes"),
            }
        } else {
            io(e)
        }
    })
}

#[cfg(feature = "sftp")]
pub use owned::OwnedReader;

#[cfg(feature = "sftp")]
mod owned {
    use std::io::{self, Read};

    use crate::sftp::SftpSpool;

    /// A file read on a session of its own, which it keeps open until it is
    /// dropped: a reader that owns its link, for a stream another thread reads.
    pub struct OwnedReader {
        // Fields drop in order: the file before its session.
        file: io::BufReader<ssh2::File>,
        _spool: SftpSpool,
    }

    /// Large reads keep SFTP's read-ahead busy over a long link.
    const READ_BUFFER: usize = 4 << 20;

    impl OwnedReader {
        /// Opens `path` (relative to the spool) on `spool`'s session, which the
        /// reader then owns.
        pub fn open(spool: SftpSpool, path: &str) -> io::Result<OwnedReader> {
            let sftp = spool.session().session().sftp().map_err(io::Error::from)?;
            let file = sftp
                .open(std::path::Path::new(&spool.remote_path(path)))
                .map_err(io::Error::from)?;
            Ok(OwnedReader {
                file: io::BufReader::with_capacity(READ_BUFFER, file),
                _spool: spool,
            })
        }
    }

    impl Read for OwnedReader {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.file.read(buf)
        }
    }
}

/// Writes a finished deploy's job log, then `deployed.toml` last, into the
/// lease's upload directory `incoming/<job>/<token>/`, each atomically, the
/// lease checked before each. The report marks the deploy complete.
pub fn write_deploy_report(
    fs: &dyn SpoolFs,
    lease: &Lease,
    report: &DeployReport,
    job_log: Option<&[u8]>,
) -> Result<String, UploadError> {
    let bad_lease = |problem: String| UploadError::BadLease {
        job: lease.job.clone(),
        problem,
    };
    check_job_id(&lease.job).map_err(|p| bad_lease(format!("job id {p}")))?;
    check_token(&lease.token).map_err(bad_lease)?;
    let dir = incoming_dir(&lease.job, &lease.token);
    let io_ctx = |what: String| move |source: io::Error| UploadError::Io { what, source };
    ensure_held(fs, lease)?;
    fs.mkdir_all(&dir)
        .map_err(io_ctx(format!("creating {dir}")))?;
    if let Some(text) = job_log {
        let path = format!("{dir}/{JOB_LOG}");
        fs.write_atomic(&path, text)
            .map_err(io_ctx(format!("writing {path}")))?;
    }
    ensure_held(fs, lease)?;
    let path = format!("{dir}/{DEPLOYED}");
    fs.write_atomic(&path, report.to_toml().as_bytes())
        .map_err(io_ctx(format!("writing {path}")))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::agent::claim::claim_next;
    use crate::master;
    use crate::spool::{lease_path, LocalSpool};
    use crate::time::Timestamp;

    const T0: Timestamp = Timestamp(1_900_000_000);

    fn spool() -> (tempfile::TempDir, LocalSpool) {
        let dir = tempfile::tempdir().unwrap();
        let fs = LocalSpool::new(dir.path().join("spool"));
        std::fs::create_dir(fs.root()).unwrap();
        master::init(&fs).unwrap();
        (dir, fs)
    }

    #[test]
    fn a_published_image_is_read_with_its_caps() {
        let (_d, fs) = spool();
        let e = fetch_published(&fs, "web").unwrap_err();
        assert!(
            matches!(&e, PublishedError::Missing { path, .. } if path == "images/web/manifest.toml"),
            "{e}"
        );
        assert!(e.to_string().contains("no image \"web\""), "{e}");
        let e = fetch_published(&fs, "../jobs").unwrap_err();
        assert!(matches!(e, PublishedError::Bad { .. }), "{e}");

        fs.mkdir_all("images/web").unwrap();
        fs.write_atomic("images/web/manifest.toml", b"format = \"raw.zst\"\n")
            .unwrap();
        let e = fetch_published(&fs, "web").unwrap_err();
        assert_eq!(
            e.to_string(),
            "images/web/manifest.toml.sig is not on the job server: no image \"web\" is published there"
        );
        let big = vec![b'x'; MAX_SIGNATURE as usize + 1];
        fs.write_atomic("images/web/manifest.toml.sig", &big)
            .unwrap();
        let e = fetch_published(&fs, "web").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("images/web/manifest.toml.sig: is 16385 bytes"),
            "{e}"
        );
        fs.write_atomic("images/web/manifest.toml.sig", b"\xff\xfe")
            .unwrap();
        let e = fetch_published(&fs, "web").unwrap_err();
        assert_eq!(
            e.to_string(),
            "images/web/manifest.toml.sig: is not UTF-8 text"
        );
        fs.write_atomic(
            "images/web/manifest.toml.sig",
            b"-----BEGIN SSH SIGNATURE-----\n",
        )
        .unwrap();
        let p = fetch_published(&fs, "web").unwrap();
        assert_eq!(p.manifest, b"format = \"raw.zst\"\n");
        assert_eq!(p.signature, "-----BEGIN SSH SIGNATURE-----\n");
        assert_eq!(image_file_path("web"), "images/web/image.raw.zst");
    }

    fn report(job: &str) -> DeployReport {
        DeployReport {
            job: job.into(),
            image: "web".into(),
            manifest_blake3: "a".repeat(64),
            image_blake3: "b".repeat(64),
            agent: "agent-1".into(),
            disk: "/dev/vda".into(),
            disk_size: 1 << 30,
            grown: true,
            bytes_written: 1 << 20,
            started: T0,
            finished: T0,
            phases: Vec::new(),
            hardware: Default::default(),
        }
    }

    #[test]
    fn the_deploy_report_goes_into_the_upload_directory_while_the_lease_is_held() {
        let (_d, fs) = spool();
        let job = "id = \"j1\"\n[disk]\n[[disk.partitions]]\nlabel = \"root\"\nsize = \"rest\"\nkind = \"linux\"\nfs = \"ext4\"\nmount = \"/\"\n";
        master::add_job(&fs, job, Path::new("j1.toml"), T0).unwrap();
        let lease = claim_next(&fs, "agent-1", T0).unwrap().unwrap();
        let path = write_deploy_report(&fs, &lease, &report("j1"), Some(b"log\n")).unwrap();
        let dir = incoming_dir("j1", &lease.token);
        assert_eq!(path, format!("{dir}/{DEPLOYED}"));
        let back = fs.read(&path).unwrap();
        assert_eq!(
            DeployReport::parse(std::str::from_utf8(&back).unwrap()).unwrap(),
            report("j1")
        );
        assert_eq!(fs.read(&format!("{dir}/{JOB_LOG}")).unwrap(), b"log\n");

        fs.remove(&lease_path("j1")).unwrap();
        fs.remove(&path).unwrap();
        let e = write_deploy_report(&fs, &lease, &report("j1"), None).unwrap_err();
        assert!(e.is_lease_lost(), "{e}");
        assert!(!fs.exists(&path).unwrap());
    }
}
