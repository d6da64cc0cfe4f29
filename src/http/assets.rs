//! Files served from the binary: the demo page and the browser client.

const INDEX_HTML: &[u8] = include_bytes!("assets/index.html");
const HERALD_JS: &[u8] = include_bytes!("assets/herald.js");

/// The body and content type of a static path.
pub(super) fn find(path: &str) -> Option<(&'static [u8], &'static str)> {
    match path {
        "/" | "/index.html" => Some((INDEX_HTML, "text/html; charset=utf-8")),
        "/herald.js" => Some((HERALD_JS, "text/javascript; charset=utf-8")),
        _ => None,
    }
}
