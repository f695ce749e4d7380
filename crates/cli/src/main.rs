//! The `silica` binary: wires the engine to the command line. Holds no logic of its own.

mod bench;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use silica_engine::device::{DTypeSpec, DeviceSpec};
use silica_engine::generate::{generate, GenerateRequest, Prompt, StopParams};
use silica_engine::loaded::LoadedModel;
use silica_engine::registry::Registry;
use silica_engine::sampling::beam::BeamSearchParams;
use silica_engine::sampling::SamplingParams;
use silica_engine::scheduler::{EngineHandle, SchedulerConfig};
use silica_engine::tokenizer::{ChatMessage, ChatOptions};
use silica_router::{ModelPool, RouterConfig};
use silica_server::{AppState, ServerConfig};

#[derive(Parser)]
#[command(name = "silica", version, about = "Silica: a fast Qwen serving engine")]
struct Cli {
    /// The model registry.
    #[arg(long, global = true, default_value = "models.toml", env = "SILICA_MODELS")]
    models: PathBuf,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the enabled models of the registry over HTTP (fetching demo models if missing).
    Serve(ServeArgs),
    /// Generate text from a prompt, streamed to stdout; statistics go to stderr.
    Generate(GenerateArgs),
    /// Measure a model through its engine loop at several concurrency levels.
    Bench(BenchArgs),
    /// Teacher forcing: print every position's top next-token logits for a token sequence
    /// (JSON), to compare a device and dtype with a reference implementation.
    Logits(LogitsArgs),
    /// List the models in the registry.
    Models,
    /// Download or assemble a model's files without running it.
    Pull { name: String },
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (default: `[server] host` of the config, 127.0.0.1).
    #[arg(long)]
    host: Option<String>,
    /// Port (default: `[server] port` of the config, 8080; 0 picks a free one).
    #[arg(long)]
    port: Option<u16>,
    /// Settings file: `[server]`, `[router]` and `[engine]` tables.
    #[arg(long, default_value = "configs/default.toml")]
    config: PathBuf,
    /// Serve only these registry models (repeatable; default: every enabled entry).
    #[arg(long = "model")]
    only: Vec<String>,
    /// Do not download or assemble missing model files.
    #[arg(long)]
    no_fetch: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[arg(long)]
    model: String,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// A JSON file holding an array of token ids.
    #[arg(long)]
    tokens: PathBuf,
    /// How many of the largest logits to print per position.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Prefill only this many tokens, then run every later position as a decode step (checks
    /// the decode path); prints `{"top": [...], "copy_max_rel_diff": x}`.
    #[arg(long)]
    decode_from: Option<usize>,
    /// With --decode-from: copies of the sequence decoded in the same steps, each prefilling
    /// one token fewer than the last (mixed lengths in every step).
    #[arg(long, default_value_t = 1)]
    streams: usize,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value = "qwen2.5-coder-0.5b")]
    model: String,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Comma-separated numbers of concurrent streams.
    #[arg(long, default_value = "1,4,16,64", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// New tokens per request, comma-separated lengths (end-of-turn ignored so every request
    /// does the same work).
    #[arg(long, default_value = "64", value_delimiter = ',')]
    max_tokens: Vec<usize>,
    /// Comma-separated strategies: greedy, sample, top-k, top-p, beam.
    #[arg(long, default_value = "greedy", value_delimiter = ',')]
    strategy: Vec<String>,
    /// Synthetic prompts of exactly this many tokens instead of short chat questions.
    #[arg(long)]
    prompt_tokens: Option<usize>,
    /// Device memory bandwidth in GB/s: adds each row's bandwidth utilisation (weight bytes
    /// read per decode step × steps/s over this).
    #[arg(long)]
    bandwidth_gbs: Option<f64>,
    #[arg(long, default_value_t = 4)]
    num_beams: usize,
    /// Run every (strategy, new tokens) this many times, the strategies in turn round after
    /// round; each row reports its median round (by decode tok/s per stream), so that a machine
    /// whose speed drifts during the bench weighs on every strategy alike.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Engine settings (the `[engine]` table).
    #[arg(long, default_value = "configs/default.toml")]
    config: PathBuf,
    /// Print the rows as JSON instead of a markdown table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// A model name or alias from the registry, or a path to a GGUF file or checkpoint directory.
    #[arg(long, default_value = "qwen2.5-coder-0.5b")]
    model: String,
    #[arg(long)]
    prompt: String,
    /// A system message (chat mode only).
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as raw text, without the chat template.
    #[arg(long)]
    raw: bool,
    /// Qwen3: turn thinking off (`enable_thinking=false` in the chat template).
    #[arg(long)]
    no_thinking: bool,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Most new tokens (default: to the end of the context).
    #[arg(long)]
    max_tokens: Option<usize>,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print the top-N log-probabilities of each chosen token to stderr.
    #[arg(long)]
    logprobs: Option<usize>,
    /// Beam search with this many beams.
    #[arg(long)]
    num_beams: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    length_penalty: f32,
    #[arg(long)]
    early_stopping: bool,
    /// Print the request's output as JSON on stdout instead of streaming text.
    #[arg(long)]
    json: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,silica=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn registry(path: &PathBuf) -> Result<Registry> {
    if path.exists() {
        Ok(Registry::load(path)?)
    } else {
        Ok(Registry::parse("", "<none>", &std::env::current_dir()?)?)
    }
}

