//! The model registry (`models.toml`): named models with aliases and a source, read in two
//! stages (raw serde structs, then a validated [`Registry`]), and resolved to local files.
//!
//! Sources: a local path, a Hugging Face repo (downloaded with hf-hub, with a progress bar,
//! into the standard HF cache), or one of the demo models that `scripts/fetch-demo-models.sh`
//! assembles from the package registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::device::{DTypeSpec, DeviceSpec};
use crate::error::{EngineError, Result};
use crate::model::ModelFiles;

/// The demo models: name → file name under the models directory.
pub const DEMO_MODELS: &[(&str, &str)] = &[
    ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
    ("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
];

/// Read table `[key]` of a settings file into `T` (each crate owns one table of
/// `configs/default.toml`; the others are left to them). A missing table gives `T::default()`;
/// unknown keys and wrong types are errors naming the file and the table.
pub fn settings_table<T: serde::de::DeserializeOwned + Default>(path: &Path, key: &str) -> std::result::Result<T, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    match table.get(key) {
        Some(v) => v.clone().try_into().map_err(|e| format!("{}: [{key}]: {e}", path.display())),
        None => Ok(T::default()),
    }
}

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// A local GGUF file or safetensors directory.
    Path(PathBuf),
    /// A Hugging Face Hub repo; `file` names a GGUF file in it, otherwise the repo is a
    /// safetensors checkpoint.
    Hf { repo: String, revision: Option<String>, file: Option<String> },
    /// A demo model assembled from the package registry.
    Demo(String),
}

/// Speed/quality tier, used by the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Speed,
    Quality,
}

/// A validated registry entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelEntry {
    pub name: String,
    pub aliases: Vec<String>,
    pub source: Source,
    pub dtype: DTypeSpec,
    pub device: DeviceSpec,
    pub tier: Option<Tier>,
    pub enabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    models: Vec<RawEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    #[serde(default)]
    aliases: Vec<String>,
    source: RawSource,
    dtype: Option<String>,
    device: Option<String>,
    tier: Option<Tier>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    path: Option<PathBuf>,
    hf: Option<String>,
    revision: Option<String>,
    file: Option<String>,
    demo: Option<String>,
}

/// The validated registry.
#[derive(Debug, Clone)]
pub struct Registry {
    pub entries: Vec<ModelEntry>,
    /// Directory the registry file lives in: relative paths resolve against it.
    pub base_dir: PathBuf,
    /// Where demo models are kept (`SILICA_MODELS_DIR`, else `<base_dir>/models`).
    pub models_dir: PathBuf,
}

