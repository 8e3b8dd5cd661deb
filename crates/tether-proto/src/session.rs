//! The sans-I/O session: handshake, streams, flow control, liveness, drain.

use bytes::Bytes;
use std::collections::{BTreeSet, VecDeque};

// Looked up several times per frame; stream ids are bounded per session
// (max_peer_streams), so a seeded fast hash is enough.
use foldhash::HashMap;
use std::time::{Duration, Instant};

use crate::codes::{ErrorCode, OpenErrorCode, ResetCode};
use crate::frame::{
    clip_reason, CatalogEntry, Frame, FrameError, Heartbeat, Hello, Replicas, StreamId, Target,
    TargetKind, HEADER_LEN,
};
use crate::stream::{Phase, Stream, CHUNK_COST};
use crate::transmit::FrameBuf;
use crate::{
    CATALOG_VERSION, EARLY_DATA_VERSION, HEARTBEAT_VERSION, MAX_EARLY_DATA, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION, REPLICAS_VERSION, UDP_VERSION,
};

/// Which end of the WebSocket this session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Dialed the WebSocket (agents and CLI clients). Sends HELLO; opens odd stream ids.
    Initiator,
    /// Accepted the WebSocket (the server). Answers HELLO; opens even stream ids.
    Acceptor,
}

/// Tunables of one session. The defaults are the documented protocol defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// Receive window granted to each new stream, in bytes.
    pub initial_window: u32,
    /// Largest receive window auto-tuning may grow a stream to. Bounds the
    /// memory one stream can make the receiver hold.
    pub max_window: u32,
    /// Auto-tuning grows a stream's window only while the windows it has
    /// grown past `initial_window` add up to at most this much over the
    /// session: what one peer's streams can make us hold beyond their
    /// initial windows, however many streams it opens. (Streams at their
    /// initial window do not count: a session's idle streams must not stop
    /// its busy one from growing.)
    pub max_session_window: u64,
    /// Most bytes one stream may have accepted from its application and not
    /// yet framed, whatever credit the peer granted. Credit beyond it goes
    /// unused: a peer that announces a huge window and stops reading makes
    /// us hold this much, not its window.
    pub max_stream_send_buffer: usize,
    /// Most bytes all streams of the session together may have queued and
    /// not yet framed (the same guard, across a peer's many streams).
    pub max_session_send_buffer: usize,
    /// Largest DATA payload we accept from the peer.
    pub max_frame_payload: u32,
    /// How often to send a PING when established. An acceptor asks its
    /// version 7 peers for the same (a HEARTBEAT frame).
    pub ping_interval: Duration,
    /// Silence (no inbound frame at all) after which the session is dead.
    pub idle_timeout: Duration,
    /// Whether an initiator takes the acceptor's HEARTBEAT as its own
    /// `ping_interval` and `idle_timeout`. Off when this side's operator
    /// set them: then it keeps its own, pinging more often only if asked.
    pub adopt_peer_heartbeat: bool,
    /// How long the HELLO / HELLO_ACK exchange may take.
    pub handshake_timeout: Duration,
    /// How long an OPEN we sent may wait for its answer.
    pub open_timeout: Duration,
    /// Partition detection: when an OPEN has waited this long and nothing
    /// was heard from the peer since it was sent, a PING goes out; if
    /// nothing is heard for this long again, the session is dead (a silent
    /// peer is found in seconds instead of `idle_timeout`).
    pub open_probe: Duration,
    /// How long a half-closed stream may go without any traffic before it is reset.
    pub linger: Duration,
    /// After GOAWAY, how long remaining streams may run before they are reset.
    pub drain_timeout: Duration,
    /// Most streams the peer may have open or opening with us at once.
    pub max_peer_streams: usize,
    /// Whether the peer may open streams at all.
    pub accept_opens: bool,
    /// Software name and version announced in HELLO / HELLO_ACK.
    pub software: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            initial_window: 256 * 1024,
            max_window: 8 * 1024 * 1024,
            max_session_window: 16 * 1024 * 1024,
            max_stream_send_buffer: 256 * 1024,
            max_session_send_buffer: 2 * 1024 * 1024,
            max_frame_payload: 64 * 1024,
            ping_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            adopt_peer_heartbeat: true,
            handshake_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(15),
            open_probe: Duration::from_secs(2),
            linger: Duration::from_secs(60),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            max_peer_streams: 1024,
            accept_opens: true,
            software: String::from("tether"),
        }
    }
}

/// How long a draining session's streams get to finish unless configured
/// otherwise (PROTOCOL.md section 13, `drain_timeout`).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Smallest window and frame limits a peer may announce; anything smaller
/// would make the session crawl and is treated as a protocol error.
const MIN_PEER_WINDOW: u32 = 4096;
// Early data must always fit the credit of a freshly opened stream.
const _: () = assert!(MAX_EARLY_DATA as u64 <= MIN_PEER_WINDOW as u64);
const MIN_PEER_FRAME: u32 = 1024;

/// How many chunks' room the list a DATA frame is gathered in keeps between
/// frames (a bulk stream's frame spans two or three chunks).
const GATHER_KEPT: usize = 16;

/// Largest window a peer may announce (credit is kept below 2^31).
const MAX_PEER_WINDOW: u32 = (1 << 31) - 1;
/// Control frames waiting to be sent before the session gives up on the peer.
const MAX_QUEUED_CONTROL: usize = 16 * 1024;
/// How old the acceptor lets its RTT sample grow before it pings for a new
/// one even while the peer's heartbeats arrive (see `ping_can_wait`), or
/// [`RTT_REFRESH_INTERVALS`] PING intervals if that is longer.
const RTT_REFRESH: Duration = Duration::from_secs(60);
/// See [`RTT_REFRESH`]: with a long interval (a server holding many agents
/// may ask for a minute), one acceptor PING in this many intervals.
const RTT_REFRESH_INTERVALS: u32 = 6;

/// Whether DATA and FIN may arrive on a stream in `phase`: once it is open
/// and, from version 5, also before we accepted it (the opener's early
/// data, held for the application until it accepts).
fn receives_in(phase: Phase, version: u16) -> bool {
    phase == Phase::Open || (phase == Phase::PendingAccept && version >= EARLY_DATA_VERSION)
}

/// What the session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake finished.
    Established {
        /// Negotiated protocol version.
        version: u16,
        /// The peer's software string.
        peer_software: String,
    },
    /// The peer asks to open a stream; answer with [`Session::accept`] or [`Session::reject`].
    IncomingOpen {
        /// The new stream.
        id: StreamId,
        /// What the peer wants to reach.
        target: Target,
    },
    /// An open we sent was accepted.
    Opened {
        /// The stream.
        id: StreamId,
    },
    /// An open we sent failed (refused by the peer, timed out, or the session ended).
    OpenFailed {
        /// The stream.
        id: StreamId,
        /// Why.
        code: OpenErrorCode,
        /// Detail.
        reason: String,
    },
    /// Bytes arrived. Call [`Session::stream_consumed`] once they are delivered.
    Data {
        /// The stream.
        id: StreamId,
        /// The bytes, in order.
        data: Bytes,
    },
    /// The peer finished sending (half-close): no more Data for this stream.
    Finished {
        /// The stream.
        id: StreamId,
    },
    /// The stream was aborted, by the peer (`remote`) or by this session.
    Reset {
        /// The stream.
        id: StreamId,
        /// Why.
        code: ResetCode,
        /// Detail.
        reason: String,
        /// The peer sent the RST (as opposed to this side deciding).
        remote: bool,
    },
    /// Send credit is available again after a short write.
    Writable {
        /// The stream.
        id: StreamId,
    },
    /// The stream's state is gone; no more events for it.
    Closed {
        /// The stream.
        id: StreamId,
    },
    /// The peer sent GOAWAY: open nothing new on this session.
    GoAway {
        /// Why.
        code: ErrorCode,
        /// Detail.
        reason: String,
    },
    /// A PONG answered our PING.
    Rtt(Duration),
    /// The acceptor's HEARTBEAT (version 7) set this initiator's heartbeat
    /// to these values.
    Heartbeat {
        /// How often this side now PINGs.
        ping_interval: Duration,
        /// The silence after which this side now declares the session dead.
        idle_timeout: Duration,
    },
    /// The peer announced the services it offers (version 3), replacing any
    /// earlier list.
    Catalog(Vec<CatalogEntry>),
    /// The peer (a server replica) listed the replicas it knows of (version
    /// 4), replacing any earlier list.
    Replicas(Replicas),
    /// The session is over; nothing more will happen. Close the transport
    /// after flushing [`Session::poll_transmit`].
    SessionClosed {
        /// `None` after an orderly drain.
        error: Option<SessionError>,
    },
}

