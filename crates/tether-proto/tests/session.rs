//! Deterministic tests of the session state machine: two sessions wired
//! back to back through an in-memory "wire", with a fake clock.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};
use tether_proto::frame::{CatalogEntry, Frame, ServiceKind, StreamId, Target};
use tether_proto::{
    Config, ErrorCode, Event, OpenErrorCode, ResetCode, Role, Session, SessionError, StreamBytes,
    CHUNK_COST,
};

/// Two sessions and the messages in flight between them.
struct Pair {
    a: Session, // initiator (client/agent)
    b: Session, // acceptor (server)
    now: Instant,
    a_events: Vec<Event>,
    b_events: Vec<Event>,
}

impl Pair {
    fn new(cfg_a: Config, cfg_b: Config) -> Pair {
        let now = Instant::now();
        let mut p = Pair {
            a: Session::new(Role::Initiator, cfg_a, now),
            b: Session::new(Role::Acceptor, cfg_b, now),
            now,
            a_events: vec![],
            b_events: vec![],
        };
        p.pump(usize::MAX);
        assert!(p.a.is_established() && p.b.is_established());
        p
    }

    fn default() -> Pair {
        Pair::new(Config::default(), Config::default())
    }

    /// A pair whose sessions have measured an RTT of `rtt` (for auto-tuning).
    fn with_rtt(cfg_a: Config, cfg_b: Config, rtt: Duration) -> Pair {
        let mut p = Pair::new(cfg_a, cfg_b);
        // The first PINGs are due at establishment; answer them `rtt` later.
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        let mut out = BytesMut::new();
        let mut pongs = vec![];
        for (from_a, s) in [(true, &mut p.a), (false, &mut p.b)] {
            if s.poll_transmit(&mut out, usize::MAX) {
                pongs.push((from_a, out.split().freeze()));
            }
        }
        p.now += rtt;
        for (from_a, m) in pongs {
            let dst = if from_a { &mut p.b } else { &mut p.a };
            dst.handle_input(m, p.now).unwrap();
        }
        p.pump(usize::MAX);
        assert_eq!(p.a.rtt(), Some(rtt));
        p
    }

    /// A stream `a` opened to `target` and `b` accepted.
    fn open_accepted(&mut self, target: &str) -> StreamId {
        let id = self.a.open(Target::tcp(target), self.now).unwrap();
        self.pump(usize::MAX);
        self.b.accept(id, self.now).unwrap();
        self.pump(usize::MAX);
        id
    }

    /// Runs both sessions' timers at `now`, b's first (its PINGs keep a's
    /// session alive), moving what each sends.
    fn run_timers(&mut self) {
        self.b.handle_timeout(self.now);
        self.pump(usize::MAX);
        self.a.handle_timeout(self.now);
        self.pump(usize::MAX);
    }

    /// Moves messages both ways until quiet, each message at most `max_len` bytes.
    fn pump(&mut self, max_len: usize) {
        for _ in 0..100_000 {
            let mut moved = false;
            let mut out = BytesMut::new();
            if self.a.poll_transmit(&mut out, max_len) {
                self.a.transmitted(self.now);
                let _ = self.b.handle_input(out.split().freeze(), self.now);
                moved = true;
            }
            if self.b.poll_transmit(&mut out, max_len) {
                self.b.transmitted(self.now);
                let _ = self.a.handle_input(out.split().freeze(), self.now);
                moved = true;
            }
            while let Some(e) = self.a.poll_event() {
                self.a_events.push(e);
            }
            while let Some(e) = self.b.poll_event() {
                self.b_events.push(e);
            }
            if !moved {
                return;
            }
        }
        panic!("pump did not settle");
    }
}

fn take_incoming(events: &mut Vec<Event>) -> Vec<(StreamId, Target)> {
    let mut v = vec![];
    events.retain(|e| match e {
        Event::IncomingOpen { id, target } => {
            v.push((*id, target.clone()));
            false
        }
        _ => true,
    });
    v
}

#[test]
fn handshake_and_open_accept_data_fin() {
    let mut p = Pair::default();
    let id = p.a.open(Target::tcp("prod/db"), p.now).unwrap();
    assert_eq!(id, StreamId(1), "initiator opens odd ids");
    p.pump(usize::MAX);
    let inc = take_incoming(&mut p.b_events);
    assert_eq!(inc, vec![(id, Target::tcp("prod/db"))]);
    p.b.accept(id, p.now).unwrap();
    p.pump(usize::MAX);
    assert!(p.a_events.contains(&Event::Opened { id }));

    assert_eq!(
        p.a.stream_write(id, Bytes::from_static(b"ping")).unwrap(),
        4
    );
    p.a.stream_finish(id, p.now).unwrap();
    p.pump(usize::MAX);
    assert!(p.b_events.contains(&Event::Data {
        id,
        data: Bytes::from_static(b"ping")
    }));
    assert!(p.b_events.contains(&Event::Finished { id }));
    // Half-closed: b can still answer.
    assert_eq!(
        p.b.stream_write(id, Bytes::from_static(b"pong")).unwrap(),
        4
    );
    p.b.stream_finish(id, p.now).unwrap();
    p.pump(usize::MAX);
    assert!(p.a_events.contains(&Event::Data {
        id,
        data: Bytes::from_static(b"pong")
    }));
    assert!(p.a_events.contains(&Event::Closed { id }));
    assert!(p.b_events.contains(&Event::Closed { id }));
    assert_eq!(p.a.stats().live, 0);
    assert_eq!(p.b.stats().live, 0);
}

#[test]
fn stream_bytes_count_what_each_side_wrote_and_received() {
    let mut p = Pair::default();
    let id = p.open_accepted("prod/db");
    assert_eq!(p.a.stream_bytes(id), Some(StreamBytes::default()));
    p.a.stream_write(id, Bytes::from_static(b"hello")).unwrap();
    p.pump(usize::MAX);
    p.b.stream_write(id, Bytes::from_static(b"hi")).unwrap();
    p.pump(usize::MAX);
    let a = p.a.stream_bytes(id).unwrap();
    let b = p.b.stream_bytes(id).unwrap();
    assert_eq!((a.sent, a.received), (5, 2));
    assert_eq!((b.sent, b.received), (2, 5));
    // Gone with the stream.
    p.a.stream_finish(id, p.now).unwrap();
    p.b.stream_finish(id, p.now).unwrap();
    p.pump(usize::MAX);
    assert_eq!(p.a.stream_bytes(id), None);
    assert_eq!(p.b.stream_bytes(id), None);
}

#[test]
fn reject_reaches_opener_with_code_and_reason() {
    let mut p = Pair::default();
    let id = p.a.open(Target::tcp("prod/nope"), p.now).unwrap();
    p.pump(usize::MAX);
    take_incoming(&mut p.b_events);
    p.b.reject(id, OpenErrorCode::UnknownService, "no service nope");
    p.pump(usize::MAX);
    assert!(p.a_events.contains(&Event::OpenFailed {
        id,
        code: OpenErrorCode::UnknownService,
        reason: "no service nope".into()
    }));
    assert_eq!(p.b.stats().live, 0);
    assert_eq!(p.a.stats().live, 0);
}

#[test]
fn pending_open_times_out_and_late_answer_is_harmless() {
    let mut p = Pair::default();
    let id = p.a.open(Target::tcp("x/y"), p.now).unwrap();
    let t = p.a.poll_timeout().unwrap();
    assert!(t <= p.now + Duration::from_secs(10), "ping is due first");
    p.pump(usize::MAX);
    // Jump past the open timeout while keeping the session alive.
    p.now += Duration::from_secs(16);
    p.b.handle_timeout(p.now); // b pings, which keeps a alive
    p.pump(usize::MAX);
    p.a.handle_timeout(p.now);
    p.pump(usize::MAX);
    assert!(p.a_events.iter().any(
        |e| matches!(e, Event::OpenFailed { id: i, code: OpenErrorCode::Timeout, .. } if *i == id)
    ));
    // b got an RST for the pending stream and dropped it.
    assert_eq!(p.b.stats().live, 0);
    // A late accept is refused locally and sends nothing.
    assert!(p.b.accept(id, p.now).is_err());
}

#[test]
fn flow_control_blocks_then_resumes() {
    let cfg = Config {
        initial_window: 8192,
        ..Config::default()
    };
    let mut p = Pair::new(cfg.clone(), cfg);
    let id = p.a.open(Target::tcp("a/b"), p.now).unwrap();
    p.pump(usize::MAX);
    p.b.accept(id, p.now).unwrap();
    p.pump(usize::MAX);
    let big = Bytes::from(vec![7u8; 20_000]);
    assert_eq!(p.a.stream_write(id, big.clone()).unwrap(), 8192);
    assert_eq!(p.a.send_capacity(id), 0);
    p.pump(usize::MAX);
    // b consumes: a gets credit back and a Writable event.
    p.b.stream_consumed(id, 8192, p.now);
    p.pump(usize::MAX);
    assert!(p.a_events.contains(&Event::Writable { id }));
    assert_eq!(p.a.send_capacity(id), 8192);
}

#[test]
fn sending_streams_counts_the_streams_with_data_to_send() {
    let mut p = Pair::default();
    let (one, two) = (p.open_accepted("a/b"), p.open_accepted("a/c"));
    assert_eq!(p.a.sending_streams(), 0);
    p.a.stream_write(one, Bytes::from(vec![1u8; 100_000]))
        .unwrap();
    assert_eq!(p.a.sending_streams(), 1);
    p.a.stream_write(two, Bytes::from(vec![2u8; 100])).unwrap();
    assert_eq!(p.a.sending_streams(), 2);
    // One 64 KiB message: the big stream's first frame fills it, both
    // still wait; the next takes the small one's data and the big one's
    // rest.
    drain_one(&mut p, 64 * 1024);
    assert_eq!(p.a.sending_streams(), 2);
    drain_one(&mut p, 64 * 1024);
    assert_eq!(p.a.sending_streams(), 0);
    p.pump(usize::MAX);
    assert_eq!(p.a.sending_streams(), 0);
    // A FIN alone waits to be sent too.
    p.a.stream_finish(two, p.now).unwrap();
    assert_eq!(p.a.sending_streams(), 1);
    p.pump(usize::MAX);
    assert_eq!(p.a.sending_streams(), 0);
}

