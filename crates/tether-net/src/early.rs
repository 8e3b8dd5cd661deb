//! Early data: the bytes a just-accepted connection already carries, read
//! without waiting, so that they can travel with the stream's OPEN
//! (protocol version 5, PROTOCOL.md 6.3).
//!
//! Most clients speak first (an HTTP request, a TLS ClientHello, a
//! database's startup message) and have written it by the time the accept
//! is served. Sending it with the OPEN lets the agent's dial and the first
//! bytes' trip overlap, instead of waiting a round trip over the session
//! for OPEN_OK first. A client that has sent nothing yet loses nothing: the
//! read finds the socket empty and the open goes out alone.

use bytes::{Bytes, BytesMut};
use std::io::{self, Read};
use tokio::net::TcpStream;

use crate::scratch::with_scratch;

/// Reads what has already arrived on `tcp`, at most `max` bytes, without
/// waiting: empty when nothing is there yet, or the peer has closed.
///
/// The read goes to the socket itself, not through tokio's readiness (which
/// has not heard from the kernel yet for a socket accepted a moment ago);
/// tokio's later reads see the socket as it is after this one.
pub fn arrived(tcp: &TcpStream, max: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::new();
    arrived_into(tcp, &mut buf, max)?;
    Ok(buf.freeze())
}

/// Like [`arrived`], appending to `buf`; returns how many bytes came.
/// The read goes through the thread's scratch buffer, so a connection
/// that has sent nothing yet (or a few bytes) costs no buffer of `max`;
/// a `max` above its 64 KiB reads 64 KiB (early data is at most 4 KiB).
pub fn arrived_into(tcp: &TcpStream, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    if max == 0 {
        return Ok(0); // no read
    }
    with_scratch(|scratch| {
        let room = max.min(scratch.len());
        let sock = socket2::SockRef::from(tcp);
        match (&*sock).read(&mut scratch[..room]) {
            Ok(n) => {
                buf.extend_from_slice(&scratch[..n]);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn takes_what_arrived_and_leaves_the_rest_to_later_reads() {
        let l = crate::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        // Nothing sent yet: nothing read, no wait.
        assert!(arrived(&s, 16).unwrap().is_empty());
        c.write_all(b"hello, early world").await.unwrap();
        c.flush().await.unwrap();
        let mut first = Bytes::new();
        for _ in 0..100 {
            first = arrived(&s, 5).unwrap();
            if !first.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(&first[..], b"hello");
        // tokio's own reads go on from where it stopped.
        let mut rest = vec![0u8; 13];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b", early world");
        // After the peer's FIN: empty, not an error.
        drop(c);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(arrived(&s, 16).unwrap().is_empty());
    }
}
