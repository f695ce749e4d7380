//! silica-engine: the only crate that touches tensors and devices.
pub mod device;
pub mod error;
pub mod kv;
pub mod model;
pub mod registry;
pub mod generate;
pub mod loaded;
pub mod sampling;
pub mod scheduler;
pub mod testing;
pub mod tokenizer;

pub use error::{EngineError, Result};
