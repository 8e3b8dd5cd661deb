//! Hostile input against a live server: garbage, truncated and oversize
//! frames, unknown stream ids and open floods, while a good client's
//! transfer in another session completes byte-exact.

use crate::common::*;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tether_proto::frame::{Frame, Hello, StreamId};
use tether_proto::{ErrorCode, OpenErrorCode, ResetCode, Target, SUBPROTOCOL};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A raw WebSocket to the client endpoint, speaking frames by hand.
async fn raw_session(t: &Tunnel) -> Ws {
    let mut req = format!("{}/tether/v1/client", t.url())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", SUBPROTOCOL.parse().unwrap());
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {CLIENT_TOKEN}").parse().unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(t.server_addr())
        .await
        .unwrap();
    let (ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    ws
}

/// A raw session past a good HELLO / HELLO_ACK exchange.
async fn established_session(t: &Tunnel) -> Ws {
    let mut ws = raw_session(t).await;
    ws.send(Message::Binary(encode(&[hello()]))).await.unwrap();
    assert!(next_frame(&mut ws, |f| matches!(f, Frame::HelloAck(_)))
        .await
        .is_some());
    ws
}

/// Waits for the server's GOAWAY and returns its code and reason.
async fn expect_goaway(ws: &mut Ws) -> (ErrorCode, String) {
    match next_frame(ws, |f| matches!(f, Frame::GoAway { .. })).await {
        Some(Frame::GoAway { code, reason }) => (code, reason),
        other => panic!("expected GOAWAY, got {other:?}"),
    }
}

fn encode(frames: &[Frame]) -> Bytes {
    let mut b = BytesMut::new();
    for f in frames {
        f.encode(&mut b);
    }
    b.freeze()
}

fn hello() -> Frame {
    Frame::Hello(Hello {
        min_version: 1,
        max_version: 1,
        capabilities: 0,
        initial_window: 256 * 1024,
        max_frame_payload: 64 * 1024,
        software: "abuse-test".into(),
    })
}

/// Reads frames until one matches, or the connection ends.
async fn next_frame(ws: &mut Ws, want: impl Fn(&Frame) -> bool) -> Option<Frame> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        let Ok(Message::Binary(mut b)) = msg else {
            return None;
        };
        while let Ok(Some(f)) = Frame::decode(&mut b, 1 << 20) {
            if want(&f) {
                return Some(f);
            }
        }
    }
}

/// A good transfer through the CLI client that must survive everything.
async fn good_transfer(port: u16, len: usize) {
    let s = connect(port).await;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut data = vec![0u8; len];
        Pattern::new(99).fill(&mut data);
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        data
    });
    let mut got = Vec::with_capacity(len);
    r.read_to_end(&mut got).await.unwrap();
    let sent = writer.await.unwrap();
    assert!(got == sent, "good transfer corrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_closes_only_the_offending_session() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &[]);
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    let good = tokio::spawn(good_transfer(port, 16 * 1024 * 1024));

    // 1. Garbage before any HELLO: GOAWAY(protocol_error) with a reason.
    let mut ws = raw_session(&t).await;
    ws.send(Message::Binary(Bytes::from_static(&[0xee; 12])))
        .await
        .unwrap();
    let (code, reason) = expect_goaway(&mut ws).await;
    assert_eq!(code, ErrorCode::ProtocolError);
    assert!(reason.contains("unknown frame type 0xee"), "{reason}");

    // 2. A truncated frame after a good handshake.
    let mut ws = established_session(&t).await;
    ws.send(Message::Binary(Bytes::from_static(&[
        0x13, 0, 0, 0, 0, 1, 0, 0, 0, 10, 1, 2,
    ])))
    .await
    .unwrap();
    let (code, reason) = expect_goaway(&mut ws).await;
    assert_eq!(code, ErrorCode::ProtocolError);
    assert!(reason.contains("truncated"), "{reason}");

    // 3. A frame larger than the announced maximum.
    let mut ws = established_session(&t).await;
    let mut big = BytesMut::new();
    Frame::Data {
        id: StreamId(1),
        payload: Bytes::from(vec![0u8; 200 * 1024]),
    }
    .encode(&mut big);
    ws.send(Message::Binary(big.freeze())).await.unwrap();
    assert_eq!(expect_goaway(&mut ws).await.0, ErrorCode::FrameTooLarge);

    // 4. A WebSocket message over the transport limit: the connection is cut.
    let mut ws = established_session(&t).await;
    let _ = ws
        .send(Message::Binary(Bytes::from(vec![0u8; 3 * 1024 * 1024])))
        .await;
    assert!(
        next_frame(&mut ws, |_| false).await.is_none(),
        "connection must end"
    );

    // 5. Frames for a stream that never existed get exactly an RST; the session lives.
    let mut ws = established_session(&t).await;
    ws.send(Message::Binary(encode(&[Frame::Data {
        id: StreamId(999),
        payload: Bytes::from_static(b"who?"),
    }])))
    .await
    .unwrap();
    match next_frame(&mut ws, |f| matches!(f, Frame::Rst { .. })).await {
        Some(Frame::Rst { id, code, .. }) => {
            assert_eq!(id, StreamId(999));
            assert_eq!(code, ResetCode::UnknownStream);
        }
        other => panic!("expected RST, got {other:?}"),
    }
    ws.send(Message::Binary(encode(&[Frame::Ping(42)])))
        .await
        .unwrap();
    assert_eq!(
        next_frame(&mut ws, |f| matches!(f, Frame::Pong(_))).await,
        Some(Frame::Pong(42))
    );

    // 6. Text messages are refused.
    let mut ws = raw_session(&t).await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert!(next_frame(&mut ws, |_| false).await.is_none());

    tokio::time::timeout(Duration::from_secs(60), good)
        .await
        .expect("good transfer finishes")
        .unwrap();
    assert!(t.server.log_text().contains("session failed"));
    assert_eq!(t.server_metric("tether_agents"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_flood_is_answered_and_bounded() {
    let echo = echo_service().await;
    // The flood comes from its own identity: its limits must not touch "dev".
    let t = Tunnel::start_with(
        &[("echo", echo)],
        &["--client", "flood=flood-token=prod/*"],
        &[],
    );
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);

    // A misbehaving client opens far more streams at once on one session
    // than its limit.
    let conn = cli_session(&t.url(), "flood-token").await;
    let mut tasks = Vec::new();
    for i in 0..(tether_server::MAX_STREAMS_PER_CLIENT * 5 / 2) {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let target = if i % 3 == 0 { "prod/nope" } else { "prod/echo" };
            conn.open(Target::tcp(target)).await.map_err(|r| r.code)
        }));
    }
    let good = tokio::spawn(good_transfer(port, 8 * 1024 * 1024));
    let mut opened = Vec::new();
    let (mut too_many, mut unknown) = (0, 0);
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("every open is answered")
            .unwrap()
        {
            Ok(s) => opened.push(s),
            Err(OpenErrorCode::TooManyStreams) => too_many += 1,
            Err(OpenErrorCode::UnknownService) => unknown += 1,
            Err(other) => panic!("unexpected refusal {other}"),
        }
    }
    eprintln!(
        "flood: {} opened, {too_many} too many, {unknown} unknown",
        opened.len()
    );
    assert!(too_many > 0, "the per-session stream limit applies");
    assert!(opened.len() <= tether_server::MAX_STREAMS_PER_CLIENT);
    tokio::time::timeout(Duration::from_secs(60), good)
        .await
        .expect("good transfer finishes during the flood")
        .unwrap();
    drop(opened);
    conn.close(ErrorCode::Normal, "done");
    assert!(
        wait_until(Duration::from_secs(15), || {
            t.server_metric("tether_live_streams") == Some(0.0)
                && t.agent_metric("tether_agent_live_streams") == Some(0.0)
        }),
        "streams of the flood were not all released"
    );
}

