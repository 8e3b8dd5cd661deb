//! The command line as operators use it: shell completions and the man page
//! generated from it, and JSON logs for log pipelines.

use crate::common::*;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tether(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .output()
        .expect("run tether");
    assert!(
        out.status.success(),
        "tether {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// Completions for bash (syntax-checked by bash itself), zsh and fish name
/// the subcommands and flags; the man page is roff for `tether` with every
/// subcommand.
#[test]
fn completions_and_the_man_page_come_from_the_cli() {
    let bash = tether(&["completions", "bash"]);
    for word in ["server", "agent", "client", "--replica-id", "--log-format"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    let dir = std::env::temp_dir().join(format!("tether-completions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("tether.bash");
    std::fs::write(&script, &bash).expect("write");
    let checked = Command::new("bash").arg("-n").arg(&script).status();
    assert!(
        checked.is_ok_and(|s| s.success()),
        "bash -n rejects the completion script"
    );
    // Loaded into bash, it completes `tether se` to `server`.
    let completed = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(tether se); COMP_CWORD=1; COMP_LINE='tether se'; COMP_POINT=9; _tether tether se tether; echo \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .expect("bash");
    let words = String::from_utf8_lossy(&completed.stdout);
    assert!(
        words.split_whitespace().any(|w| w == "server"),
        "completing 'tether se' gave {words:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(tether(&["completions", "zsh"]).starts_with("#compdef tether"));
    assert!(tether(&["completions", "fish"]).contains("complete -c tether"));
    let man = tether(&["man"]);
    assert!(man.contains(".TH tether"), "not a man page");
    for sub in ["server", "agent", "client", "completions"] {
        assert!(man.contains(sub), "man page lacks {sub}");
    }
}

/// `--log-format json`: every line the server writes is one JSON object
/// with a level and a message; the audit line of a stream says who opened
/// what.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_audit_included() {
    let echo = echo_service().await;
    let t = Tunnel::start_with(&[("echo", echo)], &["--log-format", "json"], &[]);
    let port = free_port();
    let client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    let mut s = connect(port).await;
    s.write_all(b"ping\n").await.expect("write");
    let mut got = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    drop(s);
    assert!(t.server.wait_log("\"audit\"", Duration::from_secs(5)));
    let log = t.server.log_text();
    let mut audit = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}"));
        assert!(v["level"].is_string(), "no level: {line}");
        assert!(v["fields"]["message"].is_string(), "no message: {line}");
        if v["target"] == "audit" && v["fields"]["identity"] == "dev" {
            audit = Some(v);
        }
    }
    let audit = audit.expect("an audit line for client dev");
    assert_eq!(audit["fields"]["target"], "prod/echo");
    drop(client);
}