#[test]
fn sends_are_batched_for_several_streams_or_a_relayed_one() {
    let mut p = Pair::default();
    let (one, two) = (p.open_accepted("a/b"), p.open_accepted("a/c"));
    assert!(!p.a.batch_sends(), "nothing waits");
    p.a.stream_write(one, Bytes::from(vec![1u8; 200_000]))
        .unwrap();
    assert!(!p.a.batch_sends(), "one stream fed from a socket");
    p.a.stream_write(two, Bytes::from(vec![2u8; 200_000]))
        .unwrap();
    assert!(p.a.batch_sends(), "two streams wait");
    p.pump(usize::MAX);
    // A relayed stream is batched while it waits alone.
    p.a.set_relayed(two);
    p.a.stream_write(two, Bytes::from(vec![2u8; 200_000]))
        .unwrap();
    assert!(p.a.batch_sends(), "a relayed stream alone");
    p.pump(usize::MAX);
    p.a.stream_write(one, Bytes::from(vec![1u8; 200_000]))
        .unwrap();
    assert!(!p.a.batch_sends(), "the relayed one is done");
    p.pump(usize::MAX);
    // A relayed stream reset while its data waited no longer counts.
    let three = p.open_accepted("a/d");
    p.a.set_relayed(three);
    p.a.stream_write(three, Bytes::from(vec![3u8; 200_000]))
        .unwrap();
    assert!(p.a.batch_sends(), "another relayed stream alone");
    p.a.stream_reset(three, ResetCode::Cancel, "gone");
    assert!(!p.a.batch_sends(), "reset");
    p.a.set_relayed(StreamId(999)); // unknown: ignored
}

/// The DATA payload sizes in one message of at most `max_len` bytes from `a`.
fn data_sizes(p: &mut Pair, max_len: usize) -> Vec<(StreamId, usize)> {
    let mut out = BytesMut::new();
    p.a.poll_transmit(&mut out, max_len);
    frames(out.freeze())
        .into_iter()
        .filter_map(|f| match f {
            Frame::Data { id, payload } => Some((id, payload.len())),
            _ => None,
        })
        .collect()
}

#[test]
fn each_turn_fills_the_message_and_streams_take_turns_by_message() {
    let message = 64 * 1024 - 256;
    let mut p = Pair::default();
    let (one, two) = (p.open_accepted("a/b"), p.open_accepted("a/c"));
    // Alone: one frame as large as the message allows (under the peer's
    // 64 KiB max_frame_payload).
    p.a.stream_write(one, Bytes::from(vec![1u8; 200_000]))
        .unwrap();
    let sizes = data_sizes(&mut p, message);
    assert_eq!(sizes.len(), 1, "{sizes:?}");
    assert!(sizes[0].1 > message - 64, "{sizes:?}");
    assert!(sizes[0].1 <= message, "{sizes:?}");
    // Two waiting: still one frame per message, the streams in turn (the
    // receiver keeps each as a slice of its own buffer).
    p.a.stream_write(two, Bytes::from(vec![2u8; 200_000]))
        .unwrap();
    let turns: Vec<_> = (0..4).map(|_| data_sizes(&mut p, message)).collect();
    assert!(turns.iter().all(|t| t.len() == 1), "{turns:?}");
    let ids: Vec<_> = turns.iter().map(|t| t[0].0).collect();
    assert_ne!(ids[0], ids[1], "{ids:?}");
    assert_eq!(ids[0], ids[2], "{ids:?}");
    assert_eq!(ids[1], ids[3], "{ids:?}");
    // A peer's smaller max_frame_payload bounds every turn.
    let small = Config {
        max_frame_payload: 16 * 1024,
        ..Config::default()
    };
    let mut p = Pair::new(Config::default(), small);
    let one = p.open_accepted("a/b");
    p.a.stream_write(one, Bytes::from(vec![1u8; 200_000]))
        .unwrap();
    let sizes = data_sizes(&mut p, message);
    assert!(sizes.iter().all(|&(_, n)| n <= 16 * 1024), "{sizes:?}");
    assert_eq!(sizes.len(), 4, "a message of four: {sizes:?}");
}

/// The DATA payloads in one message, in order.
fn data_payloads(msg: Bytes) -> Vec<Bytes> {
    frames(msg)
        .into_iter()
        .filter_map(|f| match f {
            Frame::Data { payload, .. } => Some(payload),
            _ => None,
        })
        .collect()
}

#[test]
fn a_frame_gathers_queued_chunks_instead_of_ending_where_they_end() {
    let message = 64 * 1024 - 256;
    let mut p = Pair::default();
    let id = p.open_accepted("a/b");
    // Chunks as socket reads or relayed frames leave them: odd sizes.
    let sizes = [532, 3_000, 70_000, 1, 40_000];
    let mut sent = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let chunk: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
        assert_eq!(p.a.stream_write(id, Bytes::from(chunk.clone())).unwrap(), n);
        sent.extend(chunk);
    }
    // Every message but the last is one full frame, whatever the chunks.
    let mut got = Vec::new();
    loop {
        let mut out = BytesMut::new();
        if !p.a.poll_transmit(&mut out, message) {
            break;
        }
        let data = data_payloads(out.freeze());
        assert_eq!(data.len(), 1, "one frame per message");
        got.push(data[0].clone());
    }
    let lens: Vec<usize> = got.iter().map(Bytes::len).collect();
    assert_eq!(lens.len(), 2, "{lens:?}");
    assert!(lens[0] > message - 64, "{lens:?}");
    assert_eq!(got.concat(), sent, "the bytes, in order");

    // A peer writing a byte at a time: its chunks go out as one frame too.
    let bytes: Vec<u8> = (0..3_000).map(|i| (i % 251) as u8).collect();
    for b in &bytes {
        assert_eq!(p.a.stream_write(id, Bytes::from(vec![*b])).unwrap(), 1);
    }
    let mut out = BytesMut::new();
    assert!(p.a.poll_transmit(&mut out, message));
    let msg = out.freeze();
    let data = data_payloads(msg.clone());
    assert_eq!(
        data,
        vec![Bytes::from(bytes.clone())],
        "one frame, in order"
    );
    p.b.handle_input(msg, p.now).unwrap();
    assert_eq!(
        p.b.poll_event(),
        Some(Event::Data {
            id,
            data: Bytes::from(bytes)
        })
    );
}

#[test]
fn window_grows_for_a_fast_reader_and_not_for_a_slow_one() {
    let cfg = Config {
        initial_window: 64 * 1024,
        max_window: 1024 * 1024,
        // Lets send_capacity show the whole credit.
        max_stream_send_buffer: 4 << 20,
        ..Config::default()
    };
    let mut p = Pair::with_rtt(cfg.clone(), cfg, Duration::from_millis(10));
    let fast = p.a.open(Target::tcp("a/fast"), p.now).unwrap();
    let slow = p.a.open(Target::tcp("a/slow"), p.now).unwrap();
    p.pump(usize::MAX);
    p.b.accept(fast, p.now).unwrap();
    p.b.accept(slow, p.now).unwrap();
    p.pump(usize::MAX);
    // The fast reader consumes everything at once (well within 2 RTT).
    for _ in 0..40 {
        let cap = p.a.send_capacity(fast);
        p.a.stream_write(fast, Bytes::from(vec![0u8; cap])).unwrap();
        p.pump(usize::MAX);
        p.b.stream_consumed(fast, cap, p.now);
        p.pump(usize::MAX);
    }
    assert_eq!(p.a.send_capacity(fast), 1024 * 1024, "grew to max_window");
    // The slow reader consumes a quarter window every 100 ms (>> 2 RTT).
    for _ in 0..10 {
        let cap = p.a.send_capacity(slow).min(16 * 1024);
        p.a.stream_write(slow, Bytes::from(vec![0u8; cap])).unwrap();
        p.pump(usize::MAX);
        p.now += Duration::from_millis(100);
        p.b.stream_consumed(slow, cap, p.now);
        p.pump(usize::MAX);
    }
    assert!(
        p.a.send_capacity(slow) <= 64 * 1024,
        "slow stream keeps its window"
    );
}

/// An open stream from `a` to `b`, with `b` announcing `b_window`.
fn pair_with_stream(a_cfg: Config, b_window: u32) -> (Pair, StreamId) {
    let b_cfg = Config {
        initial_window: b_window,
        ..Config::default()
    };
    let mut p = Pair::new(a_cfg, b_cfg);
    let id = p.open_accepted("a/b");
    (p, id)
}

/// Frames one transport message of `a` (as the writer would) and drops it,
/// as if the peer read it; returns its length.
fn drain_one(p: &mut Pair, len: usize) -> usize {
    let mut out = BytesMut::new();
    p.a.poll_transmit(&mut out, len);
    while let Some(e) = p.a.poll_event() {
        p.a_events.push(e);
    }
    out.len()
}

#[test]
fn one_byte_chunks_fill_the_send_buffer_by_their_count_too() {
    // Each queued chunk is an entry and an allocation: a writer of one-byte
    // chunks must not queue a quarter of a million of them in 256 KiB.
    let cfg = Config::default();
    let (mut p, id) = pair_with_stream(cfg.clone(), (1 << 31) - 1);
    let mut chunks = 0;
    while p.a.stream_write(id, Bytes::from_static(b"x")).unwrap() == 1 {
        chunks += 1;
        assert!(chunks <= 1 << 20, "never refused");
    }
    assert_eq!(chunks, cfg.max_stream_send_buffer / (1 + CHUNK_COST));
    // Sent, they give their room back: the queue accounts to zero.
    while drain_one(&mut p, 64 * 1024) > 0 {}
    assert_eq!(p.a.stats().queued_bytes, 0);
    assert!(p.a.stream_write(id, Bytes::from_static(b"x")).unwrap() == 1);
}

#[test]
fn a_huge_peer_window_does_not_make_a_huge_send_buffer() {
    let cfg = Config::default();
    let (mut p, id) = pair_with_stream(cfg.clone(), (1 << 31) - 1);
    // The peer grants 2 GiB of credit; we queue only our own buffer's worth.
    let taken =
        p.a.stream_write(id, Bytes::from(vec![1u8; 8 << 20]))
            .unwrap();
    assert_eq!(taken, cfg.max_stream_send_buffer - CHUNK_COST);
    assert_eq!(p.a.send_capacity(id), 0);
    assert_eq!(p.a.stats().queued_bytes, cfg.max_stream_send_buffer);
    assert_eq!(p.a.stream_write(id, Bytes::from_static(b"x")).unwrap(), 0);
    // The writer takes messages: nobody is woken while the queue is over
    // half full, and the writer is told it may go on once it is not.
    let half = cfg.max_stream_send_buffer / 2;
    while p.a.stats().queued_bytes > half {
        assert!(!p.a_events.contains(&Event::Writable { id }));
        drain_one(&mut p, 64 * 1024);
    }
    assert!(p.a_events.contains(&Event::Writable { id }));
    assert!(p.a.send_capacity(id) >= half);
}

