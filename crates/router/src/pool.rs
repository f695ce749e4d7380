//! The models a server runs: one slot per enabled registry entry, loaded concurrently.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use silica_engine::device::DeviceSpec;
use silica_engine::loaded::{LoadedModel, MemoryEstimate, ModelInfo};
use silica_engine::registry::{ModelEntry, Registry};
use silica_engine::scheduler::{cpu_available_bytes, EngineHandle, EngineStats, SchedulerConfig};
use silica_engine::EngineError;

use crate::policy::{self, Candidate, CandidateStatus, Decision, RouteError, RouteRequest, RouterConfig};

/// Where a model is in its life.
#[derive(Debug, Clone)]
pub enum ModelStatus {
    Loading,
    Ready(EngineHandle),
    Failed(String),
}

impl ModelStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            ModelStatus::Loading => "loading",
            ModelStatus::Ready(_) => "ready",
            ModelStatus::Failed(_) => "failed",
        }
    }
}

/// One model of the pool.
#[derive(Debug)]
pub struct ModelSlot {
    pub entry: ModelEntry,
    status: RwLock<ModelStatus>,
}

impl ModelSlot {
    pub fn status(&self) -> ModelStatus {
        self.status.read().map(|s| s.clone()).unwrap_or_else(|_| ModelStatus::Failed("status lock poisoned".into()))
    }
    fn set(&self, s: ModelStatus) {
        if let Ok(mut g) = self.status.write() {
            *g = s;
        }
    }
    pub fn handle(&self) -> Option<EngineHandle> {
        match self.status() {
            ModelStatus::Ready(h) => Some(h),
            _ => None,
        }
    }
}

/// Memory reserved by the models loading so far, against what was available at the start.
struct MemoryGate {
    available: Option<u64>,
    reserved: Mutex<u64>,
}

impl MemoryGate {
    fn reserve(&self, name: &str, need: &MemoryEstimate, device: DeviceSpec) -> silica_engine::Result<()> {
        let on_cpu = device.open().map(|d| d.is_cpu()).unwrap_or(false);
        let (Some(avail), true) = (self.available, on_cpu) else {
            tracing::info!(model = name, weights = need.weights_bytes, kv = need.kv_cache_bytes, "memory not checked on this device");
            return Ok(());
        };
        let mut r = self.reserved.lock().map_err(|_| EngineError::Config("memory reservation lock poisoned".into()))?;
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        if *r + need.total() > avail {
            return Err(EngineError::Config(format!(
                "not enough memory for `{name}`: it needs {:.2} GiB (weights {:.2} GiB + KV cache {:.2} GiB) but only {:.2} GiB of the \
                 {:.2} GiB available are left after the other models; lower `engine.kv_cache` in the settings or disable a model",
                gib(need.total()),
                gib(need.weights_bytes),
                gib(need.kv_cache_bytes),
                gib(avail.saturating_sub(*r)),
                gib(avail)
            )));
        }
        *r += need.total();
        Ok(())
    }
}

/// The chosen model for a request.
#[derive(Clone)]
pub struct Route {
    pub model: String,
    pub handle: EngineHandle,
    pub reason: String,
}

/// Every model the server runs, and the routing decision over them.
#[derive(Debug)]
pub struct ModelPool {
    slots: Vec<Arc<ModelSlot>>,
    cfg: RouterConfig,
}

impl ModelPool {
    /// A pool of `entries`, all `loading`.
    pub fn new(entries: Vec<ModelEntry>, cfg: RouterConfig) -> Arc<Self> {
        let slots = entries.into_iter().map(|entry| Arc::new(ModelSlot { entry, status: RwLock::new(ModelStatus::Loading) })).collect();
        Arc::new(ModelPool { slots, cfg })
    }

    /// A pool over engines already running (tests, embedding).
    pub fn from_handles(models: Vec<(ModelEntry, EngineHandle)>, cfg: RouterConfig) -> Arc<Self> {
        let slots = models
            .into_iter()
            .map(|(entry, h)| Arc::new(ModelSlot { entry, status: RwLock::new(ModelStatus::Ready(h)) }))
            .collect();
        Arc::new(ModelPool { slots, cfg })
    }

