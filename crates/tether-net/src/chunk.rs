//! When a chunk of bytes may stay a slice of the buffer it arrived in.
//!
//! Every queue on the byte path is bounded in bytes (stream windows, send
//! buffers, the unread bytes of an inbox). A `Bytes` slice, though, keeps
//! its whole allocation alive: a 1-byte chunk cut from a 64 KiB read buffer
//! holds 64 KiB. A peer sending one byte per packet could make those byte
//! bounds worth tens of thousands of times as much memory. So a chunk that
//! is small against its buffer is copied into an allocation of its own
//! (cheap: it is small), and a large one stays a slice (the bulk path
//! copies nothing).

use bytes::Bytes;

/// A chunk kept as a slice is at least 1/`MAX_PIN_RATIO` of the buffer it
/// keeps alive.
pub const MAX_PIN_RATIO: usize = 4;

/// `chunk`, a slice of a buffer of at most `buffer` bytes; copied out when
/// it is less than 1/[`MAX_PIN_RATIO`] of that.
pub fn unpinned(chunk: Bytes, buffer: usize) -> Bytes {
    if chunk.len().saturating_mul(MAX_PIN_RATIO) < buffer {
        Bytes::copy_from_slice(&chunk)
    } else {
        chunk
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_chunks_are_copied_and_large_ones_kept() {
        let buffer = Bytes::from(vec![5u8; 64 * 1024]);
        let small = unpinned(buffer.slice(..100), buffer.len());
        drop(buffer.clone());
        assert_eq!(small, vec![5u8; 100]);
        assert_eq!(
            small.try_into_mut().map(|b| b.capacity()),
            Ok(100),
            "copied into its own allocation"
        );
        let large = unpinned(buffer.slice(..16 * 1024), buffer.len());
        assert!(large.as_ptr() == buffer.as_ptr(), "a quarter stays a slice");
    }
}
