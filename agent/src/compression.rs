//! The compressions payload archives come in, recognised by their magic
//! bytes rather than their names: `.tar`, `.tar.zst`, `.tar.gz` and
//! `.tar.xz`. Each is undone by a streaming `Read` adapter, so a payload is
//! never held whole in memory.

use std::io::{self, BufRead, BufReader, Read};

/// How far the decoders read ahead of the archive reader.
const READ_BUFFER: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd,
    Gzip,
    Xz,
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const XZ_MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0x00];

/// The most bytes [`detect`] looks at.
pub const MAGIC_LEN: usize = XZ_MAGIC.len();

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "tar",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
        }
    }
}

/// The compression whose magic starts `head` (anything else is taken for
/// a plain tar, which the archive reader then checks).
pub fn detect(head: &[u8]) -> Compression {
    if head.starts_with(&ZSTD_MAGIC) {
        Compression::Zstd
    } else if head.starts_with(&XZ_MAGIC) {
        Compression::Xz
    } else if head.starts_with(&GZIP_MAGIC) {
        Compression::Gzip
    } else {
        Compression::None
    }
}

/// `src` with its compression undone: the first bytes are read to
/// recognise it, then put back in front of the stream.
pub fn decompressor<'a>(mut src: impl Read + 'a) -> io::Result<(Compression, Box<dyn Read + 'a>)> {
    let mut magic = [0u8; MAGIC_LEN];
    let mut n = 0;
    while n < magic.len() {
        match src.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let kind = detect(&magic[..n]);
    let whole =
        BufReader::with_capacity(READ_BUFFER, io::Cursor::new(magic[..n].to_vec()).chain(src));
    Ok((kind, decoder(kind, whole)?))
}

/// The streaming decoder for `kind` over `src`.
pub fn decoder<'a>(kind: Compression, src: impl BufRead + 'a) -> io::Result<Box<dyn Read + 'a>> {
    Ok(match kind {
        Compression::None => Box::new(src),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(src)?),
        // Concatenated members, as `cat a.gz b.gz` makes, are one stream.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(src)),
        Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(src)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    fn compress(kind: Compression, data: &[u8]) -> Vec<u8> {
        match kind {
            Compression::None => data.to_vec(),
            Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    #[test]
    fn every_format_is_recognised_and_undone_in_a_stream() {
        let data = sample();
        for kind in [
            Compression::None,
            Compression::Zstd,
            Compression::Gzip,
            Compression::Xz,
        ] {
            let packed = compress(kind, &data);
            // One byte at a time from the source: the magic is gathered
            // across short reads.
            let src = OneByte(io::Cursor::new(packed));
            let (found, mut r) = decompressor(src).unwrap();
            assert_eq!(found, kind);
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            assert!(out == data, "{} round trip", kind.name());
        }
    }

    #[test]
    fn concatenated_gzip_and_xz_members_are_one_stream() {
        for kind in [Compression::Gzip, Compression::Xz] {
            let mut packed = compress(kind, b"first ");
            packed.extend(compress(kind, b"second"));
            let (_, mut r) = decompressor(io::Cursor::new(packed)).unwrap();
            let mut out = String::new();
            r.read_to_string(&mut out).unwrap();
            assert_eq!(out, "first second", "{}", kind.name());
        }
    }

    #[test]
    fn a_short_or_unknown_head_is_plain() {
        assert_eq!(detect(b""), Compression::None);
        assert_eq!(detect(&[0x1f]), Compression::None);
        assert_eq!(detect(b"./etc/\0"), Compression::None);
        assert_eq!(detect(&XZ_MAGIC[..5]), Compression::None);
        let (_, mut r) = decompressor(io::Cursor::new(b"ab".to_vec())).unwrap();
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"ab");
    }

    #[test]
    fn corrupt_xz_is_an_error_not_a_short_archive() {
        let mut packed = compress(Compression::Xz, &sample());
        let mid = packed.len() / 2;
        packed[mid] ^= 0xff;
        let (_, mut r) = decompressor(io::Cursor::new(packed)).unwrap();
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
    }

    struct OneByte<R>(R);

    impl<R: Read> Read for OneByte<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(1);
            self.0.read(&mut buf[..n])
        }
    }
}
