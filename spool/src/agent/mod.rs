//! What agents do in the spool: claim a job, keep the claim with
//! heartbeats, upload the image, or read a published image and report its
//! deploy. Everything here runs on an agent, over SFTP.

pub mod claim;
pub mod published;
pub mod uploader;
