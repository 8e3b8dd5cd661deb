//! Any bytes, in any chunking, through the UDP record decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::datagram::{Decoder, MAX_DATAGRAM};

fuzz_target!(|data: &[u8]| {
    let mut d = Decoder::default();
    let step = 1 + data.first().copied().unwrap_or(0) as usize;
    for chunk in data.chunks(step) {
        d.push(chunk);
        while let Ok(Some(dg)) = d.next_datagram() {
            assert!(dg.len() <= MAX_DATAGRAM);
        }
    }
});