#[test]
fn the_session_send_buffer_bounds_many_streams_and_wakes_them_all() {
    let cfg = Config {
        max_stream_send_buffer: 256 * 1024,
        max_session_send_buffer: 1024 * 1024,
        ..Config::default()
    };
    let b_cfg = Config {
        initial_window: (1 << 31) - 1,
        ..Config::default()
    };
    let mut p = Pair::new(cfg.clone(), b_cfg);
    let mut ids = vec![];
    for _ in 0..8 {
        let id = p.open_accepted("a/b");
        ids.push(id);
    }
    let mut total = 0;
    for id in &ids {
        total +=
            p.a.stream_write(*id, Bytes::from(vec![2u8; 1 << 20]))
                .unwrap();
    }
    // Four streams fill their own buffers (each chunk charged CHUNK_COST).
    assert_eq!(
        total,
        cfg.max_session_send_buffer - 4 * CHUNK_COST,
        "session bound holds"
    );
    assert!(ids.iter().all(|id| p.a.send_capacity(*id) == 0));
    // Drain until the session is at half: the writers that got nothing in
    // are woken then (the others when their own queue has drained).
    while p.a.stats().queued_bytes > cfg.max_session_send_buffer / 2 {
        assert!(!p.a_events.contains(&Event::Writable { id: ids[7] }));
        drain_one(&mut p, 64 * 1024);
    }
    let starved: Vec<_> = ids[4..].to_vec();
    for id in &starved {
        assert!(
            p.a_events.contains(&Event::Writable { id: *id }),
            "stream {id:?} not woken"
        );
    }
    // No byte lost: what was queued comes out in full, and everyone is woken.
    while drain_one(&mut p, 64 * 1024) > 0 {}
    for id in &ids {
        assert!(p.a_events.contains(&Event::Writable { id: *id }));
    }
    assert_eq!(p.a.stats().queued_bytes, 0);
}

/// A stream blocked for credit whose credit returns while the session's
/// buffer is exactly full is woken when the session drains.
#[test]
fn credit_returning_into_a_full_session_buffer_is_not_lost() {
    let cfg = Config {
        max_stream_send_buffer: 256 * 1024,
        max_session_send_buffer: 128 * 1024,
        ..Config::default()
    };
    let b_cfg = Config {
        initial_window: 64 * 1024,
        ..Config::default()
    };
    let mut p = Pair::new(cfg, b_cfg);
    let mut ids = vec![];
    for _ in 0..3 {
        let id = p.open_accepted("a/b");
        ids.push(id);
    }
    let (starved, f1, f2) = (ids[0], ids[1], ids[2]);
    let k64 = 64 * 1024;
    // `starved` spends its 64 KiB of credit and is refused for lack of it.
    assert_eq!(
        p.a.stream_write(starved, Bytes::from(vec![1u8; 2 * k64]))
            .unwrap(),
        k64
    );
    while drain_one(&mut p, k64) > 0 {}
    // Two writers take exactly what they may, filling the session's buffer
    // without being refused (as poll_write_some does).
    assert_eq!(
        p.a.stream_write(f1, Bytes::from(vec![2u8; k64])).unwrap(),
        k64
    );
    assert_eq!(
        p.a.stream_write(f2, Bytes::from(vec![3u8; k64])).unwrap(),
        k64 - 2 * CHUNK_COST
    );
    assert_eq!(p.a.send_capacity(starved), 0);
    p.a_events.clear();
    // Credit for `starved` arrives while the session buffer is full.
    p.b.stream_consumed(starved, k64, p.now);
    let mut out = BytesMut::new();
    assert!(p.b.poll_transmit(&mut out, usize::MAX));
    p.a.handle_input(out.freeze(), p.now).unwrap();
    while let Some(e) = p.a.poll_event() {
        assert_ne!(e, Event::Writable { id: starved }, "woken with no room");
    }
    // Draining the session wakes it.
    while drain_one(&mut p, k64) > 0 {}
    assert!(p.a_events.contains(&Event::Writable { id: starved }));
    assert!(p.a.send_capacity(starved) > 0);
}

#[test]
fn window_growth_stops_at_the_session_budget() {
    let mut p = budget_pair();
    let id = p.open_accepted("a/fast");
    // It doubled while the session's grown windows summed under the budget, then stopped.
    assert_eq!(run_fast(&mut p, id), 256 * 1024);
}

/// The budget tests' sessions: 64 KiB initial windows, growth to 1 MiB,
/// 256 KiB of grown windows per session, a 10 ms round trip.
fn budget_pair() -> Pair {
    let cfg = Config {
        initial_window: 64 * 1024,
        max_window: 1024 * 1024,
        max_session_window: 256 * 1024,
        max_stream_send_buffer: 4 << 20,
        ..Config::default()
    };
    Pair::with_rtt(cfg.clone(), cfg, Duration::from_millis(10))
}

/// A sends on `id` as fast as b's window allows and b reads at once (the
/// pattern auto-tuning answers): returns the window a may send into.
fn run_fast(p: &mut Pair, id: StreamId) -> usize {
    for _ in 0..40 {
        let cap = p.a.send_capacity(id);
        p.a.stream_write(id, Bytes::from(vec![0u8; cap])).unwrap();
        p.pump(usize::MAX);
        p.b.stream_consumed(id, cap, p.now);
        p.pump(usize::MAX);
    }
    p.a.send_capacity(id)
}

#[test]
fn idle_streams_leave_the_window_growth_budget_to_the_busy_one() {
    let mut p = budget_pair();
    // Ten idle streams: 640 KiB of initial windows, more than the budget.
    for i in 0..10 {
        p.open_accepted(&format!("a/idle-{i}"));
    }
    let fast = p.open_accepted("a/fast");
    assert_eq!(run_fast(&mut p, fast), 256 * 1024);
}

#[test]
fn a_finished_streams_grown_window_goes_back_to_the_budget() {
    let mut p = budget_pair();
    let first = p.open_accepted("a/first");
    assert_eq!(run_fast(&mut p, first), 256 * 1024);
    // The budget is taken: a second fast stream keeps its initial window.
    let second = p.open_accepted("a/second");
    assert_eq!(run_fast(&mut p, second), 64 * 1024);
    // The first one ends both ways and is gone; its window is free again.
    p.a.stream_finish(first, p.now).unwrap();
    p.b.stream_finish(first, p.now).unwrap();
    p.pump(usize::MAX);
    assert_eq!(p.b.stats().live, 1);
    assert_eq!(run_fast(&mut p, second), 256 * 1024);
}

#[test]
fn data_past_window_resets_only_that_stream() {
    let cfg = Config {
        initial_window: 4096,
        ..Config::default()
    };
    let mut p = Pair::new(cfg.clone(), cfg);
    let s1 = p.a.open(Target::tcp("a/1"), p.now).unwrap();
    let s2 = p.a.open(Target::tcp("a/2"), p.now).unwrap();
    p.pump(usize::MAX);
    p.b.accept(s1, p.now).unwrap();
    p.b.accept(s2, p.now).unwrap();
    p.pump(usize::MAX);
    // Hand-craft a DATA frame larger than the window, as a broken peer would.
    let mut out = BytesMut::new();
    Frame::Data {
        id: s1,
        payload: Bytes::from(vec![0u8; 5000]),
    }
    .encode(&mut out);
    p.b.handle_input(out.freeze(), p.now).unwrap();
    p.pump(usize::MAX);
    assert!(p
        .b_events
        .iter()
        .any(|e| matches!(e, Event::Reset { id, code: ResetCode::FlowControl, .. } if *id == s1)));
    assert!(p.a_events.iter().any(
        |e| matches!(e, Event::Reset { id, code: ResetCode::FlowControl, remote: true, .. } if *id == s1)
    ));
    // The other stream still works.
    p.a.stream_write(s2, Bytes::from_static(b"ok")).unwrap();
    p.pump(usize::MAX);
    assert!(p.b_events.contains(&Event::Data {
        id: s2,
        data: Bytes::from_static(b"ok")
    }));
    assert!(p.b.is_established());
}

/// A stream of ours that this side resets while its open waits for an
/// answer (the peer broke the protocol on it) fails as an open, with the
/// reason: the opener waits for an answer to its open, not for a reset.
#[test]
fn a_pending_open_reset_here_fails_as_an_open_with_the_reason() {
    let mut p = Pair::default();
    let id = p.a.open(Target::tcp("prod/x"), p.now).unwrap();
    let other = p.open_accepted("prod/y");
    p.pump(usize::MAX);
    // DATA from the peer before its OPEN_OK.
    let mut out = BytesMut::new();
    Frame::Data {
        id,
        payload: Bytes::from_static(b"early"),
    }
    .encode(&mut out);
    p.a.handle_input(out.freeze(), p.now).unwrap();
    p.pump(usize::MAX);
    let failed: Vec<&Event> = p
        .a_events
        .iter()
        .filter(|e| match e {
            Event::OpenFailed { id: i, .. } | Event::Reset { id: i, .. } => *i == id,
            _ => false,
        })
        .collect();
    assert!(
        matches!(
            failed.as_slice(),
            [Event::OpenFailed { code: OpenErrorCode::Internal, reason, .. }]
                if reason.contains("protocol_error") && reason.contains("DATA before")
        ),
        "{failed:?}"
    );
    assert!(p.a_events.contains(&Event::Closed { id }));
    // The peer got the RST; the session and its other stream go on.
    assert!(p.b_events.iter().any(
        |e| matches!(e, Event::Reset { id: i, code: ResetCode::ProtocolError, remote: true, .. } if *i == id)
    ));
    p.a.stream_write(other, Bytes::from_static(b"ok")).unwrap();
    p.pump(usize::MAX);
    assert!(p.b_events.contains(&Event::Data {
        id: other,
        data: Bytes::from_static(b"ok")
    }));
}

#[test]
fn unknown_stream_gets_one_rst_and_no_state() {
    let mut p = Pair::default();
    let mut out = BytesMut::new();
    Frame::Data {
        id: StreamId(99),
        payload: Bytes::from_static(b"x"),
    }
    .encode(&mut out);
    p.b.handle_input(out.freeze(), p.now).unwrap();
    let mut tx = BytesMut::new();
    p.b.poll_transmit(&mut tx, usize::MAX);
    let mut tx = tx.freeze();
    let f = Frame::decode(&mut tx, 1 << 20).unwrap().unwrap();
    assert!(matches!(
        f,
        Frame::Rst {
            id: StreamId(99),
            code: ResetCode::UnknownStream,
            ..
        }
    ));
    assert!(tx.is_empty(), "exactly one frame");
    assert_eq!(p.b.stats().live, 0);
    // An RST for an unknown stream is not answered.
    let mut out = BytesMut::new();
    Frame::Rst {
        id: StreamId(101),
        code: ResetCode::Cancel,
        reason: String::new(),
    }
    .encode(&mut out);
    p.b.handle_input(out.freeze(), p.now).unwrap();
    assert!(!p.b.wants_transmit());
}