    pub fn slots(&self) -> &[Arc<ModelSlot>] {
        &self.slots
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// The slot answering to `name` (a name or an alias).
    pub fn find(&self, name: &str) -> Option<&Arc<ModelSlot>> {
        self.slots.iter().find(|s| s.entry.name == name || s.entry.aliases.iter().any(|a| a == name))
    }

    /// Whether any model is ready.
    pub fn any_ready(&self) -> bool {
        self.slots.iter().any(|s| s.handle().is_some())
    }

    /// Load every model on its own thread (fetching files when `fetch`), then start its
    /// engine. Returns at once; the threads' handles let a caller wait for the end.
    ///
    /// Before loading, each model's weights plus KV budget ([`MemoryEstimate`]) are reserved
    /// against the memory available when loading began (CPU models; GPU memory is not
    /// queried); a model that does not fit fails with the numbers and the others go on.
    pub fn load_all(self: &Arc<Self>, registry: &Registry, engine: &SchedulerConfig, fetch: bool) -> Vec<std::thread::JoinHandle<()>> {
        let gate = Arc::new(MemoryGate { available: cpu_available_bytes().ok(), reserved: Mutex::new(0) });
        self.slots
            .iter()
            .map(|slot| {
                let slot = slot.clone();
                let reg = registry.clone();
                let engine = engine.clone();
                let gate = gate.clone();
                std::thread::Builder::new()
                    .name(format!("load-{}", slot.entry.name))
                    .spawn(move || {
                        let t0 = Instant::now();
                        let e = &slot.entry;
                        let r = reg.resolve(e, fetch).and_then(|files| {
                            gate.reserve(&e.name, &MemoryEstimate::of(&files, e.device, e.dtype, &engine)?, e.device)?;
                            let m = LoadedModel::load(&e.name, &files, e.device, e.dtype)?;
                            EngineHandle::start(m, engine)
                        });
                        match r {
                            Ok(h) => {
                                tracing::info!(model = %e.name, secs = t0.elapsed().as_secs_f64(), "model ready");
                                slot.set(ModelStatus::Ready(h));
                            }
                            Err(err) => {
                                tracing::error!(model = %e.name, error = %err, "model failed to load");
                                slot.set(ModelStatus::Failed(err.to_string()));
                            }
                        }
                    })
                    .expect("spawning a loader thread")
            })
            .collect()
    }

    /// Candidate views for the policy, with live statistics.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.slots
            .iter()
            .map(|s| {
                let e = &s.entry;
                let (status, info, stats, overloaded) = match s.status() {
                    ModelStatus::Loading => (CandidateStatus::Loading, None, EngineStats::default(), false),
                    ModelStatus::Failed(r) => (CandidateStatus::Failed(r), None, EngineStats::default(), false),
                    ModelStatus::Ready(h) => {
                        let st = h.stats();
                        let over = h.is_overloaded();
                        (CandidateStatus::Ready, Some(h.info().clone()), st, over)
                    }
                };
                let info: Option<ModelInfo> = info;
                Candidate {
                    name: e.name.clone(),
                    aliases: e.aliases.clone(),
                    tier: e.tier,
                    num_parameters: info.as_ref().map_or(0, |i| i.num_parameters),
                    context_length: info.as_ref().map_or(0, |i| i.context_length),
                    status,
                    running: stats.running,
                    waiting: stats.waiting,
                    overloaded,
                    itl_ms: stats.itl_ms_p50,
                }
            })
            .collect()
    }

    /// Pick the model for a request.
    pub fn route(&self, req: &RouteRequest) -> Result<Route, RouteError> {
        let cands = self.candidates();
        let Decision { index, reason } = policy::choose(&self.cfg, &cands, req)?;
        let slot = &self.slots[index];
        let handle = slot.handle().ok_or_else(|| RouteError::NotReady { name: slot.entry.name.clone(), status: "unloaded".into() })?;
        tracing::debug!(model = %slot.entry.name, %reason, "routed");
        Ok(Route { model: slot.entry.name.clone(), handle, reason })
    }

    /// Stop every running engine (their requests end with an error event).
    pub fn shutdown(&self) {
        for s in &self.slots {
            if let Some(h) = s.handle() {
                h.shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_gate_reserves_and_refuses_with_the_numbers() {
        let gib = 1u64 << 30;
        let gate = MemoryGate { available: Some(4 * gib), reserved: Mutex::new(0) };
        let m = |w: u64, kv: u64| MemoryEstimate { weights_bytes: w, kv_cache_bytes: kv };
        gate.reserve("a", &m(gib, gib), DeviceSpec::Cpu).unwrap();
        let e = gate.reserve("b", &m(gib, 2 * gib), DeviceSpec::Cpu).unwrap_err().to_string();
        for needle in ["`b`", "3.00 GiB", "weights 1.00 GiB", "KV cache 2.00 GiB", "2.00 GiB of the 4.00 GiB"] {
            assert!(e.contains(needle), "{needle:?} missing from {e}");
        }
        // The refused model reserved nothing: a smaller one still fits.
        gate.reserve("c", &m(gib, gib), DeviceSpec::Cpu).unwrap();
        assert_eq!(*gate.reserved.lock().unwrap(), 4 * gib);
    }
}