/// Opens with a malformed target are refused at the identity's open rate
/// like any open, with a reason of at most 1 KiB. Before, they were parsed
/// before the rate was charged, so they came at no rate, and a target of
/// 1 KiB of control characters was echoed escaped (5 KiB) in each refusal,
/// which the session queued in full for a client that reads slowly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_targets_are_refused_at_the_open_rate_with_a_short_reason() {
    let (server, addr, dir) = server_with(
        "badtarget",
        &format!(
            "[[client]]\nname = \"dev\"\ntoken = \"{CLIENT_TOKEN}\"\nallow = [\"prod/*\"]\n\
             [limits]\nopens_per_sec = 0.1\nopen_burst = 3\n"
        ),
    );
    let conn = cli_session(&format!("ws://{addr}"), CLIENT_TOKEN).await;
    let target = format!("prod/{}", "\u{1}".repeat(1000));
    let mut codes = vec![];
    for _ in 0..6 {
        match conn.open(Target::tcp(target.as_str())).await {
            Ok(_) => panic!("a malformed target was opened"),
            Err(r) => {
                assert!(
                    r.reason.len() <= 1024,
                    "a reason of {} bytes",
                    r.reason.len()
                );
                codes.push(r.code);
            }
        }
    }
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == OpenErrorCode::BadTarget)
            .count(),
        3,
        "{codes:?}"
    );
    assert_eq!(
        codes
            .iter()
            .filter(|c| **c == OpenErrorCode::TooManyStreams)
            .count(),
        3,
        "{codes:?}"
    );
    conn.close(ErrorCode::Normal, "done");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that finished sending and then resets its stream, while the
/// service (having read the end) stays silent: neither relay direction is
/// reading or writing the tunnel stream then. Before, the reset went
/// unnoticed at the server and at the agent: the streams, the service's
/// connection and both relay tasks stayed until the service next wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_reaches_a_silent_service_after_the_client_finished() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let svc = listener.local_addr().unwrap();
    let (eof_tx, mut eof_rx) = tokio::sync::mpsc::unbounded_channel::<std::net::TcpStream>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let eof_tx = eof_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                // Silent from here on; the test holds the connection.
                let _ = eof_tx.send(s.into_std().unwrap());
            });
        }
    });
    let t = Tunnel::start_with(&[("silent", svc)], &[], &[]);
    let conn = cli_session(&t.url(), CLIENT_TOKEN).await;
    let (_reader, mut writer) = conn
        .open(Target::tcp("prod/silent"))
        .await
        .expect("open")
        .split();
    writer.write(Bytes::from_static(b"request")).await.unwrap();
    writer.finish().await.unwrap();
    let held = tokio::time::timeout(Duration::from_secs(10), eof_rx.recv())
        .await
        .expect("the service read the client's end")
        .unwrap();
    assert_eq!(t.agent_metric("tether_agent_live_streams"), Some(1.0));
    writer.reset(ResetCode::Cancel, "the client gave up");
    assert!(
        wait_until(Duration::from_secs(5), || {
            t.server_metric("tether_live_streams") == Some(0.0)
                && t.agent_metric("tether_agent_live_streams") == Some(0.0)
        }),
        "the reset did not reach the agent: server {:?}, agent {:?}",
        t.server_metric("tether_live_streams"),
        t.agent_metric("tether_agent_live_streams")
    );
    // The service's connection was reset too: a write to it fails.
    held.set_nonblocking(false).unwrap();
    let mut held = held;
    let mut failed = false;
    for _ in 0..10 {
        if std::io::Write::write_all(&mut held, b"late").is_err() {
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(failed, "the service's connection is still open");
    conn.close(ErrorCode::Normal, "done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_without_valid_credentials_get_401_with_a_reason() {
    let t = Tunnel::start(&[], &[]);
    let addr = t.server_addr();
    let r = raw_upgrade(
        addr,
        "/tether/v1/client",
        "Sec-WebSocket-Protocol: tether.v1\r\n",
    );
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    assert!(r.contains("missing client token"), "{r}");
    let r = raw_upgrade(
        addr,
        "/tether/v1/agent",
        "Sec-WebSocket-Protocol: tether.v1\r\nAuthorization: Bearer nope\r\n",
    );
    assert!(
        r.starts_with("HTTP/1.1 401") && r.contains("invalid agent token"),
        "{r}"
    );
    // A valid token without the tether subprotocol is told what is missing.
    let r = raw_upgrade(
        addr,
        "/tether/v1/client",
        &format!("Authorization: Bearer {CLIENT_TOKEN}\r\n"),
    );
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("tether.v1"),
        "{r}"
    );
    // The raw endpoint names unknown agents and services.
    let r = raw_upgrade(
        addr,
        &format!("/tether/v1/ws/ghost/x?token={CLIENT_TOKEN}"),
        "",
    );
    assert!(
        r.starts_with("HTTP/1.1 503") && r.contains("agent ghost is not connected"),
        "{r}"
    );
    let r = raw_upgrade(
        addr,
        &format!("/tether/v1/ws/prod/nope?token={CLIENT_TOKEN}"),
        "",
    );
    assert!(
        r.starts_with("HTTP/1.1 404") && r.contains("no service named"),
        "{r}"
    );
    let m = t.server_metrics();
    assert!(
        m.contains("tether_errors_total{kind=\"missing_token\"}"),
        "{m}"
    );
    assert!(m.contains("tether_errors_total{kind=\"bad_token\"}"), "{m}");
}

/// Wrong tokens, which anyone can send as fast as they like, are counted
/// one by one but logged at most once a second: nobody fills the server's
/// disk or buries other lines by repeating them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_tokens_is_counted_but_logged_once_a_second() {
    let t = Tunnel::start(&[], &[]);
    let addr = t.server_addr();
    let started = std::time::Instant::now();
    for _ in 0..40 {
        let r = raw_upgrade(addr, "/tether/v1/ws/prod/echo?token=wrong", "");
        assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    }
    let secs = started.elapsed().as_secs() + 1;
    let m = t.server_metrics();
    assert_eq!(
        metric(&m, "tether_errors_total{kind=\"bad_token\"}"),
        Some(40.0),
        "{m}"
    );
    let lines = t
        .server
        .log_text()
        .lines()
        .filter(|l| l.contains("credential refused") || l.contains("unknown token"))
        .count() as u64;
    assert!(
        (1..=secs + 1).contains(&lines),
        "{lines} lines for 40 wrong tokens in {secs} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_websocket_endpoint_carries_one_stream() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &[]);
    let url = format!("{}/tether/v1/ws/prod/echo?token={CLIENT_TOKEN}", t.url());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut got = Vec::new();
    for i in 0..50u8 {
        let msg = vec![i; 1000 + i as usize * 100];
        ws.send(Message::Binary(Bytes::from(msg.clone())))
            .await
            .unwrap();
        got.extend_from_slice(&msg);
    }
    // Echoed bytes come back in order, whatever the message boundaries.
    let mut back = Vec::new();
    while back.len() < got.len() {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => back.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(back == got, "raw websocket bytes differ");
    ws.close(None).await.unwrap();
    assert!(wait_until(Duration::from_secs(5), || {
        t.server_metric("tether_live_streams") == Some(0.0)
    }));
}

/// A raw WebSocket client whose message is over the limit gets a close
/// frame that says so (1009 and the reason), not a dropped connection, and
/// its stream is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_raw_websocket_message_is_answered_with_1009() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &[]);
    // A masked binary frame announcing 2 MiB (the limit is 1 MiB); no
    // payload needs to follow for the server to refuse it.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&(2u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    let (code, reason) = raw_ws_close_for(&t, frame).await;
    assert_eq!(code, 1009, "{reason}");
    assert!(
        reason.contains("too long") || reason.contains("Message"),
        "{reason}"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        t.server_metric("tether_live_streams") == Some(0.0)
    }));
    // A text message that is not UTF-8: 1007 (RFC 6455 7.4.1), not 1002.
    // (Masked with a zero key: the payload is as written.)
    let frame = vec![0x81, 0x80 | 2, 0, 0, 0, 0, 0xff, 0xfe];
    let (code, reason) = raw_ws_close_for(&t, frame).await;
    assert_eq!(code, 1007, "{reason}");
}

