//! Small `Read`/`Write` adapters that streams are composed of: hash what
//! passes, count it for progress, refuse more than a limit. Every place that
//! hashes a payload, a chunk or an image uses [`HashReader`] or
//! [`HashWriter`], so there is one way to compute a BLAKE3 in kiln.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A BLAKE3 and the number of bytes it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    pub blake3: String,
    pub size: u64,
}

/// Hashes every byte read through it.
pub struct HashReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    size: u64,
}

impl<R: Read> HashReader<R> {
    pub fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: blake3::Hasher::new(),
            size: 0,
        }
    }

    /// The hash of what was read so far.
    pub fn digest(&self) -> Digest {
        Digest {
            blake3: self.hasher.finalize().to_hex().to_string(),
            size: self.size,
        }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

/// Hashes every byte written through it.
pub struct HashWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    size: u64,
}

impl<W: Write> HashWriter<W> {
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: blake3::Hasher::new(),
            size: 0,
        }
    }

    pub fn digest(&self) -> Digest {
        Digest {
            blake3: self.hasher.finalize().to_hex().to_string(),
            size: self.size,
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads a whole stream and returns its hash; memory stays at one buffer.
pub fn digest(r: impl Read) -> io::Result<Digest> {
    let mut h = HashReader::new(r);
    io::copy(&mut h, &mut io::sink())?;
    Ok(h.digest())
}

/// Counts the bytes that pass into a shared counter that another thread
/// (a heartbeat, a console line) reads for progress.
pub struct Progress<T> {
    inner: T,
    done: Arc<AtomicU64>,
}

impl<T> Progress<T> {
    pub fn new(inner: T, done: Arc<AtomicU64>) -> Self {
        Progress { inner, done }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl<W: Write> Write for Progress<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.done.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads at most `max` bytes and fails, rather than stopping quietly, when
/// the stream holds more: a record or a chunk that keeps growing is an
/// error, never a silent cut.
pub struct Limit<R> {
    inner: R,
    left: u64,
    what: String,
    max: u64,
}

impl<R: Read> Limit<R> {
    pub fn new(inner: R, max: u64, what: impl Into<String>) -> Self {
        Limit {
            inner,
            left: max,
            what: what.into(),
            max,
        }
    }
}

impl<R: Read> Read for Limit<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // One more byte tells a stream that ends here from a longer one.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} holds more than {} bytes", self.what, self.max),
                )),
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_adapters_agree_with_blake3() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
        let want = blake3::hash(&data).to_hex().to_string();
        let d = digest(&data[..]).unwrap();
        assert_eq!((d.blake3.as_str(), d.size), (want.as_str(), 100_000));
        let mut w = HashWriter::new(Vec::new());
        w.write_all(&data).unwrap();
        assert_eq!(w.digest().blake3, want);
        assert_eq!(w.into_inner(), data);
    }

    #[test]
    fn progress_counts_and_limit_refuses_more() {
        let done = Arc::new(AtomicU64::new(0));
        let mut out = Vec::new();
        io::copy(&mut Progress::new(&[1u8; 5000][..], done.clone()), &mut out).unwrap();
        assert_eq!(done.load(Ordering::Relaxed), 5000);

        let mut exact = Vec::new();
        Limit::new(&[0u8; 10][..], 10, "x")
            .read_to_end(&mut exact)
            .unwrap();
        assert_eq!(exact.len(), 10);
        let e = Limit::new(&[0u8; 11][..], 10, "chunk 3")
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(e.to_string(), "chunk 3 holds more than 10 bytes");
    }
}
