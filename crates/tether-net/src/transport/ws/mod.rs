//! WebSocket transport, over plain TCP or TLS.
//!
//! Each WebSocket binary message carries one or more whole protocol frames.
//! The framing is ours ([`frame`], driven by [`stream`]); the client's
//! upgrade request goes through hyper. WebSocket-level pings are answered;
//! our own PING frames do the liveness work, so a dead peer is caught even
//! through proxies that answer WebSocket pings themselves.

pub mod frame;
pub mod stream;

pub use frame::Role;
pub use stream::{WsSink, WsSource};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::tls::{client_config_with_identity, ServerIdentity, ServerTrust};
use super::MAX_RECV_MESSAGE;

/// The WebSocket extension (`Sec-WebSocket-Extensions`) by which a tether
/// dialer and server agree that the dialer's frames go unmasked
/// (docs/PROTOCOL.md section 2.6, version 8).
///
/// RFC 6455 has clients mask every byte so that a script in a browser
/// cannot choose the bytes an HTTP proxy between it and the server reads
/// (a proxy that missed the upgrade and takes them for requests). Our
/// dialer is an agent or the CLI, not a browser, and offers the extension
/// only where no such proxy can read the stream: over TLS, or over a
/// connection to a loopback address. It saves a pass over every byte on
/// both ends (the dialer's masking copy and the server's unmasking): 3-hop
/// transfers moved up to a sixth more (bench/README.md, session 34).
pub const UNMASKED_EXTENSION: &str = "tether-unmasked";

/// Set by [`always_mask`]: this process never offers [`UNMASKED_EXTENSION`].
static ALWAYS_MASK: AtomicBool = AtomicBool::new(false);

/// Makes every later dial of this process mask its frames, never offering
/// [`UNMASKED_EXTENSION`] (`tether agent|client --ws-mask always`): for a
/// path through a gateway that inspects WebSocket frames and insists on
/// masks even over TLS.
pub fn always_mask(on: bool) {
    ALWAYS_MASK.store(on, Ordering::Relaxed);
}

/// Whether a header map's `Sec-WebSocket-Extensions` names
/// [`UNMASKED_EXTENSION`] (a list of extensions, each with optional
/// parameters after `;`): a tether session's upgrade request that offers
/// it, which [`accept_upgrade`] agrees to (the server's end must then take
/// unmasked frames, [`server_from_upgraded`]), or a `101` that agreed.
pub fn names_unmasked(headers: &http::HeaderMap) -> bool {
    extensions(headers).any(|e| e.eq_ignore_ascii_case(UNMASKED_EXTENSION))
}

/// The extension names in a header map's `Sec-WebSocket-Extensions`; a
/// value that is not visible ASCII comes through whole, naming no
/// extension anyone offered.
fn extensions(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .map(|v| v.to_str().unwrap_or("(not visible ASCII)"))
        .flat_map(|v| v.split(','))
        .map(|e| e.split(';').next().unwrap_or("").trim())
        .filter(|e| !e.is_empty())
}

/// Whether a dialer offers [`UNMASKED_EXTENSION`]: over TLS, or over a TCP
/// connection to a loopback address (`peer`, where the connection went:
/// not the URL's host, which a replica's own address or a name in
/// `/etc/hosts` may stand in for), where no HTTP proxy reads the stream.
pub fn may_offer_unmasked(tls: bool, peer: Option<std::net::IpAddr>) -> bool {
    tls || peer.is_some_and(|ip| ip.is_loopback())
}