/// Sends `frame` on a new raw WebSocket to `prod/echo` and reads to the
/// end: the close frame's status and reason.
async fn raw_ws_close_for(t: &Tunnel, frame: Vec<u8>) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = t.server_addr();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /tether/v1/ws/prod/echo?token={CLIENT_TOKEN} HTTP/1.1\r\nHost: x\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        s.write_all(&frame).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer
    })
    .await
    .unwrap();
    assert!(
        answer.len() >= 4 && answer[0] == 0x88,
        "no close frame: {answer:?}"
    );
    let code = u16::from_be_bytes([answer[2], answer[3]]);
    let reason = String::from_utf8_lossy(&answer[4..2 + (answer[1] & 0x7f) as usize]).into_owned();
    (code, reason)
}

/// A raw WebSocket's close says how its stream ended: 1000 when the service
/// closed its connection, 1011 (the far side failed) with the reset's reason
/// when the service reset it, after every byte it sent before; a plain close
/// for both would make a failure read as success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_websocket_close_tells_a_service_close_from_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let svc = l.local_addr().unwrap();
    tokio::spawn(async move {
        for reset in [false, true] {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            s.write_all(b"before the close").await.unwrap();
            let mut go = [0u8; 1];
            let _ = s.read_exact(&mut go).await;
            if reset {
                socket2::SockRef::from(&s)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
            }
            drop(s);
        }
    });
    let t = Tunnel::start(&[("svc", svc)], &[]);
    let url = format!("{}/tether/v1/ws/prod/svc?token={CLIENT_TOKEN}", t.url());
    for (code, reason) in [(CloseCode::Normal, ""), (CloseCode::Error, "reset")] {
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 16 {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => got.extend_from_slice(&b),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, b"before the close");
        ws.send(Message::Binary(Bytes::from_static(b"k")))
            .await
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                assert_eq!(frame.code, code, "{frame:?}");
                assert!(frame.reason.contains(reason), "{frame:?}");
            }
            other => panic!("expected a close frame with {code}, got {other:?}"),
        }
    }
}

