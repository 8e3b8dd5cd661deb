//! Numeric reason codes carried by OPEN_ERR, RST and GOAWAY frames.
//!
//! Codes are data, not control flow: a peer may send a code this build does
//! not know (a newer minor revision), so every enum keeps an `Other` arm
//! instead of failing to decode.

use std::fmt;

macro_rules! code_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $value:expr, $text:expr;)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A code this build does not know.
            Other(u16),
        }

        impl $name {
            /// The code as sent on the wire.
            pub fn to_u16(self) -> u16 {
                match self {
                    $(Self::$variant => $value,)*
                    Self::Other(v) => v,
                }
            }

            /// Decodes a wire code; unknown values become `Other`.
            pub fn from_u16(v: u16) -> Self {
                match v {
                    $($value => Self::$variant,)*
                    other => Self::Other(other),
                }
            }

            /// A short, stable, lowercase name (used in logs and metric labels).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)*
                    Self::Other(_) => "other",
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self {
                    Self::Other(v) => write!(f, "code {v}"),
                    _ => f.write_str(self.as_str()),
                }
            }
        }
    };
}

code_enum! {
    /// Why an OPEN was refused (carried by OPEN_ERR).
    OpenErrorCode {
        /// The opener is not allowed to reach this target.
        Forbidden = 1, "forbidden";
        /// No agent by that name is connected.
        AgentOffline = 2, "agent_offline";
        /// The agent has no service by that name and the target is not an allowed address.
        UnknownService = 3, "unknown_service";
        /// The service actively refused the connection.
        Refused = 4, "refused";
        /// The service did not answer within the dial timeout.
        Timeout = 5, "timeout";
        /// The target name did not resolve or the network is unreachable.
        Unreachable = 6, "unreachable";
        /// The session has too many streams or pending opens.
        TooManyStreams = 7, "too_many_streams";
        /// The receiver is draining (GOAWAY) and takes no new streams.
        GoingAway = 8, "going_away";
        /// The target string or stream kind is malformed or not supported.
        BadTarget = 9, "bad_target";
        /// The receiver does not accept opens from this side at all.
        NotAccepted = 10, "not_accepted";
        /// The session carrying the open went away before an answer came.
        SessionLost = 11, "session_lost";
        /// Anything else; the reason text says more.
        Internal = 12, "internal";
        /// This server replica has no session to the agent (yet), but the
        /// agent was connected here recently, or the replica is new among
        /// peers and cannot know yet: another replica, or this one a moment
        /// later, may well reach it (version 4; retry via a fresh connection
        /// to the load balancer).
        NotHere = 13, "not_here";
    }
}

impl OpenErrorCode {
    /// The HTTP status that tells an HTTP client of this refusal, wherever
    /// tether answers one over HTTP (the server's proxy and raw WebSocket
    /// endpoint, the CLI's HTTP proxy): one mapping, so a refusal reads the
    /// same everywhere. 503 says "try again" (no session to the agent here,
    /// yet); 502 is the gateway's failure to reach the service.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Forbidden => 403,
            Self::UnknownService => 404,
            Self::BadTarget => 400,
            Self::TooManyStreams => 429,
            Self::Timeout => 504,
            Self::AgentOffline | Self::NotHere | Self::GoingAway | Self::SessionLost => 503,
            _ => 502,
        }
    }
}

code_enum! {
    /// Why a stream was reset (carried by RST).
    ResetCode {
        /// The application on the sending side aborted the stream.
        Cancel = 1, "cancel";
        /// The peer sent more data than the window allowed.
        FlowControl = 2, "flow_control";
        /// A half-closed stream was not finished within the linger time.
        LingerTimeout = 3, "linger_timeout";
        /// Frame for a stream id that does not exist (never opened).
        UnknownStream = 4, "unknown_stream";
        /// Data or FIN after the peer had already sent FIN.
        StreamClosed = 5, "stream_closed";
        /// Reading from or writing to the local socket failed.
        IoError = 6, "io_error";
        /// The stream on the far side of a relay (server) was lost.
        Upstream = 7, "upstream";
        /// The session is draining and its deadline passed.
        DrainTimeout = 8, "drain_timeout";
        /// The session carrying the stream ended.
        SessionLost = 9, "session_lost";
        /// The peer broke the protocol on this stream (e.g. DATA before OPEN_OK).
        ProtocolError = 10, "protocol_error";
        /// Access was revoked (a reload's policy no longer allows the stream).
        Forbidden = 11, "forbidden";
    }
}

code_enum! {
    /// Why a whole session is ending (carried by GOAWAY).
    ErrorCode {
        /// Orderly shutdown; existing streams may finish.
        Normal = 0, "normal";
        /// The peer broke the protocol (bad frame, bad state).
        ProtocolError = 1, "protocol_error";
        /// A frame was larger than the negotiated maximum.
        FrameTooLarge = 2, "frame_too_large";
        /// No protocol version in common.
        VersionMismatch = 3, "version_mismatch";
        /// A newer session for the same agent name replaced this one.
        Replaced = 4, "replaced";
        /// Heartbeat deadline passed.
        Timeout = 5, "timeout";
        /// Internal error on the sender.
        Internal = 6, "internal";
        /// The peer's credentials are no longer valid.
        Unauthorized = 7, "unauthorized";
        /// The sending server replica is leaving the set for good (scale
        /// down, or a restart under a new id): do not dial it again unless
        /// it is advertised anew (version 4).
        Leaving = 8, "leaving";
    }
}
