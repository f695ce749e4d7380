//! silica-engine: the only crate that touches tensors and devices.
pub mod device;
pub mod error;
pub mod kv;
pub mod model;
pub mod registry;
pub mod sampling;
pub mod testing;

pub use error::{EngineError, Result};