/// Why a session ended abnormally.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The peer sent something undecodable or broke the state rules.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A frame was bigger than allowed.
    #[error("{0}")]
    FrameTooLarge(String),
    /// No protocol version in common.
    #[error("version mismatch: {0}")]
    VersionMismatch(String),
    /// Nothing was heard from the peer within the idle timeout, or the
    /// handshake took too long.
    #[error("peer silent for {0:?}")]
    Timeout(Duration),
    /// The peer sent GOAWAY with an error code and then closed.
    #[error("peer closed the session: {code}: {reason}")]
    Peer {
        /// The peer's code.
        code: ErrorCode,
        /// The peer's reason.
        reason: String,
    },
    /// This side closed the session with an error code.
    #[error("closed locally: {code}: {reason}")]
    Local {
        /// Our code.
        code: ErrorCode,
        /// Our reason.
        reason: String,
    },
    /// The transport (WebSocket, TCP) broke or closed.
    #[error("transport lost: {0}")]
    Transport(String),
}

impl SessionError {
    fn goaway_code(&self) -> ErrorCode {
        match self {
            SessionError::Protocol(_) => ErrorCode::ProtocolError,
            SessionError::FrameTooLarge(_) => ErrorCode::FrameTooLarge,
            SessionError::VersionMismatch(_) => ErrorCode::VersionMismatch,
            SessionError::Timeout(_) => ErrorCode::Timeout,
            SessionError::Local { code, .. } => *code,
            SessionError::Peer { .. } | SessionError::Transport(_) => ErrorCode::Normal,
        }
    }
}

/// Why [`Session::open`] could not start a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The handshake has not finished.
    #[error("session not established yet")]
    NotEstablished,
    /// GOAWAY was sent or received.
    #[error("session is draining")]
    GoingAway,
    /// The session is over.
    #[error("session is closed")]
    Closed,
    /// All stream ids of this session are used up; open a new session.
    #[error("stream ids exhausted")]
    IdsExhausted,
    /// The target address is empty or too long.
    #[error("bad target: {0}")]
    BadTarget(&'static str),
    /// More early data than [`MAX_EARLY_DATA`] was given to
    /// [`Session::open_with`].
    #[error("{0} bytes of early data (at most {MAX_EARLY_DATA})")]
    EarlyDataTooLarge(usize),
}

/// Why a write or finish on a stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// No such stream (closed, reset, or never opened).
    #[error("stream is not open")]
    UnknownStream,
    /// The stream is not open yet (OPEN not acknowledged).
    #[error("stream is not open yet")]
    NotOpen,
    /// This side already finished the stream.
    #[error("stream already finished")]
    Finished,
}

/// Counters describing the session, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Streams in the map (any phase).
    pub live: usize,
    /// Opens we sent that have no answer yet.
    pub pending_opens: usize,
    /// Streams whose sender is out of credit.
    pub blocked: usize,
    /// Bytes accepted from applications and not yet framed.
    pub queued_bytes: usize,
}

/// One stream's byte counts (see [`Session::stream_bytes`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamBytes {
    /// Bytes the application wrote on the stream.
    pub sent: u64,
    /// Bytes of DATA the peer sent on it.
    pub received: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Handshaking,
    Established,
    Closed,
}

/// Peer parameters learned in the handshake.
#[derive(Debug, Clone)]
struct Peer {
    initial_window: u32,
    max_frame_payload: u32,
}

/// A probe PING sent because an OPEN went unanswered (see
/// [`Session::transmitted`]).
#[derive(Debug)]
struct Probe {
    /// Its sequence number.
    seq: u64,
    /// When it was queued.
    queued: Instant,
    /// [`Session::poll_transmit`] handed it to the writer.
    handed: bool,
    /// When the write that carried it was done.
    written: Option<Instant>,
}

/// Room for events, and for control frames, a session keeps between
/// messages (a message of many small frames may need more for a moment;
/// see [`Session::poll_event`]).
const EVENTS_KEPT: usize = 256;

/// One end of a tether session. See the crate docs for how to drive it.
#[derive(Debug)]
pub struct Session {
    role: Role,
    config: Config,
    state: State,
    peer: Option<Peer>,
    /// Boxed values: from an eighth to over half of a hash map's buckets
    /// are empty, and every bucket, full or not, costs the value's size (a
    /// `Stream` is about 180 bytes); boxed, an empty bucket costs a pointer.
    streams: HashMap<StreamId, Box<Stream>>,
    /// The pending opens by deadline: one entry per stream in
    /// `Phase::Opening`, so the timers look at the earliest, not at every
    /// stream (a session may carry tens of thousands).
    open_deadlines: BTreeSet<(Instant, StreamId)>,
    /// The half-closed streams by the earliest instant their linger can
    /// end (`Stream::linger_check`). An entry may be early, never late:
    /// activity since it was made moves the real end later, and the timer
    /// then looks again.
    linger_checks: BTreeSet<(Instant, StreamId)>,
    next_local_id: u32,
    highest_peer_id: u32,
    /// Streams the peer opened that are still alive (bounded by `max_peer_streams`).
    peer_streams: usize,
    control: VecDeque<Frame>,
    ready: VecDeque<StreamId>,
    /// The chunks of the DATA frame being built (empty between frames; kept
    /// for its allocation).
    gather: Vec<Bytes>,
    events: VecDeque<Event>,
    handshake_deadline: Option<Instant>,
    last_recv: Instant,
    /// A probe PING for an unanswered OPEN, while it is out.
    probe: Option<Probe>,
    next_ping: Instant,
    ping_seq: u64,
    ping_sent_at: Option<(u64, Instant)>,
    rtt: Option<Duration>,
    /// When `rtt` was sampled.
    rtt_at: Option<Instant>,
    /// Negotiated protocol version (0 before the handshake).
    version: u16,
    goaway_sent: bool,
    goaway_received: bool,
    /// The GOAWAY codes received so far (a bit each: normal, replaced,
    /// leaving), so that each makes one event.
    goaway_codes_received: u8,
    drain_deadline: Option<Instant>,
    /// The catalog to announce once the session speaks version 3.
    catalog: Option<Vec<CatalogEntry>>,
    /// The replica list to announce (version 4 and up).
    replicas: Option<Replicas>,
    /// Bytes queued on all streams and not yet framed.
    queued_total: usize,
    /// The receive windows of the streams auto-tuning has grown past
    /// `initial_window`, added up (what `max_session_window` bounds).
    grown_windows: u64,
    /// Some writer was refused because the session's send buffer was full;
    /// wake the blocked streams when it has drained to half.
    session_send_blocked: bool,
    /// The streams whose writer was refused room, in id order: told when
    /// room returns, and what a drained session buffer wakes without
    /// visiting every stream.
    blocked_writers: BTreeSet<StreamId>,
}

