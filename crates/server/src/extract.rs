//! Request bodies: read within the size limit, parsed as JSON, then deserialised into a wire
//! type with errors that name the offending field.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::AppState;

/// A JSON object body. Rejections are OpenAI-shaped: 413 over the size limit, 400 for bytes
/// that are not a JSON object.
pub struct JsonObject(pub serde_json::Value);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than the limit of {} bytes", state.cfg.max_body_bytes),
                )
                .with_code("body_too_large")
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, format!("cannot read the request body: {}", r.body_text()))
            }
        })?;
        let value = parse_json_text(&bytes)?;
        Ok(JsonObject(value))
    }
}

/// Parse bytes as a JSON object.
pub fn parse_json_text(bytes: &[u8]) -> Result<serde_json::Value, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("the request body is not valid JSON: {e}")).with_code("invalid_json")
    })?;
    if !value.is_object() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "the request body must be a JSON object").with_code("invalid_json"));
    }
    Ok(value)
}

/// Deserialise a JSON value into `T`; the error names the field (`messages[0].role`) and what
/// was wrong with it. Unknown fields are refused by name.
pub fn typed<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner().to_string();
        if let Some(rest) = inner.strip_prefix("unknown field `") {
            let name = rest.split('`').next().unwrap_or_default();
            // The path already ends with the unknown key.
            let field = if path == "." { name.to_string() } else if path.ends_with(name) { path } else { format!("{path}.{name}") };
            return ApiError::unsupported(field.clone(), format!("unrecognized request argument `{field}`"));
        }
        let field = if path == "." { "body".to_string() } else { path };
        ApiError::invalid(field.clone(), format!("invalid value for `{field}`: {inner}"))
    })
}
