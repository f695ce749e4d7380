//! `[server]` settings: read raw, then validated; unknown keys are errors naming the file.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Largest request body; beyond it 413.
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM, how long running requests may take before they are ended.
    pub shutdown_grace_seconds: f64,
    /// Interval of SSE keep-alive comments.
    pub sse_keep_alive_seconds: f64,
    /// Most generations running at once on one WebSocket connection.
    pub max_ws_generations: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 2 * 1024 * 1024,
            shutdown_grace_seconds: 30.0,
            sse_keep_alive_seconds: 15.0,
            max_ws_generations: 16,
        }
    }
}

impl ServerConfig {
    /// Read the `[server]` table of a settings file (other tables belong to other crates).
    pub fn from_file(path: &std::path::Path) -> Result<Self, String> {
        let cfg: ServerConfig = silica_engine::registry::settings_table(path, "server")?;
        cfg.validate().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.max_body_bytes < 1024 {
            return Err(format!("server.max_body_bytes must be at least 1024, got {}", self.max_body_bytes));
        }
        if !(self.shutdown_grace_seconds >= 0.0 && self.shutdown_grace_seconds.is_finite()) {
            return Err(format!("server.shutdown_grace_seconds must be a number of seconds >= 0, got {}", self.shutdown_grace_seconds));
        }
        if !(self.sse_keep_alive_seconds > 0.0 && self.sse_keep_alive_seconds.is_finite()) {
            return Err(format!("server.sse_keep_alive_seconds must be > 0, got {}", self.sse_keep_alive_seconds));
        }
        if self.max_ws_generations == 0 {
            return Err("server.max_ws_generations must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_validates_and_names_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[engine]\nblock_size = 16\n[server]\nport = 9000\n").unwrap();
        let c = ServerConfig::from_file(&p).unwrap();
        assert_eq!((c.port, c.host.as_str()), (9000, "127.0.0.1"));
        std::fs::write(&p, "[server]\nprot = 9000\n").unwrap();
        let e = ServerConfig::from_file(&p).unwrap_err();
        assert!(e.contains("c.toml") && e.contains("prot"), "{e}");
        std::fs::write(&p, "[server]\nmax_body_bytes = 10\n").unwrap();
        let e = ServerConfig::from_file(&p).unwrap_err();
        assert!(e.contains("max_body_bytes") && e.contains("10"), "{e}");
    }
}
