//! What agents do in the spool: claim a job, keep the claim with
//! heartbeats, upload the image. Everything here runs on an agent, over SFTP.

pub mod claim;
pub mod uploader;