impl Registry {
    /// Read and validate a `models.toml`. Errors name the file and the offending key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Io { path: path.into(), source: e })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &path.display().to_string(), &base)
    }

    /// Parse registry text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Self> {
        let raw: RawFile =
            toml::from_str(text).map_err(|e| EngineError::Config(format!("{origin}: {e}")))?;
        let mut entries = Vec::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        for (i, r) in raw.models.into_iter().enumerate() {
            let at = |key: &str| format!("{origin}: models[{i}].{key}");
            if r.name.trim().is_empty() {
                return Err(EngineError::Config(format!("{} must not be empty", at("name"))));
            }
            for n in std::iter::once(&r.name).chain(&r.aliases) {
                if n.eq_ignore_ascii_case("auto") {
                    return Err(EngineError::Config(format!("{}: `auto` is reserved for routing", at("name"))));
                }
                if let Some(prev) = seen.insert(n.to_ascii_lowercase(), r.name.clone()) {
                    return Err(EngineError::Config(format!(
                        "{}: name or alias `{n}` is already used by model `{prev}`",
                        at("aliases")
                    )));
                }
            }
            let s = r.source;
            let source = match (s.path, s.hf, s.demo) {
                (Some(p), None, None) => Source::Path(p),
                (None, Some(repo), None) => Source::Hf { repo, revision: s.revision, file: s.file },
                (None, None, Some(d)) => {
                    if !DEMO_MODELS.iter().any(|(n, _)| *n == d) {
                        let known: Vec<_> = DEMO_MODELS.iter().map(|(n, _)| *n).collect();
                        return Err(EngineError::Config(format!(
                            "{}: unknown demo model `{d}` (known: {})",
                            at("source.demo"),
                            known.join(", ")
                        )));
                    }
                    Source::Demo(d)
                }
                _ => {
                    return Err(EngineError::Config(format!(
                        "{} must set exactly one of `path`, `hf`, `demo`",
                        at("source")
                    )))
                }
            };
            let dtype = match r.dtype {
                Some(d) => d.parse().map_err(|e| EngineError::Config(format!("{}: {e}", at("dtype"))))?,
                None => DTypeSpec::Auto,
            };
            let device = match r.device {
                Some(d) => d.parse().map_err(|e| EngineError::Config(format!("{}: {e}", at("device"))))?,
                None => DeviceSpec::Auto,
            };
            entries.push(ModelEntry { name: r.name, aliases: r.aliases, source, dtype, device, tier: r.tier, enabled: r.enabled });
        }
        let models_dir = std::env::var_os("SILICA_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| base_dir.join("models"));
        Ok(Registry { entries, base_dir: base_dir.into(), models_dir })
    }

    /// Find an entry by name or alias (case-insensitive).
    pub fn find(&self, name: &str) -> Option<&ModelEntry> {
        self.entries.iter().find(|e| {
            e.name.eq_ignore_ascii_case(name) || e.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
        })
    }

    /// Resolve a `--model` argument: a registry name or alias, else a local path.
    pub fn lookup(&self, name_or_path: &str) -> Result<ModelEntry> {
        if let Some(e) = self.find(name_or_path) {
            return Ok(e.clone());
        }
        let p = PathBuf::from(name_or_path);
        if p.exists() {
            return Ok(ModelEntry {
                name: p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| name_or_path.into()),
                aliases: vec![],
                source: Source::Path(p),
                dtype: DTypeSpec::Auto,
                device: DeviceSpec::Auto,
                tier: None,
                enabled: true,
            });
        }
        let known: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        Err(EngineError::Config(format!(
            "`{name_or_path}` is neither a model in the registry (known: {}) nor an existing path",
            known.join(", ")
        )))
    }

    /// Turn an entry's source into local files, downloading (HF) or assembling (demo) when
    /// `fetch` allows.
    pub fn resolve(&self, entry: &ModelEntry, fetch: bool) -> Result<ModelFiles> {
        match &entry.source {
            Source::Path(p) => {
                let p = if p.is_relative() { self.base_dir.join(p) } else { p.clone() };
                ModelFiles::detect(&p)
            }
            Source::Demo(d) => self.resolve_demo(d, fetch),
            Source::Hf { repo, revision, file } => hf_download(repo, revision.as_deref(), file.as_deref(), fetch),
        }
    }

    fn resolve_demo(&self, name: &str, fetch: bool) -> Result<ModelFiles> {
        let file = DEMO_MODELS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .ok_or_else(|| EngineError::Config(format!("unknown demo model `{name}`")))?;
        let path = self.models_dir.join(file);
        if path.exists() {
            return Ok(ModelFiles::Gguf(path));
        }
        let script = self.base_dir.join("scripts/fetch-demo-models.sh");
        if !fetch || !script.exists() {
            return Err(EngineError::Config(format!(
                "demo model `{name}` is not at {}; run `scripts/fetch-demo-models.sh {name}` from the Silica checkout",
                path.display()
            )));
        }
        tracing::info!(model = name, "fetching demo model from the package registry");
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg(name)
            .env("SILICA_MODELS_DIR", &self.models_dir)
            .status()
            .map_err(|e| EngineError::Io { path: script.clone(), source: e })?;
        if !status.success() || !path.exists() {
            return Err(EngineError::Config(format!(
                "fetching demo model `{name}` failed ({status}); see the output above"
            )));
        }
        Ok(ModelFiles::Gguf(path))
    }
}

/// Files of a safetensors checkpoint on the Hub, beyond the weights.
const HF_CHECKPOINT_FILES: &[(&str, bool)] = &[
    ("config.json", true),
    ("tokenizer.json", true),
    ("tokenizer_config.json", true),
    ("generation_config.json", false),
];