/// How long TCP connect + TLS + WebSocket handshake may take when dialing.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// tungstenite's settings for the raw WebSocket endpoint (tether sessions
/// use [`stream`]).
///
/// Measured in `bench/wslib-RESULTS.md`: tungstenite zero-fills
/// `read_buffer_size` bytes before every read, so a large read buffer costs
/// microseconds per message (256 KiB: 21.6 µs per 64-byte round trip, 32 KiB:
/// 6.3 µs, raw TCP 4.6 µs); and a write buffer coalesces messages into
/// bigger writes, which halved 32 KiB throughput. Our writer already batches.
///
/// The write buffer holds one message being written (a stream chunk, at
/// most [`MAX_RECV_MESSAGE`]) and the PONGs tungstenite queues for the
/// client's PINGs as it reads them. Its cap bounds the PONGs of a client
/// that pings and never reads (tungstenite holds back a PONG that would go
/// past it). It was 4 MiB (4 messages) per raw WebSocket, where the data
/// path needs one.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_RECV_MESSAGE))
        .max_frame_size(Some(MAX_RECV_MESSAGE))
        .write_buffer_size(0)
        .max_write_buffer_size(MAX_RECV_MESSAGE + 64 * 1024)
        .read_buffer_size(32 * 1024)
}

/// Why a request cannot be upgraded to a WebSocket (the server side of
/// RFC 6455 section 4.2.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// Not a WebSocket upgrade at all (`Connection: upgrade` and
    /// `Upgrade: websocket` missing).
    #[error("this endpoint speaks WebSocket only")]
    NotWebSocket,
    /// An upgrade asked with a method other than GET (RFC 6455 section
    /// 4.1): a body it carries would be read as frames.
    #[error("a WebSocket upgrade is a GET request")]
    NotGet,
    /// No `Sec-WebSocket-Key`.
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    /// A `Sec-WebSocket-Key` that is not 16 bytes in base64 (RFC 6455
    /// section 4.2.1).
    #[error("Sec-WebSocket-Key is not 16 bytes in base64")]
    BadKey,
    /// A WebSocket version other than 13.
    #[error("WebSocket version 13 required")]
    WrongVersion,
    /// The required subprotocol is not offered.
    #[error(
        "WebSocket subprotocol {0} required (this server speaks protocol versions {min} to {max})",
        min = tether_proto::MIN_PROTOCOL_VERSION,
        max = tether_proto::PROTOCOL_VERSION
    )]
    MissingSubprotocol(&'static str),
}

impl UpgradeError {
    /// The HTTP status that answers it.
    pub fn status(&self) -> http::StatusCode {
        match self {
            UpgradeError::NotWebSocket | UpgradeError::WrongVersion => {
                http::StatusCode::UPGRADE_REQUIRED
            }
            UpgradeError::NotGet => http::StatusCode::METHOD_NOT_ALLOWED,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }

    /// The headers the refusal carries: a 426 names the protocol to
    /// upgrade to (RFC 9110 section 15.5.22), and a wrong version is told
    /// the one this end speaks (RFC 6455 section 4.4).
    pub fn headers(&self) -> Vec<(http::HeaderName, http::HeaderValue)> {
        let mut headers = vec![];
        if self.status() == http::StatusCode::UPGRADE_REQUIRED {
            headers.push((
                http::header::UPGRADE,
                http::HeaderValue::from_static("websocket"),
            ));
        }
        if *self == UpgradeError::NotGet {
            headers.push((http::header::ALLOW, http::HeaderValue::from_static("GET")));
        }
        if *self == UpgradeError::WrongVersion {
            headers.push((
                http::header::SEC_WEBSOCKET_VERSION,
                http::HeaderValue::from_static("13"),
            ));
        }
        headers
    }
}

/// Whether `key` is 16 bytes in base64: 22 characters of the alphabet and
/// the padding `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    matches!(key, [body @ .., b'=', b'='] if body.len() == 22
        && body.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/'))
}

