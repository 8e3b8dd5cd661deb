//! One scratch buffer per thread, for reads whose bytes are copied out
//! before the call that made them returns: a short socket read in a
//! relay ([`crate::splice`]), a just-accepted connection's early data
//! ([`crate::early`]). A fresh buffer per read would be allocated (and
//! zeroed) for a handful of bytes, or none.

use std::cell::RefCell;

/// The scratch buffer's size: a relay's socket read
/// ([`crate::splice::SOCKET_READ_CHUNK`]).
pub(crate) const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

/// Runs `f` on this thread's scratch buffer ([`SCRATCH_LEN`] bytes,
/// holding whatever the last user left in it). Should `f` itself ask for
/// the scratch buffer, the inner call gets a fresh one.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut vec![0; SCRATCH_LEN]),
    })
}
