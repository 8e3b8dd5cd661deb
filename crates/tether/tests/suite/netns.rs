//! The "unexposed" test: a service in a network namespace that the client's
//! namespace cannot route to is reachable through tether (server in an edge
//! namespace, agent in the cluster namespace), with curl through a forward,
//! and by a name only the cluster resolves through the client's SOCKS5 /
//! HTTP proxy with curl and headless Chromium. See tests/netns_unexposed.sh.

use std::process::Command;

#[test]
fn service_in_unreachable_namespace_is_reachable_through_tether() {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n");
    if !matches!(root, Ok(true)) {
        eprintln!("SKIPPED: network namespaces need root (CI runs as root)");
        return;
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/netns_unexposed.sh"
    );
    let out = Command::new("bash")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_tether"))
        .output()
        .expect("run netns_unexposed.sh");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "netns test failed:\n{text}");
    assert!(text.contains("RESULT: PASS"), "{text}");
    assert!(
        text.contains("client cannot reach 10.200.2.2:8080 directly"),
        "{text}"
    );
}