/// Checks a WebSocket upgrade request's headers and returns the headers of
/// the `101 Switching Protocols` answer. With `subprotocol` (a tether
/// session), the client must offer it and the answer selects it, and an
/// offered [`UNMASKED_EXTENSION`] is agreed to.
pub fn accept_upgrade(
    method: &http::Method,
    request: &http::HeaderMap,
    subprotocol: Option<&'static str>,
) -> Result<http::HeaderMap, UpgradeError> {
    use http::header::{self, HeaderValue};
    let has = |name: header::HeaderName, needle: &str| {
        request.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|p| p.trim().eq_ignore_ascii_case(needle)))
                .unwrap_or(false)
        })
    };
    if !(has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")) {
        return Err(UpgradeError::NotWebSocket);
    }
    if method != http::Method::GET {
        return Err(UpgradeError::NotGet);
    }
    if let Some(p) = subprotocol {
        let offered = request
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .any(|v| {
                v.to_str()
                    .map(|s| s.split(',').any(|o| o.trim() == p))
                    .unwrap_or(false)
            });
        if !offered {
            return Err(UpgradeError::MissingSubprotocol(p));
        }
    }
    let key = request
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(UpgradeError::MissingKey)?;
    if !is_websocket_key(key.as_bytes()) {
        return Err(UpgradeError::BadKey);
    }
    if request
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(UpgradeError::WrongVersion);
    }
    let mut h = http::HeaderMap::new();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = derive_accept_key(key.as_bytes());
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = subprotocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
        if names_unmasked(request) {
            h.insert(
                header::SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_static(UNMASKED_EXTENSION),
            );
        }
    }
    Ok(h)
}

/// Wraps the raw I/O of an accepted HTTP upgrade as the server end of a
/// tether session's WebSocket. `unmasked`: the request
/// [offered](names_unmasked) [`UNMASKED_EXTENSION`] and the answer (from
/// [`accept_upgrade`]) agreed.
pub fn server_from_upgraded<S>(io: S, unmasked: bool) -> (WsSink<S>, WsSource<S>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    stream::from_io(io, Role::Server, unmasked, Bytes::new())
}

/// A dialed connection: plain TCP or TLS over TCP.
pub enum ClientIo {
    /// `ws://`
    Plain(TcpStream),
    /// `wss://`
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientIo::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Plain(s) => s.is_write_vectored(),
            ClientIo::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Why dialing a server failed, worded for the person running the command.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The URL is not `ws://` / `wss://` with a host.
    #[error("bad server URL {0:?}: {1}")]
    BadUrl(String, String),
    /// TCP connect failed.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, io::Error),
    /// TLS setup or handshake failed.
    #[error("TLS with {0} failed: {1}")]
    Tls(String, String),
    /// The server answered the upgrade with an HTTP error.
    #[error("server refused the connection: HTTP {status}: {body}")]
    Refused {
        /// HTTP status code.
        status: u16,
        /// Response body (the server's explanation).
        body: String,
        /// The replica that refused, when it said (`X-Tether-Replica`).
        replica: Option<String>,
    },
    /// The WebSocket handshake failed otherwise.
    #[error("websocket handshake with {0} failed: {1}")]
    Handshake(String, String),
    /// Took longer than [`DIAL_TIMEOUT`].
    #[error("connecting to {0} timed out after {DIAL_TIMEOUT:?}")]
    Timeout(String),
}

/// Dials `url` (`ws://` or `wss://`), asks for `subprotocol`, and sends `headers`.
pub async fn dial(
    url: &str,
    subprotocol: &str,
    headers: &[(String, String)],
    trust: &ServerTrust,
) -> Result<(WsSink<ClientIo>, WsSource<ClientIo>), DialError> {
    dial_with_identity(url, subprotocol, headers, trust, None).await
}

/// Logs a warning when `url` is plain `ws://` to anything but loopback:
/// tokens and all tunneled bytes would cross the network in clear text.
pub fn warn_if_plain(url: &str) {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return;
    };
    if uri.scheme_str() != Some("ws") {
        return;
    }
    let host = uri
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    if !is_loopback_host(host) {
        tracing::warn!(%url, "plain ws:// to a non-loopback server: the token and every tunneled byte travel unencrypted; use wss://");
    }
}

