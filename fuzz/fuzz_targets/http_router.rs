//! The browser proxy's routing and rewriting rules with arbitrary text: no
//! panic, and the security-relevant answers keep their invariants (a
//! post-login redirect never leaves the site; a host route only matches
//! names under the base domain; the service never gets tether's cookies).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_server::web::login::safe_next;
use tether_server::web::rewrite::{rewrite_location, rewrite_set_cookie, strip_hop_by_hop};
use tether_server::web::route::{route_by_host, route_by_path};
use tether_server::web::{cookie, split_port, WebConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let base = "tether.test";
    let cfg = WebConfig {
        base_domain: Some(base.into()),
        ..Default::default()
    };
    if let Some(r) = route_by_host(base, s) {
        let (h, _) = split_port(s);
        assert!(
            h.ends_with(&format!(".{}.{base}", r.agent)),
            "{s:?} -> {r:?}"
        );
        assert!(!r.service.is_empty() && !r.agent.is_empty());
    }
    if let Some((r, tail)) = route_by_path(s) {
        assert!(s.starts_with(r.prefix.as_deref().unwrap_or("")));
        if let Some(t) = tail {
            assert!(t.starts_with('/'));
        }
    }
    if safe_next(&cfg, s) {
        let on_site = s.starts_with('/') && !s.starts_with("//") && !s.starts_with("/\\");
        let under_base = ["https://", "http://"].iter().any(|p| {
            s.strip_prefix(p).is_some_and(|rest| {
                let auth = rest.split(['/', '?', '#']).next().unwrap_or("");
                let host = split_port(auth).0.to_ascii_lowercase();
                !auth.contains('@') && (host == base || host.ends_with(&format!(".{base}")))
            })
        });
        assert!(on_site || under_base, "unsafe next accepted: {s:?}");
    }
    let _ = rewrite_location(
        s,
        Some("/a/p/s"),
        "https://tether.test",
        &["svc:80", "tether.test"],
    );
    // No attribute a browser would read as Domain survives the rewrite.
    let c = rewrite_set_cookie(s.as_bytes(), "/a/p/s");
    for attr in c.split(|b| *b == b';').skip(1) {
        let name = attr.split(|b| *b == b'=').next().unwrap_or(attr);
        assert!(
            !name.trim_ascii().eq_ignore_ascii_case(b"domain"),
            "{:?}",
            String::from_utf8_lossy(&c)
        );
    }
    if let Ok(v) = http::HeaderValue::from_str(s) {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::COOKIE, v.clone());
        h.insert(http::header::CONNECTION, v);
        let _ = cookie(&h, "tether_session");
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key(http::header::CONNECTION));
    }
});