/// A client's Close is answered at once, even when the service stays
/// silent and keeps its end open after the stream's FIN (a browser tab
/// closed on a quiet connection must not sit in CLOSING).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_websocket_close_is_answered_while_the_service_is_silent() {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let svc = l.local_addr().unwrap();
    let (saw_fin_tx, saw_fin) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        let mut buf = [0u8; 16];
        // The client's FIN arrives; the service says nothing and keeps
        // its socket for a long time.
        while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        let _ = saw_fin_tx.send(());
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let t = Tunnel::start(&[("svc", svc)], &[]);
    let url = format!("{}/tether/v1/ws/prod/svc?token={CLIENT_TOKEN}", t.url());
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    ws.send(Message::Binary(Bytes::from_static(b"hello")))
        .await
        .unwrap();
    ws.close(None).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
        Ok(Some(Ok(Message::Close(_)))) | Ok(None) => {}
        other => panic!("no answer to the close within 3 s: {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(3), saw_fin)
        .await
        .expect("the service never saw the client's end")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_cap_holds_per_client_across_sessions() {
    let echo = echo_service().await;
    let dir = std::env::temp_dir().join(format!("tether-cap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("server.toml");
    std::fs::write(&cfg, "max_streams_per_client = 20\n").unwrap();
    let cfg_arg = cfg.display().to_string();
    let t = Tunnel::start_with(&[("echo", echo)], &["--config", &cfg_arg], &[]);
    let mut conns = Vec::new();
    for _ in 0..2 {
        conns.push(cli_session(&t.url(), CLIENT_TOKEN).await);
    }
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..30 {
        match conns[i % 2].open(Target::tcp("prod/echo")).await {
            Ok(s) => open.push(s),
            Err(tether_net::Refusal {
                code: OpenErrorCode::TooManyStreams,
                reason,
            }) => {
                assert!(reason.contains("over all its sessions"), "{reason}");
                refused += 1;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((open.len(), refused), (20, 10));
    // Closing some gives the budget back.
    open.truncate(15);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(conns[0].open(Target::tcp("prod/echo")).await.is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Slowloris clients, raw garbage on the HTTP port and a session that never
/// reads while it holds a stream to an endless source: a good transfer in
/// another session still completes byte-exact, the slow header senders are
/// cut at the header-read timeout, and the server's memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_garbage_and_a_reader_that_never_reads_leave_good_traffic_alone() {
    let echo = echo_service().await;
    let source = source_service(u64::MAX).await;
    let t = Tunnel::start(&[("echo", echo), ("source", source)], &[]);
    let port = free_port();
    let _client = t.client(CLIENT_TOKEN, &[(port, "prod/echo")]);
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let rss_before = rss(t.server.pid());

    // A session that opens a stream to an endless source and then never
    // reads its WebSocket again.
    let mut stuck = established_session(&t).await;
    stuck
        .send(Message::Binary(encode(&[Frame::Open {
            id: StreamId(1),
            target: Target::tcp("prod/source"),
        }])))
        .await
        .unwrap();
    assert!(
        next_frame(&mut stuck, |f| matches!(f, Frame::OpenOk { .. }))
            .await
            .is_some()
    );

    // 40 slowloris connections: a request line, then a header byte now and then.
    let started = std::time::Instant::now();
    let mut loris = vec![];
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(t.server_addr())
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        loris.push(tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                tokio::select! {
                    r = s.read(&mut buf) => return (r.map(|n| n == 0).unwrap_or(true), started.elapsed()),
                    _ = tokio::time::sleep(Duration::from_millis(700)) => {
                        if s.write_all(b"a").await.is_err() {
                            return (true, started.elapsed());
                        }
                    }
                }
            }
        }));
    }
    // Garbage that is not HTTP at all gets closed at once.
    for seed in 0..20u64 {
        let mut s = tokio::net::TcpStream::connect(t.server_addr())
            .await
            .unwrap();
        let mut junk = vec![0u8; 4096];
        Pattern::new(seed).fill(&mut junk);
        let _ = s.write_all(&junk).await;
        let mut sink = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut sink)).await;
        assert!(r.is_ok(), "garbage connection {seed} left open");
    }

    // The good transfer, while all of that is going on.
    tokio::time::timeout(
        Duration::from_secs(60),
        good_transfer(port, 32 * 1024 * 1024),
    )
    .await
    .expect("good transfer finishes");

    for l in loris {
        let (closed, after) = tokio::time::timeout(Duration::from_secs(30), l)
            .await
            .expect("slowloris connection never closed")
            .unwrap();
        assert!(closed);
        assert!(
            after < Duration::from_secs(20),
            "closed only after {after:?}"
        );
    }
    let grown = rss(t.server.pid()).saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "server RSS grew by {grown} KiB");
    assert_eq!(t.server_metric("tether_agents"), Some(1.0));
    drop(stuck);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A HELLO granting the largest window the protocol allows (2^31 - 1).
fn greedy_hello() -> Frame {
    Frame::Hello(Hello {
        min_version: 1,
        max_version: 3,
        capabilities: 0,
        initial_window: (1 << 31) - 1,
        max_frame_payload: 64 * 1024,
        software: "greedy-window".into(),
    })
}

/// Reads the WebSocket at about `bytes_per_sec` (0: never reads) until
/// `stop` passes.
async fn read_slowly(ws: &mut Ws, bytes_per_sec: usize, stop: tokio::time::Instant) {
    if bytes_per_sec == 0 {
        tokio::time::sleep_until(stop).await;
        return;
    }
    let mut budget = 0usize;
    while tokio::time::Instant::now() < stop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        budget += bytes_per_sec / 10;
        while budget > 0 {
            match tokio::time::timeout(Duration::from_millis(10), ws.next()).await {
                Ok(Some(Ok(m))) => budget = budget.saturating_sub(m.len()),
                _ => break,
            }
        }
    }
}

