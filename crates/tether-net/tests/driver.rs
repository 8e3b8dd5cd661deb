//! The session driver, in-process: two `Connection`s over an in-memory
//! transport (`transport::mem`), on tokio's paused test clock, so that
//! timeouts of seconds pass in microseconds of real time.

use bytes::Bytes;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_net::session::IncomingStreams;
use tether_net::transport::mem::{self, Valve};
use tether_net::transport::{MessageSink, MAX_SEND_MESSAGE};
use tether_net::{Connection, Refusal, Stream, StreamError, StreamReader};
use tether_proto::{Config, ErrorCode, OpenErrorCode, ResetCode, Role, Target};

/// Two connected sessions: `a` dialed (initiator), `b` accepted.
struct Pair {
    a: Connection,
    b: Connection,
    /// Opens `a` receives (kept so that they are not refused).
    _a_in: IncomingStreams,
    b_in: IncomingStreams,
    /// Pauses what `a` sends to `b`.
    a_to_b: Valve,
    /// Pauses what `b` sends to `a`.
    b_to_a: Valve,
}

async fn pair(a_cfg: Config, b_cfg: Config) -> Pair {
    pair_with_capacity(mem::DEFAULT_CAPACITY, a_cfg, b_cfg).await
}

async fn pair_with_capacity(messages: usize, a_cfg: Config, b_cfg: Config) -> Pair {
    pair_with_a_sink(messages, a_cfg, b_cfg, |sink| sink).await
}

/// A pair whose `a` writes through `wrap(its in-memory sink)`.
async fn pair_with_a_sink<S: MessageSink>(
    messages: usize,
    a_cfg: Config,
    b_cfg: Config,
    wrap: impl FnOnce(mem::MemSink) -> S,
) -> Pair {
    let (ea, eb) = mem::pair_with_capacity(messages);
    let (a_to_b, b_to_a) = (ea.sink.valve(), eb.sink.valve());
    let b = tokio::spawn(Connection::start(
        Role::Acceptor,
        b_cfg,
        eb.sink,
        eb.source,
        "b",
    ));
    let (a, _, a_in) = within(Connection::start(
        Role::Initiator,
        a_cfg,
        wrap(ea.sink),
        ea.source,
        "a",
    ))
    .await
    .expect("a starts");
    let (b, _, b_in) = b.await.unwrap().expect("b starts");
    Pair {
        a,
        b,
        _a_in: a_in,
        b_in,
        a_to_b,
        b_to_a,
    }
}

/// Fails the test instead of hanging (on the paused clock: a minute of
/// virtual time, far beyond every deadline the tests use).
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("timed out")
}

/// `a` opens a stream to `b`, which accepts it: (a's end, b's end).
async fn open(p: &mut Pair, target: &str) -> (Stream, Stream) {
    let opening = {
        let a = p.a.clone();
        let target = Target::tcp(target);
        tokio::spawn(async move { a.open(target).await })
    };
    let inc = within(p.b_in.recv()).await.expect("an incoming open");
    assert_eq!(inc.target().address, target);
    let theirs = inc.accept().expect("accepted");
    let ours = opening.await.unwrap().expect("opened");
    (ours, theirs)
}

async fn read_to_end(r: &mut StreamReader) -> Result<Vec<u8>, StreamError> {
    let mut out = Vec::new();
    while let Some(b) = within(r.read()).await? {
        out.extend_from_slice(&b);
    }
    Ok(out)
}