fn run(cli: Cli) -> Result<()> {
    let reg = registry(&cli.models)?;
    match cli.cmd {
        Command::Models => {
            for e in &reg.entries {
                println!(
                    "{:<24} {:<8} {:<8} {:<40} aliases: {}",
                    e.name,
                    e.tier.map(|t| format!("{t:?}").to_lowercase()).unwrap_or_default(),
                    if e.enabled { "enabled" } else { "disabled" },
                    serde_json::to_string(&e.source)?,
                    e.aliases.join(", ")
                );
            }
            Ok(())
        }
        Command::Pull { name } => {
            let entry = reg.lookup(&name)?;
            let files = reg.resolve(&entry, true)?;
            println!("{}", files.path().display());
            Ok(())
        }
        Command::Serve(a) => run_serve(reg, a),
        Command::Generate(a) => run_generate(&reg, a),
        Command::Bench(a) => run_bench(&reg, a),
        Command::Logits(a) => {
            let entry = reg.lookup(&a.model)?;
            let device: DeviceSpec = if a.device == "auto" { entry.device } else { a.device.parse()? };
            let dtype: DTypeSpec = if a.dtype == "auto" { entry.dtype } else { a.dtype.parse()? };
            let m = LoadedModel::load(&entry.name, &reg.resolve(&entry, true)?, device, dtype)?;
            let text = std::fs::read_to_string(&a.tokens).with_context(|| format!("reading {}", a.tokens.display()))?;
            let tokens: Vec<u32> = serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON array of token ids", a.tokens.display()))?;
            match a.decode_from {
                None => {
                    let top = silica_engine::generate::teacher_forced_top_k(&m, &tokens, a.top)?;
                    println!("{}", serde_json::to_string(&top)?);
                }
                Some(from) => {
                    let (top, diff) = silica_engine::generate::teacher_forced_decode(&m.model, &tokens, a.top, from, a.streams)?;
                    println!("{}", serde_json::json!({ "top": top, "copy_max_rel_diff": diff }));
                }
            }
            Ok(())
        }
    }
}