/// A client that grants a 2 GiB window on streams from an endless source,
/// then reads nothing (or a 300 KB/s trickle): the server holds what its own
/// send buffers allow, not what the client's window allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_window_client_cannot_make_the_server_buffer_its_window() {
    let source = source_service(u64::MAX).await;
    let t = Tunnel::start(&[("source", source)], &[]);
    let before = rss_kib(t.server.pid());
    let mut sessions = vec![];
    for rate in [0usize, 300 * 1024] {
        let mut ws = raw_session(&t).await;
        ws.send(Message::Binary(encode(&[greedy_hello()])))
            .await
            .unwrap();
        assert!(next_frame(&mut ws, |f| matches!(f, Frame::HelloAck(_)))
            .await
            .is_some());
        let opens: Vec<Frame> = (0..4)
            .map(|i| Frame::Open {
                id: StreamId(1 + 2 * i),
                target: Target::tcp("prod/source"),
            })
            .collect();
        ws.send(Message::Binary(encode(&opens))).await.unwrap();
        sessions.push((ws, rate));
    }
    let stop = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut peak = 0;
    let readers = sessions
        .iter_mut()
        .map(|(ws, rate)| read_slowly(ws, *rate, stop));
    let watch = async {
        while tokio::time::Instant::now() < stop {
            peak = peak.max(rss_kib(t.server.pid()));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::join!(futures_util::future::join_all(readers), watch);
    let grown = peak.saturating_sub(before);
    eprintln!("server RSS grew by {grown} KiB");
    // 8 streams: each holds at most its send buffer (256 KiB) plus what the
    // agent's window lets in (the session's windows stay within 32 MiB).
    assert!(grown < 48 * 1024, "server RSS grew by {grown} KiB");
    assert_eq!(t.server_metric("tether_agents"), Some(1.0));
}

/// The same from the other side: a hostile agent grants a 2 GiB window and
/// never reads, while a client uploads without end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_window_agent_cannot_make_the_server_buffer_its_window() {
    let port = free_port();
    let server = Proc::spawn(
        "server",
        &[
            "server".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--agent".into(),
            format!("evil={AGENT_TOKEN}"),
            "--client".into(),
            format!("dev={CLIENT_TOKEN}=evil/*"),
        ],
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        http_get(addr, "/healthz").is_some_and(|(s, _)| s == 200)
    }));
    let mut req = format!("ws://127.0.0.1:{port}/tether/v1/agent")
        .into_client_request()
        .unwrap();
    let h = req.headers_mut();
    h.insert("sec-websocket-protocol", SUBPROTOCOL.parse().unwrap());
    h.insert("x-tether-agent", "evil".parse().unwrap());
    h.insert(
        "authorization",
        format!("Bearer {AGENT_TOKEN}").parse().unwrap(),
    );
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut agent, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    agent
        .send(Message::Binary(encode(&[greedy_hello()])))
        .await
        .unwrap();
    assert!(next_frame(&mut agent, |f| matches!(f, Frame::HelloAck(_)))
        .await
        .is_some());

    let local = free_port();
    let client = forward_client(
        &format!("ws://127.0.0.1:{port}"),
        CLIENT_TOKEN,
        &[(local, "evil/sink")],
    );
    // Its port is bound before its session is up; connections before that
    // are closed at once.
    assert!(
        client.wait_log("connected", Duration::from_secs(10)),
        "{}",
        client.log_text()
    );
    let before = rss_kib(server.pid());
    // Four uploads; the agent accepts each stream, then stops reading.
    let mut uploads = vec![];
    for _ in 0..4 {
        let mut s = connect(local).await;
        uploads.push(tokio::spawn(async move {
            let chunk = vec![7u8; 64 * 1024];
            let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
            while tokio::time::Instant::now() < deadline {
                match tokio::time::timeout_at(deadline, s.write_all(&chunk)).await {
                    Ok(Ok(())) => {}
                    _ => break,
                }
            }
        }));
        let Some(Frame::Open { id, .. }) =
            next_frame(&mut agent, |f| matches!(f, Frame::Open { .. })).await
        else {
            panic!("no OPEN reached the agent");
        };
        agent
            .send(Message::Binary(encode(&[Frame::OpenOk { id }])))
            .await
            .unwrap();
    }
    let mut peak = 0;
    let stop = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < stop {
        peak = peak.max(rss_kib(server.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = peak.saturating_sub(before);
    eprintln!("server RSS grew by {grown} KiB");
    assert!(grown < 48 * 1024, "server RSS grew by {grown} KiB");
    for u in uploads {
        u.abort();
    }
    drop(agent);
}

/// Raw WebSockets that never read hold a bounded amount each (issue: 4-5 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_websockets_that_never_read_hold_a_bounded_amount() {
    let source = source_service(u64::MAX).await;
    let t = Tunnel::start(&[("source", source)], &[]);
    let before = rss_kib(t.server.pid());
    let mut held = vec![];
    for _ in 0..16 {
        let url = format!("{}/tether/v1/ws/prod/source?token={CLIENT_TOKEN}", t.url());
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        held.push(ws);
    }
    let mut peak = 0;
    let stop = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < stop {
        peak = peak.max(rss_kib(t.server.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = peak.saturating_sub(before);
    eprintln!("server RSS grew by {grown} KiB");
    // Bounded by the agent session's window budget (16 MiB), whatever the count.
    assert!(
        grown < 28 * 1024,
        "server RSS grew by {grown} KiB for 16 streams"
    );
    assert_eq!(t.server_metric("tether_live_streams"), Some(16.0));
}

/// Raw WebSocket clients that send PINGs and never read: the server queues
/// a PONG per PING, and holds at most about one message's worth of them per
/// connection (its write buffer's cap; tungstenite holds back the PONGs
/// past it). Before, the cap was 4 MiB per connection: 32.7 MiB grown here
/// against 7.9 with the new cap (16 clients, on this machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_websockets_that_ping_and_never_read_hold_a_bounded_amount() {
    let echo = echo_service().await;
    let t = Tunnel::start(&[("echo", echo)], &[]);
    let before = rss_kib(t.server.pid());
    let mut flooders = vec![];
    for _ in 0..16 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let tcp = sock.connect(t.server_addr()).await.unwrap();
        let url = format!("{}/tether/v1/ws/prod/echo?token={CLIENT_TOKEN}", t.url());
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        let (mut tx, rx) = ws.split();
        flooders.push(tokio::spawn(async move {
            let _rx = rx; // never read
            let ping = Bytes::from(vec![7u8; 125]);
            // 8 MiB of PINGs at most, or until the server drops us.
            for _ in 0..(8 << 20) / 131 {
                if tx.send(Message::Ping(ping.clone())).await.is_err() {
                    return;
                }
            }
        }));
    }
    let mut peak = 0;
    let stop = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < stop {
        peak = peak.max(rss_kib(t.server.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for f in flooders {
        f.abort();
    }
    let grown = peak.saturating_sub(before);
    eprintln!("server RSS grew by {grown} KiB");
    assert!(
        grown < 26 * 1024,
        "server RSS grew by {grown} KiB for 16 clients sending PINGs"
    );
}

/// An HTTP/2 connection (prior knowledge, no TLS) from a chosen loopback
/// source that sends no request; hyper answers the server's PINGs. Resolves
/// when the server closes it.
async fn idle_h2(
    server: std::net::SocketAddr,
    source: [u8; 4],
) -> Option<tokio::task::JoinHandle<()>> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::from((source, 0))).unwrap();
    let tcp = sock.connect(server).await.ok()?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .ok()?;
    Some(tokio::spawn(async move {
        let _sender = sender;
        let _ = conn.await;
    }))
}

/// The SETTINGS_MAX_CONCURRENT_STREAMS the server announces on a fresh
/// HTTP/2 connection (prior knowledge) from a chosen loopback source.
async fn h2_max_concurrent_streams(server: std::net::SocketAddr, source: [u8; 4]) -> Option<u32> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::from((source, 0))).unwrap();
    let mut tcp = sock.connect(server).await.ok()?;
    // The preface and an empty SETTINGS frame.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .ok()?;
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    assert_eq!(head[3], 4, "the server's first frame is its SETTINGS");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.ok()?;
    payload.chunks_exact(6).find_map(|s| {
        (u16::from_be_bytes([s[0], s[1]]) == 3)
            .then(|| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
    })
}

/// A GET from a chosen loopback source on a fresh connection: the status.
async fn get_from(server: std::net::SocketAddr, source: [u8; 4], path: &str) -> Option<u16> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::from((source, 0))).unwrap();
    let mut tcp = sock.connect(server).await.ok()?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split_whitespace().nth(1)?.parse().ok()
}

/// The metrics endpoint serves at most 8 connections at once from one
/// source: connections opened and left there cannot take the process's file
/// descriptors, nor the probes' room (another source is still answered).
/// The 9th is closed at accept; once the idle ones go, the source is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_pile_up_on_the_metrics_endpoint() {
    let port = free_port();
    let metrics = free_port();
    let mut args = Tunnel::server_args(port);
    args.extend(["--metrics-listen".into(), format!("127.0.0.1:{metrics}")]);
    let _server = Proc::spawn("server", &args);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        http_get(addr, "/metrics").is_some_and(|(s, _)| s == 200)
    }));
    let source = [127, 0, 0, 9];
    let connect_from = || async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(std::net::SocketAddr::from((source, 0))).unwrap();
        sock.connect(addr).await.unwrap()
    };
    let mut idle = vec![];
    for _ in 0..8 {
        idle.push(connect_from().await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over = connect_from().await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf))
        .await
        .expect("the 9th connection of one source was kept open");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    // The kubelet, from another address, is still answered.
    assert_eq!(
        http_get(addr, "/healthz").map(|(s, _)| s),
        Some(200),
        "a probe from another source was refused"
    );
    drop(idle);
    assert!(wait_until(Duration::from_secs(5), || {
        get_from_sync(addr, source, "/metrics") == Some(200)
    }));
}

