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
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

use crate::scratch::with_scratch;

/// Reads what has already arrived on `tcp`, at most `max` bytes, without
/// waiting: empty when nothing is there yet, or the peer has closed.
///
/// tokio takes a socket it just accepted as readable; then the read goes
/// through tokio, so that a short read or an empty socket clears that and
/// the next read waits for epoll instead of spending a `recvfrom` on
/// EAGAIN. Where tokio has not heard from the kernel about the socket yet
/// (a socket from elsewhere), the read goes to the socket itself; tokio's
/// later reads see the socket as it is after this one.
pub fn arrived(tcp: &mut TcpStream, max: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::new();
    arrived_into(tcp, &mut buf, max)?;
    Ok(buf.freeze())
}

/// Like [`arrived`], appending to `buf`; returns how many bytes came.
/// The read goes through the thread's scratch buffer, so a connection
/// that has sent nothing yet (or a few bytes) costs no buffer of `max`;
/// a `max` above its 64 KiB reads 64 KiB (early data is at most 4 KiB).
pub fn arrived_into(tcp: &mut TcpStream, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    if max == 0 {
        return Ok(0); // no read
    }
    with_scratch(|scratch| {
        let room = max.min(scratch.len());
        // Never woken: this read does not wait (a later read registers
        // its own waker).
        let mut cx = Context::from_waker(Waker::noop());
        let read = if tcp.poll_read_ready(&mut cx).is_ready() {
            let mut read = ReadBuf::new(&mut scratch[..room]);
            match Pin::new(tcp).poll_read(&mut cx, &mut read) {
                Poll::Ready(Ok(())) => Ok(read.filled().len()),
                Poll::Ready(Err(e)) => Err(e),
                // EAGAIN, or the task's cooperative budget spent: either
                // way what arrived waits in the socket for the next read.
                Poll::Pending => return Ok(0),
            }
        } else {
            let sock = socket2::SockRef::from(&*tcp);
            (&*sock).read(&mut scratch[..room])
        };
        match read {
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

    /// [`arrived`], tried every 5 ms (for half a second) until bytes come.
    async fn arrived_soon(s: &mut TcpStream, max: usize) -> Bytes {
        for _ in 0..100 {
            let got = arrived(s, max).unwrap();
            if !got.is_empty() {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Bytes::new()
    }

    #[tokio::test]
    async fn takes_what_arrived_and_leaves_the_rest_to_later_reads() {
        let l = crate::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        // Nothing sent yet: nothing read, no wait.
        assert!(arrived(&mut s, 16).unwrap().is_empty());
        c.write_all(b"hello, early world").await.unwrap();
        c.flush().await.unwrap();
        let first = arrived_soon(&mut s, 5).await;
        assert_eq!(&first[..], b"hello");
        // tokio's own reads go on from where it stopped.
        let mut rest = vec![0u8; 13];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b", early world");
        // After the peer's FIN: empty, not an error.
        drop(c);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(arrived(&mut s, 16).unwrap().is_empty());
    }

    /// tokio takes an accepted socket as readable; after an early read
    /// that found the socket empty, or took less than it could, the next
    /// read must wait for epoll rather than try the socket (a `recvfrom`
    /// that can only return EAGAIN).
    #[tokio::test]
    async fn the_next_read_waits_for_epoll_after_an_early_read() {
        let l = crate::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        let ready_to_read = |s: &TcpStream| {
            s.poll_read_ready(&mut Context::from_waker(Waker::noop()))
                .is_ready()
        };

        // Nothing sent yet.
        let _quiet = TcpStream::connect(addr).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        assert!(
            ready_to_read(&s),
            "tokio assumes an accepted socket readable"
        );
        assert!(arrived(&mut s, 16).unwrap().is_empty());
        assert!(
            !ready_to_read(&s),
            "an empty socket was left marked readable"
        );

        // Early data, all of it taken.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        c.flush().await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let got = arrived_soon(&mut s, 16).await;
        assert_eq!(&got[..], b"ping");
        assert!(
            !ready_to_read(&s),
            "a drained socket was left marked readable"
        );
        // And the socket still wakes its reader when more comes.
        c.write_all(b"pong").await.unwrap();
        let mut more = [0u8; 4];
        tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut more))
            .await
            .expect("the next read is woken")
            .unwrap();
        assert_eq!(&more, b"pong");
    }
}