fn pattern(len: usize) -> Vec<u8> {
    // 251 is prime: a lost, doubled or moved chunk shows.
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(start_paused = true)]
async fn half_close_each_way_independently() {
    let mut p = pair(Config::default(), Config::default()).await;

    // The opener finishes first; the acceptor reads EOF and keeps sending.
    let (s1a, s1b) = open(&mut p, "one").await;
    let (mut ra, mut wa) = s1a.split();
    let (mut rb, mut wb) = s1b.split();
    wa.write(Bytes::from_static(b"hello ")).await.unwrap();
    wa.write(Bytes::from_static(b"from a")).await.unwrap();
    wa.finish().await.unwrap();
    assert_eq!(
        wa.write(Bytes::from_static(b"late")).await,
        Err(StreamError::Finished)
    );
    assert_eq!(read_to_end(&mut rb).await.unwrap(), b"hello from a");
    assert_eq!(rb.read().await, Ok(None), "EOF stays EOF");
    wb.write(Bytes::from_static(b"b still ")).await.unwrap();
    wb.write(Bytes::from_static(b"talks")).await.unwrap();
    wb.finish().await.unwrap();
    assert_eq!(read_to_end(&mut ra).await.unwrap(), b"b still talks");

    // The acceptor finishes first, while the opener is still sending.
    let (s2a, s2b) = open(&mut p, "two").await;
    let (mut ra, mut wa) = s2a.split();
    let (mut rb, mut wb) = s2b.split();
    wa.write(Bytes::from_static(b"a, part 1; ")).await.unwrap();
    wb.write(Bytes::from_static(b"all b says")).await.unwrap();
    wb.finish().await.unwrap();
    assert_eq!(read_to_end(&mut ra).await.unwrap(), b"all b says");
    wa.write(Bytes::from_static(b"part 2")).await.unwrap();
    wa.finish().await.unwrap();
    assert_eq!(read_to_end(&mut rb).await.unwrap(), b"a, part 1; part 2");

    // Finished both ways, the streams are gone on both sides without a reset
    // (dropping the halves now changes nothing).
    drop((ra, wa, rb, wb));
    within(async {
        while p.a.stats().live + p.b.stats().live > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(!p.a.is_closed() && !p.b.is_closed());
}

#[tokio::test(start_paused = true)]
async fn dropping_both_halves_unfinished_resets_the_stream() {
    let mut p = pair(Config::default(), Config::default()).await;
    let (sa, sb) = open(&mut p, "dropped").await;
    let (ra, mut wa) = sa.split();
    let (mut rb, mut wb) = sb.split();

    // One half alone is no reset: the other keeps working.
    drop(ra);
    wa.write(Bytes::from_static(b"still here")).await.unwrap();
    assert_eq!(
        within(rb.read()).await.unwrap().as_deref(),
        Some(&b"still here"[..])
    );

    drop(wa);
    let reset = StreamError::Reset {
        code: ResetCode::Cancel,
        reason: "stream dropped by its application".into(),
        remote: true,
    };
    assert_eq!(within(rb.read()).await, Err(reset.clone()));
    // The writer learns the same reset, code and all.
    assert_eq!(wb.write(Bytes::from_static(b"x")).await, Err(reset.clone()));
    // And the code survives the trip through io::Error (as in a splice).
    let e = std::io::Error::from(wb.finish().await.unwrap_err());
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
    assert_eq!(StreamError::from_io(&e), Some(&reset));

    // An unsplit stream dropped is reset too.
    let (sa, sb) = open(&mut p, "dropped whole").await;
    drop(sa);
    let (mut rb, _wb) = sb.split();
    let e = within(rb.read()).await.unwrap_err();
    assert_eq!(e.reset_code(), Some(ResetCode::Cancel));
}

#[tokio::test(start_paused = true)]
async fn a_writer_waits_for_credit_and_loses_nothing() {
    const WINDOW: u32 = 4096;
    const TOTAL: usize = 1 << 20;
    let small = Config {
        initial_window: WINDOW,
        max_window: WINDOW, // no auto-tuning: every 4 KiB waits for credit
        ..Config::default()
    };
    let mut p = pair(Config::default(), small).await;
    let (sa, sb) = open(&mut p, "slow reader").await;
    let (_ra, mut wa) = sa.split();
    let (mut rb, _wb) = sb.split();

    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let written = written.clone();
        async move {
            for chunk in pattern(TOTAL).chunks(1000) {
                wa.write(Bytes::copy_from_slice(chunk)).await?;
                written.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            wa.finish().await
        }
    });

    // Nothing read yet: the writer is held at the window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = written.load(Ordering::Relaxed);
    assert!(
        (3000..=WINDOW as usize).contains(&held),
        "{held} bytes written"
    );
    assert!(!writer.is_finished());
    assert_eq!(p.a.stats().blocked, 1);

    // Reading lets it through, in order, to the last byte.
    let got = read_to_end(&mut rb).await.unwrap();
    assert_eq!(got.len(), TOTAL);
    assert!(got == pattern(TOTAL), "bytes differ");
    within(writer).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_reading_holds_only_the_send_buffer() {
    const BUFFER: usize = 64 * 1024;
    const TRANSPORT: usize = 1; // messages the in-memory link holds
    let ours = Config {
        max_stream_send_buffer: BUFFER,
        ..Config::default()
    };
    let theirs = Config {
        initial_window: (1 << 31) - 1, // all the credit there is
        ..Config::default()
    };
    let mut p = pair_with_capacity(TRANSPORT, ours, theirs).await;
    let (sa, sb) = open(&mut p, "never read").await;
    let (_ra, mut wa) = sa.split();
    let (mut rb, _wb) = sb.split();

    p.a_to_b.pause(); // b stops reading its socket
    const TOTAL: usize = 1 << 20;
    let written = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let written = written.clone();
        async move {
            for chunk in pattern(TOTAL).chunks(4096) {
                wa.write(Bytes::copy_from_slice(chunk)).await?;
                written.fetch_add(chunk.len(), Ordering::Relaxed);
            }
            wa.finish().await
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Held: the send buffer, what the transport holds and the message the
    // writer task is sending; not the 2 GiB of credit.
    let held = written.load(Ordering::Relaxed);
    let most = BUFFER + (TRANSPORT + 1) * MAX_SEND_MESSAGE;
    assert!(
        (BUFFER - 4096..=most).contains(&held),
        "{held} bytes written, expected {BUFFER}..={most}"
    );
    assert!(!writer.is_finished());
    assert!(p.a.stats().queued_bytes <= BUFFER);
    assert_eq!(p.a.stats().blocked, 1);

    // Reading again, b gets everything.
    p.a_to_b.resume();
    let got = read_to_end(&mut rb).await.unwrap();
    assert!(got == pattern(TOTAL), "bytes differ");
    within(writer).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn go_away_drains_then_closes() {
    let mut p = pair(Config::default(), Config::default()).await;
    let (sa, sb) = open(&mut p, "kept").await;

    // An open a sends while b's GOAWAY is on its way is refused by b.
    p.b_to_a.pause();
    p.b.go_away(ErrorCode::Normal, "maintenance");
    assert!(p.b.is_draining());
    let crossing = {
        let a = p.a.clone();
        tokio::spawn(async move { a.open(Target::tcp("crossing")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.b_to_a.resume();
    within(p.a.draining()).await;
    assert!(p.a.is_draining());
    assert_eq!(p.a.peer_goaway(), Some(ErrorCode::Normal));
    let refused = crossing.await.unwrap().err().expect("refused by b");
    assert_eq!(refused.code, OpenErrorCode::GoingAway);

    // New opens are refused on both sides.
    for side in [&p.a, &p.b] {
        let r = side.open(Target::tcp("new")).await.err().expect("refused");
        assert_eq!(r.code, OpenErrorCode::GoingAway);
    }

    // The existing stream still runs both ways.
    let (mut ra, mut wa) = sa.split();
    let (mut rb, mut wb) = sb.split();
    wa.write(Bytes::from_static(b"last words")).await.unwrap();
    wa.finish().await.unwrap();
    assert_eq!(read_to_end(&mut rb).await.unwrap(), b"last words");
    assert!(!p.b.is_closed(), "a stream is still open");
    wb.write(Bytes::from_static(b"bye")).await.unwrap();
    wb.finish().await.unwrap();
    assert_eq!(read_to_end(&mut ra).await.unwrap(), b"bye");

    // With the last stream done, b closes, in order (no error).
    assert_eq!(within(p.b.closed()).await, None);
    within(p.b.transport_closed()).await;
    within(p.a.closed()).await;
    assert!(p.a.is_closed());
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_incoming_open_is_refused() {
    let mut p = pair(Config::default(), Config::default()).await;
    let opening = {
        let a = p.a.clone();
        tokio::spawn(async move { a.open(Target::tcp("nobody home")).await })
    };
    let inc = within(p.b_in.recv()).await.unwrap();
    drop(inc);
    let refused = within(opening).await.unwrap().err().expect("refused");
    assert_eq!(
        refused,
        Refusal {
            code: OpenErrorCode::Internal,
            reason: "open was not answered".into(),
        }
    );
    assert_eq!(refused.to_string(), "internal: open was not answered");
}

/// An acceptor that stops taking opens when its session drains (an agent
/// whose session the server replaced) refuses the opens already queued
/// for it with `going_away`, which openers retry on another session, not
/// `internal`.
#[tokio::test(start_paused = true)]
async fn opens_a_draining_acceptor_leaves_unanswered_are_going_away() {
    let p = pair(Config::default(), Config::default()).await;
    let opening = {
        let a = p.a.clone();
        tokio::spawn(async move { a.open(Target::tcp("queued")).await })
    };
    within(async {
        while p.b_in.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    p.a.go_away(ErrorCode::Normal, "replaced");
    within(p.b.draining()).await;
    drop(p.b_in); // stops taking opens, the queued one unanswered
    let refused = within(opening).await.unwrap().err().expect("refused");
    assert_eq!(refused.code, OpenErrorCode::GoingAway, "{refused}");
}

#[tokio::test(start_paused = true)]
async fn an_opener_that_gives_up_cancels_the_incoming_open() {
    let mut p = pair(Config::default(), Config::default()).await;
    let opening = {
        let a = p.a.clone();
        tokio::spawn(async move { a.open(Target::tcp("slow service")).await })
    };
    let mut inc = within(p.b_in.recv()).await.unwrap();
    opening.abort();
    within(inc.cancelled()).await;
    let e = inc.accept().err().expect("the opener gave up");
    assert_eq!(e.reset_code(), Some(ResetCode::Cancel));
}

/// Early data waits in the incoming open, untouched by waiting for a
/// cancel; a relay can take some of it for its own open, and the accepted
/// stream's reader gets the rest, in order, then what follows.
#[tokio::test(start_paused = true)]
async fn early_data_waits_for_the_answer_and_is_read_in_order() {
    let mut p = pair(Config::default(), Config::default()).await;
    let opening = {
        let a = p.a.clone();
        tokio::spawn(async move {
            a.open_with(Target::tcp("web"), Bytes::from_static(b"hello early world"))
                .await
        })
    };
    let mut inc = within(p.b_in.recv()).await.unwrap();
    // Waiting for a cancel consumes nothing (the data is no cancel).
    assert!(
        tokio::time::timeout(Duration::from_millis(50), inc.cancelled())
            .await
            .is_err()
    );
    assert_eq!(&inc.take_early_data(5)[..], b"hello");
    let ours = inc.accept().unwrap();
    let theirs = within(opening).await.unwrap().expect("opened");
    let (mut r, _w) = ours.split();
    let (_tr, mut tw) = theirs.split();
    tw.write(Bytes::from_static(b"; and after")).await.unwrap();
    tw.finish().await.unwrap();
    assert_eq!(
        within(read_to_end(&mut r)).await.unwrap(),
        b" early world; and after"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_goes_silent_ends_the_session() {
    let idle = Duration::from_secs(3);
    let ours = Config {
        idle_timeout: idle,
        ping_interval: Duration::from_secs(1),
        // Its own timing, not the acceptor's (HEARTBEAT, version 7).
        adopt_peer_heartbeat: false,
        ..Config::default()
    };
    let mut p = pair(ours, Config::default()).await;
    let (sa, _sb) = open(&mut p, "live").await;
    let (mut ra, mut wa) = sa.split();

    p.b_to_a.pause(); // b still hears a, but a hears nothing more
    let silent_since = tokio::time::Instant::now();
    let opening = {
        let a = p.a.clone();
        tokio::spawn(async move { a.open(Target::tcp("pending")).await })
    };
    // b gets the open and accepts it; the OPEN_OK never reaches a.
    let _pending = within(p.b_in.recv()).await.unwrap().accept();

    let why = within(p.a.closed()).await.expect("a failure");
    assert!(why.contains("silent"), "{why}");
    let after = silent_since.elapsed();
    assert!(after <= idle && after >= idle / 2, "closed after {after:?}");

    let refused = within(opening).await.unwrap().err().expect("refused");
    assert_eq!(refused.code, OpenErrorCode::SessionLost);
    let lost = within(ra.read()).await.unwrap_err();
    assert!(
        matches!(
            lost,
            StreamError::Reset {
                code: ResetCode::SessionLost,
                remote: false,
                ..
            }
        ),
        "{lost:?}"
    );
    assert_eq!(wa.write(Bytes::from_static(b"x")).await, Err(lost));
}

/// A loopback TCP connection: (the application's end, the relay's end).
async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = tokio::net::TcpStream::connect(l.local_addr().unwrap());
    let (app, accepted) = tokio::join!(app, l.accept());
    (app.unwrap(), accepted.unwrap().0)
}

/// A stream from `a` to `b` whose `b` end is spliced to a socket: (a's end,
/// the application's socket, the running splice).
async fn spliced(
    p: &mut Pair,
    target: &str,
) -> (
    Stream,
    tokio::net::TcpStream,
    tokio::task::JoinHandle<tether_net::splice::SpliceReport>,
) {
    let (sa, sb) = open(p, target).await;
    let (app, relay_end) = tcp_pair().await;
    let (tr, tw) = tether_net::splice::socket_halves(relay_end);
    let (sr, sw) = sb.split();
    (
        sa,
        app,
        tokio::spawn(tether_net::splice::splice(tr, tw, sr, sw)),
    )
}

/// The application's socket ends with a reset (RST), not an orderly FIN.
async fn assert_reset(app: &mut tokio::net::TcpStream, why: &str) {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let ended = within(app.read_to_end(&mut rest)).await;
    assert_eq!(
        ended.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "{why}"
    );
}

/// The splice between a real socket and a tunnel stream, as a relay runs
/// it: more bytes than a window each way, exact and in order; the socket
/// finishing first does not cut the stream's direction, which keeps
/// sending; the report counts both ways.
#[tokio::test]
async fn a_splice_copies_both_ways_and_keeps_half_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut p = pair(Config::default(), Config::default()).await;
    let (sa, sb) = open(&mut p, "spliced").await;
    let (app, relay_end) = tcp_pair().await;
    let (tr, tw) = tether_net::splice::socket_halves(relay_end);
    let (sr, sw) = sb.split();
    let splice = tokio::spawn(tether_net::splice::splice(tr, tw, sr, sw));

    let up = pattern(3 << 20);
    let down = pattern(700_000);
    let (mut app_r, mut app_w) = app.into_split();
    let (mut ra, mut wa) = sa.split();
    let sender = {
        let up = up.clone();
        tokio::spawn(async move {
            app_w.write_all(&up).await.unwrap();
            app_w.shutdown().await.unwrap(); // half-close: EOF up, still reading
            app_w
        })
    };
    assert_eq!(read_to_end(&mut ra).await.unwrap(), up);
    let _app_w = sender.await.unwrap();
    // After the socket's EOF arrived, the other direction still flows.
    for chunk in down.chunks(65_000) {
        wa.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    wa.finish().await.unwrap();
    let mut got = Vec::new();
    within(app_r.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, down);

    let report = within(splice).await.unwrap();
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.a_to_b, up.len() as u64);
    assert_eq!(report.b_to_a, down.len() as u64);
}

/// Chunks that queue up on the tunnel side while the socket is full go out
/// together (one gathered write for many chunks): every byte still arrives
/// once and in order, through partial writes, many chunk sizes and a
/// reader that starts late.
#[tokio::test]
async fn a_splice_gathers_queued_chunks_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut p = pair(Config::default(), Config::default()).await;
    let (sa, sb) = open(&mut p, "gathered").await;
    let (app, relay_end) = tcp_pair().await;
    let (tr, tw) = tether_net::splice::socket_halves(relay_end);
    let (sr, sw) = sb.split();
    let splice = tokio::spawn(tether_net::splice::splice(tr, tw, sr, sw));

    let (mut app_r, mut app_w) = app.into_split();
    app_w.shutdown().await.unwrap(); // nothing goes up
    let (mut ra, mut wa) = sa.split();
    let down = pattern(4 << 20);
    let writer = {
        let down = down.clone();
        tokio::spawn(async move {
            // Sizes from 1 byte to 20 000: many small chunks per write.
            let (mut at, mut size) = (0, 1);
            while at < down.len() {
                let end = (at + size).min(down.len());
                wa.write(Bytes::copy_from_slice(&down[at..end]))
                    .await
                    .unwrap();
                at = end;
                size = size * 7 % 20_011 + 1;
            }
            wa.finish().await.unwrap();
        })
    };
    // The application reads late: the socket fills and chunks queue.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut got = Vec::new();
    within(app_r.read_to_end(&mut got)).await.unwrap();
    within(writer).await.unwrap();
    assert_eq!(got.len(), down.len());
    assert!(got == down, "bytes lost, doubled or reordered");
    assert!(read_to_end(&mut ra).await.unwrap().is_empty());
    let report = within(splice).await.unwrap();
    assert_eq!(report.b_to_a, down.len() as u64);
}

/// When the splice's stop resolves (access revoked), the tunnel side is
/// reset with its code and reason, the socket is reset, and the report
/// says why; a splice whose stream the peer resets ends with that error and
/// resets its socket (RST, not FIN: the application must not take a failed
/// transfer for a complete one); a socket that fails resets the stream
/// with `io_error`.
#[tokio::test]
async fn a_stopped_or_reset_splice_ends_both_sides() {
    use tokio::io::AsyncWriteExt;
    let mut p = pair(Config::default(), Config::default()).await;

    let (sa, sb) = open(&mut p, "stopped").await;
    let (mut app, relay_end) = tcp_pair().await;
    let (tr, tw) = tether_net::splice::socket_halves(relay_end);
    let (sr, sw) = sb.split();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
        (ResetCode::Forbidden, "access revoked".to_owned())
    };
    let splice = tokio::spawn(tether_net::splice::splice_until(tr, tw, sr, sw, stop));
    let (mut ra, _wa) = sa.split();
    app.write_all(b"before").await.unwrap();
    assert_eq!(
        within(ra.read()).await.unwrap().as_deref(),
        Some(&b"before"[..])
    );
    stop_tx.send(()).unwrap();
    let report = within(splice).await.unwrap();
    let e = report.error.expect("a stopped splice reports why");
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    assert_eq!(e.to_string(), "access revoked");
    assert_eq!(report.a_to_b, 6);
    let e = within(ra.read()).await.unwrap_err();
    assert_eq!(e.reset_code(), Some(ResetCode::Forbidden));
    assert!(e.to_string().contains("access revoked"), "{e}");
    assert_reset(&mut app, "the socket is reset").await;

    // The peer resets the stream: the splice ends with that error.
    let (sa, mut app, splice) = spliced(&mut p, "reset").await;
    let (_ra, mut wa) = sa.split();
    wa.reset(ResetCode::Cancel, "changed my mind");
    let report = within(splice).await.unwrap();
    let e = report.error.expect("a reset splice reports it");
    assert_eq!(
        StreamError::from_io(&e).and_then(StreamError::reset_code),
        Some(ResetCode::Cancel)
    );
    assert_reset(
        &mut app,
        "a reset stream resets its socket, it does not finish it",
    )
    .await;

    // The application's socket fails (it resets the connection): the
    // stream is reset with io_error, the socket's error as its reason.
    let (sa, app, splice) = spliced(&mut p, "socket fails").await;
    let (mut ra, _wa) = sa.split();
    socket2::SockRef::from(&app)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(app);
    let report = within(splice).await.unwrap();
    assert!(
        report.error.is_some(),
        "a failed socket ends the splice with an error"
    );
    let e = within(ra.read()).await.unwrap_err();
    assert_eq!(e.reset_code(), Some(ResetCode::IoError), "{e}");
    assert!(e.to_string().contains("reset"), "{e}");
}

/// A chunk keeps the whole buffer it was cut from alive, in every queue it
/// passes through: small chunks, from a session's message or from a short
/// socket read, must come in an allocation of their own (crate::chunk), so
/// that a peer sending a byte per packet cannot turn the byte bounds of
/// those queues into thousands of times as much memory.
#[tokio::test]
async fn small_chunks_keep_no_large_buffer_alive() {
    use tokio::io::AsyncWriteExt;

    // From a session: 100 bytes in one message with 60 KiB for another
    // stream (still unread, so the message buffer is alive).
    let mut p = pair(Config::default(), Config::default()).await;
    let (s1a, s1b) = open(&mut p, "small").await;
    let (s2a, s2b) = open(&mut p, "large").await;
    let ((_r1a, mut w1a), (mut r1b, _w1b)) = (s1a.split(), s1b.split());
    let ((_r2a, mut w2a), (mut r2b, _w2b)) = (s2a.split(), s2b.split());
    w1a.write(Bytes::from(vec![1u8; 100])).await.unwrap();
    w2a.write(Bytes::from(vec![2u8; 60 * 1024])).await.unwrap();
    let small = within(r1b.read()).await.unwrap().unwrap();
    assert_own_allocation(small, &[1u8; 100], "a chunk of a message");
    let mut large = 0;
    while large < 60 * 1024 {
        large += within(r2b.read()).await.unwrap().unwrap().len();
    }

    // From a socket: a short read's chunk, not the 64 KiB read buffer.
    let (mut app, relay_end) = tcp_pair().await;
    let (mut from_app, _to_app) = tether_net::splice::socket_halves(relay_end);
    app.write_all(b"ten bytes!").await.unwrap();
    let chunk = next_chunk(&mut from_app).await;
    assert_own_allocation(chunk, b"ten bytes!", "a socket read");

    // From any AsyncRead (a TLS service's read half), the same.
    let (mut near, far) = tokio::io::duplex(1024);
    let mut from_io = tether_net::splice::IoReader::new(far);
    near.write_all(b"ten bytes!").await.unwrap();
    let chunk = next_chunk(&mut from_io).await;
    assert_own_allocation(chunk, b"ten bytes!", "an AsyncRead read");
}

/// A socket that keeps filling its reads is read in larger chunks (fewer
/// reads per byte in a bulk transfer), every byte in order; a short read
/// after that still comes in an allocation of its own.
#[tokio::test]
async fn a_bulk_socket_is_read_in_larger_chunks_and_a_trickle_in_small_ones() {
    use tether_net::splice::{BULK_READ_CHUNK, SOCKET_READ_CHUNK};
    use tokio::io::AsyncWriteExt;

    let (mut app, relay_end) = tcp_pair().await;
    let (mut from_app, _to_app) = tether_net::splice::socket_halves(relay_end);
    let total = 4 << 20;
    let sent: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    let writer = tokio::spawn({
        let sent = sent.clone();
        async move {
            app.write_all(&sent).await.unwrap();
            app
        }
    });
    // Let the socket's buffers fill, as they do behind a slower relay.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (mut got, mut largest) = (Vec::with_capacity(total), 0);
    while got.len() < total {
        let chunk = next_chunk(&mut from_app).await;
        largest = largest.max(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert!(got == sent, "bytes lost, changed or reordered");
    assert!(
        largest > SOCKET_READ_CHUNK && largest <= BULK_READ_CHUNK,
        "largest chunk of a bulk transfer: {largest} bytes"
    );
    let mut app = within(writer).await.unwrap();
    app.write_all(b"ten bytes!").await.unwrap();
    let chunk = next_chunk(&mut from_app).await;
    assert_own_allocation(chunk, b"ten bytes!", "a short read after a bulk one");
}

async fn next_chunk(r: &mut impl tether_net::splice::ChunkRead) -> Bytes {
    within(std::future::poll_fn(|cx| r.poll_next_chunk(cx)))
        .await
        .unwrap()
        .expect("a chunk, not EOF")
}

/// `chunk` holds `want` in an allocation at most MAX_PIN_RATIO times its size.
fn assert_own_allocation(chunk: Bytes, want: &[u8], what: &str) {
    assert_eq!(chunk, want);
    let held = chunk.try_into_mut().map(|b| b.capacity());
    assert!(
        matches!(held, Ok(n) if n <= want.len() * tether_net::chunk::MAX_PIN_RATIO),
        "{what} of {} bytes keeps a larger buffer alive: {held:?}",
        want.len()
    );
}

/// `a`'s sink, recording how many messages each of its writer's writes
/// carries before handing them to the in-memory link one by one.
struct CountingSink {
    inner: mem::MemSink,
    writes: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl MessageSink for CountingSink {
    async fn send(&mut self, msg: Bytes) -> std::io::Result<()> {
        self.inner.send(msg).await
    }
    async fn send_batch(&mut self, messages: &mut Vec<Vec<Bytes>>) -> std::io::Result<()> {
        self.writes.lock().unwrap().push(messages.len());
        for parts in messages.drain(..) {
            self.inner.send_parts(parts).await?;
        }
        Ok(())
    }
    async fn close(&mut self, reason: &str) {
        self.inner.close(reason).await
    }
}

#[tokio::test(start_paused = true)]
async fn several_sending_streams_share_writes_and_a_lone_one_does_not_unless_relayed() {
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut p = pair_with_a_sink(
        mem::DEFAULT_CAPACITY,
        Config::default(),
        Config::default(),
        |inner| CountingSink {
            inner,
            writes: writes.clone(),
        },
    )
    .await;

    // Two streams fill their send buffers while the link is paused, then
    // drain together: the writer hands over several full messages at once.
    const TOTAL: usize = 1 << 20;
    let (s1, r1) = open(&mut p, "one").await;
    let (s2, r2) = open(&mut p, "two").await;
    p.a_to_b.pause();
    let send = |s: Stream| {
        // The reading half stays alive until the task is joined: dropping
        // both halves before the peer finishes would reset the stream.
        let (r, mut w) = s.split();
        tokio::spawn(async move {
            for chunk in pattern(TOTAL).chunks(32 * 1024) {
                w.write(Bytes::copy_from_slice(chunk)).await?;
            }
            w.finish().await.map(|()| r)
        })
    };
    let (w1, w2) = (send(s1), send(s2));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mark = writes.lock().unwrap().len();
    p.a_to_b.resume();
    let (mut r1, mut r2) = (r1.split().0, r2.split().0);
    let (g1, g2) = tokio::join!(read_to_end(&mut r1), read_to_end(&mut r2));
    assert!(g1.unwrap() == pattern(TOTAL) && g2.unwrap() == pattern(TOTAL));
    within(w1).await.unwrap().unwrap();
    within(w2).await.unwrap().unwrap();
    let shared: Vec<usize> = writes.lock().unwrap()[mark..].to_vec();
    assert!(
        shared.iter().any(|&n| n > 1) && shared.iter().all(|&n| n <= 4),
        "writes while two streams sent: {shared:?}"
    );

    // One stream alone: every write carries one message; unless it is
    // relayed (a relay between two sessions): then its full messages share
    // writes again.
    for (name, relayed) in [("three", false), ("four", true)] {
        let (s, r) = open(&mut p, name).await;
        if relayed {
            s.mark_relayed();
        }
        let mark = writes.lock().unwrap().len();
        p.a_to_b.pause();
        let w = send(s);
        tokio::time::sleep(Duration::from_millis(100)).await;
        p.a_to_b.resume();
        let got = read_to_end(&mut r.split().0).await.unwrap();
        assert!(got == pattern(TOTAL), "bytes differ");
        within(w).await.unwrap().unwrap();
        let alone: Vec<usize> = writes.lock().unwrap()[mark..].to_vec();
        if relayed {
            assert!(
                alone.iter().any(|&n| n > 1) && alone.iter().all(|&n| n <= 4),
                "writes while one relayed stream sent: {alone:?}"
            );
        } else {
            assert!(
                alone.len() > 10 && alone.iter().all(|&n| n == 1),
                "writes while one stream sent: {alone:?}"
            );
        }
    }
}

/// A writer that buffers (TLS to a service, a WebSocket sink) may take all
/// of a chunk and still be flushing it when its destination is full: the
/// splice comes back to finish the flush when the destination drains, not
/// only when the next chunk arrives. Before, the tail of a request could
/// sit in the writer's buffer while both ends waited for each other.
#[tokio::test]
async fn a_splice_finishes_a_flush_without_waiting_for_more_bytes() {
    use tokio::io::AsyncReadExt;
    let mut p = pair(Config::default(), Config::default()).await;
    let (sa, sb) = open(&mut p, "buffered").await;
    // The destination takes 16 bytes at a time; the writer buffers.
    let (near, mut far) = tokio::io::duplex(16);
    let (nr, nw) = tokio::io::split(near);
    let (sr, sw) = sb.split();
    let _splice = tokio::spawn(tether_net::splice::splice(
        sr,
        sw,
        tether_net::splice::IoReader::new(nr),
        tether_net::splice::IoWriter(tokio::io::BufWriter::new(nw)),
    ));
    let (_ra, mut wa) = sa.split();
    let request = Bytes::from(vec![7u8; 100]);
    wa.write(request.clone()).await.unwrap();
    let mut got = vec![0u8; 100];
    within(far.read_exact(&mut got)).await.unwrap();
    assert_eq!(got, request, "the whole request arrives, no FIN needed");
}

/// A drain this side starts is a drain for what keeps state for new
/// streams (`drain_begun`), while `draining` waits for the peer's word.
#[tokio::test]
async fn a_drain_this_side_begins_is_seen_by_drain_begun() {
    let mut p = pair(Config::default(), Config::default()).await;
    // A live stream keeps the drained session open.
    let _live = open(&mut p, "live").await;
    p.b.go_away(ErrorCode::Normal, "replaced");
    within(p.b.drain_begun()).await;
    assert!(p.b.is_draining());
    let peer_word = tokio::time::timeout(Duration::from_millis(50), p.b.draining()).await;
    assert!(peer_word.is_err(), "b's own GOAWAY is not the peer's");
    // The peer sees b's GOAWAY as a drain of either kind.
    within(p.a.draining()).await;
    within(p.a.drain_begun()).await;
}
