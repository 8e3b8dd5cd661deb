//! The server's own pages: error pages (HTML for browsers, JSON for API
//! clients), the login form, and the console's static files. Everything is
//! compiled into the binary; nothing loads from a CDN.

use http::{header, HeaderMap, Response, StatusCode};

use super::wants_html;
use crate::response::{api_headers, full, harden, Resp};

/// The stylesheet shared by the login page, the console and error pages.
pub(crate) const STYLE_CSS: &str = include_str!("static/style.css");
/// The console's script.
pub(crate) const CONSOLE_JS: &str = include_str!("static/console.js");

/// Escapes text for HTML element content and attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A whole HTML page in the server's look.
pub(crate) fn html_page(status: StatusCode, title: &str, body_html: &str) -> Resp {
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · tether</title><link rel=\"stylesheet\" href=\"/_tether/style.css\"></head>\
         <body>{body_html}</body></html>\n",
        t = escape(title)
    );
    let mut r = Response::new(full(page));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    harden(r.headers_mut());
    r
}

/// An error answer: an HTML page when a browser asks, JSON otherwise.
/// `code` is a short stable name (`agent_offline`, `forbidden`, ...).
pub(crate) fn error(
    req_headers: &HeaderMap,
    status: StatusCode,
    code: &str,
    message: &str,
) -> Resp {
    error_page(wants_html(req_headers), status, code, message)
}

/// [`error`] when the caller already knows whether the client wants HTML.
pub(crate) fn error_page(html: bool, status: StatusCode, code: &str, message: &str) -> Resp {
    if html {
        let title = status.canonical_reason().unwrap_or("Error");
        html_page(
            status,
            title,
            &format!(
                "<main class=\"narrow\"><h1>{} {}</h1><p class=\"error\" id=\"message\">{}</p>\
                 <p class=\"muted\">tether · <code>{}</code> · <a href=\"/\">console</a></p></main>",
                status.as_u16(),
                escape(title),
                escape(message),
                escape(code)
            ),
        )
    } else {
        let body = serde_json::json!({
            "error": code,
            "status": status.as_u16(),
            "message": message,
        });
        let mut r = Response::new(full(body.to_string() + "\n"));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        api_headers(r.headers_mut());
        r
    }
}

/// A static asset with a long cache lifetime.
pub(crate) fn asset(body: &'static str, content_type: &'static str) -> Resp {
    let mut r = Response::new(full(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("public, max-age=3600"),
    );
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_are_never_sniffed() {
        for html in [false, true] {
            let r = error_page(
                html,
                StatusCode::UNAUTHORIZED,
                "bad_token",
                "invalid client token",
            );
            assert_eq!(
                r.headers()[header::X_CONTENT_TYPE_OPTIONS],
                "nosniff",
                "html={html}"
            );
        }
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