fn run_serve(reg: Registry, a: ServeArgs) -> Result<()> {
    let (mut server_cfg, router_cfg, engine_cfg) = if a.config.exists() {
        (
            ServerConfig::from_file(&a.config).map_err(anyhow::Error::msg)?,
            RouterConfig::from_file(&a.config).map_err(anyhow::Error::msg)?,
            SchedulerConfig::from_file(&a.config)?,
        )
    } else {
        anyhow::bail!("settings file {} not found", a.config.display());
    };
    if let Some(h) = a.host {
        server_cfg.host = h;
    }
    if let Some(p) = a.port {
        server_cfg.port = p;
    }
    let entries: Vec<_> = if a.only.is_empty() {
        reg.entries.iter().filter(|e| e.enabled).cloned().collect()
    } else {
        a.only.iter().map(|n| reg.lookup(n)).collect::<silica_engine::Result<_>>()?
    };
    if entries.is_empty() {
        anyhow::bail!("no model to serve: enable one in {} or pass --model NAME", "models.toml");
    }
    let pool = ModelPool::new(entries, router_cfg);
    let _loaders = pool.load_all(&reg, &engine_cfg, !a.no_fetch);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", server_cfg.host, server_cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        tracing::info!(%local, "listening");
        eprintln!("silica: listening on http://{local} (OpenAI API at http://{local}/v1)");
        let state = AppState::new(pool, server_cfg);
        silica_server::serve(listener, state, silica_server::shutdown_signal()).await?;
        Ok::<_, anyhow::Error>(())
    })
}

fn run_bench(reg: &Registry, a: BenchArgs) -> Result<()> {
    if let Some(s) = a.strategy.iter().find(|s| !bench::STRATEGIES.contains(&s.as_str())) {
        anyhow::bail!("--strategy must be among {}; got `{s}`", bench::STRATEGIES.join(", "));
    }
    if a.max_tokens.contains(&0) {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    if a.rounds == 0 {
        anyhow::bail!("--rounds must be at least 1");
    }
    let cfg = if a.config.exists() { SchedulerConfig::from_file(&a.config)? } else { SchedulerConfig::default() };
    let entry = reg.lookup(&a.model)?;
    let device: DeviceSpec = if a.device == "auto" { entry.device } else { a.device.parse()? };
    let dtype: DTypeSpec = if a.dtype == "auto" { entry.dtype } else { a.dtype.parse()? };
    let files = reg.resolve(&entry, true)?;
    let m = LoadedModel::load(&entry.name, &files, device, dtype)?;
    let info = m.info.clone();
    // Weight bytes read per decode step: every weight but the embedding table (a lookup),
    // unless the head shares it.
    let c = m.config();
    let embed = if c.tie_word_embeddings { 0 } else { c.vocab_size * c.hidden_size };
    let bytes_per_step = match info.format {
        silica_engine::model::Format::Gguf => info.weights_file_bytes as f64,
        _ => ((info.num_parameters as usize - embed) * m.model.dtype().size_in_bytes()) as f64,
    };
    let handle = EngineHandle::start(m, cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut rounds = Vec::with_capacity(a.rounds);
    let mut failure = None;
    'runs: for _ in 0..a.rounds {
        let mut rows = Vec::new();
        for strategy in &a.strategy {
            for &max_tokens in &a.max_tokens {
                let spec = bench::BenchSpec {
                    concurrency: a.concurrency.clone(),
                    max_tokens,
                    strategy: strategy.clone(),
                    num_beams: a.num_beams,
                    prompt_tokens: a.prompt_tokens,
                };
                match rt.block_on(bench::run(&handle, &spec)) {
                    Ok(r) => rows.extend(r),
                    Err(e) => {
                        failure = Some(e);
                        break 'runs;
                    }
                }
            }
        }
        rounds.push(rows);
    }
    handle.shutdown();
    if let Some(e) = failure {
        return Err(e);
    }
    let mut rows = bench::median_rows(rounds)?;
    if let Some(bw) = a.bandwidth_gbs {
        bench::add_bandwidth(&mut rows, bytes_per_step, bw);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "model {} ({}, {}, {}), {:.2} GB of weights read per decode step{}\n",
            info.name,
            info.weights,
            info.device,
            info.dtype,
            bytes_per_step / 1e9,
            if a.rounds > 1 { format!("; each row the median of {} rounds", a.rounds) } else { String::new() }
        );
        print!("{}", bench::table(&rows));
    }
    Ok(())
}

