//! Building the server's own HTTP answers: the body type every response
//! uses, plain-text answers, redirects and the headers that keep the
//! server's own pages and data from being framed, sniffed or cached.

use bytes::Bytes;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Error type of response bodies.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every response the server sends (static or streamed).
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;
/// A response.
pub(crate) type Resp = Response<Body>;

/// Boxes a complete body.
pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

/// An empty body.
pub(crate) fn empty() -> Body {
    full(Bytes::new())
}

/// A plain-text answer (one line), never sniffed or cached.
pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(full(body.into() + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    api_headers(r.headers_mut());
    r
}

/// A redirect.
pub(crate) fn redirect(status: StatusCode, location: &str) -> Resp {
    let mut r = Response::new(empty());
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The content security policy of the server's own pages: everything from
/// the server itself, no framing. Forms post to the server itself, and also
/// to `also_post_to` (a CSP source list) where a page's form must be
/// followed by a redirect elsewhere (browsers apply `form-action` to it).
pub(crate) fn page_policy(also_post_to: Option<&str>) -> header::HeaderValue {
    const POLICY: &str = "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'";
    match also_post_to {
        None => header::HeaderValue::from_static(POLICY),
        Some(more) => header::HeaderValue::from_str(&format!("{POLICY} {more}"))
            .unwrap_or_else(|_| header::HeaderValue::from_static(POLICY)),
    }
}

/// Headers for the server's own pages: no framing, no sniffing, scripts and
/// styles only from the server itself ([`page_policy`]).
pub(crate) fn harden(h: &mut HeaderMap) {
    h.insert(header::CONTENT_SECURITY_POLICY, page_policy(None));
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
}

/// Headers for the server's own data (JSON, event streams, error bodies):
/// never sniffed into something a browser would run, never cached.
pub(crate) fn api_headers(h: &mut HeaderMap) {
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
}