impl Session {
    /// A new session. An initiator queues its HELLO at once.
    pub fn new(role: Role, config: Config, now: Instant) -> Session {
        let mut s = Session {
            role,
            state: State::Handshaking,
            peer: None,
            streams: HashMap::default(),
            open_deadlines: BTreeSet::new(),
            linger_checks: BTreeSet::new(),
            next_local_id: match role {
                Role::Initiator => 1,
                Role::Acceptor => 2,
            },
            highest_peer_id: 0,
            peer_streams: 0,
            control: VecDeque::new(),
            ready: VecDeque::new(),
            gather: Vec::new(),
            events: VecDeque::new(),
            handshake_deadline: Some(now + config.handshake_timeout),
            last_recv: now,
            probe: None,
            next_ping: now + config.ping_interval,
            ping_seq: 0,
            ping_sent_at: None,
            rtt: None,
            rtt_at: None,
            version: 0,
            goaway_sent: false,
            goaway_received: false,
            goaway_codes_received: 0,
            drain_deadline: None,
            catalog: None,
            replicas: None,
            queued_total: 0,
            grown_windows: 0,
            session_send_blocked: false,
            blocked_writers: BTreeSet::new(),
            config,
        };
        if role == Role::Initiator {
            let hello = s.our_hello(MIN_PROTOCOL_VERSION, PROTOCOL_VERSION);
            s.control.push_back(Frame::Hello(hello));
        }
        s
    }

    fn our_hello(&self, min_version: u16, max_version: u16) -> Hello {
        Hello {
            min_version,
            max_version,
            capabilities: 0,
            initial_window: self.config.initial_window,
            max_frame_payload: self.config.max_frame_payload,
            software: self.config.software.clone(),
        }
    }

    /// The negotiated protocol version (0 before the handshake).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// This session's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The handshake finished and the session is not closed.
    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// The session is over.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// GOAWAY was sent or received: no new streams.
    pub fn is_draining(&self) -> bool {
        self.goaway_sent || self.goaway_received
    }

    /// Current stream counters, read off the session's tables without
    /// visiting each stream (a server asks on every open, to pick the least
    /// loaded session).
    pub fn stats(&self) -> StreamStats {
        StreamStats {
            live: self.streams.len(),
            // Every stream in `Phase::Opening` has its entry there.
            pending_opens: self.open_deadlines.len(),
            blocked: self.blocked_writers.len(),
            queued_bytes: self.queued_total,
        }
    }

    // ------------------------------------------------------------------
    // Input
    // ------------------------------------------------------------------

