//! The engine thread: `loop { admit → schedule → forward → postprocess }`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::prefix::PrefixCache;
use super::stats::{EngineStats, Windows};
use super::{Command, Event, FinishedEvent, RequestTimings, SchedulerConfig, Submission, TokenEvent};
use crate::error::{EngineError, Result};
use crate::generate::{beam_results, prepare_prompt, token_budget, FinishReason, SequenceOutput, TokenLogprob, Usage};
use crate::kv::{KvCache, KvCacheConfig, ReserveError, SeqCache};
use crate::loaded::LoadedModel;
use crate::model::fused::{PendingSelection, PendingWords, Readbacks};
use crate::model::SeqInput;
use crate::sampling::beam::{BeamSearch, BeamSearchParams};
use crate::sampling::{Sampled, Sampler};

/// A sampled (non-beam) sequence.
struct Single {
    seq: SeqCache,
    /// Prompt followed by every sampled token; positions `seq.len..` still need computing.
    tokens: Vec<u32>,
    sampler: Sampler,
    out: SequenceOutput,
    want_logprobs: bool,
}

impl Single {
    /// Whether the device picks this sequence's next token: no logprobs, and a sampler without
    /// penalties, logit bias or invalid parameters.
    fn device_picks(&self) -> bool {
        !self.want_logprobs && self.sampler.device_selectable()
    }
}

/// A beam-search group: its beams run as rows of the same batched forward.
struct Beams {
    params: BeamSearchParams,
    eos: Vec<u32>,
    search: BeamSearch,
    /// Live beams' caches; before the first step, one sequence holding the prompt.
    live: Vec<SeqCache>,
    /// The token each live beam must feed next (empty while prefilling).
    next: Vec<u32>,
    /// The live beam each live beam continues (the last step's parents).
    parents: Vec<u32>,
}

enum Body {
    Single(Box<Single>),
    Beams(Box<Beams>),
}

struct Request {
    /// Unique per engine: what an [`InFlight`] step knows its rows' requests by.
    id: u64,
    tx: UnboundedSender<Event>,
    arrived: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    prompt: Vec<u32>,
    stops: Vec<String>,
    prompt_cached: usize,
    prompt_inserted: bool,
    body: Body,
}