/// A GET from a chosen loopback source, blocking: the status.
fn get_from_sync(server: std::net::SocketAddr, source: [u8; 4], path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    sock.bind(&std::net::SocketAddr::from((source, 0)).into())
        .ok()?;
    sock.connect(&server.into()).ok()?;
    let mut tcp: std::net::TcpStream = sock.into();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = vec![0u8; 256];
    let n = tcp.read(&mut buf).ok()?;
    String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A request head over 64 KiB is refused with 431 (hyper's default let an
/// unauthenticated connection buffer about 400 KiB of one); a 30 KiB one, a
/// browser's with big cookies, still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_gets_431() {
    let port = free_port();
    let _server = Proc::spawn("server", &Tunnel::server_args(port));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        http_get(addr, "/healthz").is_some_and(|(s, _)| s == 200)
    }));
    let status = |size: usize| async move {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(size)
        );
        let _ = tcp.write_all(head.as_bytes()).await;
        let mut buf = vec![0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap_or(0);
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .nth(1)
            .map(str::to_owned)
    };
    assert_eq!(status(30 * 1024).await.as_deref(), Some("200"));
    assert_eq!(status(70 * 1024).await.as_deref(), Some("431"));
}

/// A server run from a config file of `extra` after its `listen` and the
/// `prod` agent (in a directory of its own, `name` in its name, removed
/// when the test ends well), once it answers `/healthz`.
fn server_with(name: &str, extra: &str) -> (Proc, std::net::SocketAddr, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tether-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let cfg = dir.join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{port}\"\n[[agent]]\nname = \"prod\"\ntoken = \"{AGENT_TOKEN}\"\n{extra}"
        ),
    )
    .unwrap();
    let server = Proc::spawn(
        "server",
        &[
            "server".into(),
            "--config".into(),
            cfg.display().to_string(),
        ],
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        http_get(addr, "/healthz").is_some_and(|(s, _)| s == 200)
    }));
    (server, addr, dir)
}

/// A client that sends requests and never reads the answers (its receive
/// window shut) holds its connection slot only until `[limits]
/// send_timeout_secs`: the stuck write fails and the slot comes back. Before,
/// hyper waited on that write forever, and the connection was never idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_gives_its_slot_back() {
    let (_server, addr, dir) = server_with(
        "send-timeout",
        "[limits]\nmax_connections_per_source = 1\nsend_timeout_secs = 2\n",
    );
    let source = [127, 0, 0, 7];
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind(std::net::SocketAddr::from((source, 0))).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let (_unread, mut w) = tcp.into_split();
    // 3 000 pipelined requests for a 12 KB asset: 35 MB of answers, far
    // more than the two sockets' buffers hold.
    let requests = "GET /_tether/console.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3000);
    let writer = tokio::spawn(async move {
        let _ = w.write_all(requests.as_bytes()).await;
        w // kept open: no FIN
    });
    // The stuck connection holds the source's one slot...
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get_from(addr, source, "/healthz").await,
        None,
        "a second connection from the source was let in"
    );
    // ... until its write has waited 2 s with nothing read.
    let started = std::time::Instant::now();
    let mut back = false;
    while started.elapsed() < Duration::from_secs(20) {
        if get_from(addr, source, "/healthz").await == Some(200) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        back,
        "the slot of a client that never reads never came back"
    );
    let m = http_get(addr, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        metric(&m, "tether_limit_hits_total{limit=\"send_timeout\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    writer.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HTTP/2 client that reads its socket but grants an answer no window
/// holds that stream only for `[limits] send_timeout_secs`: the stream is
/// reset (CANCEL) and the connection goes on, also while the client's
/// upload on that stream is still open. An answer that is quiet with its
/// window open (the console's events) and a slow reader are not cut.
/// Before, hyper held such a stream, and our side of its tunnel stream, for
/// as long as the client stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_answer_given_no_window_is_reset_after_the_send_timeout() {
    use crate::common::web::{Web, WebOpts};
    use http_body_util::BodyExt;
    type ReqBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;
    // A service that answers at once and goes on reading the upload, as
    // one taking a long upload while it reports progress would.
    let holder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let holder_port = holder.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = holder.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nhello\n")
                    .await;
                while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let w = Web::start_with(WebOpts {
        plain: true,
        config: "[limits]\nsend_timeout_secs = 3\n".into(),
        services: format!("holder = \"http://127.0.0.1:{holder_port}\""),
        ..Default::default()
    });
    let base = format!("http://127.0.0.1:{}", w.port);
    let request = |method: &str, path: &str, body: ReqBody| {
        http::Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header("authorization", format!("Bearer {CLIENT_TOKEN}"))
            .body(body)
            .unwrap()
    };
    let get = |path: &str| request("GET", path, http_body_util::Empty::new().boxed());
    let connect = |window: u32| async move { h2_client::<ReqBody>(w.port, window).await.0 };

    // A quiet answer with its window open, beside it on another connection:
    // the console's events for the offline agent, which do not change.
    let mut quiet = connect(65_535).await;
    let events = quiet
        .send_request(get("/api/events?q=ghost"))
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let quiet_task = tokio::spawn(async move {
        let mut body = events.into_body();
        let until = tokio::time::Instant::now() + Duration::from_secs(8);
        let mut seen = 0usize;
        while let Ok(frame) = tokio::time::timeout_at(until, body.frame()).await {
            match frame {
                Some(Ok(f)) => seen += f.data_ref().map_or(0, |d| d.len()),
                Some(Err(e)) => return Err(format!("the quiet answer was cut: {e:?}")),
                None => return Err("the quiet answer ended".into()),
            }
        }
        Ok(seen)
    });
    // A slow reader: a 64 KiB window, a 16 KiB frame every 100 ms.
    let mut slow = connect(65_535).await;
    let download = slow
        .send_request(get("/a/prod/web/bytes?n=524288"))
        .await
        .unwrap();
    let slow_task = tokio::spawn(async move {
        let mut body = download.into_body();
        let mut n = 0usize;
        while let Some(frame) = body.frame().await {
            let f = frame.map_err(|e| format!("the slow reader was cut at {n}: {e:?}"))?;
            n += f.data_ref().map_or(0, |d| d.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok::<_, String>(n)
    });

    // No window at all: the answers' heads come, their bytes cannot. The
    // first request's upload stays open (the service reads on): it holds
    // the stream too.
    let mut stuck = connect(0).await;
    let (_upload, upload_rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >(1);
    let upload = BodyExt::boxed(http_body_util::StreamBody::new(
        futures_util::stream::unfold(upload_rx, |mut rx| async move {
            rx.recv().await.map(|f| (f, rx))
        }),
    ));
    let first = stuck
        .send_request(request("POST", "/a/prod/holder/", upload))
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = stuck
        .send_request(get("/a/prod/web/bytes?n=1048576"))
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    let mut first = first.into_body();
    let mut second = second.into_body();
    let reset = tokio::time::timeout(Duration::from_secs(20), first.frame())
        .await
        .unwrap_or_else(|_| panic!("not reset in 20 s:\n{}", w.server.log_text()));
    let took = started.elapsed();
    match reset {
        Some(Err(e)) => assert!(format!("{e:?}").contains("CANCEL"), "{e:?}"),
        other => panic!("data came through a window of 0: {other:?}"),
    }
    assert!(took >= Duration::from_millis(2500), "reset early: {took:?}");
    // One stream went, not the connection: the later stream still waits,
    // and a new request on the connection is answered.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), second.frame())
            .await
            .is_err(),
        "the second stream went with the first"
    );
    let third = tokio::time::timeout(
        Duration::from_secs(5),
        stuck.send_request(get("/a/prod/web/hello")),
    )
    .await
    .expect("the connection went with the stream")
    .unwrap();
    assert_eq!(third.status(), 200);
    let reset = tokio::time::timeout(Duration::from_secs(20), second.frame())
        .await
        .expect("the second stream was not reset");
    assert!(matches!(reset, Some(Err(_))), "{reset:?}");
    let log = w.server.log_text();
    assert!(
        log.contains("resetting an HTTP/2 stream") && log.contains("send_timeout_secs"),
        "{log}"
    );
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], w.port).into();
    let m = http_get(addr, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        metric(&m, "tether_limit_hits_total{limit=\"send_timeout\"}").unwrap_or(0.0) >= 2.0,
        "{m}"
    );

    assert_eq!(slow_task.await.unwrap(), Ok(524_288));
    let seen = quiet_task.await.unwrap();
    assert!(seen.as_ref().is_ok_and(|n| *n > 0), "{seen:?}");
}

/// An answer sent short of window is reset too, though its body has
/// nothing more to hand over: one that has ended (hyper's stream task would
/// be over, h2 keeping the rest) and one that has gone quiet (its task
/// waiting on its source). The client reads nothing, so grants no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_answer_sent_short_of_window_is_reset_when_it_ends_or_goes_quiet() {
    use crate::common::web::{Web, WebOpts};
    use http_body_util::BodyExt;
    type ReqBody = http_body_util::Empty<Bytes>;
    let w = Web::start_with(WebOpts {
        plain: true,
        config: "[limits]\nsend_timeout_secs = 3\n".into(),
        ..Default::default()
    });
    let get = |path: &str| {
        http::Request::builder()
            .uri(format!("http://127.0.0.1:{}{path}", w.port))
            .header("authorization", format!("Bearer {CLIENT_TOKEN}"))
            .body(ReqBody::new())
            .unwrap()
    };
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], w.port).into();
    let resets = || {
        let m = http_get(addr, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        metric(&m, "tether_limit_hits_total{limit=\"send_timeout\"}").unwrap_or(0.0)
    };
    // A window of one byte per stream, never opened further.
    let (mut short, _conn) = h2_client::<ReqBody>(w.port, 1).await;
    // "hello\n", one chunk, then the end.
    let ended = short.send_request(get("/a/prod/web/hello")).await.unwrap();
    assert_eq!(ended.status(), 200);
    // The console's events for an offline agent: a first chunk, then
    // nothing for as long as the agent stays away.
    let quiet = short
        .send_request(get("/api/events?q=ghost"))
        .await
        .unwrap();
    assert_eq!(quiet.status(), 200);
    let started = std::time::Instant::now();
    while resets() < 2.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not reset in 20 s ({} of 2):\n{}",
            resets(),
            w.server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2500), "reset early: {took:?}");
    // What came of each (a byte, in the one-byte window), then the reset.
    for (what, resp) in [("the ended answer", ended), ("the quiet answer", quiet)] {
        let mut body = resp.into_body();
        let mut got = 0;
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
                Ok(Some(Ok(f))) => got += f.data_ref().map_or(0, |d| d.len()),
                other => break other,
            }
        };
        match end {
            Ok(Some(Err(e))) => assert!(format!("{e:?}").contains("CANCEL"), "{what}: {e:?}"),
            other => panic!("{what}: not reset, {got} bytes, then {other:?}"),
        }
        assert!(got <= 1, "{what}: {got} bytes through a window of one");
    }
    let log = w.server.log_text();
    assert!(log.contains("resetting an HTTP/2 stream"), "{log}");
}