/// Whether a URL's host (brackets removed) is this machine: `localhost` or
/// a loopback address. Plain `ws://` is fine there and nowhere else.
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Like [`dial`], presenting a client certificate (mutual TLS) over `wss://`.
pub async fn dial_with_identity(
    url: &str,
    subprotocol: &str,
    headers: &[(String, String)],
    trust: &ServerTrust,
    identity: Option<&ServerIdentity>,
) -> Result<(WsSink<ClientIo>, WsSource<ClientIo>), DialError> {
    dial_via(url, None, subprotocol, headers, trust, identity).await
}

/// Like [`dial_with_identity`], but the TCP connection goes to `connect_to`
/// when given (one server replica's own address) instead of the URL's host;
/// TLS (server name and certificate check) and the `Host` header still use
/// the URL's host, so a replica is checked against the public name.
pub async fn dial_via(
    url: &str,
    connect_to: Option<std::net::SocketAddr>,
    subprotocol: &str,
    headers: &[(String, String)],
    trust: &ServerTrust,
    identity: Option<&ServerIdentity>,
) -> Result<(WsSink<ClientIo>, WsSource<ClientIo>), DialError> {
    let via = connect_to.map_or(Via::Url, Via::Addr);
    dial_within_timeout(url, via, subprotocol, headers, trust, identity).await
}

/// Like [`dial_with_identity`] over a TCP connection the caller made (from
/// a source address of its choosing, say): TLS, `Host` and the path still
/// come from `url`.
pub async fn dial_over(
    tcp: TcpStream,
    url: &str,
    subprotocol: &str,
    headers: &[(String, String)],
    trust: &ServerTrust,
    identity: Option<&ServerIdentity>,
) -> Result<(WsSink<ClientIo>, WsSource<ClientIo>), DialError> {
    let via = Via::Socket(tcp);
    dial_within_timeout(url, via, subprotocol, headers, trust, identity).await
}

/// Where the TCP connection of a dial goes.
enum Via {
    /// The URL's host and port.
    Url,
    /// This address (one replica's own).
    Addr(std::net::SocketAddr),
    /// Already connected by the caller.
    Socket(TcpStream),
}

/// [`dial_inner`], bounded by [`DIAL_TIMEOUT`].
async fn dial_within_timeout(
    url: &str,
    via: Via,
    subprotocol: &str,
    headers: &[(String, String)],
    trust: &ServerTrust,
    identity: Option<&ServerIdentity>,
) -> Result<(WsSink<ClientIo>, WsSource<ClientIo>), DialError> {
    let dial = dial_inner(url, via, subprotocol, headers, trust, identity);
    match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout(url.to_owned())),
    }
}

async fn dial_inner(
    url: &str,
    connect_to: Via,
    subprotocol: &str,
    headers: &[(String, String)],
    trust: &ServerTrust,
    identity: Option<&ServerIdentity>,
) -> Result<(WsSink<ClientIo>, WsSource<ClientIo>), DialError> {
    let bad = |why: &str| DialError::BadUrl(url.to_owned(), why.to_owned());
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    let tls = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(bad("scheme must be ws:// or wss://")),
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?.to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let bare_host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let (addr, tcp) = match connect_to {
        Via::Addr(to) => (format!("{to} ({bare_host})"), TcpStream::connect(to).await),
        Via::Url => (
            format!("{bare_host}:{port}"),
            TcpStream::connect((bare_host.as_str(), port)).await,
        ),
        Via::Socket(tcp) => {
            let peer = tcp
                .peer_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            (format!("{peer} ({bare_host})"), Ok(tcp))
        }
    };
    let tcp = tcp.map_err(|e| DialError::Connect(addr.clone(), e))?;
    let _ = tcp.set_nodelay(true);
    let offer_unmasked = !ALWAYS_MASK.load(Ordering::Relaxed)
        && may_offer_unmasked(tls, tcp.peer_addr().ok().map(|a| a.ip()));
    let io = if tls {
        let cfg = client_config_with_identity(trust, identity)
            .map_err(|e| DialError::Tls(addr.clone(), format!("{e:#}")))?;
        let name = rustls::pki_types::ServerName::try_from(bare_host.clone())
            .map_err(|e| DialError::Tls(addr.clone(), e.to_string()))?;
        let s = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| DialError::Tls(addr.clone(), e.to_string()))?;
        ClientIo::Tls(Box::new(s))
    } else {
        ClientIo::Plain(tcp)
    };
    use http::header;
    let key = generate_key();
    let authority = uri.authority().map_or(host.as_str(), |a| a.as_str());
    let mut req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_KEY, &key)
        .header(header::SEC_WEBSOCKET_PROTOCOL, subprotocol)
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| bad(&e.to_string()))?;
    for (k, v) in headers {
        let name = http::HeaderName::from_bytes(k.as_bytes()).map_err(|e| bad(&e.to_string()))?;
        let value = http::HeaderValue::from_str(v).map_err(|e| bad(&e.to_string()))?;
        req.headers_mut().insert(name, value);
    }
    // After the caller's headers: the offer is the dialer's to make.
    if offer_unmasked {
        req.headers_mut().insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            http::HeaderValue::from_static(UNMASKED_EXTENSION),
        );
    } else {
        req.headers_mut().remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    let (io, read_ahead, unmasked) =
        client_upgrade(io, req, &key, subprotocol, offer_unmasked, &addr).await?;
    tracing::debug!(server = %addr, offered = offer_unmasked, unmasked, "WebSocket up (frames unmasked when both agreed on {UNMASKED_EXTENSION}; --ws-mask always to mask them)");
    Ok(stream::from_io(io, Role::Client, unmasked, read_ahead))
}

