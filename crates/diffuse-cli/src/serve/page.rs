//! The web page at `/`: one self-contained HTML file (no CDN, no build step), served without
//! the API key (the page asks for it, or takes it from `/?api_key=KEY`, and sends it as a
//! bearer header on every API call).

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("page.html");

pub async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], PAGE)
}
