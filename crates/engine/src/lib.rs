//! silica-engine: the only crate that touches tensors and devices.
pub mod error;

pub use error::{EngineError, Result};