/// Sends the upgrade request over `io` and checks the `101` answer (RFC 6455
/// section 4.1); returns the connection, whatever was read past the answer,
/// and whether the server agreed to [`UNMASKED_EXTENSION`] (offered when
/// `offered_unmasked`).
async fn client_upgrade(
    io: ClientIo,
    req: http::Request<http_body_util::Empty<Bytes>>,
    key: &str,
    subprotocol: &str,
    offered_unmasked: bool,
    addr: &str,
) -> Result<(ClientIo, Bytes, bool), DialError> {
    use http::header;
    let fail = |why: String| DialError::Handshake(addr.to_owned(), why);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| fail(e.to_string()))?;
    // The connection task ends on its own: at the upgrade, or when the
    // sender is dropped after a refusal.
    tokio::spawn(conn.with_upgrades());
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = resp.status();
    if status != http::StatusCode::SWITCHING_PROTOCOLS {
        let replica = resp
            .headers()
            .get(tether_proto::endpoints::REPLICA_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(DialError::Refused {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).trim().to_owned(),
            replica,
        });
    }
    let answer = |name: header::HeaderName| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    if !answer(header::UPGRADE).is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        return Err(fail("the 101 answer does not switch to websocket".into()));
    }
    // RFC 6455 section 4.1: the answer's Connection names the upgrade.
    if !answer(header::CONNECTION).is_some_and(|c| {
        c.split(',')
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
    }) {
        return Err(fail("the 101 answer has no \"Connection: upgrade\"".into()));
    }
    if answer(header::SEC_WEBSOCKET_ACCEPT) != Some(derive_accept_key(key.as_bytes())) {
        return Err(fail(
            "the 101 answer has a wrong Sec-WebSocket-Accept".into(),
        ));
    }
    if answer(header::SEC_WEBSOCKET_PROTOCOL).as_deref() != Some(subprotocol) {
        return Err(fail(format!(
            "the server did not select the subprotocol {subprotocol}"
        )));
    }
    // RFC 6455 section 4.1: an extension the dialer did not offer fails
    // the connection.
    if let Some(other) = extensions(resp.headers())
        .find(|e| !(offered_unmasked && e.eq_ignore_ascii_case(UNMASKED_EXTENSION)))
    {
        return Err(fail(format!(
            "the server chose the WebSocket extension {other:?}, which was not offered"
        )));
    }
    let unmasked = names_unmasked(resp.headers());
    let upgraded = hyper::upgrade::on(resp)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let parts = upgraded
        .downcast::<TokioIo<ClientIo>>()
        .map_err(|_| fail("the upgraded connection is not the one dialed".into()))?;
    Ok((parts.io.into_inner(), parts.read_buf, unmasked))
}

