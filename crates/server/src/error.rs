//! API errors: one type, one exhaustive mapping from engine and router errors to an HTTP
//! status and OpenAI's body `{"error": {"message", "type", "param", "code"}}`. Internal
//! details (tensor errors) are logged, not sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use silica_engine::EngineError;
use silica_router::RouteError;

/// An error answered to a client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (429/503).
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'a str>,
    code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None, code: None, retry_after: None }
    }
    /// 400 naming the offending field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.into()), code: Some("invalid_value"), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }
    /// 400 for a parameter Silica does not implement.
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.into()), code: Some("unsupported_parameter"), ..Self::new(StatusCode::BAD_REQUEST, message) }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError { code: Some("not_found"), ..Self::new(StatusCode::NOT_FOUND, message) }
    }
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// OpenAI's error `type` for the status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 413 | 422 => "invalid_request_error",
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "service_unavailable",
            _ => "server_error",
        }
    }

    /// The JSON body (also used as a stream error event's payload).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner { message: &self.message, kind: self.kind(), param: self.param.as_deref(), code: self.code },
        })
        .unwrap_or_default()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "request failed");
        }
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidParam { field, msg } => ApiError::invalid(field, msg),
            EngineError::Template(m) => ApiError::invalid("messages", format!("the chat template rejected the conversation: {m}")),
            EngineError::Overloaded { .. } => ApiError {
                retry_after: Some(1),
                code: Some("overloaded"),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
            },
            EngineError::Unavailable(_) => ApiError {
                retry_after: Some(5),
                code: Some("unavailable"),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            },
            EngineError::Candle(_)
            | EngineError::Load { .. }
            | EngineError::Unsupported(_)
            | EngineError::Tokenizer(_)
            | EngineError::Device(_)
            | EngineError::Config(_)
            | EngineError::Io { .. } => {
                tracing::error!(error = %e, "internal error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error while generating; see the server log")
                    .with_code("internal_error")
            }
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let msg = e.to_string();
        match e {
            RouteError::UnknownModel { .. } => ApiError { param: Some("model".into()), ..ApiError::not_found(msg).with_code("model_not_found") },
            RouteError::NotReady { .. } | RouteError::NoneReady { .. } => ApiError {
                retry_after: Some(5),
                code: Some("model_not_ready"),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, msg)
            },
            RouteError::TooLong { .. } => ApiError::invalid("max_tokens", msg),
            RouteError::Overloaded => ApiError {
                retry_after: Some(1),
                code: Some("overloaded"),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, msg)
            },
        }
    }
}
