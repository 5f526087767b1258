//! HTTP errors: [`ApiError`] — the core's error, or one that only HTTP has — the table of
//! SPEC §6 that gives each code its status, and the one function that turns an error into
//! a response.

use std::fmt;
use std::time::Duration;

use http::header::{HeaderValue, ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Method, Response, StatusCode};
use registry_core::RegistryError;
use serde::Serialize;

use crate::wire::{with_type, Body};

/// Every error code of the API with its status, in the order of the contract's table
/// (SPEC §6). The OpenAPI document lists the same codes (a test keeps it so).
pub const ERRORS: &[(&str, StatusCode)] = &[
    ("invalid_request", StatusCode::BAD_REQUEST),
    ("invalid_json", StatusCode::BAD_REQUEST),
    ("unauthorized", StatusCode::UNAUTHORIZED),
    ("forbidden", StatusCode::FORBIDDEN),
    ("origin_not_allowed", StatusCode::FORBIDDEN),
    ("runtime_not_found", StatusCode::NOT_FOUND),
    ("worker_not_found", StatusCode::NOT_FOUND),
    ("route_not_found", StatusCode::NOT_FOUND),
    ("method_not_allowed", StatusCode::METHOD_NOT_ALLOWED),
    ("conflict", StatusCode::CONFLICT),
    ("payload_too_large", StatusCode::PAYLOAD_TOO_LARGE),
    ("unsupported_media_type", StatusCode::UNSUPPORTED_MEDIA_TYPE),
    ("capacity_exceeded", StatusCode::TOO_MANY_REQUESTS),
    (
        "headers_too_large",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    ),
    ("internal", StatusCode::INTERNAL_SERVER_ERROR),
    ("unsupported", StatusCode::NOT_IMPLEMENTED),
    ("runtime_unavailable", StatusCode::SERVICE_UNAVAILABLE),
    ("upstream_timeout", StatusCode::GATEWAY_TIMEOUT),
];

/// What a request can fail with: an error of the registry or a source, or one of the
/// errors only HTTP has (the body's encoding, the credential, the route, the origin).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiError {
    /// An error of the registry or a source; its code is the core's.
    Registry(RegistryError),
    /// The body is not parsable JSON (`invalid_json`).
    InvalidJson(String),
    /// No or an unknown credential (`unauthorized`, with `WWW-Authenticate: Bearer`).
    Unauthorized(String),
    /// The request's `Origin` is not allowed (`origin_not_allowed`).
    OriginNotAllowed(String),
    /// No route has this path (`route_not_found`).
    RouteNotFound(String),
    /// The path has routes, but not for `method` (`method_not_allowed`); `allow` is what
    /// it takes, sent as `Allow`.
    MethodNotAllowed {
        /// The method the request used.
        method: Method,
        /// The methods the path takes, in table order.
        allow: Vec<Method>,
    },
    /// The body is not declared JSON (`unsupported_media_type`).
    UnsupportedMediaType(String),
    /// The request's head has more header lines or bytes than the server takes
    /// (`headers_too_large`, `431`).
    HeadersTooLarge(String),
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Registry(e) => e.fmt(f),
            ApiError::MethodNotAllowed { method, allow } => write!(
                f,
                "{method} is not allowed here; this path takes {}",
                allow_list(allow)
            ),
            ApiError::InvalidJson(m)
            | ApiError::Unauthorized(m)
            | ApiError::OriginNotAllowed(m)
            | ApiError::RouteNotFound(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::HeadersTooLarge(m) => f.write_str(m),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(error: RegistryError) -> Self {
        ApiError::Registry(error)
    }
}

