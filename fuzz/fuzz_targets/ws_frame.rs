//! Any bytes through the session's WebSocket frame decoder, as either end
//! (a server's with or without the unmasked-frames extension): never a panic, messages within the limit, and the same events whether
//! the bytes arrive at once or in small reads.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tether_net::transport::ws::frame::{Decoder, Event, FrameError, Role};

const MAX: usize = 4096;

fn run(role: Role, unmasked: bool, data: &[u8], step: usize) -> (Vec<Event>, Option<FrameError>) {
    let mut d = Decoder::new(role, MAX).unmasked_client(unmasked);
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for chunk in data.chunks(step) {
        assert!(d.wanted(&buf) >= 1);
        buf.extend_from_slice(chunk);
        loop {
            match d.decode(&mut buf) {
                Ok(Some(e)) => {
                    if let Event::Binary(m) = &e {
                        assert!(m.len() <= MAX);
                    }
                    events.push(e);
                }
                Ok(None) => break,
                Err(e) => return (events, Some(e)),
            }
        }
    }
    (events, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let role = if first & 1 == 0 {
        Role::Client
    } else {
        Role::Server
    };
    let unmasked = first & 2 != 0;
    let step = usize::from(first >> 2).max(1);
    let whole = run(role, unmasked, rest, rest.len().max(1));
    let pieces = run(role, unmasked, rest, step);
    assert_eq!(whole, pieces);
});
