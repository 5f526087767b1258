//! HTTP plumbing: the body type, JSON answers, the one error → HTTP mapping, and reading
//! request bodies under the cap.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming};
use registry_core::RegistryError;
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
        Err(e) => error_response(&RegistryError::internal(format!(
            "serializing a response: {e}"
        ))),
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

/// The HTTP status of an error code (SPEC §6).
pub fn status_of(error: &RegistryError) -> StatusCode {
    match error {
        RegistryError::InvalidRequest(_) | RegistryError::InvalidJson(_) => StatusCode::BAD_REQUEST,
        RegistryError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        RegistryError::Forbidden(_) | RegistryError::OriginNotAllowed(_) => StatusCode::FORBIDDEN,
        RegistryError::RuntimeNotFound(_)
        | RegistryError::WorkerNotFound(_)
        | RegistryError::RouteNotFound(_) => StatusCode::NOT_FOUND,
        RegistryError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        RegistryError::Conflict(_) => StatusCode::CONFLICT,
        RegistryError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        RegistryError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        RegistryError::CapacityExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
        RegistryError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
        RegistryError::RuntimeUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        RegistryError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        // `Internal` and any variant added later.
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    code: &'a str,
    message: String,
    retryable: bool,
}

/// The one place where an error becomes an HTTP answer: `{"error": {code, message,
/// retryable}}`, with `Retry-After` on `503` and `429`. An internal error's detail is not
/// here: the caller logs it with the request's id.
pub fn error_response(error: &RegistryError) -> Response<Body> {
    let status = status_of(error);
    let message = match error {
        RegistryError::Internal { .. } => {
            "internal error; the server's log has the detail under this request's id".to_string()
        }
        other => other.public_message(),
    };
    let body = ErrorBody {
        error: ErrorFields {
            code: error.code(),
            message,
            retryable: error.is_retryable(),
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = with_type(status, "application/json", bytes);
    let retry_after = match error {
        RegistryError::RuntimeUnavailable { retry_after, .. } => {
            Some(retry_after.unwrap_or(Duration::from_secs(1)))
        }
        RegistryError::CapacityExceeded(_) => Some(Duration::from_secs(1)),
        _ => None,
    };
    if let Some(after) = retry_after {
        // Whole seconds, rounded up, at least one.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if let RegistryError::Unauthorized(_) = error {
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    resp
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
) -> Result<Bytes, RegistryError> {
    let too_large = || {
        RegistryError::PayloadTooLarge(format!(
            "the request body is larger than the limit of {cap} bytes"
        ))
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
        return Err(RegistryError::InvalidRequest(format!(
            "the request body did not arrive within {} s",
            within.as_secs()
        )));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(RegistryError::InvalidRequest(format!(
            "the request body could not be read: {e}"
        ))),
    }
}

/// Parses a JSON body into `T`: `415` unless it is declared JSON, `invalid_json` when it
/// does not parse, `invalid_request` naming the field for unknown fields and wrong types.
/// `None` for an empty body when `optional`.
pub fn parse_json<T: DeserializeOwned>(
    headers: &http::HeaderMap,
    bytes: &[u8],
    optional: bool,
) -> Result<Option<T>, RegistryError> {
    if optional && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !is_json(headers) {
        return Err(RegistryError::UnsupportedMediaType(
            "this request needs a JSON body with `Content-Type: application/json`".into(),
        ));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(RegistryError::InvalidJson(
            "the request body is empty; this request needs a JSON object".into(),
        ));
    }
    // serde reads a struct from a JSON array too (fields by position): every body of this
    // API is an object, so anything else is refused before it could be read that way.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                Ok(_) => {
                    RegistryError::InvalidRequest("the request body must be a JSON object".into())
                }
                Err(e) => {
                    RegistryError::InvalidJson(format!("the request body is not valid JSON: {e}"))
                }
            },
        );
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(&mut *de) {
        // Only whitespace may follow the object: `{…} junk` is not JSON.
        Ok(value) => match de.end() {
            Ok(()) => Ok(Some(value)),
            Err(e) => Err(RegistryError::InvalidJson(format!(
                "the request body is not valid JSON: {e}"
            ))),
        },
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            match inner.classify() {
                serde_json::error::Category::Data => {
                    let text = strip_position(&inner.to_string());
                    Err(RegistryError::InvalidRequest(if path == "." {
                        format!("invalid request body: {text}")
                    } else {
                        format!("invalid field `{path}`: {text}")
                    }))
                }
                _ => Err(RegistryError::InvalidJson(format!(
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

    #[test]
    fn unavailable_answers_carry_retry_after_in_whole_seconds() {
        let r = error_response(&RegistryError::unavailable(
            "down",
            Some(Duration::from_millis(1500)),
        ));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "2");
        let r = error_response(&RegistryError::unavailable("down", None));
        assert_eq!(r.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn every_error_code_has_its_contract_status() {
        let cases = [
            (RegistryError::InvalidRequest(String::new()), 400),
            (RegistryError::InvalidJson(String::new()), 400),
            (RegistryError::Unauthorized(String::new()), 401),
            (RegistryError::Forbidden(String::new()), 403),
            (RegistryError::OriginNotAllowed(String::new()), 403),
            (RegistryError::RuntimeNotFound(String::new()), 404),
            (RegistryError::WorkerNotFound(String::new()), 404),
            (RegistryError::RouteNotFound(String::new()), 404),
            (RegistryError::MethodNotAllowed(String::new()), 405),
            (RegistryError::Conflict(String::new()), 409),
            (RegistryError::PayloadTooLarge(String::new()), 413),
            (RegistryError::UnsupportedMediaType(String::new()), 415),
            (RegistryError::CapacityExceeded(String::new()), 429),
            (RegistryError::internal("x"), 500),
            (RegistryError::Unsupported(String::new()), 501),
            (RegistryError::unavailable("", None), 503),
            (RegistryError::UpstreamTimeout(String::new()), 504),
        ];
        assert_eq!(cases.len(), registry_core::ERROR_CODES.len());
        for (e, status) in cases {
            assert_eq!(status_of(&e).as_u16(), status, "{}", e.code());
        }
    }
}
