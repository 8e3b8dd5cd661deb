//! Datagram framing inside UDP streams (protocol version 2).
//!
//! A UDP stream's bytes are a sequence of records, each one datagram:
//!
//! ```text
//! +----------------+---------------------+
//! | length: u16 BE | datagram[length]    |
//! +----------------+---------------------+
//! ```
//!
//! Records may be split across DATA frames like any stream bytes; the
//! receiver reassembles them. A length above [`MAX_DATAGRAM`] is an error on
//! that stream.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest datagram carried: the largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65507;

/// Bytes of framing added to each datagram.
pub const RECORD_OVERHEAD: usize = 2;

/// Frames one datagram as a record.
pub fn encode(datagram: &[u8]) -> Result<Bytes, DatagramTooLarge> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(DatagramTooLarge(datagram.len()));
    }
    let mut b = BytesMut::with_capacity(RECORD_OVERHEAD + datagram.len());
    b.put_u16(datagram.len() as u16);
    b.put_slice(datagram);
    Ok(b.freeze())
}

/// A datagram over [`MAX_DATAGRAM`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("datagram of {0} bytes exceeds the limit of {MAX_DATAGRAM}")]
pub struct DatagramTooLarge(pub usize);

/// Reassembles records from stream chunks.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    /// Adds received stream bytes.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next whole datagram, if one is buffered.
    pub fn next_datagram(&mut self) -> Result<Option<Bytes>, DatagramTooLarge> {
        if self.buf.len() < RECORD_OVERHEAD {
            return Ok(None);
        }
        let len = u16::from_be_bytes([self.buf[0], self.buf[1]]) as usize;
        if len > MAX_DATAGRAM {
            return Err(DatagramTooLarge(len));
        }
        if self.buf.len() < RECORD_OVERHEAD + len {
            return Ok(None);
        }
        self.buf.advance(RECORD_OVERHEAD);
        Ok(Some(self.buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Records survive any re-chunking of the stream.
        #[test]
        fn records_survive_any_chunking(
            dgrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            cuts in proptest::collection::vec(1usize..50, 1..40),
        ) {
            let mut stream = Vec::new();
            for d in &dgrams {
                stream.extend_from_slice(&encode(d).unwrap());
            }
            let mut dec = Decoder::default();
            let mut out = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < stream.len() {
                let n = cuts[i % cuts.len()].min(stream.len() - pos);
                dec.push(&stream[pos..pos + n]);
                pos += n;
                i += 1;
                while let Some(d) = dec.next_datagram().unwrap() {
                    out.push(d.to_vec());
                }
            }
            prop_assert_eq!(out, dgrams);
        }
    }

    #[test]
    fn oversize_is_refused_both_ways() {
        assert!(encode(&vec![0u8; MAX_DATAGRAM + 1]).is_err());
        let mut dec = Decoder::default();
        dec.push(&[0xff, 0xff, 1, 2]);
        assert_eq!(dec.next_datagram(), Err(DatagramTooLarge(65535)));
    }
}
