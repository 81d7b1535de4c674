//! What every route shares: errors as JSON that name the field at fault, request bodies
//! (size-limited, parsed with the path of a bad field), base64 images, and the API key.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use diffuse::pipelines::image_processor::Image8;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::sync::Arc;

use super::jobs::Shared;

/// An error answer: `{"error": {"message", "type", "param", "code"}, "detail": message}`
/// (OpenAI's shape, with FastAPI's `detail` that AUTOMATIC1111 clients read).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    pub kind: &'static str,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None, kind, retry_after: None }
    }
    /// 400: a malformed value (bad JSON, bad base64, an image that does not decode).
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_string()), ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message) }
    }
    /// 422: a well-formed value that cannot be used (out of range, unknown name).
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_string()), ..Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", message) }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
    }
    pub fn queue_full(retry_after: u64) -> Self {
        ApiError {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", format!("the queue is full: try again in {retry_after} s"))
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": null },
            "detail": self.message,
        });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"diffuse\""));
        }
        response
    }
}

/// A body the size limit refused (413), or one that could not be read.
pub fn body_error(rejection: BytesRejection) -> ApiError {
    let status = rejection.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError {
            param: Some("body".into()),
            ..ApiError::new(status, "request_too_large", "the request body is larger than the server's --max-body-mb")
        };
    }
    ApiError::bad("body", format!("cannot read the request body: {}", rejection.body_text()))
}

/// A JSON body as `T`; a bad one is refused naming the field (`steps`, `init_images[0]`).
pub fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(body_error)?;
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &body };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    let parsed = parsed.map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad("body", format!("the body is not valid JSON: {inner}"))
        } else if path == "." || path.is_empty() {
            ApiError::bad("body", format!("the body is not the expected JSON object: {inner}"))
        } else {
            ApiError::bad(&path, format!("{path}: {inner}"))
        }
    })?;
    deserializer.end().map_err(|e| ApiError::bad("body", format!("the body is not valid JSON: {e}")))?;
    Ok(parsed)
}

/// Bytes sent as base64, bare or as a `data:` URL; `param` names the field in errors.
pub fn decode_base64(param: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let data = match text.strip_prefix("data:") {
        Some(url) => url.split_once(',').map(|(_, data)| data).ok_or_else(|| ApiError::bad(param, format!("{param}: a data: URL without data")))?,
        None => text,
    };
    let cleaned: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engines = [&base64::engine::general_purpose::STANDARD, &base64::engine::general_purpose::STANDARD_NO_PAD];
    for engine in engines {
        if let Ok(bytes) = engine.decode(&cleaned) {
            return Ok(bytes);
        }
    }
    match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cleaned.trim_end_matches('=')) {
        Ok(bytes) => Ok(bytes),
        Err(e) => Err(ApiError::bad(param, format!("{param}: not valid base64 ({e})"))),
    }
}

/// An image (PNG or JPEG) sent as base64.
pub fn decode_image(param: &str, text: &str) -> Result<Image8, ApiError> {
    let bytes = decode_base64(param, text)?;
    Image8::decode_rgb(&bytes, param).map_err(|e| ApiError::bad(param, e.to_string()))
}

/// Whether the request carries the key: `Authorization: Bearer KEY`, or HTTP Basic auth with
/// KEY as the password (any user name).
pub fn authorized(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let (scheme, credentials) = value.trim().split_once(' ').unwrap_or((value, ""));
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return same(credentials.as_bytes(), key.as_bytes());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else { return false };
        let Ok(decoded) = String::from_utf8(decoded) else { return false };
        return decoded.split_once(':').is_some_and(|(_, password)| same(password.as_bytes(), key.as_bytes()));
    }
    false
}

/// Compares in time independent of where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The API key check in front of every API route.
pub async fn require_key(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if let Some(key) = &shared.api_key {
        if !authorized(request.headers(), key) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "this server needs its API key: `Authorization: Bearer KEY` (or HTTP Basic auth with the key as the password)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route {}", uri.path()))
}

/// A JSON value as `T`, naming the bad field (see [`parse_json`]).
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::bad("body", format!("the body is not the expected JSON object: {inner}"))
        } else {
            ApiError::bad(&path, format!("{path}: {inner}"))
        }
    })
}