impl Request {
    fn caches_mut(&mut self) -> Vec<&mut SeqCache> {
        match &mut self.body {
            Body::Single(s) => vec![&mut s.seq],
            Body::Beams(b) => b.live.iter_mut().collect(),
        }
    }
    fn cancelled(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A step's results on the host: every logit of the rows that need them (`offsets[row]` into
/// `dense`); for the others, what the device picked: the token (`picked`, a greedy argmax or a
/// draw) or a beam row's best continuations (`top`).
struct HostLogits {
    dense: Vec<f32>,
    offsets: Vec<Option<usize>>,
    picked: Vec<Option<u32>>,
    top: Vec<Option<Vec<(u32, f32)>>>,
}

/// A step whose forward pass and token selection are on the device's stream, the tokens on
/// their way to the host (CUDA; see [`Engine::land`]).
struct InFlight {
    /// Per row: its request's id (indices into `running` move as requests end) and the
    /// positions the row computes, `start..start + len`. A beam step's rows are its live
    /// beams, in order.
    rows: Vec<(u64, usize, usize)>,
    selection: PendingSelection,
    /// A beam step launched ahead ([`Engine::launch_beams_ahead`]).
    beams: Option<AheadBeams>,
}

/// A beam step launched before the host had read the step before: the device decided that
/// step (its live beams and their tokens) and wrote this one's inputs. The host makes the
/// same decision when it reads the step before and keeps this one only where both agree
/// ([`Engine::confirm_beams`]).
struct AheadBeams {
    /// A fresh block per row: the row's last block in this step (the parent's partial last
    /// block copied into it on the device).
    spares: Vec<u32>,
    /// The device's decision: (parent, token) per row, then 1 when it took a full set of beams
    /// (`fused::beam_advance`).
    decision: PendingWords,
}

/// One row group of the step: a request's tokens to compute for one of its sequences.
struct Row {
    req: usize,
    /// Beam index (0 for single sequences).
    beam: usize,
    start: usize,
    len: usize,
    /// The chunk reaches the end of what must be computed: its logits are used.
    samples: bool,
}

/// Where a step's time goes (`SILICA_PROFILE_STEPS=1`): schedule, forward (host-side kernel
/// launches), logits to the host (waits for the device), postprocess (sampling, detokenizing,
/// events). Logged every few seconds.
#[derive(Default)]
struct StepProfile {
    since: Option<Instant>,
    steps: u32,
    rows: usize,
    spent: [std::time::Duration; 4],
}

impl StepProfile {
    fn add(&mut self, rows: usize, d: [std::time::Duration; 4]) {
        let since = *self.since.get_or_insert_with(Instant::now);
        self.steps += 1;
        self.rows += rows;
        for (a, b) in self.spent.iter_mut().zip(d) {
            *a += b;
        }
        if since.elapsed().as_secs_f64() >= 2.0 {
            let ms = |i: usize| self.spent[i].as_secs_f64() * 1e3 / self.steps as f64;
            tracing::info!(
                steps = self.steps,
                rows_per_step = self.rows as f64 / self.steps as f64,
                schedule_ms = ms(0),
                forward_ms = ms(1),
                logits_to_host_ms = ms(2),
                postprocess_ms = ms(3),
                "step profile"
            );
            *self = StepProfile::default();
        }
    }
}

pub(crate) struct Engine {
    profile: Option<StepProfile>,
    model: LoadedModel,
    kv: KvCache,
    prefix: Option<PrefixCache>,
    cfg: SchedulerConfig,
    rx: Receiver<Command>,
    pending: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
    counters: EngineStats,
    windows: Windows,
    waiting: VecDeque<Request>,
    /// The step launched but not yet read back (see [`Engine::land`]).
    in_flight: Option<InFlight>,
    /// Decode steps may be launched before the previous step's tokens are on the host
    /// (`SILICA_RUN_AHEAD=0` turns it off).
    run_ahead: bool,
    readbacks: Readbacks,
    next_id: u64,
    running: Vec<Request>,
    /// Logits to the host (page-locked buffer on CUDA).
    copier: crate::device::HostCopier,
}

impl Engine {
    pub fn new(
        model: LoadedModel,
        cfg: SchedulerConfig,
        rx: Receiver<Command>,
        pending: Arc<AtomicUsize>,
        stats: Arc<Mutex<EngineStats>>,
    ) -> Result<Self> {
        let c = model.config();
        let dsize = model.model.dtype().size_in_bytes();
        let num_blocks = cfg.num_blocks(c.kv_bytes_per_token(dsize), model.model.device())?;
        let kv = model.model.new_kv_cache(KvCacheConfig { block_size: cfg.block_size, num_blocks })?;
        tracing::info!(model = %model.info.name, num_blocks, block_size = cfg.block_size,
            mib = (num_blocks * cfg.block_size * c.kv_bytes_per_token(dsize)) as f64 / 1048576.0, "KV cache allocated");
        let prefix = cfg.prefix_caching.then(PrefixCache::default);
        let counters = EngineStats {
            kv_cache_bytes: (num_blocks * cfg.block_size * c.kv_bytes_per_token(dsize)) as u64,
            ..Default::default()
        };
        Ok(Engine {
            profile: std::env::var("SILICA_PROFILE_STEPS").is_ok_and(|v| v == "1").then(StepProfile::default),
            model,
            kv,
            prefix,
            cfg,
            rx,
            pending,
            stats,
            counters,
            windows: Windows::default(),
            waiting: VecDeque::new(),
            in_flight: None,
            run_ahead: std::env::var("SILICA_RUN_AHEAD").map_or(true, |v| v != "0"),
            readbacks: Readbacks::default(),
            next_id: 0,
            running: Vec::new(),
            copier: Default::default(),
        })
    }

    pub fn run(mut self) {
        loop {
            if !self.receive() {
                break;
            }
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            match step {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.fail_running(&e),
                Err(_) => self.fail_running(&EngineError::Unavailable("internal error in the engine step".into())),
            }
            self.publish();
        }
        let err = || EngineError::Unavailable("the engine is shutting down".into());
        for r in std::mem::take(&mut self.running).into_iter().chain(std::mem::take(&mut self.waiting)) {
            let _ = r.tx.send(Event::Error(err()));
        }
        while let Ok(Command::Submit(s)) = self.rx.try_recv() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            let _ = s.tx.send(Event::Error(err()));
        }
        self.publish();
    }

    /// Take new commands; block when idle. Returns false when the engine must stop.
    fn receive(&mut self) -> bool {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            let cmd = if idle {
                match self.rx.recv() {
                    Ok(c) => c,
                    Err(_) => return false, // every handle dropped and nothing in flight
                }
            } else {
                match self.rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => return true,
                }
            };
            match cmd {
                Command::Submit(s) => self.accept(s),
                Command::Shutdown => return false,
            }
        }
    }

    /// Prepare a submission on the engine thread (template, tokenization, limits).
    fn accept(&mut self, s: Submission) {
        self.counters.requests_total += 1;
        match self.prepare(&s, self.next_id) {
            Ok(r) => {
                self.next_id += 1;
                self.waiting.push_back(r);
            }
            Err(e) => {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                self.counters.requests_failed += 1;
                let _ = s.tx.send(Event::Error(e));
            }
        }
    }

    /// The request `id` for a submission: template, tokenization, limits.
    fn prepare(&self, s: &Submission, id: u64) -> Result<Request> {
        let m = &self.model;
        let req = &s.req;
        req.sampling.validate(m.config().vocab_size)?;
        let prompt = prepare_prompt(m, &req.prompt)?;
        let budget = token_budget(prompt.len(), req.stop.max_tokens, m.config().max_position_embeddings)?;
        let beams = req.beam.as_ref().map_or(1, |b| b.num_beams);
        let need = self.kv.blocks_for(prompt.len() + budget.min(256)) * beams;
        if need > self.kv.num_blocks() {
            return Err(EngineError::invalid(
                "prompt",
                format!(
                    "the request needs {} KV-cache tokens, the cache holds {}",
                    need * self.kv.block_size(),
                    self.kv.num_blocks() * self.kv.block_size()
                ),
            ));
        }
        let body = match &req.beam {
            None => Body::Single(Box::new(Single {
                seq: SeqCache::default(),
                tokens: prompt.clone(),
                sampler: Sampler::new(req.sampling.clone(), m.config().vocab_size),
                out: SequenceOutput::new(m, &req.stop, budget)?,
                want_logprobs: req.sampling.top_logprobs.is_some(),
            })),
            Some(b) => {
                if !req.sampling.is_greedy() {
                    return Err(EngineError::invalid(
                        "temperature",
                        "beam search is deterministic; temperature > 0 cannot be combined with num_beams",
                    ));
                }
                let mut eos = req.stop.stop_token_ids.clone();
                if !req.stop.ignore_eos {
                    eos.extend(m.tokenizer.eos_token_ids().iter().copied());
                }
                let params = BeamSearchParams { max_new_tokens: budget, ..b.clone() };
                let search = BeamSearch::new(params.clone(), eos.clone())?;
                Body::Beams(Box::new(Beams { params, eos, search, live: vec![SeqCache::default()], next: Vec::new(), parents: Vec::new() }))
            }
        };
        Ok(Request {
            id,
            tx: s.tx.clone(),
            arrived: s.arrived,
            admitted: None,
            first_token: None,
            last_token: None,
            prompt,
            stops: req.stop.stop.clone(),
            prompt_cached: 0,
            prompt_inserted: false,
            body,
        })
    }

    /// One step: drop cancelled requests, schedule rows, run one forward, postprocess; or,
    /// while a step is in flight, land it.
    fn step(&mut self) -> Result<()> {
        if let Some(f) = self.in_flight.take() {
            return self.land(f);
        }
        let t0 = Instant::now();
        self.reap_cancelled();
        let rows = self.schedule()?;
        if rows.is_empty() {
            return Ok(());
        }
        let t1 = Instant::now();
        let logits = {
            let mut inputs = Vec::with_capacity(rows.len());
            for r in &rows {
                let req = &self.running[r.req];
                let (tokens, cache): (&[u32], &SeqCache) = match &req.body {
                    Body::Single(s) => (&s.tokens[r.start..r.start + r.len], &s.seq),
                    Body::Beams(b) if b.next.is_empty() => (&req.prompt[r.start..r.start + r.len], &b.live[0]),
                    Body::Beams(b) => (std::slice::from_ref(&b.next[r.beam]), &b.live[r.beam]),
                };
                inputs.push(SeqInput { tokens, cache, all_logits: false });
            }
            self.model.model.forward(&inputs, &mut self.kv)?
        };
        let t2 = Instant::now();
        let in_flight = match self.start_in_flight(&rows, &logits)? {
            Some(f) => Some(f),
            None => self.start_beams_in_flight(&rows, &logits)?,
        };
        if let Some(f) = in_flight {
            if let Some(p) = &mut self.profile {
                p.add(rows.len(), [t1 - t0, t2 - t1, std::time::Duration::ZERO, std::time::Duration::ZERO]);
            }
            return self.land(f);
        }
        let vocab = self.model.config().vocab_size;
        let logits = self.logits_to_host(&rows, &logits, vocab)?;
        let t3 = Instant::now();
        let r = self.postprocess(&rows, &logits, vocab);
        if let Some(p) = &mut self.profile {
            p.add(rows.len(), [t1 - t0, t2 - t1, t3 - t2, t3.elapsed()]);
        }
        r
    }

    /// Launches this step's token selection on the device without waiting for it, when every
    /// row is a single sequence's last chunk whose choice the device makes (CUDA; greedy or
    /// sampling without penalties, bias or logprobs). Each row's sampler gives its selection
    /// here, as in [`logits_to_host`](Self::logits_to_host).
    fn start_in_flight(&mut self, rows: &[Row], logits: &candle_core::Tensor) -> Result<Option<InFlight>> {
        if !self.run_ahead || !crate::model::fused::select_applies(self.model.model.device()) {
            return Ok(None);
        }
        let device_picks = |r: &Row| {
            r.samples && matches!(&self.running[r.req].body, Body::Single(s) if s.device_picks())
        };
        if !rows.iter().all(device_picks) {
            return Ok(None);
        }
        let sel = self.device_selections(rows.iter().map(|r| r.req))?;
        let ids = rows.iter().map(|r| (self.running[r.req].id, r.start, r.len)).collect();
        let selection = crate::model::fused::select_start(logits, &sel, &mut self.readbacks)?;
        Ok(Some(InFlight { rows: ids, selection, beams: None }))
    }

    /// The top-n selection of a beam step launched without waiting, when the step is one beam
    /// search's decode step and nothing else (CUDA): [`land`](Self::land) may then launch the
    /// next beam step before it reads this one ([`launch_beams_ahead`](Self::launch_beams_ahead)).
    fn start_beams_in_flight(&mut self, rows: &[Row], logits: &candle_core::Tensor) -> Result<Option<InFlight>> {
        let Some(first) = rows.first() else { return Ok(None) };
        if !self.run_ahead || !crate::model::fused::select_applies(self.model.model.device()) || !self.kv.copies_on_device() {
            return Ok(None);
        }
        let Body::Beams(b) = &self.running[first.req].body else { return Ok(None) };
        let one_group = rows.len() == b.live.len() && !b.next.is_empty();
        if !one_group || !rows.iter().enumerate().all(|(k, r)| r.req == first.req && r.beam == k && r.len == 1 && r.samples) {
            return Ok(None);
        }
        // The candidates come back in one read-back buffer.
        let k = b.search.candidates_per_row();
        if 2 * k * rows.len() > crate::model::fused::READBACK_WORDS {
            return Ok(None);
        }
        let sel = vec![crate::sampling::Selection::TopN(k); rows.len()];
        let id = self.running[first.req].id;
        let ids = rows.iter().map(|r| (id, r.start, 1)).collect();
        let selection = crate::model::fused::select_start(logits, &sel, &mut self.readbacks)?;
        Ok(Some(InFlight { rows: ids, selection, beams: None }))
    }

    /// Each request's selection for the device, its sampler drawing now (single sequences that
    /// [`Single::device_picks`]).
    fn device_selections(&mut self, reqs: impl Iterator<Item = usize>) -> Result<Vec<crate::sampling::Selection>> {
        reqs.map(|i| match &mut self.running[i].body {
            Body::Single(s) => s.sampler.device_selection(),
            Body::Beams(_) => None,
        }
        .ok_or_else(|| EngineError::Unavailable("a row's token needs the host".into())))
        .collect()
    }

    /// Ends an in-flight step. First, when nothing would change the batch, the next decode step
    /// of the same sequences is launched behind it, its input ids this step's tokens on the
    /// device ([`launch_ahead`](Self::launch_ahead)): the device runs it while the host reads
    /// this step's tokens, streams them and prepares the step after, so the host's share of a
    /// step no longer adds to it. Then this step's tokens are read and postprocessed as any
    /// step's. A row whose request has ended since (finished on its previous token, cancelled)
    /// is dropped with its token.
    fn land(&mut self, mut f: InFlight) -> Result<()> {
        use crate::model::fused::Selected;
        let t0 = Instant::now();
        self.reap_cancelled();
        let next = match self.launch_ahead(&f) {
            Ok(next) => next,
            Err(e) => {
                self.discard(f);
                return Err(e);
            }
        };
        let t1 = Instant::now();
        debug_assert!(f.beams.is_none(), "a beam step is confirmed before it lands");
        let ids = std::mem::take(&mut f.rows);
        let picked = f.selection.wait(&mut self.readbacks);
        let t2 = Instant::now();
        let result = picked.map_err(EngineError::from).and_then(|picked| {
            let n = ids.len();
            let mut rows = Vec::with_capacity(n);
            let mut logits = HostLogits { dense: Vec::new(), offsets: Vec::with_capacity(n), picked: Vec::with_capacity(n), top: Vec::with_capacity(n) };
            for (k, (&(id, start, len), p)) in ids.iter().zip(picked).enumerate() {
                let Some(req) = self.index_of(id) else { continue };
                // A beam step's rows are its live beams, in order.
                let beam = if matches!(self.running[req].body, Body::Beams(_)) { k } else { 0 };
                let (token, top) = match p {
                    Selected::Token(token) => (Some(token), None),
                    Selected::Top(top) => (None, Some(top)),
                    // As the host sampler on such a row: the step fails.
                    Selected::NonFinite => {
                        return Err(EngineError::invalid("logits", "a logit of this step is NaN or +inf, or every logit is -inf: no token can be chosen"))
                    }
                };
                rows.push(Row { req, beam, start, len, samples: true });
                logits.offsets.push(None);
                logits.picked.push(token);
                logits.top.push(top);
            }
            let vocab = self.model.config().vocab_size;
            self.postprocess(&rows, &logits, vocab).map(|()| rows.len())
        });
        // The next step is kept while one of its requests is still running (a beam step: and
        // the device decided this step as the host did).
        self.in_flight = match next {
            Some(mut next) if result.is_ok() && next.rows.iter().any(|&(id, ..)| self.index_of(id).is_some()) => match self.confirm_beams(&mut next) {
                Ok(true) => Some(next),
                Ok(false) => {
                    self.discard(next);
                    None
                }
                Err(e) => {
                    self.discard(next);
                    return Err(e);
                }
            },
            Some(next) => {
                self.discard(next);
                None
            }
            None => None,
        };
        if let (Some(p), Ok(rows)) = (&mut self.profile, &result) {
            p.add(*rows, [std::time::Duration::ZERO, t1 - t0, t2 - t1, t2.elapsed()]);
        }
        result.map(|_| ())
    }

    /// Launches the decode step that follows the in-flight one `f` for the same sequences,
    /// when no request waits to be admitted, every row's request is still running and can go
    /// on after this token, and a CUDA graph of the step's shape is captured: the graph reads
    /// its input ids from `f`'s selection on the device. `Ok(None)`: nothing was launched.
    /// The rows' samplers give their selections only once the step is launched, so a seeded
    /// request draws the same numbers as without running ahead.
    fn launch_ahead(&mut self, f: &InFlight) -> Result<Option<InFlight>> {
        if !self.waiting.is_empty() || self.pending.load(Ordering::SeqCst) > 0 {
            return Ok(None);
        }
        if let Some(i) = f.rows.first().and_then(|&(id, ..)| self.index_of(id)) {
            if matches!(self.running[i].body, Body::Beams(_)) {
                return self.launch_beams_ahead(f, i);
            }
        }
        let mut at = Vec::with_capacity(f.rows.len());
        for &(id, start, len) in &f.rows {
            let Some(i) = self.index_of(id) else { return Ok(None) };
            match &self.running[i].body {
                Body::Single(s) if s.out.may_outlast_next() && s.device_picks() => at.push((i, start + len)),
                _ => return Ok(None),
            }
        }
        // Blocks for the next position, and each cache as it will be once this step's token is
        // in: one position on.
        let mut caches = Vec::with_capacity(at.len());
        for &(i, pos) in &at {
            if !self.reserve(i, 0, pos + 1, false)? {
                return Ok(None);
            }
            if let Body::Single(s) = &self.running[i].body {
                caches.push(SeqCache { blocks: s.seq.blocks.clone(), len: pos });
            }
        }
        let unknown = [0u32];
        let batch: Vec<SeqInput<'_>> = caches.iter().map(|cache| SeqInput { tokens: &unknown, cache, all_logits: false }).collect();
        let set_ids = Box::new(|g: &crate::model::GraphBuffers| crate::model::set_ids(g, &f.selection.tokens()?));
        let Some(logits) = self.model.model.forward_ahead(&batch, &mut self.kv, set_ids)? else {
            return Ok(None);
        };
        let sel = self.device_selections(at.iter().map(|&(i, _)| i))?;
        let rows = at.iter().map(|&(i, pos)| (self.running[i].id, pos, 1)).collect();
        let selection = crate::model::fused::select_start(&logits, &sel, &mut self.readbacks)?;
        #[cfg(all(test, feature = "cuda"))]
        cuda_tests::LAUNCHED_AHEAD.fetch_add(1, Ordering::SeqCst);
        Ok(Some(InFlight { rows, selection, beams: None }))
    }

    /// Launches the beam step after the in-flight one `f` (request `i`'s live beams) before
    /// the host has read `f`'s candidates: the device decides `f`'s step as the host will
    /// (`fused::beam_advance`: the same candidates, the same ranking), copies each parent's
    /// partial last block into a fresh block per row, writes the step's ids and slots, and
    /// replays the captured step; its top-n selection follows. `Ok(None)`: nothing was
    /// launched (the search ends at `f` by its length, no graph of the shape, too few free
    /// blocks). The host keeps the step only where its own decision agrees
    /// ([`confirm_beams`](Self::confirm_beams)).
    fn launch_beams_ahead(&mut self, f: &InFlight, i: usize) -> Result<Option<InFlight>> {
        use crate::sampling::Selection;
        let bs = self.kv.block_size();
        let id = self.running[i].id;
        let Body::Beams(b) = &self.running[i].body else { return Ok(None) };
        let rows = f.rows.len();
        // Every live beam is at the same length; the next step writes position `pos`.
        let pos = b.live.first().map_or(0, |c| c.len + 1);
        let full = rows == b.params.num_beams && rows == b.live.len() && b.next.len() == rows;
        if !full || b.search.steps() + 1 >= b.params.max_new_tokens || b.live.iter().any(|c| c.len + 1 != pos) {
            return Ok(None);
        }
        if self.kv.num_free_blocks() < rows || b.live.iter().any(|c| c.blocks.len() < pos.div_ceil(bs)) {
            return Ok(None);
        }
        let spares: Vec<u32> = (0..rows).filter_map(|_| self.kv.allocate_block()).collect();
        // The step's caches as if each row continued itself: the shape, positions and lengths
        // are right; the device rewrites the ids, write slots and tables.
        let caches: Vec<SeqCache> = b
            .live
            .iter()
            .zip(&spares)
            .map(|(c, &spare)| SeqCache { blocks: c.blocks[..pos / bs].iter().copied().chain([spare]).collect(), len: pos })
            .collect();
        let blocks: Vec<&[u32]> = b.live.iter().map(|c| c.blocks.as_slice()).collect();
        let cum = b.search.live_scores();
        let k = b.search.candidates_per_row();
        let (top, nout) = f.selection.output();
        let advance = crate::model::fused::BeamAdvance { k, num_beams: b.params.num_beams, cum: &cum, spares: &spares, eos: &b.eos, blocks: &blocks, pos, block_size: bs };
        let pools: Vec<candle_core::Tensor> = self.kv.pools().cloned().collect();
        let unknown = [0u32];
        let batch: Vec<SeqInput<'_>> = caches.iter().map(|cache| SeqInput { tokens: &unknown, cache, all_logits: false }).collect();
        let mut decision = None;
        let readbacks = &mut self.readbacks;
        let patch = Box::new(|g: &crate::model::GraphBuffers| {
            let pools: Vec<&candle_core::Tensor> = pools.iter().collect();
            let d = crate::model::advance_beams(g, top, nout, &advance, &pools)?;
            decision = Some(crate::model::fused::read_start(&d, readbacks)?);
            Ok(())
        });
        let launched = self.model.model.forward_ahead(&batch, &mut self.kv, patch).and_then(|logits| {
            let Some(logits) = logits else { return Ok(None) };
            let sel = vec![Selection::TopN(k); rows];
            Ok(Some(crate::model::fused::select_start(&logits, &sel, &mut self.readbacks)?))
        });
        match (launched, decision) {
            (Ok(Some(selection)), Some(decision)) => {
                #[cfg(all(test, feature = "cuda"))]
                cuda_tests::BEAMS_AHEAD.fetch_add(1, Ordering::SeqCst);
                Ok(Some(InFlight { rows: vec![(id, pos, 1); rows], selection, beams: Some(AheadBeams { spares, decision }) }))
            }
            (launched, decision) => {
                // Nothing kept: the buffers go back and the spares (written at most by a step
                // that is dropped) are freed.
                decision.into_iter().for_each(|d| d.discard(&mut self.readbacks));
                spares.into_iter().for_each(|s| self.kv.release_block(s));
                if let Some(selection) = launched? {
                    selection.discard(&mut self.readbacks);
                }
                Ok(None)
            }
        }
    }

    /// Keeps the beam step `next` launched ahead ([`launch_beams_ahead`](Self::launch_beams_ahead))
    /// when the device decided the step before as the host just did (the same parents and
    /// tokens, a full set of beams): the rows' caches then become what the device wrote, each
    /// its parent's blocks below the last one and its spare block. `Ok(false)`: the step must
    /// be discarded (the host then runs the next step itself). Other steps are kept as they are.
    fn confirm_beams(&mut self, next: &mut InFlight) -> Result<bool> {
        let Some(ahead) = next.beams.take() else { return Ok(true) };
        let words = ahead.decision.wait(&mut self.readbacks)?;
        let bs = self.kv.block_size();
        let rows = ahead.spares.len();
        let i = next.rows.first().and_then(|&(id, ..)| self.index_of(id));
        let beams = match i.map(|i| &mut self.running[i].body) {
            Some(Body::Beams(b)) => Some(b),
            _ => None,
        };
        let agree = beams.as_ref().is_some_and(|b| {
            words.len() == 2 * rows + 1
                && words[2 * rows] == 1
                && b.next.len() == rows
                && b.parents.len() == rows
                && b.live.len() == rows
                && (0..rows).all(|r| words[2 * r] == b.parents[r] && words[2 * r + 1] == b.next[r])
        });
        match beams {
            Some(b) if agree => {
                for (c, &spare) in b.live.iter_mut().zip(&ahead.spares) {
                    // `c` is a fork of its parent, `c.len` positions in: the parent's partial
                    // last block (if any) was copied into the spare on the device.
                    for block in c.blocks.drain(c.len / bs..) {
                        self.kv.release_block(block);
                    }
                    c.blocks.push(spare);
                }
                Ok(true)
            }
            beams => {
                if beams.is_some() && words.get(2 * rows) == Some(&1) {
                    // Both decided from the same candidates: a disagreement on a full set of
                    // beams is a fault of the device's decision (the host's stands).
                    tracing::warn!(device = ?words.get(..2 * rows), "the device decided a beam step otherwise than the host; the host runs the next step");
                    #[cfg(all(test, feature = "cuda"))]
                    cuda_tests::BEAMS_DISAGREED.fetch_add(1, Ordering::SeqCst);
                }
                for s in ahead.spares {
                    self.kv.release_block(s);
                }
                Ok(false)
            }
        }
    }

    /// Drops a launched step whose results are not wanted: its buffers go back, and a beam
    /// step's spare blocks (which only it wrote) are freed.
    fn discard(&mut self, f: InFlight) {
        f.selection.discard(&mut self.readbacks);
        if let Some(a) = f.beams {
            a.decision.discard(&mut self.readbacks);
            for s in a.spares {
                self.kv.release_block(s);
            }
        }
    }

    fn index_of(&self, id: u64) -> Option<usize> {
        self.running.iter().position(|r| r.id == id)
    }

    fn reap_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].cancelled() {
                let mut r = self.running.swap_remove(i);
                self.release(&mut r);
                self.counters.requests_cancelled += 1;
            } else {
                i += 1;
            }
        }
        let before = self.waiting.len();
        self.waiting.retain(|r| !r.tx.is_closed());
        let gone = before - self.waiting.len();
        if gone > 0 {
            self.pending.fetch_sub(gone, Ordering::SeqCst);
            self.counters.requests_cancelled += gone as u64;
        }
    }

    fn release(&mut self, r: &mut Request) {
        for c in r.caches_mut() {
            self.kv.free(c);
        }
    }

    /// Reserve blocks for `seq` to reach `len`, evicting idle prefix blocks and preempting
    /// younger running requests (never `keep`) when the pool is short. Returns false when
    /// nothing more can be freed.
    fn reserve(&mut self, req: usize, beam: usize, len: usize, may_preempt: bool) -> Result<bool> {
        loop {
            let r = &mut self.running[req];
            let seq = match &mut r.body {
                Body::Single(s) => &mut s.seq,
                Body::Beams(b) => &mut b.live[beam],
            };
            match self.kv.reserve(seq, len) {
                Ok(()) => return Ok(true),
                Err(ReserveError::Tensor(e)) => return Err(e.into()),
                Err(ReserveError::OutOfBlocks(o)) => {
                    if let Some(p) = &mut self.prefix {
                        if p.evict(&mut self.kv, o.needed) > 0 {
                            continue;
                        }
                    }
                    if !may_preempt || !self.preempt_youngest(req) {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Preempt the most recently admitted running request younger than `keep` (recompute
    /// later: its blocks are freed and it goes back to the front of the queue). Requests are
    /// planned oldest first, so a younger one has no rows in this step yet.
    fn preempt_youngest(&mut self, keep: usize) -> bool {
        if self.running.len() <= keep + 1 {
            return false;
        }
        let v = self.running.len() - 1;
        let mut r = self.running.remove(v);
        self.release(&mut r);
        match &mut r.body {
            Body::Single(s) => s.seq = SeqCache::default(),
            Body::Beams(b) => {
                // Restart the (deterministic) beam search from the prompt.
                b.search = BeamSearch::new(b.params.clone(), b.eos.clone()).expect("params were validated");
                b.live = vec![SeqCache::default()];
                b.next.clear();
                b.parents.clear();
            }
        }
        r.prompt_cached = 0;
        self.counters.preemptions += 1;
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.waiting.push_front(r);
        tracing::debug!(victim = v, "preempted a sequence (KV cache full); it will be recomputed");
        true
    }

    /// Decide this step's rows: every running sequence's decode row (or its next prefill
    /// chunk), then new requests' prefill chunks while the token budget and blocks allow.
    fn schedule(&mut self) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        let mut budget = self.cfg.max_batch_tokens;
        let mut starved = None;
        // Decode rows first, so that a long prompt being prefilled never holds back the
        // decoding sequences; prefill chunks then share what is left of the budget. Only the
        // decode pass preempts, and only requests younger than the one being planned (which
        // have no rows yet).
        for decode_pass in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                // While requests wait, a prefill takes at most half of what is left, so new
                // requests are admitted beside a long prompt instead of after it.
                let max_chunk = if decode_pass || self.waiting.is_empty() { budget } else { budget.div_ceil(2) };
                if self.is_decoding(i) == decode_pass
                    && !self.plan_request(i, &mut budget, max_chunk, &mut rows, decode_pass)?
                    && starved.is_none()
                {
                    // Cannot get blocks even after preempting every younger request: it
                    // waits (keeping its blocks) until older ones finish.
                    starved = Some(i);
                }
                i += 1;
            }
        }
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(mut r) = self.waiting.pop_front() else { break };
            if let (Some(p), Body::Single(s)) = (&mut self.prefix, &mut r.body) {
                if s.seq.blocks.is_empty() {
                    let reused = p.attach(&mut self.kv, &s.tokens, &mut s.seq);
                    r.prompt_cached = reused.min(r.prompt.len());
                }
            }
            self.running.push(r);
            let idx = self.running.len() - 1;
            let n_before = rows.len();
            let max_chunk = budget;
            if !self.plan_request(idx, &mut budget, max_chunk, &mut rows, false)? || rows.len() == n_before {
                // Not enough blocks for its first chunk: back to the queue, untouched.
                rows.truncate(n_before);
                let mut r = self.running.pop().expect("just pushed");
                self.release(&mut r);
                if let Body::Single(s) = &mut r.body {
                    s.seq = SeqCache::default();
                }
                r.prompt_cached = 0;
                self.waiting.push_front(r);
                break;
            }
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.running[idx].admitted.get_or_insert_with(Instant::now);
        }
        if rows.is_empty() {
            if let Some(i) = starved {
                // Nothing can run and nothing older will free blocks: this request needs
                // more KV cache than the pool has.
                let mut r = self.running.remove(i);
                let held: usize = r.caches_mut().iter().map(|c| c.len).sum();
                self.release(&mut r);
                self.counters.requests_failed += 1;
                let _ = r.tx.send(Event::Error(EngineError::invalid(
                    "max_tokens",
                    format!(
                        "the KV cache ({} tokens) is too small to continue this request at {held} tokens; \
                         lower max_tokens or raise engine.kv_cache",
                        self.kv.num_blocks() * self.kv.block_size()
                    ),
                )));
            }
        }
        Ok(rows)
    }

    /// Whether request `i` only needs decode rows (one token per sequence) this step.
    fn is_decoding(&self, i: usize) -> bool {
        match &self.running[i].body {
            Body::Single(s) => s.tokens.len() - s.seq.len == 1,
            Body::Beams(b) => !b.next.is_empty(),
        }
    }

    /// Add request `i`'s rows. Returns false when its blocks could not be reserved.
    fn plan_request(&mut self, i: usize, budget: &mut usize, max_chunk: usize, rows: &mut Vec<Row>, may_preempt: bool) -> Result<bool> {
        let (pending, beams_decoding) = match &self.running[i].body {
            Body::Single(s) => (vec![(0usize, s.seq.len, s.tokens.len() - s.seq.len)], false),
            Body::Beams(b) if b.next.is_empty() => (vec![(0, b.live[0].len, self.running[i].prompt.len() - b.live[0].len)], false),
            Body::Beams(b) => (b.live.iter().enumerate().map(|(k, c)| (k, c.len, 1)).collect(), true),
        };
        let need: usize = if beams_decoding { pending.len() } else { 1 };
        if *budget < need {
            return Ok(true);
        }
        let first_row = rows.len();
        let budget_before = *budget;
        for (beam, start, remaining) in pending {
            if remaining == 0 || *budget == 0 {
                continue;
            }
            let len = remaining.min(*budget).min(max_chunk.max(1));
            if !self.reserve(i, beam, start + len, may_preempt)? {
                // All of a request's rows or none (beam groups step together).
                rows.truncate(first_row);
                *budget = budget_before;
                return Ok(false);
            }
            *budget -= len;
            rows.push(Row { req: i, beam, start, len, samples: len == remaining });
        }
        Ok(true)
    }

    /// Sample every single-sequence row that has its logits on the host, in parallel: each
    /// row's sampler is independent and deterministic, so the result is the same as one by
    /// one. Indexed by request; `None` where the row took the device's argmax or has no
    /// sample this step.
    fn sample_rows(&mut self, rows: &[Row], logits: &HostLogits, vocab: usize) -> Vec<Option<Result<Sampled>>> {
        use rayon::prelude::*;
        let mut row_of = vec![None; self.running.len()];
        for (r, row) in rows.iter().enumerate() {
            if row.samples && row_of[row.req].is_none() {
                row_of[row.req] = logits.offsets[r].map(|o| (r, o));
            }
        }
        let sample = |(req, at): (&mut Request, Option<(usize, usize)>)| {
            let (_, o) = at?;
            let Request { body: Body::Single(s), prompt, .. } = req else { return None };
            Some(s.sampler.sample(&logits.dense[o..o + vocab], prompt, &s.tokens[prompt.len()..]))
        };
        let work = self.running.iter_mut().zip(row_of);
        if rows.len() >= 4 {
            work.collect::<Vec<_>>().into_par_iter().map(sample).collect()
        } else {
            work.map(sample).collect()
        }
    }

    /// Bring the step's results to the host. On the CPU every logit. On CUDA (with Silica's
    /// kernels) each row whose choice needs nothing of the host (greedy, or temperature /
    /// top-k / top-p / min-p without penalties, bias or logprobs; a beam step's candidates) is
    /// decided on the device and sends back its token or candidates; only the other rows send
    /// their logits. On other devices a plain greedy row sends its argmax.
    fn logits_to_host(&mut self, rows: &[Row], logits: &candle_core::Tensor, vocab: usize) -> Result<HostLogits> {
        use crate::model::fused::{self, Selected};
        use crate::sampling::Selection;
        let n = rows.len();
        let mut out = HostLogits { dense: Vec::new(), offsets: vec![None; n], picked: vec![None; n], top: vec![None; n] };
        let device = self.model.model.device().clone();
        if device.is_cpu() {
            out.dense = self.copier.to_vec(logits)?;
            out.offsets = (0..n).map(|r| Some(r * vocab)).collect();
            return Ok(out);
        }
        let mut dense_rows: Vec<u32> = Vec::new();
        if fused::select_applies(&device) {
            let mut sel = Vec::with_capacity(n);
            for (i, r) in rows.iter().enumerate() {
                let choice = match &mut self.running[r.req].body {
                    _ if !r.samples => Some(Selection::Greedy),
                    Body::Single(s) if s.want_logprobs => None,
                    Body::Single(s) => s.sampler.device_selection(),
                    Body::Beams(b) => Some(Selection::TopN(b.search.candidates_per_row())),
                };
                if choice.is_none() {
                    dense_rows.push(i as u32);
                }
                sel.push(choice.unwrap_or(Selection::Greedy));
            }
            if dense_rows.len() < n {
                for (i, picked) in fused::select(logits, &sel)?.into_iter().enumerate() {
                    match picked {
                        Selected::Token(t) => out.picked[i] = Some(t),
                        Selected::Top(top) => out.top[i] = Some(top),
                        // The host sampler reports which logit is not finite.
                        Selected::NonFinite => dense_rows.push(i as u32),
                    }
                }
                dense_rows.sort_unstable();
                dense_rows.dedup();
            }
        } else {
            let plain = |r: &Row| match &self.running[r.req].body {
                Body::Single(s) => !r.samples || (s.sampler.params().is_plain_greedy() && !s.want_logprobs),
                Body::Beams(_) => false,
            };
            dense_rows = (0..n).filter(|&i| !plain(&rows[i])).map(|i| i as u32).collect();
            if dense_rows.len() < n {
                let argmax = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
                out.picked = argmax.into_iter().map(Some).collect();
            }
        }
        out.dense = match dense_rows.len() {
            0 => Vec::new(),
            k if k == n => self.copier.to_vec(logits)?,
            k => {
                let idx = candle_core::Tensor::from_vec(dense_rows.clone(), k, logits.device())?;
                self.copier.to_vec(&logits.index_select(&idx, 0)?)?
            }
        };
        for (k, &r) in dense_rows.iter().enumerate() {
            out.offsets[r as usize] = Some(k * vocab);
            out.picked[r as usize] = None;
            out.top[r as usize] = None;
        }
        Ok(out)
    }

    fn postprocess(&mut self, rows: &[Row], logits: &HostLogits, vocab: usize) -> Result<()> {
        let mut presampled = self.sample_rows(rows, logits, vocab);
        let now = Instant::now();
        let mut generated = 0usize;
        let mut done: Vec<usize> = Vec::new();
        let mut r = 0;
        while r < rows.len() {
            let req_idx = rows[r].req;
            // All rows of one request are adjacent.
            let end = (r..rows.len()).find(|&k| rows[k].req != req_idx).unwrap_or(rows.len());
            let group = &rows[r..end];
            let req = &mut self.running[req_idx];
            match &mut req.body {
                Body::Single(s) => {
                    let row = &group[0];
                    s.seq.len += row.len;
                    if !req.prompt_inserted && s.seq.len >= req.prompt.len() {
                        if let Some(p) = &mut self.prefix {
                            p.insert(&mut self.kv, &req.prompt, &s.seq);
                        }
                        req.prompt_inserted = true;
                    }
                    if row.samples {
                        let sampled = match presampled[req_idx].take() {
                            Some(result) => result?,
                            None => {
                                let token = logits.picked[r].expect("a row without logits on the host has its token picked");
                                Sampled { token, logprob: 0.0, top_logprobs: Vec::new() }
                            }
                        };
                        s.tokens.push(sampled.token);
                        let text = s.out.push(sampled.token)?;
                        generated += 1;
                        if let Some(prev) = req.last_token {
                            self.windows.record_itl(now.duration_since(prev));
                        } else {
                            req.first_token = Some(now);
                            self.windows.record_ttft(now.duration_since(req.arrived));
                        }
                        req.last_token = Some(now);
                        let logprobs = if s.want_logprobs {
                            vec![TokenLogprob { token: sampled.token, logprob: sampled.logprob, top: sampled.top_logprobs }]
                        } else {
                            Vec::new()
                        };
                        let _ = req.tx.send(Event::Token(TokenEvent { text, token_ids: vec![sampled.token], logprobs }));
                        if s.out.is_finished() {
                            done.push(req_idx);
                        }
                    }
                }
                Body::Beams(b) => {
                    if b.next.is_empty() {
                        b.live[0].len += group[0].len;
                        if !group[0].samples {
                            r = end;
                            continue;
                        }
                    } else {
                        for (k, c) in b.live.iter_mut().enumerate() {
                            debug_assert_eq!(group[k].beam, k);
                            c.len += 1;
                        }
                    }
                    let step = if let Some(top) = (r..end).map(|k| logits.top[k].clone()).collect::<Option<Vec<_>>>() {
                        b.search.step_top(&top)?
                    } else {
                        let mut lp = Vec::with_capacity(group.len() * vocab);
                        let mut row = Vec::with_capacity(vocab);
                        for k in r..end {
                            match logits.offsets[k] {
                                Some(o) => crate::sampling::log_softmax(&logits.dense[o..o + vocab], &mut row),
                                None => return Err(candle_core::Error::Msg("a beam row has neither logits nor candidates".into()).into()),
                            }
                            lp.extend_from_slice(&row);
                        }
                        b.search.step(&lp, vocab)?
                    };
                    if req.first_token.is_none() {
                        req.first_token = Some(now);
                        self.windows.record_ttft(now.duration_since(req.arrived));
                    }
                    req.last_token = Some(now);
                    generated += group.len();
                    if step.done || step.beams.is_empty() {
                        done.push(req_idx);
                    } else {
                        let next: Vec<SeqCache> = step.beams.iter().map(|c| self.kv.fork(&b.live[c.parent])).collect();
                        for mut old in std::mem::replace(&mut b.live, next) {
                            self.kv.free(&mut old);
                        }
                        b.next = step.beams.iter().map(|c| c.token).collect();
                        b.parents = step.beams.iter().map(|c| c.parent as u32).collect();
                    }
                }
            }
            r = end;
        }
        self.windows.record_step(now, generated);
        self.counters.tokens_generated += generated as u64;
        done.sort_unstable();
        for idx in done.into_iter().rev() {
            let mut req = self.running.swap_remove(idx);
            // The request has left `running`: it must get its terminal event here.
            if let Err(e) = self.finish(&mut req, now) {
                self.release(&mut req);
                self.counters.requests_failed += 1;
                let _ = req.tx.send(Event::Error(e));
            }
        }
        Ok(())
    }

    fn finish(&mut self, req: &mut Request, now: Instant) -> Result<()> {
        self.release(req);
        let first = req.first_token.unwrap_or(now);
        let (text, reason, completion, beams, seed) = match &mut req.body {
            Body::Single(s) => (
                s.out.text.clone(),
                s.out.finish.unwrap_or(FinishReason::Length),
                s.out.num_sampled,
                Vec::new(),
                Some(s.sampler.seed()),
            ),
            Body::Beams(b) => {
                let search = std::mem::replace(
                    &mut b.search,
                    BeamSearch::new(b.params.clone(), b.eos.clone()).expect("params were validated"),
                );
                let beams = beam_results(&self.model, search.finish(), &req.stops)?;
                let best = beams[0].clone();
                let reason = if best.finished { FinishReason::Stop } else { FinishReason::Length };
                let completion = best.token_ids.len() + usize::from(best.finished);
                if !best.text.is_empty() {
                    let _ = req.tx.send(Event::Token(TokenEvent { text: best.text.clone(), token_ids: best.token_ids.clone(), logprobs: Vec::new() }));
                }
                (best.text, reason, completion, beams, None)
            }
        };
        let computed = req.prompt.len() - req.prompt_cached;
        self.counters.prompt_tokens_computed += computed as u64;
        self.counters.prompt_tokens_cached += req.prompt_cached as u64;
        self.counters.requests_finished += 1;
        let last = req.last_token.unwrap_or(now);
        let decode_s = last.duration_since(first).as_secs_f64();
        let timings = RequestTimings {
            queue: req.admitted.unwrap_or(now).duration_since(req.arrived),
            time_to_first_token: first.duration_since(req.arrived),
            total: now.duration_since(req.arrived),
            decode_tokens_per_s: if decode_s > 0.0 { completion.saturating_sub(1) as f64 / decode_s } else { 0.0 },
            prompt_tokens_computed: computed,
            prompt_tokens_cached: req.prompt_cached,
        };
        self.windows.record_latency(timings.total);
        let _ = req.tx.send(Event::Finished(FinishedEvent {
            reason,
            usage: Usage { prompt_tokens: req.prompt.len(), completion_tokens: completion },
            timings,
            text,
            beams,
            seed,
        }));
        Ok(())
    }

    /// A step failed: every running request gets the error and its blocks back.
    fn fail_running(&mut self, e: &EngineError) {
        tracing::error!(error = %e, "engine step failed; failing the running requests");
        for mut r in std::mem::take(&mut self.running) {
            self.release(&mut r);
            self.counters.requests_failed += 1;
            let _ = r.tx.send(Event::Error(EngineError::Unavailable(format!("generation failed: {e}"))));
        }
    }

    pub(crate) fn publish(&mut self) {
        let now = Instant::now();
        let mut s = self.counters.clone();
        s.running = self.running.len();
        s.waiting = self.waiting.len();
        s.kv_blocks_total = self.kv.num_blocks();
        s.kv_blocks_free = self.kv.num_free_blocks();
        s.kv_blocks_used = s.kv_blocks_total - s.kv_blocks_free;
        s.prefix_cache_blocks = self.prefix.as_ref().map_or(0, |p| p.len());
        self.windows.fill(&mut s, now);
        if let Ok(mut g) = self.stats.lock() {
            *g = s;
        }
    }
}

/// Decode steps run ahead against the same requests without (runs where the `cuda` feature is
/// built, on a machine with a CUDA device).
#[cfg(all(test, feature = "cuda"))]
pub(super) mod cuda_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::Device;

    use crate::generate::{FinishReason, GenerateRequest, Prompt, StopParams};
    use crate::loaded::{LoadedModel, ModelInfo};
    use crate::model::Format;
    use crate::sampling::SamplingParams;
    use crate::scheduler::{collect_blocking, EngineHandle, SchedulerConfig};
    use crate::tokenizer::TextTokenizer;

    /// Steps launched by `launch_ahead` in this process.
    pub(crate) static LAUNCHED_AHEAD: AtomicUsize = AtomicUsize::new(0);

    /// Beam steps launched by `launch_beams_ahead`, and confirmations that found the device's
    /// decision otherwise than the host's.
    pub(crate) static BEAMS_AHEAD: AtomicUsize = AtomicUsize::new(0);
    pub(crate) static BEAMS_DISAGREED: AtomicUsize = AtomicUsize::new(0);

    /// A tiny random Qwen2 model (F16, heads of 64: the fused kernels and graphs apply) with a
    /// word-level tokenizer of its vocabulary and no end-of-sequence token.
    fn tiny(dir: &std::path::Path) -> LoadedModel {
        let cfg = crate::testing::tiny_fused_config(4, 2);
        let model = crate::testing::load_random_f16(&cfg, 21, dir, &Device::new_cuda(0).expect("a CUDA device")).unwrap();
        let vocab = (0..cfg.vocab_size as u32).map(|i| (format!("w{i}"), i)).collect();
        let wl = tokenizers::models::wordlevel::WordLevel::builder().vocab(vocab).unk_token("w0".into()).build().unwrap();
        let tokenizer = TextTokenizer::from_parts(tokenizers::Tokenizer::new(wl), Vec::new(), None, None, None);
        let info = ModelInfo {
            name: "tiny".into(),
            architecture: "qwen2".into(),
            format: Format::Safetensors,
            weights: "safetensors F16".into(),
            dtype: "f16".into(),
            device: "cuda:0".into(),
            num_parameters: cfg.num_parameters(),
            context_length: cfg.max_position_embeddings,
            weights_file_bytes: 0,
            load_seconds: 0.0,
        };
        LoadedModel { model, tokenizer, info }
    }

    /// Greedy and seeded top-p / top-k requests over different prompts; every seventh token
    /// id ends the last two (a finish the engine only learns after the next step is launched).
    fn requests() -> Vec<GenerateRequest> {
        let sampled = |seed, top_k| SamplingParams { temperature: 0.9, top_p: 0.9, top_k, seed: Some(seed), ..Default::default() };
        let samplings = [SamplingParams::default(), sampled(7, None), sampled(8, Some(20)), SamplingParams::default(), sampled(9, None)];
        samplings
            .into_iter()
            .enumerate()
            .map(|(i, sampling)| {
                let prompt: Vec<u32> = (0..20 + 9 * i as u32).map(|j| (j * 37 + 11 * i as u32 + 5) % 320).collect();
                let stop_token_ids = if i >= 3 { (0..320).step_by(7).collect() } else { Vec::new() };
                let stop = StopParams { max_tokens: Some(60), stop_token_ids, ..Default::default() };
                GenerateRequest { prompt: Prompt::Tokens(prompt), sampling, stop, beam: None }
            })
            .collect()
    }

    /// Each request's tokens and finish reason: one at a time (graph steps of one row), then
    /// three at once.
    fn run(ahead: bool) -> Vec<(Vec<u32>, FinishReason)> {
        with_engine(ahead, |h| {
            let result = |rx| {
                let (tokens, fin) = collect_blocking(rx).expect("the request succeeds");
                (tokens.iter().flat_map(|t| t.token_ids.clone()).collect::<Vec<u32>>(), fin.reason)
            };
            let mut out: Vec<_> = requests().into_iter().map(|r| result(h.submit(r).unwrap())).collect();
            let together: Vec<_> = requests().into_iter().skip(2).map(|r| h.submit(r).unwrap()).collect();
            out.extend(together.into_iter().map(result));
            out
        })
    }

    /// `f` against an engine on the tiny model, running ahead or not (`SILICA_RUN_AHEAD`, read
    /// by the engine when it starts).
    fn with_engine<T>(ahead: bool, f: impl FnOnce(&EngineHandle) -> T) -> T {
        std::env::set_var("SILICA_RUN_AHEAD", if ahead { "1" } else { "0" });
        let dir = tempfile::tempdir().unwrap();
        let h = EngineHandle::start(tiny(dir.path()), SchedulerConfig::default()).unwrap();
        let out = f(&h);
        h.shutdown();
        std::env::remove_var("SILICA_RUN_AHEAD");
        out
    }

    #[test]
    fn running_ahead_changes_no_output() {
        let before = LAUNCHED_AHEAD.load(Ordering::SeqCst);
        let waited = run(false);
        assert_eq!(LAUNCHED_AHEAD.load(Ordering::SeqCst), before, "SILICA_RUN_AHEAD=0 launched steps ahead");
        let ahead = run(true);
        let launched = LAUNCHED_AHEAD.load(Ordering::SeqCst) - before;
        // Five requests alone and three together, up to 60 tokens each: most steps run ahead.
        assert!(launched > 200, "only {launched} steps were launched ahead");
        assert!(waited.iter().any(|(_, r)| *r == FinishReason::Stop), "no request ended on a stop token: {waited:?}");
        assert!(waited.iter().any(|(t, r)| *r == FinishReason::Length && t.len() == 60), "no request used its whole budget");
        for (i, (a, w)) in ahead.iter().zip(&waited).enumerate() {
            assert_eq!(a, w, "request {i}: run ahead {:?} against waited {:?}", a, w);
        }
    }

    /// Four 4-beam searches, one at a time: without and with end-of-sequence ids (three, so
    /// that hypotheses finish and a step may keep its beams from 16 candidates a row), early
    /// stopping on the last. Each result as text: the best beam's tokens, the finish reason
    /// and every returned beam.
    fn run_beams(ahead: bool) -> Vec<String> {
        use crate::sampling::beam::BeamSearchParams;
        with_engine(ahead, |h| {
            (0..4u32)
                .map(|i| {
                    let prompt: Vec<u32> = (0..30 + 7 * i).map(|j| (j * 53 + 3 * i + 1) % 320).collect();
                    let stop_token_ids = if i % 2 == 1 { vec![3 + i, 40 + i, 200 + i] } else { Vec::new() };
                    let stop = StopParams { max_tokens: Some(48), stop_token_ids, ..Default::default() };
                    let beam = Some(BeamSearchParams { num_beams: 4, length_penalty: 1.0, early_stopping: i == 3, max_new_tokens: 48 });
                    let req = GenerateRequest { prompt: Prompt::Tokens(prompt), sampling: SamplingParams::default(), stop, beam };
                    let (tokens, fin) = collect_blocking(h.submit(req).unwrap()).expect("the beam search succeeds");
                    let tokens: Vec<u32> = tokens.iter().flat_map(|t| t.token_ids.clone()).collect();
                    format!("{tokens:?} {:?} {:?}", fin.reason, fin.beams)
                })
                .collect()
        })
    }

    #[test]
    fn beam_steps_decided_on_the_device_change_no_output() {
        let before = BEAMS_AHEAD.load(Ordering::SeqCst);
        let waited = run_beams(false);
        assert_eq!(BEAMS_AHEAD.load(Ordering::SeqCst), before, "SILICA_RUN_AHEAD=0 launched beam steps ahead");
        let ahead = run_beams(true);
        let launched = BEAMS_AHEAD.load(Ordering::SeqCst) - before;
        // Four searches of up to 48 steps; the first decode step of each runs from the host.
        assert!(launched > 60, "only {launched} beam steps were launched ahead");
        assert_eq!(BEAMS_DISAGREED.load(Ordering::SeqCst), 0, "the device decided a beam step otherwise than the host");
        for (i, (a, w)) in ahead.iter().zip(&waited).enumerate() {
            assert_eq!(a, w, "search {i}: run ahead against waited");
        }
    }
}