/// Download (or find in the local HF cache) a Hub repo's files. Offline (`HF_HUB_OFFLINE=1`,
/// or the Hub unreachable) only the cache is used, and a miss says what to do.
fn hf_download(repo: &str, revision: Option<&str>, file: Option<&str>, fetch: bool) -> Result<ModelFiles> {
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
    let hf_repo = match revision {
        Some(r) => Repo::with_revision(repo.into(), RepoType::Model, r.into()),
        None => Repo::new(repo.into(), RepoType::Model),
    };
    let offline = !fetch || std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let cache = Cache::from_env().repo(hf_repo.clone());
    let api = if offline {
        None
    } else {
        Some(
            ApiBuilder::from_env()
                .with_progress(true)
                .build()
                .map_err(|e| EngineError::Config(format!("cannot set up the Hugging Face client: {e}")))?
                .repo(hf_repo),
        )
    };
    let get = |name: &str| -> Result<PathBuf> {
        if let Some(p) = cache.get(name) {
            return Ok(p);
        }
        let Some(api) = &api else {
            return Err(EngineError::Config(format!(
                "`{name}` of Hugging Face repo `{repo}` is not in the local cache and downloads are off \
                 (HF_HUB_OFFLINE); download it on a machine that is online (`huggingface-cli download {repo}`) \
                 or point `source.path` in models.toml at a local copy"
            )));
        };
        api.get(name).map_err(|e| {
            EngineError::Config(format!(
                "cannot download `{name}` from Hugging Face repo `{repo}`: {e}. If this machine is offline, \
                 download the model elsewhere and set `source.path` in models.toml to the local directory"
            ))
        })
    };
    if let Some(f) = file {
        return Ok(ModelFiles::Gguf(get(f)?));
    }
    let mut dir = None;
    for (name, required) in HF_CHECKPOINT_FILES {
        match get(name) {
            Ok(p) => dir = p.parent().map(Path::to_path_buf),
            Err(e) if *required => return Err(e),
            Err(_) => {}
        }
    }
    match get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| EngineError::Io { path: index.clone(), source: e })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::load(&index, e))?;
            let mut shards: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| m.values().filter_map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                get(&s)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    let dir = dir.ok_or_else(|| EngineError::Config(format!("no files resolved for `{repo}`")))?;
    Ok(ModelFiles::Safetensors(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[models]]
name = "small"
aliases = ["fast"]
source = { demo = "qwen2.5-coder-0.5b" }
tier = "speed"

[[models]]
name = "big"
source = { hf = "Qwen/Qwen2.5-7B-Instruct" }
dtype = "f16"
device = "cuda:1"
tier = "quality"
enabled = false
"#;

    #[test]
    fn parses_and_finds_by_alias() {
        let r = Registry::parse(GOOD, "models.toml", Path::new("/x")).unwrap();
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.find("FAST").unwrap().name, "small");
        let big = r.find("big").unwrap();
        assert_eq!(big.device, DeviceSpec::Cuda(1));
        assert_eq!(big.dtype, DTypeSpec::F16);
        assert!(!big.enabled);
        assert!(matches!(&big.source, Source::Hf { repo, .. } if repo == "Qwen/Qwen2.5-7B-Instruct"));
    }

    #[test]
    fn errors_name_file_and_key() {
        let cases = [
            ("[[models]]\nname = \"a\"\nsource = { path = \"x\", demo = \"qwen2.5-coder-0.5b\" }\n", "models[0].source"),
            ("[[models]]\nname = \"a\"\nsource = { demo = \"nope\" }\n", "models[0].source.demo"),
            ("[[models]]\nname = \"a\"\nsource = { path = \"x\" }\ndtype = \"f8\"\n", "models[0].dtype"),
            ("[[models]]\nname = \"a\"\nsource = { path = \"x\" }\n[[models]]\nname = \"b\"\naliases=[\"A\"]\nsource = { path = \"y\" }\n", "models[1].aliases"),
            ("[[models]]\nname = \"a\"\nsource = { path = \"x\" }\ncolour = 1\n", "colour"),
        ];
        for (text, key) in cases {
            let msg = Registry::parse(text, "m.toml", Path::new(".")).unwrap_err().to_string();
            assert!(msg.contains("m.toml") && msg.contains(key), "{msg} should name {key}");
        }
    }

    #[test]
    fn lookup_unknown_lists_known_models() {
        let r = Registry::parse(GOOD, "models.toml", Path::new("/x")).unwrap();
        let msg = r.lookup("nonexistent-model").unwrap_err().to_string();
        assert!(msg.contains("small") && msg.contains("big"), "{msg}");
    }

    #[test]
    fn offline_hf_miss_says_what_to_do() {
        let msg = hf_download("Qwen/Does-Not-Exist-Silica-Test", None, None, false).unwrap_err().to_string();
        assert!(msg.contains("HF_HUB_OFFLINE") && msg.contains("source.path"), "{msg}");
    }
}