impl ApiError {
    /// The API error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Registry(e) => e.code(),
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::OriginNotAllowed(_) => "origin_not_allowed",
            ApiError::RouteNotFound(_) => "route_not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
        }
    }

    /// The status of the code, from [`ERRORS`]; `500` for a code the table lacks (a variant
    /// the core adds later).
    pub fn status(&self) -> StatusCode {
        let code = self.code();
        ERRORS
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(StatusCode::INTERNAL_SERVER_ERROR, |(_, status)| *status)
    }

    /// Whether the same request may succeed later without change: only as the core says.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Registry(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The detail of an internal error, for the log.
    pub fn internal_detail(&self) -> Option<&str> {
        match self {
            ApiError::Registry(e) => e.internal_detail(),
            _ => None,
        }
    }

    /// The message a client sees: for an internal error, a generic one.
    fn public_message(&self) -> String {
        match self {
            ApiError::Registry(RegistryError::Internal { .. }) => {
                "internal error; the server's log has the detail under this request's id".into()
            }
            ApiError::Registry(e) => e.public_message(),
            other => other.to_string(),
        }
    }

    /// The one place where an error becomes an HTTP answer: `{"error": {code, message,
    /// retryable}}` with the status of [`ERRORS`], `Retry-After` on `503` and `429`,
    /// `WWW-Authenticate` on `401` and `Allow` on `405`. An internal error's detail is not
    /// here: the caller logs it with the request's id.
    pub fn to_response(&self) -> Response<Body> {
        let mut resp = with_type(self.status(), "application/json", self.body_bytes());
        let headers = resp.headers_mut();
        if let Some(secs) = self.retry_after_secs() {
            headers.insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        match self {
            ApiError::Unauthorized(_) => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                if let Ok(value) = HeaderValue::from_str(&allow_list(allow)) {
                    headers.insert(ALLOW, value);
                }
            }
            _ => {}
        }
        resp
    }

    /// The JSON error body, `{"error": {code, message, retryable}}`.
    fn body_bytes(&self) -> Vec<u8> {
        let body = ErrorBody {
            error: ErrorFields {
                code: self.code(),
                message: self.public_message(),
                retryable: self.is_retryable(),
            },
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// `Retry-After` in whole seconds (rounded up, at least one), on `503` and `429`.
    fn retry_after_secs(&self) -> Option<u64> {
        let after = match self {
            ApiError::Registry(RegistryError::RuntimeUnavailable { retry_after, .. }) => {
                retry_after.unwrap_or(Duration::from_secs(1))
            }
            ApiError::Registry(RegistryError::CapacityExceeded(_)) => Duration::from_secs(1),
            _ => return None,
        };
        Some((after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1))
    }

    /// The whole HTTP/1.1 answer as bytes, with `Connection: close`: what the listener
    /// writes on a connection it refuses before any request was read from it (hyper does
    /// not serve that connection). Nothing of it depends on the request.
    pub fn to_closing_bytes(&self) -> Vec<u8> {
        let body = self.body_bytes();
        let status = self.status();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        if let Some(secs) = self.retry_after_secs() {
            out.push_str(&format!("retry-after: {secs}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&body);
        out
    }
}

/// `GET, DELETE`.
fn allow_list(allow: &[Method]) -> String {
    allow
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ")
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One error of every code, in the order of [`ERRORS`].
    fn every_error() -> Vec<ApiError> {
        let m = String::new;
        let core = |e: RegistryError| ApiError::Registry(e);
        vec![
            core(RegistryError::InvalidRequest(m())),
            ApiError::InvalidJson(m()),
            ApiError::Unauthorized(m()),
            core(RegistryError::Forbidden(m())),
            ApiError::OriginNotAllowed(m()),
            core(RegistryError::RuntimeNotFound(m())),
            core(RegistryError::WorkerNotFound(m())),
            ApiError::RouteNotFound(m()),
            ApiError::MethodNotAllowed {
                method: Method::PUT,
                allow: vec![Method::GET],
            },
            core(RegistryError::Conflict(m())),
            core(RegistryError::PayloadTooLarge(m())),
            ApiError::UnsupportedMediaType(m()),
            core(RegistryError::CapacityExceeded(m())),
            ApiError::HeadersTooLarge(m()),
            core(RegistryError::internal("x")),
            core(RegistryError::Unsupported(m())),
            core(RegistryError::unavailable("", None)),
            core(RegistryError::UpstreamTimeout(m())),
        ]
    }

    #[test]
    fn variants_map_one_to_one_onto_spec_codes() {
        let codes: Vec<&str> = every_error().iter().map(ApiError::code).collect();
        let table: Vec<&str> = ERRORS.iter().map(|(code, _)| *code).collect();
        assert_eq!(codes, table);
    }

    #[test]
    fn every_error_code_has_its_contract_status() {
        let statuses = [
            400, 400, 401, 403, 403, 404, 404, 404, 405, 409, 413, 415, 429, 431, 500, 501, 503,
            504,
        ];
        let cases = every_error();
        assert_eq!(cases.len(), ERRORS.len());
        for (e, status) in cases.iter().zip(statuses) {
            assert_eq!(e.status().as_u16(), status, "{}", e.code());
            assert_eq!(e.to_response().status().as_u16(), status, "{}", e.code());
        }
    }

    #[test]
    fn retryable_is_the_cores_word_and_http_only_errors_are_not() {
        for e in every_error() {
            match &e {
                ApiError::Registry(core) => assert_eq!(e.is_retryable(), core.is_retryable()),
                other => assert!(!other.is_retryable(), "{}", other.code()),
            }
        }
    }

    #[test]
    fn unavailable_answers_carry_retry_after_in_whole_seconds() {
        let r = ApiError::from(RegistryError::unavailable(
            "down",
            Some(Duration::from_millis(1500)),
        ))
        .to_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "2");
        let r = ApiError::from(RegistryError::unavailable("down", None)).to_response();
        assert_eq!(r.headers()[RETRY_AFTER], "1");
    }

    #[test]
    fn a_closing_answer_is_a_whole_http_response_with_its_length() {
        let e = ApiError::from(RegistryError::CapacityExceeded("too many".into()));
        let bytes = e.to_closing_bytes();
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(head.contains("\r\nretry-after: 1"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "capacity_exceeded");
        assert_eq!(v["error"]["retryable"], true);
    }

    #[test]
    fn method_not_allowed_sends_its_allow_list() {
        let r = ApiError::MethodNotAllowed {
            method: Method::PUT,
            allow: vec![Method::GET, Method::DELETE],
        }
        .to_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "GET, DELETE");
    }
}
