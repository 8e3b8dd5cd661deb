//! Any bytes through the frame decoder: never a panic, never a loop, and
//! every frame it accepts encodes back to the bytes it came from.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tether_proto::frame::Frame;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::copy_from_slice(data);
    for _ in 0..10_000 {
        let before = b.clone();
        match Frame::decode(&mut b, 64 * 1024) {
            Ok(Some(f)) => {
                let used = before.len() - b.len();
                let mut out = BytesMut::new();
                f.encode(&mut out);
                // Reasons are decoded lossily, so only frames without text
                // must round-trip byte for byte.
                if !matches!(f, Frame::GoAway { .. } | Frame::OpenErr { .. } | Frame::Rst { .. } | Frame::Hello(_) | Frame::HelloAck(_)) {
                    // Byte 1 holds flags, which receivers ignore and senders zero.
                    let mut original = before[..used].to_vec();
                    original[1] = 0;
                    assert_eq!(&out[..], &original[..]);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});