#[test]
fn garbage_truncated_and_oversize_close_with_reason() {
    for (bytes, want_large) in [
        (vec![0xee; 12], false),
        (vec![0x13, 0, 0, 0, 0, 1, 0, 0], false),
        ([0x13u8, 0, 0, 0, 0, 1, 0, 0x10, 0, 0].to_vec(), true),
    ] {
        let mut p = Pair::default();
        let err = p.b.handle_input(Bytes::from(bytes), p.now).unwrap_err();
        assert_eq!(
            matches!(err, SessionError::FrameTooLarge(_)),
            want_large,
            "{err}"
        );
        assert!(p.b.is_closed());
        let mut tx = BytesMut::new();
        p.b.poll_transmit(&mut tx, usize::MAX);
        let tx = tx.freeze();
        match Frame::decode(&mut tx.clone(), 0).unwrap().unwrap() {
            Frame::GoAway { code, reason } => {
                assert_ne!(code, ErrorCode::Normal);
                assert!(!reason.is_empty());
            }
            f => panic!("expected GOAWAY, got {f:?}"),
        }
        // The other end learns why.
        let err = p.a.handle_input(tx, p.now).unwrap_err();
        assert!(matches!(err, SessionError::Peer { .. }), "{err}");
        assert!(p.a.is_closed());
    }
}

#[test]
fn version_mismatch_is_explicit() {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Config::default(), now);
    let mut out = BytesMut::new();
    Frame::Hello(tether_proto::frame::Hello {
        min_version: tether_proto::PROTOCOL_VERSION + 1,
        max_version: tether_proto::PROTOCOL_VERSION + 2,
        capabilities: 0,
        initial_window: 65536,
        max_frame_payload: 65536,
        software: "future".into(),
    })
    .encode(&mut out);
    let err = b.handle_input(out.freeze(), now).unwrap_err();
    assert!(matches!(err, SessionError::VersionMismatch(_)));
    let mut tx = BytesMut::new();
    b.poll_transmit(&mut tx, usize::MAX);
    let mut tx = tx.freeze();
    assert!(matches!(
        Frame::decode(&mut tx, 0).unwrap().unwrap(),
        Frame::GoAway {
            code: ErrorCode::VersionMismatch,
            ..
        }
    ));
}

/// A version-1 peer (HELLO 1..=1) gets version 1, and no UDP either way.
#[test]
fn version_1_peer_negotiates_down_and_gets_no_udp() {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Config::default(), now);
    let mut out = BytesMut::new();
    Frame::Hello(tether_proto::frame::Hello {
        min_version: 1,
        max_version: 1,
        capabilities: 0,
        initial_window: 65536,
        max_frame_payload: 65536,
        software: "old".into(),
    })
    .encode(&mut out);
    b.handle_input(out.freeze(), now).unwrap();
    assert_eq!(b.version(), 1);
    let mut tx = BytesMut::new();
    b.poll_transmit(&mut tx, usize::MAX);
    let mut tx = tx.freeze();
    match Frame::decode(&mut tx, 0).unwrap().unwrap() {
        Frame::HelloAck(h) => assert_eq!((h.min_version, h.max_version), (1, 1)),
        f => panic!("{f:?}"),
    }
    let udp = Target {
        kind: tether_proto::TargetKind::Udp,
        address: "dns".into(),
    };
    assert!(matches!(
        b.open(udp.clone(), now),
        Err(tether_proto::OpenError::BadTarget(_))
    ));
    // An OPEN for UDP from that peer is refused for the stream only.
    let mut out = BytesMut::new();
    Frame::Open {
        id: StreamId(1),
        target: udp,
    }
    .encode(&mut out);
    b.handle_input(out.freeze(), now).unwrap();
    let mut tx = BytesMut::new();
    b.poll_transmit(&mut tx, usize::MAX);
    let mut tx = tx.freeze();
    let mut saw = false;
    while let Ok(Some(f)) = Frame::decode(&mut tx, 1 << 20) {
        if let Frame::OpenErr { code, .. } = f {
            assert_eq!(code, OpenErrorCode::BadTarget);
            saw = true;
        }
    }
    assert!(saw);
    assert!(b.is_established());
}

/// What a peer sends that the session refuses for one stream, or hears
/// once: an OPEN of a kind this build does not know gets OPEN_ERR
/// `bad_target` from the session itself; a GOAWAY repeated is one event;
/// an OPEN from a peer that sent GOAWAY gets OPEN_ERR `going_away`.
#[test]
fn unknown_kinds_repeated_goaways_and_opens_after_goaway() {
    let mut p = Pair::default();
    let inject = |p: &mut Pair, frames: Vec<Frame>| {
        let mut m = BytesMut::new();
        for f in frames {
            f.encode(&mut m);
        }
        p.b.handle_input(m.freeze(), p.now).unwrap();
        p.b_events.extend(std::iter::from_fn(|| p.b.poll_event()));
        transmit(&mut p.b)
    };
    let refusal = |sent: &[Frame], want: StreamId| {
        sent.iter().find_map(|f| match f {
            Frame::OpenErr { id, code, .. } if *id == want => Some(*code),
            _ => None,
        })
    };
    let sent = inject(
        &mut p,
        vec![Frame::Open {
            id: StreamId(1),
            target: Target {
                kind: tether_proto::TargetKind::Other(9),
                address: "a/b".into(),
            },
        }],
    );
    assert_eq!(refusal(&sent, StreamId(1)), Some(OpenErrorCode::BadTarget));
    assert!(!p
        .b_events
        .iter()
        .any(|e| matches!(e, Event::IncomingOpen { .. })));
    let goaway = |code| Frame::GoAway {
        code,
        reason: "leaving".into(),
    };
    // Repeated, or alternating between codes: one event per code.
    let (normal, leaving) = (ErrorCode::Normal, ErrorCode::Leaving);
    inject(
        &mut p,
        vec![
            goaway(normal),
            goaway(normal),
            goaway(leaving),
            goaway(normal),
            goaway(leaving),
            goaway(normal),
        ],
    );
    let goaways = p
        .b_events
        .iter()
        .filter(|e| matches!(e, Event::GoAway { .. }))
        .count();
    assert_eq!(goaways, 2, "{:?}", p.b_events);
    let sent = inject(
        &mut p,
        vec![Frame::Open {
            id: StreamId(3),
            target: Target::tcp("a/b"),
        }],
    );
    assert_eq!(refusal(&sent, StreamId(3)), Some(OpenErrorCode::GoingAway));
    assert!(p.b.is_established());
}

#[test]
fn current_peers_negotiate_the_newest_version_with_udp() {
    let mut p = Pair::default();
    assert_eq!((p.a.version(), p.b.version()), (9, 9));
    assert_eq!(p.a.version(), tether_proto::PROTOCOL_VERSION);
    let id =
        p.a.open(
            Target {
                kind: tether_proto::TargetKind::Udp,
                address: "prod/dns".into(),
            },
            p.now,
        )
        .unwrap();
    p.pump(usize::MAX);
    assert!(p
        .b_events
        .iter()
        .any(|e| matches!(e, Event::IncomingOpen { id: i, .. } if *i == id)));
}

fn catalog(names: &[&str]) -> Vec<CatalogEntry> {
    names
        .iter()
        .map(|n| CatalogEntry {
            name: (*n).into(),
            kind: ServiceKind::Http,
            host: format!("{n}.svc"),
        })
        .collect()
}

/// A catalog announced before the handshake goes out on establishment; a
/// later one replaces it.
#[test]
fn catalog_is_sent_at_establishment_and_on_change() {
    let now = Instant::now();
    let mut a = Session::new(Role::Initiator, Config::default(), now);
    a.announce_catalog(catalog(&["web", "grafana"]));
    let mut p = Pair {
        a,
        b: Session::new(Role::Acceptor, Config::default(), now),
        now,
        a_events: vec![],
        b_events: vec![],
    };
    p.pump(usize::MAX);
    let got: Vec<_> = p
        .b_events
        .iter()
        .filter_map(|e| match e {
            Event::Catalog(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(got, vec![catalog(&["web", "grafana"])]);
    p.b_events.clear();
    p.a.announce_catalog(catalog(&["web"]));
    p.pump(usize::MAX);
    assert!(p.b_events.contains(&Event::Catalog(catalog(&["web"]))));
}

/// A version-2 peer never gets a CATALOG, and a CATALOG on a version-2
/// session is a protocol error.
#[test]
fn catalog_needs_version_3() {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Config::default(), now);
    b.announce_catalog(catalog(&["web"]));
    let mut out = BytesMut::new();
    Frame::Hello(tether_proto::frame::Hello {
        min_version: 1,
        max_version: 2,
        capabilities: 0,
        initial_window: 65536,
        max_frame_payload: 65536,
        software: "v2".into(),
    })
    .encode(&mut out);
    b.handle_input(out.freeze(), now).unwrap();
    assert_eq!(b.version(), 2);
    let mut tx = BytesMut::new();
    b.poll_transmit(&mut tx, usize::MAX);
    let mut tx = tx.freeze();
    while let Ok(Some(f)) = Frame::decode(&mut tx, 1 << 20) {
        assert!(!matches!(f, Frame::Catalog(_)), "v2 peer got {f:?}");
    }
    let mut out = BytesMut::new();
    Frame::Catalog(catalog(&["x"])).encode(&mut out);
    assert!(matches!(
        b.handle_input(out.freeze(), now),
        Err(SessionError::Protocol(_))
    ));
}

/// The catalogs an acceptor speaking with a peer of `max_version` sends,
/// once at establishment and once after a later announcement.
fn catalogs_sent_to(max_version: u16, entries: Vec<CatalogEntry>) -> Vec<Vec<CatalogEntry>> {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Config::default(), now);
    b.announce_catalog(entries.clone());
    let mut out = BytesMut::new();
    Frame::Hello(tether_proto::frame::Hello {
        min_version: 1,
        max_version,
        capabilities: 0,
        initial_window: 65536,
        max_frame_payload: 65536,
        software: format!("v{max_version}"),
    })
    .encode(&mut out);
    b.handle_input(out.freeze(), now).unwrap();
    assert_eq!(b.version(), max_version);
    b.announce_catalog(entries);
    let mut tx = BytesMut::new();
    b.poll_transmit(&mut tx, usize::MAX);
    let mut tx = tx.freeze();
    let mut got = vec![];
    while let Ok(Some(f)) = Frame::decode(&mut tx, 1 << 20) {
        if let Frame::Catalog(c) = f {
            got.push(c);
        }
    }
    got
}

/// An HTTP/2 service (kind 3, version 6) is announced as what an older
/// server can still use it for: a TCP service. A version-6 peer learns the
/// kind.
#[test]
fn http2_services_reach_older_peers_as_tcp() {
    let entries = vec![
        CatalogEntry {
            name: "grpc".into(),
            kind: ServiceKind::Http2,
            host: String::new(),
        },
        CatalogEntry {
            name: "web".into(),
            kind: ServiceKind::Http,
            host: String::new(),
        },
    ];
    let kinds = |catalogs: Vec<Vec<CatalogEntry>>| -> Vec<Vec<ServiceKind>> {
        catalogs
            .into_iter()
            .map(|c| c.into_iter().map(|e| e.kind).collect())
            .collect()
    };
    assert_eq!(
        kinds(catalogs_sent_to(5, entries.clone())),
        vec![vec![ServiceKind::Tcp, ServiceKind::Http]; 2]
    );
    assert_eq!(
        kinds(catalogs_sent_to(6, entries)),
        vec![vec![ServiceKind::Http2, ServiceKind::Http]; 2]
    );
}

fn replicas(n: u64) -> tether_proto::Replicas {
    tether_proto::Replicas {
        generation: n,
        entries: vec![tether_proto::ReplicaEntry {
            id: format!("r{n}"),
            addr: String::new(),
            this: true,
        }],
    }
}

/// A replica list announced before the handshake goes out on
/// establishment, a later one replaces it; a GOAWAY `leaving` drains like
/// `normal` (the streams may finish).
#[test]
fn replicas_are_sent_at_establishment_and_on_change() {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Config::default(), now);
    b.announce_replicas(replicas(1));
    let mut p = Pair {
        a: Session::new(Role::Initiator, Config::default(), now),
        b,
        now,
        a_events: vec![],
        b_events: vec![],
    };
    p.pump(usize::MAX);
    assert!(p.a_events.contains(&Event::Replicas(replicas(1))));
    let id = p.a.open(Target::tcp("web"), p.now).unwrap();
    p.pump(usize::MAX);
    p.b.accept(id, p.now).unwrap();
    p.b.announce_replicas(replicas(2));
    p.b.go_away(ErrorCode::Leaving, "scaling down", p.now);
    p.pump(usize::MAX);
    assert!(p.a_events.contains(&Event::Replicas(replicas(2))));
    assert!(p.a.is_draining() && !p.a.is_closed(), "leaving drains");
    p.a.stream_write(id, Bytes::from_static(b"still here"))
        .unwrap();
    p.pump(usize::MAX);
    assert!(p
        .b_events
        .iter()
        .any(|e| matches!(e, Event::Data { id: i, .. } if *i == id)));
}

