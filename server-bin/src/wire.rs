//! HTTP plumbing: the body type, JSON answers, and reading request bodies under the cap.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming};
use registry_core::RegistryError;

use crate::error::ApiError;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

/// Every response body of the server.
pub type Body = BoxBody<Bytes, Infallible>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// An empty body.
pub fn empty() -> Body {
    full(Bytes::new())
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => with_type(status, "application/json", bytes),
        Err(e) => ApiError::from(RegistryError::internal(format!(
            "serializing a response: {e}"
        )))
        .to_response(),
    }
}

/// A response with a content type.
pub fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// An `invalid_request` error.
fn invalid(message: String) -> ApiError {
    RegistryError::InvalidRequest(message).into()
}

/// Whether the request declares a JSON body (`application/json`, parameters allowed).
fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads a request body of at most `cap` bytes within `within`. Over the cap is
/// `payload_too_large`, whether the client announced it (`Content-Length`) or not; a body
/// that does not arrive in time is `invalid_request` (the connection is not kept).
pub async fn read_body(
    headers: &http::HeaderMap,
    body: Incoming,
    cap: u64,
    within: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::from(RegistryError::PayloadTooLarge(format!(
            "the request body is larger than the limit of {cap} bytes"
        )))
    };
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > cap) || body.size_hint().lower() > cap {
        return Err(too_large());
    }
    let limit = usize::try_from(cap).unwrap_or(usize::MAX);
    let read = tokio::time::timeout(within, Limited::new(body, limit).collect());
    let Ok(read) = read.await else {
        return Err(invalid(format!(
            "the request body did not arrive within {} s",
            within.as_secs()
        )));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(invalid(format!("the request body could not be read: {e}"))),
    }
}

/// Parses a JSON body into `T`: `415` unless it is declared JSON, `invalid_json` when it
/// does not parse, `invalid_request` naming the field for unknown fields and wrong types.
/// `None` for an empty body when `optional`.
pub fn parse_json<T: DeserializeOwned>(
    headers: &http::HeaderMap,
    bytes: &[u8],
    optional: bool,
) -> Result<Option<T>, ApiError> {
    if optional && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !is_json(headers) {
        return Err(ApiError::UnsupportedMediaType(
            "this request needs a JSON body with `Content-Type: application/json`".into(),
        ));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::InvalidJson(
            "the request body is empty; this request needs a JSON object".into(),
        ));
    }
    // serde reads a struct from a JSON array too (fields by position): every body of this
    // API is an object, so anything else is refused before it could be read that way.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => invalid("the request body must be a JSON object".into()),
                Err(e) => ApiError::InvalidJson(format!("the request body is not valid JSON: {e}")),
            },
        );
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut *de) {
        // Only whitespace may follow the object: `{…} junk` is not JSON.
        Ok(value) => match de.end() {
            Ok(()) => Ok(Some(value)),
            Err(e) => Err(ApiError::InvalidJson(format!(
                "the request body is not valid JSON: {e}"
            ))),
        },
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => {
                    let text = strip_position(&inner.to_string());
                    Err(invalid(if path == "." {
                        format!("invalid request body: {text}")
                    } else {
                        format!("invalid field `{path}`: {text}")
                    }))
                }
                _ => Err(ApiError::InvalidJson(format!(
                    "the request body is not valid JSON: {inner}"
                ))),
            }
        }
    }
}

/// serde's message without what the client sent: serde_json appends " at line L column C"
/// (the field path says more), and quotes a wrong string value (`string "K=SECRET"`), which
/// may be a secret meant for the environment. Field names (in backticks) stay.
fn strip_position(text: &str) -> String {
    let text = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i]);
        out.push_str("a string");
        let quoted = &rest[i + "string \"".len()..];
        // Skip to the closing quote, past escaped ones.
        let mut end = quoted.len();
        let mut escaped = false;
        for (j, c) in quoted.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = j + 1;
                    break;
                }
                _ => escaped = false,
            }
        }
        rest = &quoted[end.min(quoted.len())..];
    }
    out.push_str(rest);
    out
}

/// A streamed body fed by a bounded channel: the producer waits when the client reads
/// slowly, and learns that the client left when sending fails.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    /// A body and the sender that feeds it, holding at most `capacity` pieces.
    pub fn new(capacity: usize) -> (mpsc::Sender<Bytes>, ChannelBody) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, ChannelBody { rx })
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|piece| piece.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(ct: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(ct) = ct {
            h.insert(CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
        }
        h
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Stop {
        grace_ms: Option<u64>,
    }

    #[test]
    fn body_errors_name_the_field_and_keep_their_codes() {
        let h = headers(Some("application/json; charset=utf-8"));
        let e = parse_json::<Stop>(&h, br#"{"grace_ms": "soon"}"#, false).unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().contains("grace_ms"), "{e}");
        let e = parse_json::<Stop>(&h, br#"{"grace": 1}"#, false).unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().contains("grace"), "{e}");
        let e = parse_json::<Stop>(&h, br#"{"grace_ms": 1"#, false).unwrap_err();
        assert_eq!(e.code(), "invalid_json");
        // A struct is never read from an array (serde would take fields by position).
        let e = parse_json::<Stop>(&h, b" [5]", false).unwrap_err();
        assert_eq!(e.code(), "invalid_request");
        assert!(e.to_string().contains("object"), "{e}");
        let e = parse_json::<Stop>(&h, b"[5", false).unwrap_err();
        assert_eq!(e.code(), "invalid_json");
        let e = parse_json::<Stop>(&h, b"{} {}", false).unwrap_err();
        assert_eq!(e.code(), "invalid_json");
        assert!(parse_json::<Stop>(&h, b" {} \n", false).unwrap().is_some());
        let e = parse_json::<Stop>(&headers(Some("text/plain")), b"{}", false).unwrap_err();
        assert_eq!(e.code(), "unsupported_media_type");
        let e = parse_json::<Stop>(&headers(None), b"{}", false).unwrap_err();
        assert_eq!(e.code(), "unsupported_media_type");
        assert!(parse_json::<Stop>(&headers(None), b"", true)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_wrong_string_value_is_not_echoed_back() {
        let text = strip_position(
            r#"invalid type: string "K=SECRET \"x\"", expected a map at line 1 column 30"#,
        );
        assert_eq!(text, "invalid type: a string, expected a map");
        assert_eq!(
            strip_position("unknown field `grace`, expected `grace_ms`"),
            "unknown field `grace`, expected `grace_ms`"
        );
    }
}
