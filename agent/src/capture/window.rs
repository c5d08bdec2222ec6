//! The upload window: the bytes of compressed image in flight between the
//! capture and the job server, which is what a streamed build's memory
//! grows with beyond the agent's fixed needs. Half of it goes to zstd's
//! workers, half to the upload's chunk buffers (four chunks: one being
//! filled, one being hashed, one being sent, one spare; a chunk stays until
//! the server holds it, so that a cut link resumes without capturing again).

use kiln_spool::agent::uploader::{ChunkPlan, DEFAULT_CHUNK_SIZE};

use super::MAX_WORKERS;

/// What one zstd worker holds at most with [`super::ZSTD_JOB`]-sized jobs
/// (its job's input and output and its tables), measured with margin.
pub const ZSTD_WORKER_BYTES: u64 = 8 << 20;

/// How a window is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSplit {
    /// zstd workers: as many as half the window holds, at least one, at
    /// most the CPUs.
    pub workers: u32,
    pub chunks: ChunkPlan,
}

/// Splits `window` bytes for a machine with `cpus` CPUs; chunks are at
/// most `max_chunk` bytes.
pub fn split_window(window: u64, max_chunk: u64, cpus: u32) -> WindowSplit {
    let half = window / 2;
    let workers = (half / ZSTD_WORKER_BYTES).clamp(1, u64::from(cpus.clamp(1, MAX_WORKERS)));
    WindowSplit {
        workers: workers as u32,
        chunks: ChunkPlan::new(max_chunk.min(DEFAULT_CHUNK_SIZE), window - half),
    }
}

/// [`split_window`] for this machine.
pub fn split_window_here(window: u64, max_chunk: u64) -> WindowSplit {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    split_window(window, max_chunk, cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_window_gives_two_workers_and_four_4mib_chunks() {
        let s = split_window(32 << 20, 64 << 20, 16);
        assert_eq!(s.workers, 2);
        assert_eq!(s.chunks.chunk_size, 4 << 20);
        assert_eq!(s.chunks.buffers, 4);
        assert_eq!(
            u64::from(s.workers) * ZSTD_WORKER_BYTES + s.chunks.bytes(),
            32 << 20
        );
    }

    #[test]
    fn workers_follow_the_cpus_and_small_chunks_stay_small() {
        assert_eq!(split_window(256 << 20, 64 << 20, 2).workers, 2);
        assert_eq!(split_window(256 << 20, 64 << 20, 64).workers, MAX_WORKERS);
        assert_eq!(split_window(4 << 20, 64 << 20, 8).workers, 1);
        let s = split_window(32 << 20, 1 << 20, 8);
        assert_eq!((s.chunks.chunk_size, s.chunks.buffers), (1 << 20, 4));
    }
}