/// An HTTP/2 client connection to `port` that grants each stream `window`
/// bytes until its body is read, and the task driving it (which ends when
/// the connection does).
async fn h2_client<B>(
    port: u16,
    window: u32,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(window)
            .handshake::<_, B>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    (send, tokio::spawn(conn))
}

/// Idle HTTP/2 connections cannot fill the connection cap: one source gets
/// at most its share, the last tenth stays for agent and client sessions,
/// and idle connections are closed after the first-request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_cannot_lock_out_agents_and_clients() {
    let echo = echo_service().await;
    let (server, addr, dir) = server_with(
        "h2idle",
        &format!(
            "[[client]]\nname = \"dev\"\ntoken = \"{CLIENT_TOKEN}\"\nallow = [\"prod/*\"]\n\
             [limits]\nmax_connections = 50\nmax_connections_per_source = 30\n"
        ),
    );
    let port = addr.port();

    assert_eq!(
        h2_max_concurrent_streams(addr, [127, 0, 0, 9]).await,
        Some(256),
        "an ordinary connection takes many streams"
    );
    // One source gets 30 connections and no more.
    let started = std::time::Instant::now();
    let mut idle = vec![];
    for _ in 0..30 {
        idle.push(
            idle_h2(addr, [127, 0, 0, 2])
                .await
                .expect("within the per-source cap"),
        );
    }
    let over = idle_h2(addr, [127, 0, 0, 2]).await;
    match over {
        None => {}
        Some(h) => assert!(
            tokio::time::timeout(Duration::from_secs(2), h)
                .await
                .is_ok(),
            "the 31st connection of one source was kept"
        ),
    }
    // A second source fills the anonymous share (45 of 50).
    for _ in 0..15 {
        idle.push(
            idle_h2(addr, [127, 0, 0, 3])
                .await
                .expect("within the anonymous share"),
        );
    }
    // Now only sessions and health checks are served on new connections.
    assert_eq!(get_from(addr, [127, 0, 0, 4], "/metrics").await, Some(503));
    assert_eq!(get_from(addr, [127, 0, 0, 4], "/healthz").await, Some(200));
    // A reserve connection answers one request and closes: keep-alive
    // health checks cannot hold a reserve slot.
    {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(std::net::SocketAddr::from(([127, 0, 0, 5], 0)))
            .unwrap();
        let mut tcp = sock.connect(addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; 512];
        let n = tcp.read(&mut first).await.unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
        let _ = tcp
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut rest = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut rest)).await;
        assert!(r.is_ok(), "the reserve connection was kept open");
        assert!(
            !String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"),
            "a second request was served on a reserve connection"
        );
    }
    // Over HTTP/2, a reserve connection takes one stream at a time: its
    // SETTINGS say so (else one slot would carry 256 requests at once).
    assert_eq!(
        h2_max_concurrent_streams(addr, [127, 0, 0, 5]).await,
        Some(1)
    );
    let metrics_port = free_port();
    let _agent = Proc::spawn(
        "agent",
        &[
            "agent".into(),
            "--server".into(),
            format!("ws://127.0.0.1:{port}"),
            "--name".into(),
            "prod".into(),
            "--token".into(),
            AGENT_TOKEN.into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}"),
            "--service".into(),
            format!("echo={echo}"),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(15), || _agent
            .log_text()
            .contains("registered")),
        "agent could not connect: {}",
        _agent.log_text()
    );
    let local = free_port();
    let client = forward_client(
        &format!("ws://127.0.0.1:{port}"),
        CLIENT_TOKEN,
        &[(local, "prod/echo")],
    );
    assert!(
        client.wait_log("connected", Duration::from_secs(10)),
        "{}",
        client.log_text()
    );
    good_transfer(local, 64 * 1024).await;

    // The idle HTTP/2 connections are closed at the first-request timeout,
    // PINGs or not.
    for h in idle {
        tokio::time::timeout(Duration::from_secs(20), h)
            .await
            .expect("an idle HTTP/2 connection was kept")
            .unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(25));
    let m = http_get(addr, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        metric(
            &m,
            "tether_limit_hits_total{limit=\"connections_per_source\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "tether_limit_hits_total{limit=\"connections_reserved\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that gives up on its opens while the agent is still dialing
/// (the service never answers): each cancelled open gives back its
/// pending-open slot, so with a cap of one the next open is admitted again,
/// and every gauge returns to zero, also when the whole session goes away
/// with an open pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_open_leaves_every_gauge_at_zero() {
    let (_hole, blackhole) = blackhole_addr();
    let dir = std::env::temp_dir().join(format!("tether-cancel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("server.toml");
    std::fs::write(&cfg, "[limits]\nmax_pending_opens_per_client = 1\n").unwrap();
    let cfg_arg = cfg.display().to_string();
    let t = Tunnel::start_with(
        &[("hole", blackhole)],
        &["--config", &cfg_arg],
        &["--dial-timeout-ms", "30000"],
    );
    let url = t.url();
    let session = || cli_session(&url, CLIENT_TOKEN);
    let all_zero = |t: &Tunnel| {
        wait_until(Duration::from_secs(10), || {
            t.server_metric("tether_pending_opens") == Some(0.0)
                && t.server_metric("tether_live_streams") == Some(0.0)
                && t.agent_metric("tether_agent_live_streams") == Some(0.0)
        })
    };
    let conn = session().await;
    for round in 0..3 {
        let pending = tokio::spawn({
            let conn = conn.clone();
            async move { conn.open(Target::tcp("prod/hole")).await }
        });
        assert!(
            wait_until(Duration::from_secs(10), || t
                .server_metric("tether_pending_opens")
                == Some(1.0)),
            "round {round}: the open is pending"
        );
        // The client gives up: its open is reset, and the server's too.
        pending.abort();
        assert!(all_zero(&t), "round {round}: {}", t.server_metrics());
    }
    // The whole session goes away with an open pending.
    let pending = tokio::spawn({
        let conn = conn.clone();
        async move { conn.open(Target::tcp("prod/hole")).await }
    });
    assert!(wait_until(Duration::from_secs(10), || t
        .server_metric("tether_pending_opens")
        == Some(1.0)));
    conn.close(ErrorCode::Normal, "giving up");
    let _ = pending.await;
    assert!(all_zero(&t), "{}", t.server_metrics());
    // Nothing was ever refused at the cap: each slot came back in time.
    let m = t.server_metrics();
    assert_eq!(
        metric(&m, "tether_limit_hits_total{limit=\"pending_opens\"}"),
        None,
        "{m}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A raw WebSocket client that never answers the close frame the server
/// sends when the service finished is dropped after the close-reply
/// timeout: it cannot keep its stream (and its slots) by staying silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_websocket_that_never_answers_the_close_is_dropped() {
    // A service that closes every connection at once.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closer = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    let t = Tunnel::start(&[("closer", closer)], &[]);
    let mut tcp = tokio::net::TcpStream::connect(t.server_addr())
        .await
        .unwrap();
    tcp.write_all(
        format!(
            "GET /tether/v1/ws/prod/closer?token={CLIENT_TOKEN} HTTP/1.1\r\nHost: x\r\n\
             Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The 101, the server's close frame, then (never answered) the end.
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(ended.is_ok(), "the connection was kept open: {text:?}");
    assert!(text.starts_with("HTTP/1.1 101"), "{text:?}");
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(got.get(head_end), Some(&0x88), "a close frame: {text:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "the client was given time to answer"
    );
    assert!(wait_until(Duration::from_secs(5), || t
        .server_metric("tether_live_streams")
        == Some(0.0)));
}

/// One agent name holds at most 32 sessions on a replica, handshakes
/// included, so one agent token cannot take every one of `max_sessions`
/// with upgrades that never finish their handshake: the 33rd is refused
/// with a 429 that names the limit, another agent is not affected, and a
/// closed one gives its slot back.
#[test]
fn one_agent_token_cannot_take_every_session_with_unfinished_handshakes() {
    use std::io::{Read, Write};
    let (_server, addr, dir) = server_with(
        "agent-cap",
        "[[agent]]\nname = \"staging\"\ntoken = \"staging-token\"\n",
    );
    // An upgrade whose handshake never follows (no HELLO): the connection
    // and the server's answer to the upgrade.
    let upgrade = |token: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /tether/v1/agent HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        (s, String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let mut held = Vec::new();
    for i in 0..32 {
        let (s, answer) = upgrade(AGENT_TOKEN);
        assert!(answer.starts_with("HTTP/1.1 101"), "upgrade {i}: {answer}");
        held.push(s);
    }
    let (_refused, answer) = upgrade(AGENT_TOKEN);
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.contains("already has 32 sessions") && answer.contains("a fixed limit"),
        "{answer}"
    );
    let (_staging, answer) = upgrade("staging-token");
    assert!(
        answer.starts_with("HTTP/1.1 101"),
        "another agent: {answer}"
    );
    // A closed upgrade gives its slot back.
    drop(held.pop());
    assert!(
        wait_until(Duration::from_secs(10), || {
            let (s, answer) = upgrade(AGENT_TOKEN);
            let ok = answer.starts_with("HTTP/1.1 101");
            if ok {
                held.push(s);
            }
            ok
        }),
        "the closed upgrade's slot did not come back"
    );
    let m = http_get(addr, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        metric(&m, "tether_limit_hits_total{limit=\"sessions_per_agent\"}").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    drop(held);
    let _ = std::fs::remove_dir_all(dir);
}