/// A version-3 peer never gets a REPLICAS, and a REPLICAS on a version-3
/// session is a protocol error.
#[test]
fn replicas_need_version_4() {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Config::default(), now);
    b.announce_replicas(replicas(1));
    let mut out = BytesMut::new();
    Frame::Hello(tether_proto::frame::Hello {
        min_version: 1,
        max_version: 3,
        capabilities: 0,
        initial_window: 65536,
        max_frame_payload: 65536,
        software: "v3".into(),
    })
    .encode(&mut out);
    b.handle_input(out.freeze(), now).unwrap();
    assert_eq!(b.version(), 3);
    let mut tx = BytesMut::new();
    b.poll_transmit(&mut tx, usize::MAX);
    let mut tx = tx.freeze();
    while let Ok(Some(f)) = Frame::decode(&mut tx, 1 << 20) {
        assert!(!matches!(f, Frame::Replicas(_)), "v3 peer got {f:?}");
    }
    let mut out = BytesMut::new();
    Frame::Replicas(replicas(2)).encode(&mut out);
    assert!(matches!(
        b.handle_input(out.freeze(), now),
        Err(SessionError::Protocol(_))
    ));
}

/// The frames of one message.
fn frames(mut msg: Bytes) -> Vec<Frame> {
    let mut v = vec![];
    while let Ok(Some(f)) = Frame::decode(&mut msg, 1 << 20) {
        v.push(f);
    }
    v
}

fn transmit(s: &mut Session) -> Vec<Frame> {
    let mut out = BytesMut::new();
    s.poll_transmit(&mut out, usize::MAX);
    frames(out.freeze())
}

/// Version 5: early data follows the OPEN in the same message, reaches the
/// acceptor before it answers, and the stream goes on from there.
#[test]
fn early_data_travels_with_the_open_and_counts_against_the_window() {
    let mut p = Pair::default();
    let id =
        p.a.open_with(
            Target::tcp("prod/web"),
            Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"),
            p.now,
        )
        .unwrap();
    let sent = transmit(&mut p.a);
    assert!(
        matches!(&sent[..], [Frame::Open { id: o, .. }, Frame::Data { id: d, payload }]
            if *o == id && *d == id && payload == "GET / HTTP/1.1\r\n\r\n"),
        "{sent:?}"
    );
    for f in sent {
        let mut m = BytesMut::new();
        f.encode(&mut m);
        p.b.handle_input(m.freeze(), p.now).unwrap();
    }
    while let Some(e) = p.b.poll_event() {
        p.b_events.push(e);
    }
    assert_eq!(take_incoming(&mut p.b_events).len(), 1);
    assert!(p.b_events.contains(&Event::Data {
        id,
        data: Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n")
    }));
    assert_eq!(
        p.b.stream_unread(id),
        18,
        "held against the stream's window"
    );
    p.b.accept(id, p.now).unwrap();
    p.b.stream_write(id, Bytes::from_static(b"HTTP/1.1 200 OK"))
        .unwrap();
    p.pump(usize::MAX);
    assert!(p.a_events.contains(&Event::Opened { id }));
    assert!(p.a_events.contains(&Event::Data {
        id,
        data: Bytes::from_static(b"HTTP/1.1 200 OK")
    }));
    assert_eq!(p.a.stream_bytes(id).unwrap().sent, 18);
    // More than MAX_EARLY_DATA is refused up front.
    let big = Bytes::from(vec![0u8; tether_proto::MAX_EARLY_DATA + 1]);
    assert!(matches!(
        p.a.open_with(Target::tcp("prod/web"), big, p.now),
        Err(tether_proto::OpenError::EarlyDataTooLarge(_))
    ));
}

/// A refused open's early data is dropped by the acceptor with the stream:
/// no RST for its DATA, nothing delivered, nothing left behind.
#[test]
fn early_data_of_a_refused_open_is_dropped_quietly() {
    let cfg = Config {
        max_peer_streams: 1,
        ..Config::default()
    };
    let mut p = Pair::new(Config::default(), cfg);
    let first = p.open_accepted("prod/web");
    p.b_events.clear();
    // Refused by the session itself (too many streams): no state kept.
    let id =
        p.a.open_with(Target::tcp("prod/web"), Bytes::from_static(b"hello"), p.now)
            .unwrap();
    p.pump(usize::MAX);
    assert!(p.a_events.iter().any(|e| matches!(e, Event::OpenFailed { id: i, code: OpenErrorCode::TooManyStreams, .. } if *i == id)));
    // Refused by the application after the data arrived.
    p.b.stream_finish(first, p.now).unwrap();
    p.a.stream_finish(first, p.now).unwrap();
    p.pump(usize::MAX);
    let id2 =
        p.a.open_with(
            Target::tcp("prod/nope"),
            Bytes::from_static(b"hello"),
            p.now,
        )
        .unwrap();
    p.pump(usize::MAX);
    assert_eq!(take_incoming(&mut p.b_events).len(), 1);
    p.b.reject(id2, OpenErrorCode::UnknownService, "no such service");
    p.pump(usize::MAX);
    assert!(p
        .a_events
        .iter()
        .any(|e| matches!(e, Event::OpenFailed { id: i, .. } if *i == id2)));
    let resets = p
        .a_events
        .iter()
        .chain(p.b_events.iter())
        .filter(|e| matches!(e, Event::Reset { .. }))
        .count();
    assert_eq!(resets, 0);
    assert_eq!((p.a.stats().live, p.b.stats().live), (0, 0));
    assert_eq!(p.a.stats().queued_bytes, 0);
}

/// Handshakes `a` (this build) with a hand-made peer that speaks at most
/// `version`.
fn initiator_against(version: u16, now: Instant) -> Session {
    let mut a = Session::new(Role::Initiator, Config::default(), now);
    let _hello = transmit(&mut a);
    let mut m = BytesMut::new();
    Frame::HelloAck(tether_proto::frame::Hello {
        min_version: version,
        max_version: version,
        capabilities: 0,
        initial_window: 65536,
        max_frame_payload: 65536,
        software: "old".into(),
    })
    .encode(&mut m);
    a.handle_input(m.freeze(), now).unwrap();
    assert_eq!(a.version(), version);
    a
}

/// A version-4 peer never sees DATA before its OPEN_OK: early data waits
/// for the answer, then goes first.
#[test]
fn early_data_waits_for_open_ok_from_a_version_4_peer() {
    let now = Instant::now();
    let mut a = initiator_against(4, now);
    let id = a
        .open_with(Target::tcp("prod/web"), Bytes::from_static(b"early"), now)
        .unwrap();
    a.stream_finish(id, now).unwrap_err(); // not open yet: nothing may follow
    let sent = transmit(&mut a);
    assert!(
        sent.iter().any(|f| matches!(f, Frame::Open { .. }))
            && !sent.iter().any(|f| matches!(f, Frame::Data { .. })),
        "{sent:?}"
    );
    let mut m = BytesMut::new();
    Frame::OpenOk { id }.encode(&mut m);
    a.handle_input(m.freeze(), now).unwrap();
    let sent = transmit(&mut a);
    assert!(
        sent.iter()
            .any(|f| matches!(f, Frame::Data { id: d, payload } if *d == id && payload == "early")),
        "{sent:?}"
    );
}

/// More than MAX_EARLY_DATA before the acceptor answers resets that stream
/// (flow_control); the session and other streams go on.
#[test]
fn early_data_beyond_the_limit_resets_only_that_stream() {
    let mut p = Pair::default();
    let other = p.open_accepted("prod/db");
    let id =
        p.a.open_with(Target::tcp("prod/web"), Bytes::from(vec![1u8; 4096]), p.now)
            .unwrap();
    p.pump(usize::MAX);
    // A peer that ignores the limit: more DATA while the open is pending.
    let mut m = BytesMut::new();
    Frame::Data {
        id,
        payload: Bytes::from_static(b"x"),
    }
    .encode(&mut m);
    p.b.handle_input(m.freeze(), p.now).unwrap();
    p.pump(usize::MAX);
    assert!(
        p.a_events.iter().any(|e| matches!(
            e,
            Event::OpenFailed { id: i, .. } if *i == id
        )),
        "{:?}",
        p.a_events
    );
    assert!(p.b.is_established() && p.a.is_established());
    p.a.stream_write(other, Bytes::from_static(b"still fine"))
        .unwrap();
    p.pump(usize::MAX);
    assert!(p.b_events.contains(&Event::Data {
        id: other,
        data: Bytes::from_static(b"still fine")
    }));
}

