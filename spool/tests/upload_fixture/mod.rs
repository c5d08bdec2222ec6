//! A complete upload as an agent writes it, for the spool's tests.

use kiln_spool::agent::claim::pinned_job_hash;
use kiln_spool::lease::Lease;
use kiln_spool::manifest::ImageManifest;
use kiln_spool::spool::incoming_dir;
use kiln_spool::time::Timestamp;
use kiln_spool::upload::{chunk_name, Chunk, ChunkList, CHUNKS, MANIFEST};
use kiln_spool::{LocalSpool, SpoolFs};

const T0: Timestamp = Timestamp(1_900_000_000);

/// Writes a complete upload as an agent would: chunks, chunk list, manifest last.
#[allow(dead_code)]
pub fn upload(spool: &LocalSpool, lease: &Lease, image: &[u8], chunk_size: usize) -> ImageManifest {
    upload_with(spool, lease, image, chunk_size, |_| {})
}

/// [`upload`] with the manifest changed by `edit` before it is written, as
/// an agent that reports more (or lies) would.
#[allow(dead_code)]
pub fn upload_with(
    spool: &LocalSpool,
    lease: &Lease,
    image: &[u8],
    chunk_size: usize,
    edit: impl FnOnce(&mut ImageManifest),
) -> ImageManifest {
    let dir = incoming_dir(&lease.job, &lease.token);
    spool.mkdir_all(&dir).unwrap();
    let mut chunks = Vec::new();
    for (i, piece) in image.chunks(chunk_size).enumerate() {
        spool
            .write_atomic(&format!("{dir}/{}", chunk_name(i)), piece)
            .unwrap();
        chunks.push(Chunk {
            size: piece.len() as u64,
            blake3: blake3::hash(piece).to_hex().to_string(),
        });
    }
    let list = ChunkList {
        chunk_size: chunk_size as u64,
        total_size: image.len() as u64,
        chunks,
    };
    spool
        .write_atomic(&format!("{dir}/{CHUNKS}"), list.to_toml().as_bytes())
        .unwrap();
    let mut manifest = ImageManifest {
        format: "raw.zst".into(),
        job: lease.job.clone(),
        job_blake3: pinned_job_hash(spool, &lease.job).unwrap(),
        agent: lease.agent.clone(),
        disk_size: 1 << 30,
        block_size: 4096,
        bytes_read: 4096,
        image_size: image.len() as u64,
        image_blake3: blake3::hash(image).to_hex().to_string(),
        payloads: vec![],
        started: T0,
        finished: T0,
        phases: vec![],
        ranges: vec![],
        generalized: Vec::new(),
        provenance: None,
    };
    edit(&mut manifest);
    spool
        .write_atomic(&format!("{dir}/{MANIFEST}"), manifest.to_toml().as_bytes())
        .unwrap();
    manifest
}
