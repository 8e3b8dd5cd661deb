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
                // REPLICAS entries carry flag bits receivers ignore (only
                // bit 0 means something): they round-trip as frames.
                if matches!(f, Frame::Replicas(_)) {
                    let mut again = out.clone().freeze();
                    let g = Frame::decode(&mut again, 64 * 1024).expect("re-encoded frame decodes");
                    assert_eq!(g, Some(f.clone()));
                    assert!(again.is_empty());
                }
                // Reasons are decoded lossily, so only frames without text
                // must round-trip byte for byte.
                if !matches!(
                    f,
                    Frame::GoAway { .. }
                        | Frame::OpenErr { .. }
                        | Frame::Rst { .. }
                        | Frame::Hello(_)
                        | Frame::HelloAck(_)
                        | Frame::Replicas(_)
                ) {
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