/// A version-4 acceptor keeps the old rule: DATA before its OPEN_OK resets
/// the stream.
#[test]
fn a_version_4_acceptor_resets_data_before_open_ok() {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Config::default(), now);
    let mut m = BytesMut::new();
    Frame::Hello(tether_proto::frame::Hello {
        min_version: 1,
        max_version: 4,
        capabilities: 0,
        initial_window: 65536,
        max_frame_payload: 65536,
        software: "v4".into(),
    })
    .encode(&mut m);
    Frame::Open {
        id: StreamId(1),
        target: Target::tcp("prod/web"),
    }
    .encode(&mut m);
    Frame::Data {
        id: StreamId(1),
        payload: Bytes::from_static(b"too soon"),
    }
    .encode(&mut m);
    b.handle_input(m.freeze(), now).unwrap();
    assert_eq!(b.version(), 4);
    let sent = transmit(&mut b);
    assert!(
        sent.iter().any(|f| matches!(
            f,
            Frame::Rst {
                code: ResetCode::ProtocolError,
                ..
            }
        )),
        "{sent:?}"
    );
}

#[test]
fn frames_before_hello_are_a_protocol_error() {
    let now = Instant::now();
    let mut b = Session::new(Role::Acceptor, Config::default(), now);
    let mut out = BytesMut::new();
    Frame::Ping(1).encode(&mut out);
    assert!(matches!(
        b.handle_input(out.freeze(), now),
        Err(SessionError::Protocol(_))
    ));
}

#[test]
fn silence_kills_session_and_fails_pending_opens() {
    let mut p = Pair::default();
    let id = p.a.open(Target::tcp("a/b"), p.now).unwrap();
    p.now += Duration::from_secs(31);
    p.a.handle_timeout(p.now);
    let evs: Vec<Event> = std::iter::from_fn(|| p.a.poll_event()).collect();
    assert!(evs.iter().any(
        |e| matches!(e, Event::OpenFailed { id: i, code: OpenErrorCode::SessionLost, .. } if *i == id)
    ));
    assert!(evs.iter().any(|e| matches!(
        e,
        Event::SessionClosed {
            error: Some(SessionError::Timeout(_))
        }
    )));
}

#[test]
fn pings_keep_an_idle_session_alive() {
    let mut p = Pair::default();
    for _ in 0..10 {
        p.now += Duration::from_secs(10);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        p.pump(usize::MAX);
    }
    assert!(p.a.is_established() && p.b.is_established());
    assert!(p.a_events.iter().any(|e| matches!(e, Event::Rtt(_))));
}

/// PING frames in one message.
fn pings_in(msg: &Bytes) -> usize {
    let mut b = msg.clone();
    let mut n = 0;
    while let Ok(Some(f)) = Frame::decode(&mut b, 1 << 20) {
        n += usize::from(matches!(f, Frame::Ping(_)));
    }
    n
}

/// Lets `secs` seconds pass one at a time, both sides' timers firing and
/// their messages delivered; the PINGs each side sent.
fn idle_for(p: &mut Pair, secs: u64) -> (usize, usize) {
    let (mut a_pings, mut b_pings) = (0, 0);
    for _ in 0..secs {
        p.now += Duration::from_secs(1);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        for _ in 0..100 {
            let mut out = BytesMut::new();
            let mut moved = false;
            if p.a.poll_transmit(&mut out, usize::MAX) {
                let m = out.split().freeze();
                a_pings += pings_in(&m);
                let _ = p.b.handle_input(m, p.now);
                moved = true;
            }
            if p.b.poll_transmit(&mut out, usize::MAX) {
                let m = out.split().freeze();
                b_pings += pings_in(&m);
                let _ = p.a.handle_input(m, p.now);
                moved = true;
            }
            if !moved {
                break;
            }
        }
    }
    (a_pings, b_pings)
}

/// The initiator goes silent (a partition): lets time pass on the acceptor
/// alone, a second at a time, until it closes or `limit_secs` pass. Returns
/// how long that took and when the acceptor's first PING went out.
fn silence_the_initiator(p: &mut Pair, limit_secs: u64) -> (Duration, Option<Duration>) {
    let silent_since = p.now;
    let mut first_ping = None;
    while !p.b.is_closed() && p.now < silent_since + Duration::from_secs(limit_secs) {
        p.now += Duration::from_secs(1);
        p.b.handle_timeout(p.now);
        let mut out = BytesMut::new();
        if p.b.poll_transmit(&mut out, usize::MAX) && pings_in(&out.freeze()) > 0 {
            first_ping.get_or_insert(p.now - silent_since);
        }
    }
    (p.now - silent_since, first_ping)
}

#[test]
fn the_acceptor_leaves_heartbeats_to_the_initiator_while_they_arrive() {
    let mut p = Pair::default();
    let (a_pings, b_pings) = idle_for(&mut p, 600);
    assert!(p.a.is_established() && p.b.is_established());
    assert!(
        (59..=61).contains(&a_pings),
        "the initiator pings every 10 s: {a_pings}"
    );
    assert!(
        (9..=12).contains(&b_pings),
        "the acceptor pings only to refresh its RTT, about once a minute: {b_pings}"
    );
    assert!(p.b.rtt().is_some());

    // The initiator goes silent (a partition): the acceptor pings after one
    // and a half intervals of silence and gives up at idle_timeout, as before.
    let (silent, first_ping) = silence_the_initiator(&mut p, 60);
    assert!(
        first_ping.is_some_and(|t| t <= Duration::from_secs(15)),
        "{first_ping:?}"
    );
    assert!(p.b.is_closed(), "closed at idle_timeout");
    assert!(silent <= Duration::from_secs(31));
}

#[test]
fn with_a_stream_open_the_acceptor_pings_every_interval() {
    let mut p = Pair::default();
    p.open_accepted("a/b");
    let (_, b_pings) = idle_for(&mut p, 60);
    assert!(b_pings >= 6, "{b_pings}");
}

fn heartbeat_config(interval_secs: u64, idle_secs: u64) -> Config {
    Config {
        ping_interval: Duration::from_secs(interval_secs),
        idle_timeout: Duration::from_secs(idle_secs),
        ..Config::default()
    }
}

/// Version 7: the acceptor (a server holding many agents) asks for a PING
/// a minute; the initiator takes it, and the acceptor's own RTT refreshes
/// stretch with it. The session stays up, and a silent initiator is still
/// found at the acceptor's idle timeout.
#[test]
fn the_initiator_takes_the_acceptors_heartbeat() {
    let mut p = Pair::new(Config::default(), heartbeat_config(60, 180));
    assert!(p.a_events.iter().any(|e| *e
        == Event::Heartbeat {
            ping_interval: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(180),
        }));
    let (a_pings, b_pings) = idle_for(&mut p, 1800);
    assert!(p.a.is_established() && p.b.is_established());
    assert!(
        (29..=32).contains(&a_pings),
        "the initiator pings once a minute, not every 10 s: {a_pings}"
    );
    assert!(
        (4..=7).contains(&b_pings),
        "the acceptor refreshes its RTT once in six intervals: {b_pings}"
    );
    // A partition: the acceptor gives up at its idle timeout (180 s after
    // the initiator's last PING), not sooner.
    let (silent, _) = silence_the_initiator(&mut p, 400);
    assert!(p.b.is_closed());
    assert!(
        silent > Duration::from_secs(110) && silent <= Duration::from_secs(181),
        "{silent:?}"
    );
}

/// An initiator whose operator set its own heartbeat keeps it, unless the
/// acceptor needs PINGs more often than that.
#[test]
fn an_initiator_with_its_own_heartbeat_keeps_it_or_pings_more_often() {
    let own = Config {
        adopt_peer_heartbeat: false,
        ..heartbeat_config(30, 90)
    };
    let mut p = Pair::new(own.clone(), heartbeat_config(60, 180));
    let (a_pings, _) = idle_for(&mut p, 600);
    assert!((19..=21).contains(&a_pings), "its own 30 s: {a_pings}");

    let mut p = Pair::new(own, heartbeat_config(5, 15));
    assert!(p.a_events.iter().any(|e| *e
        == Event::Heartbeat {
            ping_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(90),
        }));
    let (a_pings, _) = idle_for(&mut p, 600);
    assert!(p.b.is_established());
    assert!((119..=121).contains(&a_pings), "the asked 5 s: {a_pings}");
}

/// A version-6 peer gets no HEARTBEAT (it would be a protocol error to
/// it); a version-7 peer gets one, right after HELLO_ACK.
#[test]
fn heartbeat_goes_to_version_7_peers_only() {
    for (version, expected) in [(6, false), (7, true)] {
        let now = Instant::now();
        let mut b = Session::new(Role::Acceptor, heartbeat_config(60, 180), now);
        let mut out = BytesMut::new();
        Frame::Hello(tether_proto::frame::Hello {
            min_version: 1,
            max_version: version,
            capabilities: 0,
            initial_window: 65536,
            max_frame_payload: 65536,
            software: format!("v{version}"),
        })
        .encode(&mut out);
        b.handle_input(out.freeze(), now).unwrap();
        let sent = transmit(&mut b);
        assert!(matches!(sent.first(), Some(Frame::HelloAck(_))), "{sent:?}");
        let hb = sent.iter().position(|f| {
            *f == Frame::Heartbeat(tether_proto::Heartbeat {
                ping_interval_ms: 60_000,
                idle_timeout_ms: 180_000,
            })
        });
        assert_eq!(hb == Some(1), expected, "v{version}: {sent:?}");
        assert_eq!(hb.is_some(), expected, "v{version}: {sent:?}");
    }
}

/// HEARTBEAT on a version-6 session, or from the initiator, ends the
/// session with a protocol error that says why.
#[test]
fn heartbeat_out_of_place_is_a_protocol_error() {
    let hb = || {
        let mut m = BytesMut::new();
        Frame::Heartbeat(tether_proto::Heartbeat {
            ping_interval_ms: 1_000,
            idle_timeout_ms: 3_000,
        })
        .encode(&mut m);
        m.freeze()
    };
    let now = Instant::now();
    let mut a = initiator_against(6, now);
    let e = a.handle_input(hb(), now).unwrap_err();
    assert!(e.to_string().contains("needs protocol version 7"), "{e}");

    let mut p = Pair::default();
    let e = p.b.handle_input(hb(), p.now).unwrap_err();
    assert!(e.to_string().contains("only the acceptor"), "{e}");
}

