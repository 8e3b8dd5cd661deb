//! The client target parser (`AGENT/SERVICE`, raw `HOST:PORT`): never
//! panics, and what it accepts has one spelling: the canonical text parses
//! to the same target and prints the same again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::target::ClientTarget;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = ClientTarget::parse(text) {
        let canonical = t.to_string();
        let again = ClientTarget::parse(&canonical).expect("canonical text parses");
        assert_eq!(again, t);
        assert_eq!(again.to_string(), canonical);
    }
});
