//! The chat page (`serve --ui`): one self-contained HTML file, embedded in the binary and
//! served at `/`. It talks to the server's own `/v1/chat/completions` with streaming.

use axum::http::header;
use axum::response::{IntoResponse, Response};

/// The page, with a content security policy that allows nothing from elsewhere: its own inline
/// script and style, and requests to this origin only.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("ui.html"),
    )
        .into_response()
}
