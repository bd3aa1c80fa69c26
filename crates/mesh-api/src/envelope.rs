//! The JSON envelope of every answer: `{"success": true, "data": ...}` or
//! `{"success": false, "error": "..."}`, and how failures map to status codes.

use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mesh_ipc::ErrorKind;
use serde::Serialize;

/// A successful answer: `{"success": true, "data": <T>}`.
pub(crate) struct Data<T>(pub T);

#[derive(Serialize)]
struct DataBody<T> {
    success: bool,
    data: T,
}

impl<T: Serialize> IntoResponse for Data<T> {
    fn into_response(self) -> Response {
        json(StatusCode::OK, &DataBody { success: true, data: self.0 })
    }
}

/// `{"success": true, "data": <value>}` encoded, for answers that are cached.
pub(crate) fn data_json<T: Serialize>(value: &T) -> Result<Bytes, ApiError> {
    serde_json::to_vec(&DataBody { success: true, data: value }).map(Bytes::from).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("answer not encoded: {e}"))
    })
}

/// An encoded successful answer.
pub(crate) struct Encoded(pub Bytes);

impl IntoResponse for Encoded {
    fn into_response(self) -> Response {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            self.0,
        )
            .into_response()
    }
}

/// A failed answer: `{"success": false, "error": "..."}` with its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// The node is away: 503 with the reason.
    pub fn node_unavailable(reason: &str) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, format!("node unavailable: {reason}"))
    }

    /// The node answered a request with an error.
    pub fn from_remote(kind: ErrorKind, message: String) -> Self {
        let status = match kind {
            ErrorKind::InvalidApiKey => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            // The node refused mesh-api itself (socket credentials): the API cannot serve.
            ErrorKind::PermissionDenied => StatusCode::SERVICE_UNAVAILABLE,
        };
        // The guide's troubleshooting section greps for this exact text.
        let message = match kind {
            ErrorKind::InvalidApiKey => "Invalid API key".to_owned(),
            _ if message.trim().is_empty() => format!("{kind:?}"),
            _ => message,
        };
        Self { status, message }
    }

    /// A request to the node failed before it answered.
    pub fn from_ipc(error: mesh_ipc::Error) -> Self {
        match error {
            mesh_ipc::Error::Remote { kind, message } => Self::from_remote(kind, message),
            mesh_ipc::Error::Timeout => {
                Self::new(StatusCode::GATEWAY_TIMEOUT, "node did not answer in time")
            }
            mesh_ipc::Error::Malformed(m) => {
                Self::new(StatusCode::BAD_GATEWAY, format!("unexpected answer from the node: {m}"))
            }
            other => Self::node_unavailable(&other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            success: bool,
            error: &'a str,
        }
        let mut response = json(self.status, &Body { success: false, error: &self.message });
        if self.status == StatusCode::UNAUTHORIZED && self.message != "Invalid API key" {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => {
            (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes)
                .into_response()
        }
        // Our own types always serialise; this is the one answer that needs no JSON encoder.
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            r#"{"success":false,"error":"response could not be encoded"}"#,
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_error_kinds_map_to_their_status() {
        let cases = [
            (ErrorKind::InvalidApiKey, 401),
            (ErrorKind::Forbidden, 403),
            (ErrorKind::BadRequest, 400),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::Internal, 500),
            (ErrorKind::PermissionDenied, 503),
        ];
        for (kind, status) in cases {
            assert_eq!(ApiError::from_remote(kind, "x".into()).status.as_u16(), status);
        }
        let key = ApiError::from_remote(ErrorKind::InvalidApiKey, "birdeye said 401".into());
        assert_eq!(key.message, "Invalid API key");
        assert_eq!(ApiError::from_ipc(mesh_ipc::Error::Timeout).status.as_u16(), 504);
        let away = ApiError::from_ipc(mesh_ipc::Error::Closed);
        assert_eq!(away.status.as_u16(), 503);
        assert!(away.message.starts_with("node unavailable: "), "{}", away.message);
    }
}