#[test]
fn goaway_drains_then_closes() {
    let mut p = Pair::default();
    let id = p.a.open(Target::tcp("a/b"), p.now).unwrap();
    p.pump(usize::MAX);
    p.b.accept(id, p.now).unwrap();
    p.pump(usize::MAX);
    p.b.go_away(ErrorCode::Normal, "restarting", p.now);
    p.pump(usize::MAX);
    assert!(p.a_events.iter().any(|e| matches!(e, Event::GoAway { .. })));
    assert_eq!(
        p.a.open(Target::tcp("a/c"), p.now),
        Err(tether_proto::OpenError::GoingAway)
    );
    // The existing stream still works and, once finished, the session closes.
    p.a.stream_write(id, Bytes::from_static(b"last")).unwrap();
    p.a.stream_finish(id, p.now).unwrap();
    p.b.stream_finish(id, p.now).unwrap();
    p.pump(usize::MAX);
    assert!(p.b_events.contains(&Event::Data {
        id,
        data: Bytes::from_static(b"last")
    }));
    assert!(p.b.is_closed());
    assert!(p.b_events.contains(&Event::SessionClosed { error: None }));
}

#[test]
fn drain_deadline_resets_stragglers() {
    let mut p = Pair::default();
    let id = p.a.open(Target::tcp("a/b"), p.now).unwrap();
    p.pump(usize::MAX);
    p.b.accept(id, p.now).unwrap();
    p.b.go_away(ErrorCode::Replaced, "newer session", p.now);
    p.pump(usize::MAX);
    for step in [20, 11] {
        p.now += Duration::from_secs(step);
        p.a.handle_timeout(p.now);
        p.pump(usize::MAX); // a's ping keeps b from declaring a silent
        p.b.handle_timeout(p.now);
        p.pump(usize::MAX);
    }
    assert!(p.b.is_closed());
    assert!(p.a_events.iter().any(|e| matches!(
        e,
        Event::Reset {
            code: ResetCode::DrainTimeout,
            remote: true,
            ..
        }
    )));
}

#[test]
fn half_closed_idle_stream_lingers_then_resets() {
    let mut p = Pair::default();
    let id = p.a.open(Target::tcp("a/b"), p.now).unwrap();
    p.pump(usize::MAX);
    p.b.accept(id, p.now).unwrap();
    p.pump(usize::MAX);
    p.a.stream_finish(id, p.now).unwrap();
    p.pump(usize::MAX);
    // Keep the session alive with pings, but the stream carries nothing.
    for _ in 0..7 {
        p.now += Duration::from_secs(10);
        p.a.handle_timeout(p.now);
        p.b.handle_timeout(p.now);
        p.pump(usize::MAX);
    }
    assert!(p.a_events.iter().any(
        |e| matches!(e, Event::Reset { id: i, code: ResetCode::LingerTimeout, .. } if *i == id)
    ));
    assert_eq!(p.a.stats().live, 0);
    assert_eq!(p.b.stats().live, 0);
}

/// A stream idle for longer than the linger and then half-closed is not
/// reset on the spot: its FIN arrives, the other direction still carries
/// the answer, and the linger counts from the half-close.
#[test]
fn a_stream_half_closed_after_a_long_silence_gets_its_linger() {
    let mut p = Pair::default();
    let linger = Config::default().linger;
    let id = p.open_accepted("a/b");
    // Silence on the stream for one and a half lingers (pings keep the
    // session alive).
    let quiet_until = p.now + linger + linger / 2;
    while p.now < quiet_until {
        p.now += Duration::from_secs(10);
        p.run_timers();
    }
    p.a.stream_finish(id, p.now).unwrap();
    p.a.handle_timeout(p.now);
    p.pump(usize::MAX);
    let lingered = |events: &[Event]| {
        events.iter().any(
            |e| matches!(e, Event::Reset { id: i, code: ResetCode::LingerTimeout, .. } if *i == id),
        )
    };
    assert!(!lingered(&p.a_events), "reset as it was half-closed");
    assert!(
        p.b_events.contains(&Event::Finished { id }),
        "the FIN arrived"
    );
    p.b.stream_write(id, Bytes::from_static(b"answer")).unwrap();
    p.pump(usize::MAX);
    assert!(p.a_events.contains(&Event::Data {
        id,
        data: Bytes::from_static(b"answer")
    }));
    // Then silence again: the linger ends it, counted from the answer.
    for _ in 0..7 {
        p.now += Duration::from_secs(10);
        p.run_timers();
    }
    assert!(lingered(&p.a_events) || lingered(&p.b_events));
}

/// The OpenFailed{Timeout} ids among `events`, in order.
fn timed_out_opens(events: &[Event]) -> Vec<StreamId> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::OpenFailed {
                id,
                code: OpenErrorCode::Timeout,
                ..
            } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn among_many_pending_opens_the_oldest_time_out_first_and_answered_ones_never() {
    let cfg = Config {
        max_peer_streams: 4096,
        ..Config::default()
    };
    let mut p = Pair::new(Config::default(), cfg);
    let t0 = p.now;
    // 2 000 opens one millisecond apart; b answers every other one.
    let ids: Vec<StreamId> = (0..2000u64)
        .map(|i| {
            p.now = t0 + Duration::from_millis(i);
            p.a.open(Target::tcp(format!("a/{i}")), p.now).unwrap()
        })
        .collect();
    p.pump(usize::MAX);
    for id in ids.iter().step_by(2) {
        p.b.accept(*id, p.now).unwrap();
    }
    p.pump(usize::MAX);
    let open_timeout = Config::default().open_timeout;
    // The timer's next instant is no later than the oldest unanswered open's
    // deadline (ids[1], opened at t0 + 1 ms).
    assert!(p.a.poll_timeout().unwrap() <= t0 + Duration::from_millis(1) + open_timeout);
    // Just past the deadlines of ids[1] and ids[3], short of ids[5]'s; b's
    // PINGs keep the session alive meanwhile.
    p.now = t0 + Duration::from_millis(4) + open_timeout;
    p.run_timers();
    assert_eq!(timed_out_opens(&p.a_events), vec![ids[1], ids[3]]);
    assert_eq!(p.a.stats().live, 2000 - 2);
    assert_eq!(p.a.stats().pending_opens, 1000 - 2);
    let next = p.a.poll_timeout().unwrap();
    assert!(
        next > p.now && next <= t0 + Duration::from_millis(5) + open_timeout,
        "the next deadline is ids[5]'s (or a PING's before it)"
    );
    // Later, every unanswered open has timed out, oldest first, and no
    // answered one.
    p.now = t0 + Duration::from_millis(2000) + open_timeout;
    p.run_timers();
    let unanswered: Vec<StreamId> = ids.iter().skip(1).step_by(2).copied().collect();
    assert_eq!(timed_out_opens(&p.a_events), unanswered);
    assert_eq!(p.a.stats().live, 1000);
    assert_eq!(p.a.stats().pending_opens, 0);
}

#[test]
fn a_half_closed_stream_that_keeps_receiving_does_not_linger_out() {
    let mut p = Pair::default();
    let id = p.open_accepted("a/b");
    p.a.stream_finish(id, p.now).unwrap();
    p.pump(usize::MAX);
    // b goes on sending every 10 s for twice the linger: a's half-closed
    // stream has activity, so it stays.
    let linger = Config::default().linger;
    let until = p.now + linger * 2;
    while p.now < until {
        p.now += Duration::from_secs(10);
        p.b.stream_write(id, Bytes::from_static(b"tick")).unwrap();
        // Sent as the driver sends: with the clock, so b's side of the
        // stream has activity too.
        let mut out = BytesMut::new();
        assert!(p.b.poll_transmit_at(&mut out, usize::MAX, Some(p.now)));
        p.a.handle_input(out.split().freeze(), p.now).unwrap();
        p.run_timers();
        p.a.stream_consumed(id, 4, p.now);
        p.pump(usize::MAX);
    }
    let linger_resets = |events: &[Event]| {
        events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::Reset {
                        code: ResetCode::LingerTimeout,
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(linger_resets(&p.a_events), 0);
    assert_eq!(p.a.stats().live, 1);
    // Then silence: the linger ends it, counted from the last frame.
    let last = p.now;
    while p.now < last + linger + Duration::from_secs(10) {
        p.now += Duration::from_secs(10);
        p.run_timers();
        if p.now < last + linger {
            assert_eq!(
                linger_resets(&p.a_events),
                0,
                "reset before the linger ran out"
            );
        }
    }
    assert_eq!(linger_resets(&p.a_events), 1);
    assert_eq!(p.a.stats().live, 0);
}

#[test]
fn open_flood_beyond_limit_is_refused_not_fatal() {
    let cfg_b = Config {
        max_peer_streams: 4,
        ..Config::default()
    };
    let mut p = Pair::new(Config::default(), cfg_b);
    let ids: Vec<StreamId> = (0..10)
        .map(|i| p.a.open(Target::tcp(format!("a/{i}")), p.now).unwrap())
        .collect();
    p.pump(usize::MAX);
    let refused = p
        .a_events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::OpenFailed {
                    code: OpenErrorCode::TooManyStreams,
                    ..
                }
            )
        })
        .count();
    assert_eq!(refused, 6);
    assert_eq!(take_incoming(&mut p.b_events).len(), 4);
    assert!(p.b.is_established());
    for id in &ids[..4] {
        p.b.reject(*id, OpenErrorCode::Refused, "no");
    }
    p.pump(usize::MAX);
    // Slots free again.
    p.a.open(Target::tcp("a/again"), p.now).unwrap();
    p.pump(usize::MAX);
    assert_eq!(take_incoming(&mut p.b_events).len(), 1);
}

#[test]
fn control_frames_go_ahead_of_queued_data() {
    let mut p = Pair::default();
    let id = p.a.open(Target::tcp("a/b"), p.now).unwrap();
    p.pump(usize::MAX);
    p.b.accept(id, p.now).unwrap();
    p.pump(usize::MAX);
    p.a.stream_write(id, Bytes::from(vec![1u8; 500_000]))
        .unwrap();
    // A ping arrives from b while a has lots of data queued.
    p.now += Duration::from_secs(10);
    p.b.handle_timeout(p.now);
    let mut out = BytesMut::new();
    p.b.poll_transmit(&mut out, usize::MAX);
    p.a.handle_input(out.freeze(), p.now).unwrap();
    let mut tx = BytesMut::new();
    p.a.poll_transmit(&mut tx, 64 * 1024);
    let mut tx = tx.freeze();
    let first = Frame::decode(&mut tx, 1 << 20).unwrap().unwrap();
    assert!(matches!(first, Frame::Pong(_)), "got {first:?}");
}

