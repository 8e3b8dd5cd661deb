//! Arbitrary messages into a server-side session, before and after a good
//! handshake: errors are fine, panics and unbounded state are not.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use tether_proto::frame::{Frame, Hello};
use tether_proto::{Config, Role, Session};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let handshake_first = data.first().is_some_and(|b| b & 1 == 1);
    let mut s = Session::new(Role::Acceptor, Config::default(), now);
    if handshake_first {
        let mut hello = BytesMut::new();
        Frame::Hello(Hello {
            min_version: 1,
            max_version: 3,
            capabilities: 0,
            initial_window: 65536,
            max_frame_payload: 65536,
            software: "fuzz".into(),
        })
        .encode(&mut hello);
        let _ = s.handle_input(hello.freeze(), now);
    }
    // Split the input into messages at 0xFF bytes, feeding each with time moving on.
    let mut t = now;
    for (i, msg) in data.split(|b| *b == 0xff).enumerate() {
        t += Duration::from_millis(i as u64);
        let _ = s.handle_input(Bytes::copy_from_slice(msg), t);
        s.handle_timeout(t);
        while s.poll_event().is_some() {}
        let mut out = BytesMut::new();
        s.poll_transmit(&mut out, 64 * 1024);
        assert!(
            out.len() <= 64 * 1024 + 64 * 1024 + 16,
            "message size bounded"
        );
        if s.is_closed() {
            break;
        }
    }
    assert!(s.stats().live <= Config::default().max_peer_streams);
});