/// Appends the endpoint `path` to a server URL that has no path of its own
/// (`wss://host:7700` becomes `wss://host:7700/tether/v1/agent`).
pub fn endpoint_url(server: &str, path: &str) -> String {
    let s = server.trim_end_matches('/');
    let after_scheme = s.split_once("://").map_or(s, |(_, r)| r);
    if after_scheme.contains('/') {
        s.to_owned()
    } else {
        format!("{s}{path}")
    }
}

#[cfg(test)]
mod tests {
    use super::{
        accept_upgrade, derive_accept_key, dial, endpoint_url, may_offer_unmasked, names_unmasked,
        ServerTrust, UpgradeError, UNMASKED_EXTENSION,
    };
    use crate::transport::MessageSink;

    #[test]
    fn upgrade_requests_are_checked_in_order_and_answered() {
        let mut h = http::HeaderMap::new();
        assert_eq!(
            accept_upgrade(&http::Method::GET, &h, None),
            Err(UpgradeError::NotWebSocket)
        );
        h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        let post = accept_upgrade(&http::Method::POST, &h, None).unwrap_err();
        assert_eq!(post, UpgradeError::NotGet);
        assert_eq!(post.status(), http::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            post.headers(),
            vec![(http::header::ALLOW, http::HeaderValue::from_static("GET"))]
        );
        assert_eq!(
            accept_upgrade(&http::Method::GET, &h, Some("tether.v1")),
            Err(UpgradeError::MissingSubprotocol("tether.v1"))
        );
        h.insert("sec-websocket-protocol", "x, tether.v1".parse().unwrap());
        assert_eq!(
            accept_upgrade(&http::Method::GET, &h, Some("tether.v1")),
            Err(UpgradeError::MissingKey)
        );
        for bad in [
            "",
            "x",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25j*Q==",
        ] {
            h.insert("sec-websocket-key", bad.parse().unwrap());
            assert_eq!(
                accept_upgrade(&http::Method::GET, &h, None),
                Err(UpgradeError::BadKey),
                "{bad}"
            );
        }
        h.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        h.insert("sec-websocket-version", "8".parse().unwrap());
        let e = accept_upgrade(&http::Method::GET, &h, None).unwrap_err();
        assert_eq!(e, UpgradeError::WrongVersion);
        assert_eq!(e.status(), http::StatusCode::UPGRADE_REQUIRED);
        let headers = e.headers();
        assert!(headers.contains(&(http::header::SEC_WEBSOCKET_VERSION, "13".parse().unwrap())));
        assert!(headers.contains(&(http::header::UPGRADE, "websocket".parse().unwrap())));
        let not_ws = UpgradeError::NotWebSocket.headers();
        assert_eq!(
            not_ws,
            vec![(http::header::UPGRADE, "websocket".parse().unwrap())]
        );
        h.insert("sec-websocket-version", "13".parse().unwrap());
        let answer = accept_upgrade(&http::Method::GET, &h, Some("tether.v1")).unwrap();
        // RFC 6455's own example key and accept value.
        assert_eq!(
            answer["sec-websocket-accept"],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(answer["sec-websocket-protocol"], "tether.v1");
        assert!(!answer.contains_key("sec-websocket-extensions"));

        // The unmasked-frames extension: agreed when offered (among others,
        // with parameters), on a session endpoint only.
        h.insert(
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits, Tether-Unmasked"
                .parse()
                .unwrap(),
        );
        assert!(names_unmasked(&h));
        let answer = accept_upgrade(&http::Method::GET, &h, Some("tether.v1")).unwrap();
        assert_eq!(answer["sec-websocket-extensions"], UNMASKED_EXTENSION);
        let raw = accept_upgrade(&http::Method::GET, &h, None).unwrap();
        assert!(!raw.contains_key("sec-websocket-extensions"));
        h.insert(
            "sec-websocket-extensions",
            "permessage-deflate".parse().unwrap(),
        );
        assert!(!names_unmasked(&h));
    }

    #[test]
    fn unmasked_frames_are_offered_over_tls_or_to_loopback_only() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        assert!(may_offer_unmasked(true, ip("203.0.113.7")));
        assert!(may_offer_unmasked(true, None));
        assert!(may_offer_unmasked(false, ip("127.0.0.1")));
        assert!(may_offer_unmasked(false, ip("127.3.0.9")));
        assert!(may_offer_unmasked(false, ip("::1")));
        // Plain ws over the network (a replica's own address, say),
        // whatever the URL named: masked.
        assert!(!may_offer_unmasked(false, ip("10.0.0.7")));
        assert!(!may_offer_unmasked(false, ip("::ffff:10.0.0.7")));
        assert!(!may_offer_unmasked(false, None));
    }

