//! The held job's image to the job server, resumed after a cut.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kiln_spool::agent::uploader::{upload, UploadReport};
use kiln_spool::manifest::ImageManifest;
use kiln_spool::sftp::SftpSpool;

use super::job::HeldJob;

/// How often an interrupted upload is resumed before the job fails.
const UPLOAD_RETRIES: u32 = 6;

/// Uploads the image, and after a cut (link drop, sshd restart) reconnects
/// and resumes: the chunks the server holds whole are not sent again.
pub(super) fn upload_resuming(
    held: &HeldJob,
    image: &Path,
    manifest: &ImageManifest,
) -> Result<UploadReport> {
    let log_file = held.log_file();
    let mut fresh: Option<SftpSpool> = None;
    let mut retry = 0;
    loop {
        let fs = fresh.as_ref().unwrap_or(held.spool);
        let result = upload(
            fs,
            held.lease,
            image,
            manifest,
            Some(&log_file),
            &held.opts.upload,
            &mut |p| {
                held.watch_stop();
                held.beat.set(|st| st.progress = p.fraction());
            },
        );
        let e = match result {
            Ok(report) => {
                if retry > 0 {
                    held.log.line(&format!(
                        "upload resumed: {} chunks sent, {} already held",
                        report.sent, report.skipped
                    ));
                }
                return Ok(report);
            }
            Err(e) if e.is_lease_lost() || retry >= UPLOAD_RETRIES => return Err(e.into()),
            Err(e) => e,
        };
        retry += 1;
        let wait = Duration::from_secs(1 << retry.min(4));
        held.log.line(&format!(
            "upload interrupted: {e}; resuming in {}s (try {retry} of {UPLOAD_RETRIES})",
            wait.as_secs()
        ));
        held.beat
            .set(|st| st.message = format!("upload interrupted, resuming (try {retry})"));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if held.beat.abort.load(Ordering::SeqCst) {
                bail!("stopped while resuming the upload");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        fresh = held.reconnect().ok();
    }
}
