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
    kept_if_at_least(chunk, buffer, 1, MAX_PIN_RATIO)
}

/// A chunk kept as a slice while its reader is behind is at least
/// `BEHIND_KEEP_EIGHTHS`/8 of the buffer it keeps alive: a message read into
/// a buffer of its own (a bulk transfer's) pins at most a seventh more than
/// its bytes, so copying it would buy no memory.
pub const BEHIND_KEEP_EIGHTHS: usize = 7;

/// `chunk`, a slice of a buffer of at most `buffer` bytes, for a reader
/// that is behind (its unread bytes are already many): copied out unless
/// it is nearly all of that buffer, so that what waits pins little more
/// than itself.
pub fn unpinned_behind(chunk: Bytes, buffer: usize) -> Bytes {
    kept_if_at_least(chunk, buffer, BEHIND_KEEP_EIGHTHS, 8)
}

/// `chunk` as it is when it is at least `num`/`den` of `buffer`, else a copy.
fn kept_if_at_least(chunk: Bytes, buffer: usize, num: usize, den: usize) -> Bytes {
    if chunk.len().saturating_mul(den) < buffer.saturating_mul(num) {
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

    #[test]
    fn behind_only_a_chunk_that_is_nearly_its_buffer_stays_a_slice() {
        let buffer = Bytes::from(vec![5u8; 64 * 1024]);
        let half = unpinned_behind(buffer.slice(..32 * 1024), buffer.len());
        assert!(half.as_ptr() != buffer.as_ptr(), "half is copied");
        assert_eq!(half, vec![5u8; 32 * 1024]);
        let whole = unpinned_behind(buffer.slice(10..), buffer.len());
        assert_eq!(
            whole.as_ptr(),
            buffer[10..].as_ptr(),
            "nearly all stays a slice"
        );
    }
}