fn run_generate(reg: &Registry, a: GenerateArgs) -> Result<()> {
    let entry = reg.lookup(&a.model)?;
    let device: DeviceSpec = if a.device == "auto" { entry.device } else { a.device.parse()? };
    let dtype: DTypeSpec = if a.dtype == "auto" { entry.dtype } else { a.dtype.parse()? };
    let files = reg.resolve(&entry, true)?;
    let m = LoadedModel::load(&entry.name, &files, device, dtype).with_context(|| format!("loading {}", entry.name))?;

    let prompt = if a.raw {
        if a.system.is_some() {
            anyhow::bail!("--system needs the chat template; drop --raw");
        }
        Prompt::Text(a.prompt.clone())
    } else {
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", &a.prompt));
        let mut options = ChatOptions { add_generation_prompt: true, ..Default::default() };
        if a.no_thinking {
            options.extra.insert("enable_thinking".into(), false.into());
        }
        Prompt::Chat { messages, options }
    };
    let req = GenerateRequest {
        prompt,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            seed: a.seed,
            top_logprobs: a.logprobs,
            ..Default::default()
        },
        stop: StopParams { stop: a.stop.clone(), max_tokens: a.max_tokens, ..Default::default() },
        beam: a.num_beams.map(|n| BeamSearchParams {
            num_beams: n,
            length_penalty: a.length_penalty,
            early_stopping: a.early_stopping,
            ..Default::default()
        }),
    };
    let prompt_tokens = silica_engine::generate::prepare_prompt(&m, &req.prompt)?.len();
    let budget = silica_engine::generate::token_budget(prompt_tokens, a.max_tokens, m.config().max_position_embeddings)?;
    let beams = a.num_beams.unwrap_or(1);
    // Beams share the prompt's blocks (copy on write); each needs room for its own tokens.
    let mut kv = m.kv_cache_for_tokens(prompt_tokens + beams * (budget + 32), 16)?;
    let stdout = std::io::stdout();
    let stream = !a.json && a.num_beams.is_none();
    let out = generate(&m, &mut kv, &req, &mut |piece| {
        if stream {
            let mut lock = stdout.lock();
            let _ = lock.write_all(piece.as_bytes());
            let _ = lock.flush();
        }
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if !stream {
            print!("{}", out.text);
        }
        println!();
        for (i, b) in out.beams.iter().enumerate().skip(1) {
            eprintln!("beam {i} (score {:.4}): {:?}", b.score, b.text);
        }
    }
    if let Some(n) = a.logprobs.filter(|n| *n > 0) {
        for lp in &out.logprobs {
            let top: Vec<String> = lp
                .top
                .iter()
                .take(n)
                .map(|(t, p)| format!("{:?}={p:.3}", m.tokenizer.decode(&[*t], false).unwrap_or_default()))
                .collect();
            eprintln!("{:?} {:.4} [{}]", m.tokenizer.decode(&[lp.token], false).unwrap_or_default(), lp.logprob, top.join(" "));
        }
    }
    let t = &out.timings;
    eprintln!(
        "prompt tokens: {} | generated: {} ({}) | time to first token: {:.1} ms | prefill: {:.1} tok/s | decode: {:.1} tok/s{}",
        out.usage.prompt_tokens,
        out.usage.completion_tokens,
        out.finish_reason.as_str(),
        t.time_to_first_token.as_secs_f64() * 1e3,
        t.prefill_tokens_per_s(&out.usage),
        t.decode_tokens_per_s(&out.usage),
        out.seed.map(|s| format!(" | seed: {s}")).unwrap_or_default(),
    );
    Ok(())
}