    /// Feeds one message received from the peer (whole frames only).
    ///
    /// On `Err` the session is closed: flush [`Session::poll_transmit`] (it
    /// holds a GOAWAY telling the peer why) and close the transport.
    pub fn handle_input(&mut self, mut msg: Bytes, now: Instant) -> Result<(), SessionError> {
        if self.state == State::Closed {
            return Ok(());
        }
        self.last_recv = now;
        loop {
            let frame = match Frame::decode(&mut msg, self.config.max_frame_payload as usize) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let err = match e {
                        FrameError::TooLarge { .. } => SessionError::FrameTooLarge(e.to_string()),
                        _ => SessionError::Protocol(e.to_string()),
                    };
                    return Err(self.fail(err));
                }
            };
            self.handle_frame(frame, now)?;
            if self.state == State::Closed {
                return Ok(());
            }
        }
    }

    fn handle_frame(&mut self, frame: Frame, now: Instant) -> Result<(), SessionError> {
        if self.control.len() >= MAX_QUEUED_CONTROL {
            // The peer keeps provoking answers (PONG, RST) but does not read them.
            return Err(self.fail(SessionError::Protocol(format!(
                "{MAX_QUEUED_CONTROL} control frames queued: the peer is not reading"
            ))));
        }
        if self.state == State::Handshaking {
            return self.handle_handshake(frame, now);
        }
        match frame {
            Frame::Hello(_) | Frame::HelloAck(_) => {
                Err(self.fail(SessionError::Protocol("HELLO after handshake".into())))
            }
            Frame::Ping(v) => {
                self.control.push_back(Frame::Pong(v));
                Ok(())
            }
            Frame::Pong(v) => {
                if let Some((seq, at)) = self.ping_sent_at {
                    if seq == v {
                        let rtt = now.saturating_duration_since(at);
                        self.rtt = Some(rtt);
                        self.rtt_at = Some(now);
                        self.events.push_back(Event::Rtt(rtt));
                        self.ping_sent_at = None;
                    }
                }
                Ok(())
            }
            Frame::GoAway { code, reason } => {
                self.goaway_received = true;
                if !matches!(
                    code,
                    ErrorCode::Normal | ErrorCode::Replaced | ErrorCode::Leaving
                ) {
                    // An error GOAWAY: the peer is about to close the transport.
                    let err = SessionError::Peer { code, reason };
                    self.close_now(Some(err.clone()), false);
                    return Err(err);
                }
                // A code already received says nothing new: no event (and no
                // log line per frame for a peer that repeats it, or
                // alternates codes): at most one event per code.
                let bit = match code {
                    ErrorCode::Normal => 1,
                    ErrorCode::Replaced => 2,
                    _ => 4,
                };
                if self.goaway_codes_received & bit == 0 {
                    self.goaway_codes_received |= bit;
                    self.events.push_back(Event::GoAway { code, reason });
                }
                self.maybe_finish_drain();
                Ok(())
            }
            Frame::Catalog(entries) => {
                if self.version < CATALOG_VERSION {
                    return Err(self.fail(SessionError::Protocol(format!(
                        "CATALOG needs protocol version {CATALOG_VERSION}, this session speaks {}",
                        self.version
                    ))));
                }
                self.events.push_back(Event::Catalog(entries));
                Ok(())
            }
            Frame::Replicas(replicas) => {
                if self.version < REPLICAS_VERSION {
                    return Err(self.fail(SessionError::Protocol(format!(
                        "REPLICAS needs protocol version {REPLICAS_VERSION}, this session speaks {}",
                        self.version
                    ))));
                }
                self.events.push_back(Event::Replicas(replicas));
                Ok(())
            }
            Frame::Heartbeat(h) => {
                if self.version < HEARTBEAT_VERSION {
                    return Err(self.fail(SessionError::Protocol(format!(
                        "HEARTBEAT needs protocol version {HEARTBEAT_VERSION}, this session speaks {}",
                        self.version
                    ))));
                }
                if self.role == Role::Acceptor {
                    return Err(self.fail(SessionError::Protocol(
                        "HEARTBEAT from the initiator (only the acceptor sends it)".into(),
                    )));
                }
                self.take_heartbeat(h, now);
                Ok(())
            }
            Frame::Open { id, target } => self.handle_open(id, target, now),
            Frame::OpenOk { id } => {
                match self.streams.get_mut(&id) {
                    Some(s) if s.phase == Phase::Opening => {
                        s.phase = Phase::Open;
                        if let Some(d) = s.open_deadline.take() {
                            self.open_deadlines.remove(&(d, id));
                        }
                        s.last_activity = now;
                        // Early data held back for a pre-5 peer goes now.
                        if !s.send_queue.is_empty() && !s.in_ready {
                            s.in_ready = true;
                            self.ready.push_back(id);
                        }
                        self.events.push_back(Event::Opened { id });
                    }
                    Some(_) => self.reset_stream(
                        id,
                        ResetCode::ProtocolError,
                        "OPEN_OK for a stream that is not opening",
                        now,
                    ),
                    None => self.unknown_stream(id),
                }
                Ok(())
            }
            Frame::OpenErr { id, code, reason } => {
                match self.streams.get(&id) {
                    Some(s) if s.phase == Phase::Opening => {
                        self.events
                            .push_back(Event::OpenFailed { id, code, reason });
                        self.remove_stream(id);
                    }
                    Some(_) => self.reset_stream(
                        id,
                        ResetCode::ProtocolError,
                        "OPEN_ERR for a stream that is not opening",
                        now,
                    ),
                    None => {} // late answer to an open we gave up on; we already sent RST
                }
                Ok(())
            }
            Frame::Data { id, payload } => {
                self.handle_data(id, payload, now);
                Ok(())
            }
            Frame::Fin { id } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    self.unknown_stream(id);
                    return Ok(());
                };
                if !receives_in(s.phase, self.version) {
                    self.reset_stream(id, ResetCode::ProtocolError, "FIN before OPEN", now);
                } else if s.fin_received {
                    self.reset_stream(id, ResetCode::StreamClosed, "second FIN", now);
                } else {
                    s.fin_received = true;
                    s.last_activity = now;
                    Self::arm_linger(&mut self.linger_checks, s, id, self.config.linger);
                    self.events.push_back(Event::Finished { id });
                    self.maybe_remove(id);
                }
                Ok(())
            }
            Frame::Rst { id, code, reason } => {
                if let Some(s) = self.streams.get(&id) {
                    if s.phase == Phase::Opening {
                        // A reset in answer to our OPEN is a refusal.
                        self.events.push_back(Event::OpenFailed {
                            id,
                            code: OpenErrorCode::Internal,
                            reason: format!("reset: {code}: {reason}"),
                        });
                    } else {
                        self.events.push_back(Event::Reset {
                            id,
                            code,
                            reason,
                            remote: true,
                        });
                    }
                    self.remove_stream(id);
                }
                // Never answer an RST with an RST.
                Ok(())
            }
            Frame::WindowUpdate { id, increment } => {
                let Some(s) = self.streams.get_mut(&id) else {
                    self.unknown_stream(id);
                    return Ok(());
                };
                let new_credit = s.send_credit + u64::from(increment);
                // Credit of 2^31 or more means the peer's arithmetic is broken.
                if new_credit > u64::from(MAX_PEER_WINDOW) {
                    self.reset_stream(id, ResetCode::FlowControl, "window overflow", now);
                    return Ok(());
                }
                s.send_credit = new_credit;
                s.last_activity = now;
                self.wake_if_writable(id);
                Ok(())
            }
        }
    }

    fn handle_handshake(&mut self, frame: Frame, now: Instant) -> Result<(), SessionError> {
        match (self.role, frame) {
            (Role::Acceptor, Frame::Hello(h)) => {
                // The highest version both speak.
                let chosen = h.max_version.min(PROTOCOL_VERSION);
                if chosen < h.min_version.max(MIN_PROTOCOL_VERSION) {
                    return Err(self.fail(SessionError::VersionMismatch(format!(
                        "this side speaks versions {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}, the peer {}..={}",
                        h.min_version, h.max_version
                    ))));
                }
                self.learn_peer(&h)?;
                let ack = self.our_hello(chosen, chosen);
                self.control.push_back(Frame::HelloAck(ack));
                self.establish(chosen, h.software, now);
                Ok(())
            }
            (Role::Initiator, Frame::HelloAck(h)) => {
                let v = h.min_version;
                if v != h.max_version || !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v) {
                    return Err(self.fail(SessionError::VersionMismatch(format!(
                        "peer chose version {}..={}, this side speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}",
                        h.min_version, h.max_version
                    ))));
                }
                self.learn_peer(&h)?;
                self.establish(v, h.software, now);
                Ok(())
            }
            (_, Frame::GoAway { code, reason }) => {
                // E.g. the acceptor refusing our versions.
                let err = SessionError::Peer { code, reason };
                self.close_now(Some(err.clone()), false);
                Err(err)
            }
            (_, other) => {
                let what = crate::frame::type_name(other.frame_type());
                Err(self.fail(SessionError::Protocol(format!(
                    "{what} received before the handshake finished"
                ))))
            }
        }
    }

    fn learn_peer(&mut self, h: &Hello) -> Result<(), SessionError> {
        if h.initial_window < MIN_PEER_WINDOW
            || h.initial_window > MAX_PEER_WINDOW
            || h.max_frame_payload < MIN_PEER_FRAME
        {
            return Err(self.fail(SessionError::Protocol(format!(
                "peer limits out of range: window {} ({MIN_PEER_WINDOW}..={MAX_PEER_WINDOW}), frame {} (min {MIN_PEER_FRAME})",
                h.initial_window, h.max_frame_payload
            ))));
        }
        self.peer = Some(Peer {
            initial_window: h.initial_window,
            max_frame_payload: h.max_frame_payload,
        });
        Ok(())
    }

    fn establish(&mut self, version: u16, peer_software: String, now: Instant) {
        self.version = version;
        self.state = State::Established;
        self.handshake_deadline = None;
        // Ping at once: the first RTT sample drives window auto-tuning.
        self.next_ping = now;
        self.events.push_back(Event::Established {
            version,
            peer_software,
        });
        if version >= CATALOG_VERSION {
            if let Some(c) = &self.catalog {
                self.control
                    .push_back(Frame::Catalog(catalog_for(c, version)));
            }
        }
        if version >= REPLICAS_VERSION {
            if let Some(r) = &self.replicas {
                self.control.push_back(Frame::Replicas(r.clone()));
            }
        }
        if self.role == Role::Acceptor && version >= HEARTBEAT_VERSION {
            let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
            let asked = Heartbeat {
                ping_interval_ms: millis(self.config.ping_interval),
                idle_timeout_ms: millis(self.config.idle_timeout),
            };
            // A config the peer would have to refuse is kept to ourselves
            // (the operator's config check names it).
            if asked.check().is_ok() {
                self.control.push_back(Frame::Heartbeat(asked));
            }
        }
    }

    /// An initiator's answer to the acceptor's HEARTBEAT: its values become
    /// ours, or, when our operator set our own, we only ping at least as
    /// often as the acceptor's idle timeout needs.
    fn take_heartbeat(&mut self, h: Heartbeat, now: Instant) {
        let interval = Duration::from_millis(h.ping_interval_ms.into());
        if self.config.adopt_peer_heartbeat {
            self.config.ping_interval = interval;
            self.config.idle_timeout = Duration::from_millis(h.idle_timeout_ms.into());
        } else {
            self.config.ping_interval = self.config.ping_interval.min(interval);
        }
        self.next_ping = self.next_ping.min(now + self.config.ping_interval);
        self.events.push_back(Event::Heartbeat {
            ping_interval: self.config.ping_interval,
            idle_timeout: self.config.idle_timeout,
        });
    }

    /// Announces the server replicas this side knows of (a REPLICAS frame,
    /// version 4), replacing any earlier announcement. Before the handshake
    /// it is kept and sent on establishment; with an older peer it is never
    /// sent.
    pub fn announce_replicas(&mut self, replicas: Replicas) {
        if self.state == State::Established && self.version >= REPLICAS_VERSION {
            self.control.push_back(Frame::Replicas(replicas.clone()));
        }
        self.replicas = Some(replicas);
    }

    /// Announces the services this side offers (a CATALOG frame, version 3),
    /// replacing any earlier announcement. Before the handshake it is kept
    /// and sent on establishment; with a version 1 or 2 peer it is never sent,
    /// and a peer older than version 6 is told kinds it knows
    /// ([`crate::frame::ServiceKind::for_version`]).
    pub fn announce_catalog(&mut self, entries: Vec<CatalogEntry>) {
        if self.state == State::Established && self.version >= CATALOG_VERSION {
            self.control
                .push_back(Frame::Catalog(catalog_for(&entries, self.version)));
        }
        self.catalog = Some(entries);
    }

    fn peer_parity(&self, id: StreamId) -> bool {
        let peer_odd = self.role == Role::Acceptor;
        (id.0 % 2 == 1) == peer_odd
    }

    fn handle_open(
        &mut self,
        id: StreamId,
        target: Target,
        now: Instant,
    ) -> Result<(), SessionError> {
        if !self.peer_parity(id) || id.0 <= self.highest_peer_id {
            return Err(self.fail(SessionError::Protocol(format!(
                "OPEN with stream id {id} (wrong parity or reused)"
            ))));
        }
        self.highest_peer_id = id.0;
        let refuse: Option<(OpenErrorCode, std::borrow::Cow<'static, str>)> =
            if !self.config.accept_opens {
                Some((
                    OpenErrorCode::NotAccepted,
                    "this side does not accept streams".into(),
                ))
            } else if self.goaway_sent {
                Some((OpenErrorCode::GoingAway, "session is draining".into()))
            } else if self.goaway_received {
                // Neither side opens after a GOAWAY (PROTOCOL.md 10), the one
                // that sent it included.
                Some((
                    OpenErrorCode::GoingAway,
                    "you sent GOAWAY: no new streams".into(),
                ))
            } else if matches!(target.kind, TargetKind::Other(_)) {
                Some((OpenErrorCode::BadTarget, "unknown stream kind".into()))
            } else if self.peer_streams >= self.config.max_peer_streams {
                // The number, and that it is this session's (shared by every
                // client whose streams it carries).
                Some((
                    OpenErrorCode::TooManyStreams,
                    format!(
                        "this session already carries {} streams, its limit",
                        self.config.max_peer_streams
                    )
                    .into(),
                ))
            } else if target.kind == TargetKind::Udp && self.version < UDP_VERSION {
                Some((
                    OpenErrorCode::BadTarget,
                    "UDP streams need protocol version 2".into(),
                ))
            } else {
                None
            };
        if let Some((code, reason)) = refuse {
            self.control.push_back(Frame::OpenErr {
                id,
                code,
                reason: reason.into(),
            });
            return Ok(());
        }
        let (send, recv) = self.windows();
        self.streams.insert(
            id,
            Box::new(Stream::new(Phase::PendingAccept, send, recv, now)),
        );
        self.peer_streams += 1;
        self.events.push_back(Event::IncomingOpen { id, target });
        Ok(())
    }

    fn windows(&self) -> (u32, u32) {
        let send = self.peer.as_ref().map_or(0, |p| p.initial_window);
        (send, self.config.initial_window)
    }

    fn handle_data(&mut self, id: StreamId, payload: Bytes, now: Instant) {
        let Some(s) = self.streams.get_mut(&id) else {
            self.unknown_stream(id);
            return;
        };
        if !receives_in(s.phase, self.version) {
            self.reset_stream(
                id,
                ResetCode::ProtocolError,
                "DATA before the stream was open",
                now,
            );
            return;
        }
        if s.fin_received {
            self.reset_stream(id, ResetCode::StreamClosed, "DATA after FIN", now);
            return;
        }
        let len = payload.len() as u64;
        if s.phase == Phase::PendingAccept && s.bytes_received + len > MAX_EARLY_DATA as u64 {
            // Held until the application answers: bounded far below the
            // window, so a peer's pending opens cannot park much here.
            let reason = format!("more than {MAX_EARLY_DATA} bytes of early data");
            self.reset_stream(id, ResetCode::FlowControl, &reason, now);
            return;
        }
        if len > s.recv_remaining {
            let reason = format!(
                "{len} bytes of DATA with only {} bytes of window left",
                s.recv_remaining
            );
            self.reset_stream(id, ResetCode::FlowControl, &reason, now);
            return;
        }
        s.recv_remaining -= len;
        s.bytes_received += len;
        s.last_activity = now;
        if !payload.is_empty() {
            self.events.push_back(Event::Data { id, data: payload });
        }
    }

    /// A frame names a stream we do not have. Late frames for streams we
    /// closed are normal and dropped; a stream that never existed gets one
    /// RST and no state.
    fn unknown_stream(&mut self, id: StreamId) {
        let known_before = if self.peer_parity(id) {
            id.0 <= self.highest_peer_id
        } else {
            id.0 < self.next_local_id
        };
        if !known_before {
            self.control.push_back(Frame::Rst {
                id,
                code: ResetCode::UnknownStream,
                reason: format!("no stream {id} on this session"),
            });
        }
    }

    // ------------------------------------------------------------------
    // Application calls
    // ------------------------------------------------------------------

    /// Starts opening a stream to `target`. The answer comes as
    /// [`Event::Opened`] or [`Event::OpenFailed`].
    pub fn open(&mut self, target: Target, now: Instant) -> Result<StreamId, OpenError> {
        self.open_with(target, Bytes::new(), now)
    }

    /// Like [`Session::open`], with the stream's first bytes (at most
    /// [`MAX_EARLY_DATA`]). With a version 5 peer they follow the OPEN at
    /// once, before its answer (early data: the connection's first round
    /// trip overlaps the peer's dial); with an older peer they wait for
    /// OPEN_OK. A refusal means the peer's application never saw them.
    ///
    /// Early data bypasses the send buffers' limits (it is at most
    /// [`MAX_EARLY_DATA`] per stream being opened, so bounded by the number
    /// of streams) but is charged to the stream's credit like any DATA.
    pub fn open_with(
        &mut self,
        target: Target,
        early: Bytes,
        now: Instant,
    ) -> Result<StreamId, OpenError> {
        if early.len() > MAX_EARLY_DATA {
            return Err(OpenError::EarlyDataTooLarge(early.len()));
        }
        match self.state {
            State::Handshaking => return Err(OpenError::NotEstablished),
            State::Closed => return Err(OpenError::Closed),
            State::Established => {}
        }
        if self.is_draining() {
            return Err(OpenError::GoingAway);
        }
        if target.address.is_empty() {
            return Err(OpenError::BadTarget("empty address"));
        }
        if target.kind == TargetKind::Udp && self.version < UDP_VERSION {
            return Err(OpenError::BadTarget(
                "the peer speaks protocol version 1: no UDP",
            ));
        }
        if target.address.len() > crate::frame::MAX_TARGET_LEN {
            return Err(OpenError::BadTarget("address too long"));
        }
        if self.next_local_id > u32::MAX - 2 {
            return Err(OpenError::IdsExhausted);
        }
        let id = StreamId(self.next_local_id);
        self.next_local_id += 2;
        let (send, recv) = self.windows();
        let mut s = Box::new(Stream::new(Phase::Opening, send, recv, now));
        let deadline = now + self.config.open_timeout;
        s.open_deadline = Some(deadline);
        self.open_deadlines.insert((deadline, id));
        if !early.is_empty() {
            // early.len() <= MIN_PEER_WINDOW <= the peer's initial window.
            self.queued_total += s.enqueue(early);
            if self.version >= EARLY_DATA_VERSION {
                // Framed after the OPEN: control frames go first.
                s.in_ready = true;
                self.ready.push_back(id);
            }
        }
        self.streams.insert(id, s);
        self.control.push_back(Frame::Open { id, target });
        Ok(id)
    }

    /// Accepts a stream announced by [`Event::IncomingOpen`] (sends OPEN_OK).
    pub fn accept(&mut self, id: StreamId, now: Instant) -> Result<(), WriteError> {
        let s = self.streams.get_mut(&id).ok_or(WriteError::UnknownStream)?;
        if s.phase != Phase::PendingAccept {
            return Err(WriteError::NotOpen);
        }
        s.phase = Phase::Open;
        s.last_activity = now;
        self.control.push_back(Frame::OpenOk { id });
        Ok(())
    }

    /// Refuses a stream announced by [`Event::IncomingOpen`] (sends OPEN_ERR).
    pub fn reject(&mut self, id: StreamId, code: OpenErrorCode, reason: &str) {
        if matches!(self.streams.get(&id), Some(s) if s.phase == Phase::PendingAccept) {
            self.control.push_back(Frame::OpenErr {
                id,
                code,
                reason: clip_reason(reason).to_owned(),
            });
            self.remove_stream(id);
        }
    }

    /// Bytes the stream may send right now: the peer's credit, capped by
    /// the local send buffers (per stream and per session).
    pub fn send_capacity(&self, id: StreamId) -> usize {
        self.streams
            .get(&id)
            .filter(|s| s.phase == Phase::Open && !s.fin_queued)
            .map_or(0, |s| self.room_for(s))
    }

    /// How many bytes one more chunk of `s` may carry now: the least of its
    /// credit, its own send buffer and the session's send buffer (the
    /// buffers less the chunk's [`CHUNK_COST`]).
    fn room_for(&self, s: &Stream) -> usize {
        let credit = s.send_credit.min(usize::MAX as u64) as usize;
        let own = self
            .config
            .max_stream_send_buffer
            .saturating_sub(s.queued)
            .saturating_sub(CHUNK_COST);
        credit.min(own).min(self.session_room())
    }

    /// Bytes one more chunk may carry within the session's send buffer.
    fn session_room(&self) -> usize {
        self.config
            .max_session_send_buffer
            .saturating_sub(self.queued_total)
            .saturating_sub(CHUNK_COST)
    }

    /// Queues as much of `data` as the stream's credit and the local send
    /// buffers allow, and returns how many bytes were taken. When fewer than
    /// all were taken, an [`Event::Writable`] follows once there is room
    /// again (the peer granted credit, or queued data went out).
    pub fn stream_write(&mut self, id: StreamId, mut data: Bytes) -> Result<usize, WriteError> {
        let s = self.streams.get(&id).ok_or(WriteError::UnknownStream)?;
        if s.phase != Phase::Open {
            return Err(WriteError::NotOpen);
        }
        if s.fin_queued {
            return Err(WriteError::Finished);
        }
        let room = self.room_for(s);
        // The session's buffer, not this stream's credit or queue, is what
        // refused the rest: remember to wake this writer when it drains.
        let session_limited = self.session_room() == room;
        let take = data.len().min(room);
        let Some(s) = self.streams.get_mut(&id) else {
            return Err(WriteError::UnknownStream);
        };
        if take < data.len() {
            self.blocked_writers.insert(id);
            self.session_send_blocked |= session_limited;
        }
        if take == 0 {
            return Ok(0);
        }
        self.queued_total += s.enqueue(data.split_to(take));
        if !s.in_ready {
            s.in_ready = true;
            self.ready.push_back(id);
        }
        Ok(take)
    }

    /// Tells a blocked writer that its stream has room again. Waits until
    /// its own queue has drained to half, so that writers are woken per
    /// batch, not per frame.
    fn wake_if_writable(&mut self, id: StreamId) {
        let half = self.config.max_stream_send_buffer / 2;
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        if !self.blocked_writers.contains(&id) || s.queued > half {
            return;
        }
        if self.room_for(s) > 0 {
            self.blocked_writers.remove(&id);
            self.events.push_back(Event::Writable { id });
        } else if s.send_credit > 0 {
            // Credit came back but the session's buffer is full: this
            // writer now waits for the session to drain.
            self.session_send_blocked = true;
        }
    }

    /// Once the session's send buffer has drained to half, wakes every
    /// writer that was refused for lack of room in it.
    fn wake_session_blocked(&mut self) {
        if !self.session_send_blocked || self.queued_total > self.config.max_session_send_buffer / 2
        {
            return;
        }
        self.session_send_blocked = false;
        let ids: Vec<StreamId> = self.blocked_writers.iter().copied().collect();
        for id in ids {
            self.wake_if_writable(id);
        }
    }

    /// Half-closes the sending direction at `now`: a FIN follows the queued
    /// data. The half-close is activity: the linger counts from it, not
    /// from the stream's last data (a stream idle for longer than `linger`
    /// would otherwise be reset the moment it is half-closed, its FIN and
    /// the other direction's answer lost).
    pub fn stream_finish(&mut self, id: StreamId, now: Instant) -> Result<(), WriteError> {
        let s = self.streams.get_mut(&id).ok_or(WriteError::UnknownStream)?;
        if s.phase != Phase::Open {
            return Err(WriteError::NotOpen);
        }
        if s.fin_queued {
            return Ok(());
        }
        s.fin_queued = true;
        s.last_activity = now;
        Self::arm_linger(&mut self.linger_checks, s, id, self.config.linger);
        if !s.in_ready {
            s.in_ready = true;
            self.ready.push_back(id);
        }
        Ok(())
    }

    /// Aborts a stream in both directions (sends RST, drops queued data).
    /// Also cancels a pending open. Unknown ids are ignored.
    pub fn stream_reset(&mut self, id: StreamId, code: ResetCode, reason: &str) {
        if self.streams.contains_key(&id) {
            self.control.push_back(Frame::Rst {
                id,
                code,
                reason: clip_reason(reason).to_owned(),
            });
            self.remove_stream(id);
        }
    }

    /// The application is done with the stream. A stream finished both ways
    /// (FIN queued and FIN received) is left to flush its last DATA and FIN;
    /// anything else is reset with `code`.
    pub fn stream_release(&mut self, id: StreamId, code: ResetCode, reason: &str) {
        match self.streams.get(&id) {
            Some(s) if s.fin_queued && s.fin_received => {}
            Some(_) => self.stream_reset(id, code, reason),
            None => {}
        }
    }

    /// The application delivered `n` bytes of this stream's Data; grant the
    /// peer that much more credit (batched into WINDOW_UPDATE frames).
    ///
    /// Window auto-tuning: when a stream's reader consumes a quarter of its
    /// window in less than two round trips, the window (not the credit
    /// already granted) is the bottleneck, so it doubles, up to
    /// `max_window`. A stalled reader consumes nothing and never grows.
    pub fn stream_consumed(&mut self, id: StreamId, n: usize, now: Instant) {
        let rtt = self.rtt;
        let initial = self.config.initial_window;
        let max_window = self.config.max_window.max(initial);
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.fin_received {
            return; // nothing more will come; no credit needed
        }
        s.recv_unacked += n as u64;
        let threshold = u64::from(s.recv_window / 4).max(1);
        if s.recv_unacked < threshold {
            return;
        }
        let mut extra = 0u32;
        if let (Some(rtt), Some(last)) = (rtt, s.last_update_at) {
            if now.saturating_duration_since(last) < rtt * 2 && s.recv_window < max_window {
                // A stream still at its initial window joins the grown ones
                // with its whole window.
                let counted = if s.recv_window > initial {
                    0
                } else {
                    u64::from(s.recv_window)
                };
                let budget_left = self
                    .config
                    .max_session_window
                    .saturating_sub(self.grown_windows + counted);
                let grown = u64::from(s.recv_window.saturating_mul(2).min(max_window))
                    .min(u64::from(s.recv_window) + budget_left) as u32;
                extra = grown - s.recv_window;
                if extra > 0 {
                    self.grown_windows += counted + u64::from(extra);
                }
                s.recv_window = grown;
            }
        }
        s.last_update_at = Some(now);
        let inc = (s.recv_unacked + u64::from(extra)).min(u64::from(MAX_PEER_WINDOW)) as u32;
        s.recv_unacked = 0;
        s.recv_remaining += u64::from(inc);
        self.control
            .push_back(Frame::WindowUpdate { id, increment: inc });
    }

    /// Bytes of this stream received and not yet reported consumed with
    /// [`Session::stream_consumed`] (0 for unknown streams).
    pub fn stream_unread(&self, id: StreamId) -> usize {
        self.streams.get(&id).map_or(0, |s| {
            let granted_unused = s.recv_remaining + s.recv_unacked;
            u64::from(s.recv_window).saturating_sub(granted_unused) as usize
        })
    }

    /// Bytes written on this stream by the application and received from
    /// the peer so far, while the session keeps the stream (`None` once it
    /// is gone).
    pub fn stream_bytes(&self, id: StreamId) -> Option<StreamBytes> {
        self.streams.get(&id).map(|s| StreamBytes {
            sent: s.bytes_sent,
            received: s.bytes_received,
        })
    }

    /// The latest round-trip time measured with PING / PONG.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// Starts a graceful drain: GOAWAY goes out, new opens from the peer are
    /// refused, and remaining streams get `drain_timeout` to finish.
    pub fn go_away(&mut self, code: ErrorCode, reason: &str, now: Instant) {
        if self.state == State::Closed || self.goaway_sent {
            return;
        }
        self.goaway_sent = true;
        self.control.push_back(Frame::GoAway {
            code,
            reason: clip_reason(reason).to_owned(),
        });
        self.drain_deadline = Some(now + self.config.drain_timeout);
        self.maybe_finish_drain();
    }

    /// Closes the session at once with an error GOAWAY; every stream is reset.
    pub fn close(&mut self, code: ErrorCode, reason: &str) {
        if self.state == State::Closed {
            return;
        }
        let err = SessionError::Local {
            code,
            reason: reason.to_owned(),
        };
        self.close_now(Some(err), true);
    }

    /// The transport under the session broke: fail everything, send nothing.
    pub fn transport_lost(&mut self, reason: &str) {
        if self.state != State::Closed {
            self.close_now(Some(SessionError::Transport(reason.to_owned())), false);
        }
    }

    // ------------------------------------------------------------------
    // Output
    // ------------------------------------------------------------------

    /// Next thing that happened, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        let event = self.events.pop_front();
        if event.is_none() && self.events.capacity() > EVENTS_KEPT {
            // A message of many small frames left room for as many events;
            // give it back rather than keep it for the session's life.
            self.events = VecDeque::new();
        }
        event
    }

    /// Appends frames to send to `out`, control frames first, then DATA
    /// round-robin across streams, one frame of at most the peer's
    /// `max_frame_payload` per turn, until `out` holds at least `max_len`
    /// bytes or nothing is left.
    /// Returns whether anything was appended.
    pub fn poll_transmit(&mut self, out: &mut impl FrameBuf, max_len: usize) -> bool {
        self.poll_transmit_at(out, max_len, None)
    }

    /// Like [`Session::poll_transmit`], also recording `now` as activity on
    /// the streams whose data goes out (keeps a busy half-closed stream from
    /// lingering out).
    pub fn poll_transmit_at(
        &mut self,
        out: &mut impl FrameBuf,
        max_len: usize,
        now: Option<Instant>,
    ) -> bool {
        let start = out.len();
        while out.len() < max_len {
            let Some(f) = self.control.pop_front() else {
                break;
            };
            if let (Frame::Ping(seq), Some(probe)) = (&f, &mut self.probe) {
                probe.handed |= *seq == probe.seq;
            }
            out.push(f);
        }
        if !self.control.is_empty() {
            return true; // the rest of the control frames go in the next message
        }
        if self.control.capacity() > EVENTS_KEPT {
            // A message of many PINGs left room for as many PONGs: give it
            // back rather than keep it for the session's life.
            self.control = VecDeque::new();
        }
        // Established: the peer's HELLO came, with its frame limit (at
        // least MIN_PEER_FRAME, checked there).
        let peer = match &self.peer {
            Some(peer) if self.state == State::Established => peer,
            _ => return out.len() > start,
        };
        // Each turn's frame may fill the rest of the message: a bulk
        // stream's message is then one frame, which its receiver keeps as
        // a slice of a buffer of its own instead of copying it out (see
        // docs/PROTOCOL.md section 12). Fairness between streams is by
        // message: the next stream's turn starts the next one.
        let frame_max = peer.max_frame_payload as usize;
        while out.len() < max_len {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue; // removed while queued
            };
            if !s.send_queue.is_empty() {
                // One frame per turn, gathered from as many queued chunks as
                // fit: frames are cut by the message and the peer's limit,
                // never where the chunks (socket reads, relayed frames)
                // happened to end, so a relay passes full frames on.
                let room = (max_len - out.len()).saturating_sub(HEADER_LEN).max(1);
                let mut want = frame_max.min(room);
                let mut sent = 0;
                while want > 0 {
                    let Some(front) = s.send_queue.front_mut() else {
                        break;
                    };
                    let n = front.len().min(want);
                    self.gather.push(front.split_to(n));
                    want -= n;
                    sent += n;
                    if front.is_empty() {
                        s.send_queue.pop_front();
                        sent += CHUNK_COST;
                    }
                }
                s.queued -= sent;
                self.queued_total -= sent;
                if let Some(now) = now {
                    s.last_activity = now;
                }
                out.push_data(id, &mut self.gather);
                if self.gather.capacity() > GATHER_KEPT {
                    // A frame of many tiny chunks (a peer writing a byte at
                    // a time) leaves no large list behind.
                    self.gather = Vec::new();
                }
            }
            if s.send_queue.is_empty() && s.fin_queued && !s.fin_sent {
                s.fin_sent = true;
                if let Some(now) = now {
                    s.last_activity = now;
                }
                out.push(Frame::Fin { id });
            }
            if s.send_queue.is_empty() {
                s.in_ready = false;
                self.maybe_remove(id);
            } else {
                self.ready.push_back(id);
            }
            self.wake_if_writable(id);
        }
        self.wake_session_blocked();
        out.len() > start
    }

    /// How many streams have DATA (or a FIN) waiting to be sent. A stream
    /// reset while it waited still counts until its turn comes round.
    pub fn sending_streams(&self) -> usize {
        self.ready.len()
    }

    /// Marks stream `id` as relayed from another session (its bytes come
    /// from a session where they arrived in whole messages): see
    /// [`Session::batch_sends`]. Unknown ids are ignored.
    pub fn set_relayed(&mut self, id: StreamId) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.relayed = true;
        }
    }

    /// Whether a writer that just took a full message should take more for
    /// the same write (`docs/PROTOCOL.md` section 12): while two or more
    /// streams have data waiting (a multiplexed bulk transfer), or while the
    /// only one waiting is relayed ([`Session::set_relayed`]).
    pub fn batch_sends(&self) -> bool {
        self.sending_streams() >= 2
            || self
                .ready
                .front()
                .and_then(|id| self.streams.get(id))
                .is_some_and(|s| s.relayed)
    }

    /// Whether the writer should call [`Session::transmitted`] when the
    /// write it is about to make is done: a probe PING is in it.
    pub fn wants_transmit_notice(&self) -> bool {
        self.probe
            .as_ref()
            .is_some_and(|p| p.handed && p.written.is_none())
    }

    /// The writer finished writing what it took from
    /// [`Session::poll_transmit`] at `now`. A probe PING's answer is awaited
    /// from when it was written, not queued: our own backlog (a slow uplink
    /// full of uploads) must not pass for a silent peer.
    pub fn transmitted(&mut self, now: Instant) {
        if let Some(probe) = &mut self.probe {
            if probe.handed && probe.written.is_none() {
                probe.written = Some(now);
            }
        }
    }

    /// Whether [`Session::poll_transmit`] has anything to send.
    pub fn wants_transmit(&self) -> bool {
        !self.control.is_empty() || (self.state == State::Established && !self.ready.is_empty())
    }

    /// When a probe PING is due: `open_probe` after both the oldest OPEN
    /// still unanswered and the last thing heard from the peer (a frame
    /// that crossed the OPEN in flight proves nothing about what followed).
    /// The periodic PING, which also samples the RTT.
    fn send_ping(&mut self, now: Instant) {
        self.ping_seq += 1;
        self.control.push_back(Frame::Ping(self.ping_seq));
        if self.ping_sent_at.is_none() {
            self.ping_sent_at = Some((self.ping_seq, now));
        }
        self.next_ping = now + self.config.ping_interval;
    }

    /// When the acceptor may put its periodic PING off to (`None`: send it
    /// now). A server holds thousands of idle agent sessions whose agents
    /// ping it every interval; answering those is proof of life both ways,
    /// so while the peer's frames keep arriving, no stream is open and the
    /// last RTT sample is younger than [`RTT_REFRESH`], the acceptor waits
    /// until the peer has been silent for one and a half intervals. That halves the
    /// heartbeat messages a server sends and reads. Liveness is unchanged:
    /// it rests on `idle_timeout` since the last inbound frame.
    fn ping_can_wait(&self, now: Instant) -> Option<Instant> {
        if self.role != Role::Acceptor || !self.streams.is_empty() {
            return None;
        }
        let refresh = RTT_REFRESH.max(self.config.ping_interval * RTT_REFRESH_INTERVALS);
        let fresh = self.rtt_at.is_some_and(|at| now < at + refresh);
        // Half an interval of slack: the peer's PING, sent every interval,
        // must not lose the race against this timer by its transit time.
        let quiet_until = self.last_recv + self.config.ping_interval * 3 / 2;
        (fresh && quiet_until > now).then_some(quiet_until)
    }

    fn probe_due(&self) -> Option<Instant> {
        // The oldest pending open: the one with the earliest deadline.
        self.open_deadlines
            .first()
            .map(|&(d, _)| d - self.config.open_timeout)
            .map(|sent| sent.max(self.last_recv) + self.config.open_probe)
    }

    /// The earliest instant at which [`Session::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        let mut t = self.last_recv + self.config.idle_timeout;
        let mut consider = |d: Option<Instant>| {
            if let Some(d) = d {
                t = t.min(d);
            }
        };
        consider(self.handshake_deadline);
        if self.state == State::Established {
            consider(Some(self.next_ping));
        }
        consider(self.drain_deadline);
        match &self.probe {
            // Not yet written: the writer's notice moves the deadline.
            Some(probe) => consider(probe.written.map(|w| w + self.config.open_probe)),
            None if self.state == State::Established => consider(self.probe_due()),
            None => {}
        }
        consider(self.open_deadlines.first().map(|&(d, _)| d));
        consider(self.linger_checks.first().map(|&(d, _)| d));
        Some(t)
    }

    /// Runs every timer that is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if let Some(d) = self.handshake_deadline {
            if now >= d {
                self.fail(SessionError::Timeout(self.config.handshake_timeout));
                return;
            }
        }
        if now >= self.last_recv + self.config.idle_timeout {
            self.fail(SessionError::Timeout(self.config.idle_timeout));
            return;
        }
        if let Some(probe) = &self.probe {
            if self.last_recv >= probe.queued {
                self.probe = None;
            } else if probe
                .written
                .is_some_and(|w| now >= w + self.config.open_probe)
            {
                self.fail(SessionError::Timeout(
                    now.saturating_duration_since(self.last_recv),
                ));
                return;
            }
        }
        if self.state == State::Established
            && self.probe.is_none()
            && self.probe_due().is_some_and(|d| now >= d)
        {
            // An open waits and the peer has been silent since it was sent:
            // ask it for a sign of life now.
            self.ping_seq += 1;
            self.control.push_back(Frame::Ping(self.ping_seq));
            self.probe = Some(Probe {
                seq: self.ping_seq,
                queued: now,
                handed: false,
                written: None,
            });
        }
        if self.state == State::Established && now >= self.next_ping {
            if let Some(later) = self.ping_can_wait(now) {
                self.next_ping = later;
            } else {
                self.send_ping(now);
            }
        }
        let mut expired_opens = Vec::new();
        while let Some(&(d, id)) = self.open_deadlines.first() {
            if now < d {
                break;
            }
            self.open_deadlines.pop_first();
            expired_opens.push(id);
        }
        let mut lingering = Vec::new();
        while let Some(&(check, id)) = self.linger_checks.first() {
            if now < check {
                break;
            }
            self.linger_checks.pop_first();
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.linger_check = None;
            if s.open_deadline.is_some_and(|d| now >= d) {
                continue; // its open expired: it goes with those
            }
            let end = s.last_activity + self.config.linger;
            if now >= end {
                lingering.push(id);
            } else {
                // Active since this check was made: look again at the real end.
                s.linger_check = Some(end);
                self.linger_checks.insert((end, id));
            }
        }
        for id in expired_opens {
            let reason = format!(
                "no answer within {:?} (the open timeout)",
                self.config.open_timeout
            );
            self.control.push_back(Frame::Rst {
                id,
                code: ResetCode::Cancel,
                reason: reason.clone(),
            });
            self.events.push_back(Event::OpenFailed {
                id,
                code: OpenErrorCode::Timeout,
                reason,
            });
            self.remove_stream(id);
        }
        for id in lingering {
            let reason = format!("half-closed and idle for {:?}", self.config.linger);
            self.reset_stream(id, ResetCode::LingerTimeout, &reason, now);
        }
        if self.drain_deadline.is_some_and(|d| now >= d) {
            let ids: Vec<StreamId> = self.streams.keys().copied().collect();
            for id in ids {
                self.reset_stream(id, ResetCode::DrainTimeout, "drain deadline passed", now);
            }
            self.maybe_finish_drain();
        }
    }

    // ------------------------------------------------------------------
    // Internals
    // ------------------------------------------------------------------

    /// Resets a stream from this side: RST to the peer, Reset event locally.
    fn reset_stream(&mut self, id: StreamId, code: ResetCode, reason: &str, _now: Instant) {
        let Some(s) = self.streams.get(&id) else {
            return;
        };
        // An open of ours still waiting for its answer fails as an open
        // (its opener waits for that), with the reason, as an RST from the
        // peer does; `internal`, not `session_lost`: the session lives, and
        // the peer may have passed the early data on, so it is no case for
        // trying another session.
        let event = if s.phase == Phase::Opening {
            Event::OpenFailed {
                id,
                code: OpenErrorCode::Internal,
                reason: format!("reset: {code}: {reason}"),
            }
        } else {
            Event::Reset {
                id,
                code,
                reason: reason.to_owned(),
                remote: false,
            }
        };
        self.control.push_back(Frame::Rst {
            id,
            code,
            reason: clip_reason(reason).to_owned(),
        });
        self.events.push_back(event);
        self.remove_stream(id);
    }

    fn maybe_remove(&mut self, id: StreamId) {
        if self.streams.get(&id).is_some_and(|s| s.is_done()) {
            self.remove_stream(id);
        }
    }

    /// Puts a stream that just became half-closed among the linger checks
    /// (once: a second half-close finds its entry there, early or exact).
    fn arm_linger(
        checks: &mut BTreeSet<(Instant, StreamId)>,
        s: &mut Stream,
        id: StreamId,
        linger: Duration,
    ) {
        if s.linger_check.is_none() {
            let end = s.last_activity + linger;
            s.linger_check = Some(end);
            checks.insert((end, id));
        }
    }

    /// Takes a removed stream's entries out of the timer sets.
    fn forget_deadlines(&mut self, id: StreamId, s: &Stream) {
        if let Some(d) = s.open_deadline {
            self.open_deadlines.remove(&(d, id));
        }
        if let Some(check) = s.linger_check {
            self.linger_checks.remove(&(check, id));
        }
    }

    fn remove_stream(&mut self, id: StreamId) {
        if let Some(s) = self.streams.remove(&id) {
            self.forget_deadlines(id, &s);
            self.blocked_writers.remove(&id);
            if s.recv_window > self.config.initial_window {
                debug_assert!(self.grown_windows >= u64::from(s.recv_window));
                self.grown_windows = self.grown_windows.saturating_sub(u64::from(s.recv_window));
            }
            self.queued_total -= s.queued;
            self.wake_session_blocked();
            if self.peer_parity(id) {
                self.peer_streams -= 1;
            }
            self.events.push_back(Event::Closed { id });
            self.maybe_finish_drain();
        }
    }

    fn maybe_finish_drain(&mut self) {
        if self.goaway_sent && self.streams.is_empty() && self.state != State::Closed {
            self.close_now(None, false);
        }
    }

    /// A fatal error: tell the peer why, then close.
    fn fail(&mut self, err: SessionError) -> SessionError {
        self.close_now(Some(err.clone()), true);
        err
    }

    fn close_now(&mut self, error: Option<SessionError>, send_goaway: bool) {
        if let (Some(err), true) = (&error, send_goaway) {
            self.control.push_back(Frame::GoAway {
                code: err.goaway_code(),
                reason: err.to_string(),
            });
        }
        let reason = error
            .as_ref()
            .map_or_else(|| "session closed".to_owned(), ToString::to_string);
        let mut ids: Vec<StreamId> = self.streams.keys().copied().collect();
        ids.sort();
        for id in ids {
            if let Some(s) = self.streams.remove(&id) {
                if s.phase == Phase::Opening {
                    self.events.push_back(Event::OpenFailed {
                        id,
                        code: OpenErrorCode::SessionLost,
                        reason: reason.clone(),
                    });
                } else {
                    self.events.push_back(Event::Reset {
                        id,
                        code: ResetCode::SessionLost,
                        reason: reason.clone(),
                        remote: false,
                    });
                }
                self.events.push_back(Event::Closed { id });
            }
        }
        self.open_deadlines.clear();
        self.linger_checks.clear();
        self.peer_streams = 0;
        self.queued_total = 0;
        self.grown_windows = 0;
        self.blocked_writers.clear();
        self.ready.clear();
        self.state = State::Closed;
        self.handshake_deadline = None;
        self.events.push_back(Event::SessionClosed { error });
    }
}

/// `entries` as a peer speaking `version` is told them.
fn catalog_for(entries: &[CatalogEntry], version: u16) -> Vec<CatalogEntry> {
    entries
        .iter()
        .map(|e| CatalogEntry {
            kind: e.kind.for_version(version),
            ..e.clone()
        })
        .collect()
}
