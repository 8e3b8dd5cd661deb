//! The client's SOCKS5 / HTTP proxy handshake parser and the SOCKS5 UDP
//! header with arbitrary bytes: never a panic; a UDP datagram's payload is
//! what follows its header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_client::proxy::{parse_udp_header, read_request, ProxyAuth};

fuzz_target!(|data: &[u8]| {
    if let Some((_host, _port, payload)) = parse_udp_header(data) {
        assert!(data.ends_with(payload));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // Reads come from the input, answers go nowhere.
        // Without a password and with one (SOCKS5 RFC 1929, HTTP Basic).
        let auth = ProxyAuth::parse("user:pass").expect("auth");
        for auth in [None, Some(&auth)] {
            let mut io = tokio::io::join(data, tokio::io::sink());
            let _ = read_request(&mut io, auth).await;
        }
    });
});
