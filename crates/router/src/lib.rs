//! silica-router: holds every model `silica serve` runs and picks one per request.
//!
//! - [`ModelPool`]: one [`ModelSlot`] per enabled registry entry, each `loading`, `ready`
//!   (with its [`EngineHandle`]) or `failed` (with the reason). Models load concurrently on
//!   their own threads; a failure leaves the others serving.
//! - [`policy::choose`]: the routing decision, a pure function of the request and a
//!   [`policy::Candidate`] view of each model (status, tier, size, live statistics), so it
//!   can be tested table by table. The router decides; it never computes tensors.
//!
//! ```
//! use silica_router::policy::{choose, Candidate, Priority, RouteRequest, RouterConfig};
//! let c = |name: &str, tier, params| Candidate::ready_idle(name, tier, params);
//! let models = [c("small", Some(silica_engine::registry::Tier::Speed), 500_000_000),
//!               c("large", Some(silica_engine::registry::Tier::Quality), 1_500_000_000)];
//! let req = RouteRequest { priority: Some(Priority::Quality), ..Default::default() };
//! let d = choose(&RouterConfig::default(), &models, &req).unwrap();
//! assert_eq!(models[d.index].name, "large");
//! ```

pub mod policy;
mod pool;

pub use policy::{Decision, Priority, RouteError, RouteRequest, RouterConfig};
pub use pool::{ModelPool, ModelSlot, ModelStatus, Route};