    /// Dials a server on a real loopback socket that answers the upgrade
    /// with `extensions` in its 101 (`None`: no such header), and returns
    /// whether the dial offered the unmasked extension, and either the
    /// dial's error or whether the dialer's first frame came masked.
    async fn dial_answered_with(extensions: Option<&'static str>) -> (bool, Result<bool, String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/tether/v1/agent", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            while !req.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                tcp.read_exact(&mut b).await.unwrap();
                req.push(b[0]);
            }
            let req = String::from_utf8(req).unwrap();
            let header = |name: &str| {
                req.lines().find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                })
            };
            let offered = header("sec-websocket-extensions").as_deref() == Some(UNMASKED_EXTENSION);
            let accept = derive_accept_key(header("sec-websocket-key").unwrap().as_bytes());
            let mut answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                 sec-websocket-accept: {accept}\r\nsec-websocket-protocol: tether.v1\r\n"
            );
            if let Some(e) = extensions {
                answer.push_str(&format!("sec-websocket-extensions: {e}\r\n"));
            }
            answer.push_str("\r\n");
            tcp.write_all(answer.as_bytes()).await.unwrap();
            let mut first = [0u8; 2];
            let masked = match tcp.read_exact(&mut first).await {
                Ok(_) => Some(first[1] & 0x80 != 0),
                Err(_) => None, // the dialer gave up
            };
            (offered, masked)
        });
        let dialed = dial(&url, "tether.v1", &[], &ServerTrust::default()).await;
        let result = match dialed {
            Ok((mut sink, _source)) => {
                sink.send(bytes::Bytes::from_static(b"hi")).await.unwrap();
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        };
        let (offered, masked) = server.await.unwrap();
        (offered, result.map(|()| masked.unwrap()))
    }

    #[tokio::test]
    async fn a_dialer_to_loopback_sends_unmasked_frames_once_the_server_agrees() {
        let (offered, masked) = dial_answered_with(Some(UNMASKED_EXTENSION)).await;
        assert!(offered);
        assert_eq!(masked, Ok(false));
        // A server that predates the extension: masked, as RFC 6455 has it.
        let (offered, masked) = dial_answered_with(None).await;
        assert!(offered);
        assert_eq!(masked, Ok(true));
        // An extension the dialer did not offer fails the dial, saying so.
        let (_, masked) = dial_answered_with(Some("permessage-deflate")).await;
        let e = masked.unwrap_err();
        assert!(
            e.contains("permessage-deflate") && e.contains("not offered"),
            "{e}"
        );
        // So does one that is not even readable.
        let (_, masked) = dial_answered_with(Some("tether-unmasked, caf\u{e9}")).await;
        let e = masked.unwrap_err();
        assert!(e.contains("not offered"), "{e}");
    }

    #[test]
    fn endpoint_urls() {
        assert_eq!(endpoint_url("wss://h:1", "/p"), "wss://h:1/p");
        assert_eq!(endpoint_url("wss://h:1/", "/p"), "wss://h:1/p");
        assert_eq!(endpoint_url("wss://h:1/custom", "/p"), "wss://h:1/custom");
    }
}