// ----------------------------------------------------------------------
// Property test: random interleavings of opens, writes, consumption,
// finishes, resets and message sizes.
// ----------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Open,
    Write {
        stream: usize,
        len: usize,
        from_a: bool,
    },
    Consume {
        stream: usize,
        frac: u8,
        at_a: bool,
    },
    Finish {
        stream: usize,
        from_a: bool,
    },
    Reset {
        stream: usize,
    },
    Transmit {
        max_len: usize,
        from_a: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Open),
        6 => (0..8usize, 1..40_000usize, any::<bool>())
            .prop_map(|(stream, len, from_a)| Op::Write { stream, len, from_a }),
        4 => (0..8usize, 0..=100u8, any::<bool>())
            .prop_map(|(stream, frac, at_a)| Op::Consume { stream, frac, at_a }),
        1 => (0..8usize, any::<bool>()).prop_map(|(stream, from_a)| Op::Finish { stream, from_a }),
        1 => (0..40usize).prop_map(|stream| Op::Reset { stream }),
        6 => (1..70_000usize, any::<bool>()).prop_map(|(max_len, from_a)| Op::Transmit { max_len, from_a }),
    ]
}

/// What one direction of one stream has sent and received.
#[derive(Default)]
struct Dir {
    sent: Vec<u8>,
    received: Vec<u8>,
    /// Received but not yet reported consumed.
    unconsumed: usize,
}

struct Model {
    p: Pair,
    streams: Vec<StreamId>,
    /// (stream, from_a) -> direction bookkeeping
    dirs: HashMap<(StreamId, bool), Dir>,
    counter: u8,
    reset: Vec<StreamId>,
    closed_a: Vec<StreamId>,
    closed_b: Vec<StreamId>,
    /// Pending messages on the wire: from_a -> queue (kept in order).
    wire: BTreeMap<bool, VecDeque<Bytes>>,
}

impl Model {
    fn deliver_all(&mut self) {
        for from_a in [true, false] {
            while let Some(m) = self.wire.get_mut(&from_a).and_then(VecDeque::pop_front) {
                let dst = if from_a { &mut self.p.b } else { &mut self.p.a };
                dst.handle_input(m, self.p.now)
                    .expect("no protocol error in a fair run");
            }
        }
        self.drain_events();
    }

    fn transmit(&mut self, from_a: bool, max_len: usize) {
        let src = if from_a { &mut self.p.a } else { &mut self.p.b };
        let mut out = BytesMut::new();
        if src.poll_transmit(&mut out, max_len) {
            self.wire.entry(from_a).or_default().push_back(out.freeze());
        }
        // Deliver the oldest message in that direction.
        if let Some(m) = self.wire.get_mut(&from_a).and_then(VecDeque::pop_front) {
            let dst = if from_a { &mut self.p.b } else { &mut self.p.a };
            dst.handle_input(m, self.p.now)
                .expect("no protocol error in a fair run");
        }
        self.drain_events();
    }

    fn drain_events(&mut self) {
        for at_a in [true, false] {
            loop {
                let ev = if at_a {
                    self.p.a.poll_event()
                } else {
                    self.p.b.poll_event()
                };
                let Some(ev) = ev else { break };
                match ev {
                    Event::IncomingOpen { id, .. } => {
                        assert!(!at_a);
                        // May fail if a reset arrived in the same message.
                        let _ = self.p.b.accept(id, self.p.now);
                    }
                    Event::Data { id, data } => {
                        let d = self.dirs.entry((id, !at_a)).or_default();
                        d.received.extend_from_slice(&data);
                        d.unconsumed += data.len();
                    }
                    Event::Reset { id, code, .. } => {
                        assert!(
                            matches!(code, ResetCode::Cancel),
                            "unexpected reset {code} on {id}"
                        );
                        self.reset.push(id);
                    }
                    Event::Closed { id } => {
                        if at_a {
                            self.closed_a.push(id)
                        } else {
                            self.closed_b.push(id)
                        }
                    }
                    Event::OpenFailed { .. } | Event::SessionClosed { .. } => {
                        panic!("unexpected {ev:?}")
                    }
                    _ => {}
                }
            }
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Open => {
                if self.streams.len() < 8 {
                    let id = self.p.a.open(Target::tcp("a/b"), self.p.now).unwrap();
                    self.streams.push(id);
                }
            }
            Op::Write {
                stream,
                len,
                from_a,
            } => {
                let Some(&id) = self.streams.get(stream) else {
                    return;
                };
                self.counter = self.counter.wrapping_add(1);
                let c = self.counter;
                let data: Vec<u8> = (0..len).map(|i| c.wrapping_add(i as u8)).collect();
                let s = if from_a { &mut self.p.a } else { &mut self.p.b };
                let cap = s.send_capacity(id);
                if let Ok(n) = s.stream_write(id, Bytes::from(data.clone())) {
                    assert!(n <= cap, "wrote {n} with capacity {cap}");
                    self.dirs
                        .entry((id, from_a))
                        .or_default()
                        .sent
                        .extend_from_slice(&data[..n]);
                }
            }
            Op::Consume { stream, frac, at_a } => {
                let Some(&id) = self.streams.get(stream) else {
                    return;
                };
                // Data received *at* a was sent by b.
                let d = self.dirs.entry((id, !at_a)).or_default();
                let n = d.unconsumed * frac as usize / 100;
                d.unconsumed -= n;
                let s = if at_a { &mut self.p.a } else { &mut self.p.b };
                s.stream_consumed(id, n, self.p.now);
            }
            Op::Finish { stream, from_a } => {
                let Some(&id) = self.streams.get(stream) else {
                    return;
                };
                let s = if from_a { &mut self.p.a } else { &mut self.p.b };
                let _ = s.stream_finish(id, self.p.now);
            }
            Op::Reset { stream } => {
                // Rare: reset from a.
                if stream < self.streams.len() {
                    let id = self.streams[stream];
                    self.p.a.stream_reset(id, ResetCode::Cancel, "test");
                    self.reset.push(id);
                }
            }
            Op::Transmit { max_len, from_a } => self.transmit(from_a, max_len),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_every_byte_in_order(ops in proptest::collection::vec(op(), 1..300)) {
        let cfg = Config {
            initial_window: 16 * 1024,
            ..Config::default()
        }; // small, so credit runs out often
        let mut m = Model {
            // Time stands still in the model, so with a 5 ms RTT every window
            // update looks fast: auto-tuning grows windows as far as it can.
            p: Pair::with_rtt(cfg.clone(), cfg, Duration::from_millis(5)),
            streams: vec![],
            dirs: HashMap::new(),
            counter: 0,
            reset: vec![],
            closed_a: vec![],
            closed_b: vec![],
            wire: BTreeMap::new(),
        };
        for op in ops {
            m.apply(op);
        }
        // Finish everything: consume all, finish all, pump to quiescence.
        for _ in 0..1000 {
            m.deliver_all();
            let ids = m.streams.clone();
            for id in ids {
                for at_a in [true, false] {
                    let d = m.dirs.entry((id, !at_a)).or_default();
                    let n = std::mem::take(&mut d.unconsumed);
                    let s = if at_a { &mut m.p.a } else { &mut m.p.b };
                    s.stream_consumed(id, n, m.p.now);
                    let _ = s.stream_finish(id, m.p.now);
                }
            }
            let before = (m.p.a.wants_transmit(), m.p.b.wants_transmit());
            m.transmit(true, 64 * 1024);
            m.transmit(false, 64 * 1024);
            if before == (false, false) && m.wire.values().all(VecDeque::is_empty) {
                break;
            }
        }
        for ((id, _), d) in &m.dirs {
            if m.reset.contains(id) {
                // A reset stream may lose its tail, but what arrived is a prefix.
                prop_assert!(d.sent.starts_with(&d.received), "stream {id}: not a prefix");
            } else {
                prop_assert!(d.sent == d.received, "stream {id}: sent {} received {}", d.sent.len(), d.received.len());
            }
        }
        // Every stream ended on both sides, and no state is left.
        for id in &m.streams {
            prop_assert!(m.closed_a.contains(id), "stream {id} not closed at a");
            prop_assert!(m.closed_b.contains(id), "stream {id} not closed at b");
        }
        prop_assert_eq!(m.p.a.stats().live, 0);
        prop_assert_eq!(m.p.b.stats().live, 0);
    }
}

/// A peer that goes silent while an open waits is found dead after two
/// probe intervals, not after the idle timeout; a peer that answers the
/// probe PING keeps the session.
#[test]
fn an_unanswered_open_probes_the_peer() {
    let mut p = Pair::default();
    let probe = Config::default().open_probe;
    // The peer answers: the open waits (a slow service), the session lives.
    let id = p.a.open(Target::tcp("slow"), p.now).unwrap();
    p.pump(usize::MAX);
    p.now += probe;
    p.a.handle_timeout(p.now);
    p.pump(usize::MAX); // the PING goes out, b answers PONG
    p.now += probe + Duration::from_millis(1);
    p.a.handle_timeout(p.now);
    assert!(!p.a.is_closed(), "a peer that answers the probe is alive");
    p.b.accept(id, p.now).unwrap();
    p.pump(usize::MAX);
    // Now the peer goes silent (nothing pumped from b any more).
    let _second = p.a.open(Target::tcp("web"), p.now).unwrap();
    let mut out = BytesMut::new();
    p.a.poll_transmit(&mut out, usize::MAX);
    let started = p.now;
    let mut steps = 0;
    while !p.a.is_closed() && steps < 100 {
        p.now = p.a.poll_timeout().unwrap().max(p.now);
        p.a.handle_timeout(p.now);
        p.a.poll_transmit(&mut out, usize::MAX);
        p.a.transmitted(p.now);
        steps += 1;
    }
    assert!(p.a.is_closed(), "a silent peer ends the session");
    let took = p.now - started;
    assert!(
        took <= probe * 2 + Duration::from_millis(10),
        "found dead after {took:?}, not after the idle timeout"
    );
}

/// The probe's answer is awaited from when the PING was written, not
/// queued: while our own writer is backed up (a slow uplink full of
/// uploads), a live peer is not taken for a dead one.
#[test]
fn a_probe_is_timed_from_its_write() {
    let mut p = Pair::default();
    let probe = Config::default().open_probe;
    let _waiting = p.a.open(Target::tcp("slow"), p.now).unwrap();
    let mut out = BytesMut::new();
    p.a.poll_transmit(&mut out, usize::MAX); // the OPEN, handed over
    p.now += probe;
    p.a.handle_timeout(p.now); // the probe PING is queued
    assert!(p.a.poll_transmit(&mut out, usize::MAX));
    assert!(p.a.wants_transmit_notice(), "the PING was handed over");
    // The write that carries it takes long: our backlog, not the peer.
    p.now += probe * 3;
    p.a.handle_timeout(p.now);
    assert!(!p.a.is_closed(), "failed before its PING was written");
    p.a.transmitted(p.now);
    assert!(!p.a.wants_transmit_notice());
    p.now += probe + Duration::from_millis(1);
    p.a.handle_timeout(p.now);
    assert!(p.a.is_closed(), "no answer after the PING was written");
}
