//! Typed errors of the session driver's seams: why a stream operation
//! failed ([`StreamError`]) and why an open was refused ([`Refusal`]).
//!
//! Both keep the protocol's code, so a caller can map it (to an HTTP status,
//! a metric label, an RST for the other side of a relay) without parsing
//! text. A [`StreamError`] converts into an [`io::Error`] for code that works
//! with byte pipes (splicing, `AsyncRead`); the code survives the trip:
//! [`StreamError::from_io`] recovers it.

use std::io;
use tether_proto::{OpenErrorCode, ResetCode};

/// Why a read, write, finish or accept on a stream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// The stream was reset: by the peer (`remote`, an RST arrived) or by
    /// this side's session (linger or drain deadline, a protocol error on
    /// the stream, or the session ended: code [`ResetCode::SessionLost`]).
    #[error("stream reset: {code}: {reason}")]
    Reset {
        /// The RST code.
        code: ResetCode,
        /// The reason text that came with it.
        reason: String,
        /// The peer sent the RST (as opposed to this side deciding).
        remote: bool,
    },
    /// The stream is gone without a reset this handle was told about (it
    /// closed cleanly, or this side reset it).
    #[error("stream is closed")]
    Closed,
    /// The stream is not open (yet, or any more: an accept of an open
    /// that was already answered).
    #[error("stream is not open yet")]
    NotOpen,
    /// A write after this side finished the stream.
    #[error("stream already finished")]
    Finished,
}

impl StreamError {
    /// The reset code, when the stream was reset.
    pub fn reset_code(&self) -> Option<ResetCode> {
        match self {
            StreamError::Reset { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The stream error inside an [`io::Error`] made from one (by the
    /// `From` conversion), if `e` is one.
    pub fn from_io(e: &io::Error) -> Option<&StreamError> {
        e.get_ref()?.downcast_ref::<StreamError>()
    }
}

impl From<StreamError> for io::Error {
    /// Kind [`io::ErrorKind::ConnectionReset`]; the [`StreamError`] stays
    /// inside (see [`StreamError::from_io`]) and gives the message.
    fn from(e: StreamError) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionReset, e)
    }
}

/// Why [`crate::Connection::open`] got no stream: the peer's OPEN_ERR, or a
/// refusal by this side (the session is draining, closed, or lost before
/// the answer came; the open timed out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Refusal {
    /// The OPEN_ERR code (or the one this side chose).
    pub code: OpenErrorCode,
    /// Detail for logs and for whoever asked.
    pub reason: String,
}

impl Refusal {
    /// A refusal with `code` and `reason`.
    pub fn new(code: OpenErrorCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reset_code_survives_the_io_error() {
        let e = StreamError::Reset {
            code: ResetCode::DrainTimeout,
            reason: "drain deadline passed".into(),
            remote: true,
        };
        let io: io::Error = e.clone().into();
        assert_eq!(io.kind(), io::ErrorKind::ConnectionReset);
        // The message is what it was before the type existed.
        assert_eq!(
            io.to_string(),
            "stream reset: drain_timeout: drain deadline passed"
        );
        assert_eq!(StreamError::from_io(&io), Some(&e));
        assert_eq!(
            StreamError::from_io(&io).and_then(StreamError::reset_code),
            Some(ResetCode::DrainTimeout)
        );
        assert_eq!(StreamError::from_io(&io::Error::other("x")), None);
        assert_eq!(
            StreamError::from_io(&io::ErrorKind::BrokenPipe.into()),
            None
        );
    }

    #[test]
    fn a_refusal_reads_code_then_reason() {
        let r = Refusal::new(OpenErrorCode::GoingAway, "session is draining");
        assert_eq!(r.to_string(), "going_away: session is draining");
    }
}
