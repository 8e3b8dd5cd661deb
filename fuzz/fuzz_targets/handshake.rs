//! The handshake from both sides with hostile HELLO / HELLO_ACK values and
//! trailing garbage: a session either establishes on a version both speak,
//! with limits inside the accepted ranges, or fails with an error; it never
//! panics and never answers with more than a bounded message.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use std::time::Instant;
use tether_proto::frame::{Frame, Hello};
use tether_proto::{Config, Role, Session, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

fn u16_at(d: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([*d.get(i).unwrap_or(&0), *d.get(i + 1).unwrap_or(&0)])
}

fn u32_at(d: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([
        *d.get(i).unwrap_or(&0),
        *d.get(i + 1).unwrap_or(&0),
        *d.get(i + 2).unwrap_or(&0),
        *d.get(i + 3).unwrap_or(&0),
    ])
}

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let hello = Hello {
        min_version: u16_at(data, 0),
        max_version: u16_at(data, 2),
        capabilities: u32_at(data, 4),
        initial_window: u32_at(data, 8),
        max_frame_payload: u32_at(data, 12),
        software: String::from_utf8_lossy(data.get(16..data.len().min(48)).unwrap_or(&[]))
            .into_owned(),
    };
    let rest = data.get(48..).unwrap_or(&[]);
    for role in [Role::Acceptor, Role::Initiator] {
        let mut s = Session::new(role, Config::default(), now);
        let mut out = BytesMut::new();
        s.poll_transmit(&mut out, usize::MAX);
        let mut msg = BytesMut::new();
        match role {
            Role::Acceptor => Frame::Hello(hello.clone()).encode(&mut msg),
            Role::Initiator => Frame::HelloAck(hello.clone()).encode(&mut msg),
        }
        msg.extend_from_slice(rest);
        let r = s.handle_input(msg.freeze(), now);
        if s.is_established() {
            let v = s.version();
            assert!(
                (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v),
                "version {v}"
            );
            // Only a HELLO naming a common version may succeed.
            assert!(hello.min_version <= v && v <= hello.max_version.max(hello.min_version));
        } else if r.is_ok() {
            // No error: nothing but a HELLO that is still being waited for.
            assert!(!s.is_closed());
        }
        let _ = s.handle_input(Bytes::copy_from_slice(rest), now);
        while s.poll_event().is_some() {}
        let mut out = BytesMut::new();
        s.poll_transmit(&mut out, 64 * 1024);
        assert!(out.len() <= 128 * 1024 + 16);
    }
});
