//! A Rust client for cellvm.
//!
//! Creates, lists and deletes go to the edge with the API key. Every
//! call inside a sandbox (exec, files) goes straight to the owning cell
//! at the sandbox's `connectURL` with the token the edge signed, so the
//! frequent path has no edge hop. Tokens are short-lived; the client
//! fetches a fresh one from the edge when the cell refuses an old one.
//! Terminals and exec sessions are WebSockets to the cell, the same
//! way ([`Client::attach_pty`], [`Client::attach_exec`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use cellvm_wire::api::{
    CreateSandbox, ErrorBody, ExecResult, ExecRun, FileEntry, Sandbox,
};
use futures::{Stream, TryStreamExt};
use reqwest::{Method, RequestBuilder};

mod ws;

pub use ws::{Event, Session, SessionReader, SessionWriter};

/// The HTTP client type, for callers that talk to internal routes.
pub use reqwest::Client as HttpClient;

/// Environment variable holding the edge URL.
pub const ENV_URL: &str = "CELLVM_API_URL";
/// Environment variable holding the API key.
pub const ENV_KEY: &str = "CELLVM_API_KEY";

/// What went wrong talking to cellvm.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{message} (HTTP {status}, {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// Machine-readable code.
        code: String,
        /// Server's message.
        message: String,
    },
    /// The request could not be sent or the answer read.
    #[error("request to {url} failed")]
    Http {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// No URL or key configured.
    #[error("{0}")]
    Config(String),
    /// A local file could not be read or written.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// The HTTP status for API errors.
    #[must_use]
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::Http { .. } | Self::Config(_) | Self::Io { .. } => None,
        }
    }
}

/// Where to reach cellvm and as whom.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Edge base URL.
    pub url: String,
    /// API key.
    pub key: String,
}

impl Credentials {
    /// From `CELLVM_API_URL`/`CELLVM_API_KEY`, else from the env file
    /// `cellvm up` writes (`~/.cellvm/env` unless `CELLVM_HOME` says
    /// otherwise).
    ///
    /// # Errors
    /// [`ClientError::Config`] when neither has both values.
    pub fn discover() -> Result<Self, ClientError> {
        let from_file = env_file().and_then(|p| read_env_file(&p).ok());
        let pick = |name: &str| {
            std::env::var(name).ok().filter(|v| !v.is_empty()).or_else(|| {
                from_file.as_ref().and_then(|m| m.get(name).cloned())
            })
        };
        let file = env_file().map_or_else(
            || "~/.cellvm/env".into(),
            |p| p.display().to_string(),
        );
        match (pick(ENV_URL), pick(ENV_KEY)) {
            (Some(url), Some(key)) => Ok(Self { url, key }),
            (url, key) => {
                let missing: Vec<&str> = [(ENV_URL, url), (ENV_KEY, key)]
                    .into_iter()
                    .filter(|(_, v)| v.is_none())
                    .map(|(name, _)| name)
                    .collect();
                Err(ClientError::Config(format!(
                    "{} not set: set it in the environment, or run \
                     `cellvm up` (it writes {file})",
                    missing.join(" and ")
                )))
            }
        }
    }
}

/// The env file `cellvm up` writes.
#[must_use]
pub fn env_file() -> Option<PathBuf> {
    if let Ok(home) = std::env::var("CELLVM_HOME") {
        return Some(PathBuf::from(home).join("env"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cellvm/env"))
}

/// Reads `KEY=VALUE` lines.
///
/// # Errors
/// I/O errors reading the file.
pub fn read_env_file(path: &Path) -> std::io::Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.strip_prefix("export ").unwrap_or(l))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), unquote(v.trim()).to_owned()))
        .collect())
}

/// `"x"` or `'x'` to `x`; anything else as is.
fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) =
            v.strip_prefix(q).and_then(|rest| rest.strip_suffix(q))
        {
            return inner;
        }
    }
    v
}

/// A client bound to one edge and API key.
#[derive(Debug)]
pub struct Client {
    creds: Credentials,
    http: reqwest::Client,
    /// Sandbox id -> (connectURL, token).
    direct: Mutex<HashMap<String, (String, String)>>,
}

impl Client {
    /// A client for `creds`.
    #[must_use]
    pub fn new(creds: Credentials) -> Self {
        Self { creds, http: reqwest::Client::new(), direct: Mutex::default() }
    }

    fn edge(&self, method: Method, path: &str) -> RequestBuilder {
        let url = format!("{}{path}", self.creds.url.trim_end_matches('/'));
        self.http.request(method, url).header("X-API-Key", &self.creds.key)
    }

    /// Creates a sandbox and waits until it runs.
    ///
    /// # Errors
    /// The edge's answer (400, 402, 404 template, 429, 503...).
    pub async fn create(
        &self,
        req: &CreateSandbox,
    ) -> Result<Sandbox, ClientError> {
        let sb: Sandbox =
            json(self.edge(Method::POST, "/api/sandboxes").json(req)).await?;
        self.remember(&sb);
        Ok(sb)
    }

    /// The org's sandboxes, newest first.
    ///
    /// # Errors
    /// The edge's answer.
    pub async fn list(&self) -> Result<Vec<Sandbox>, ClientError> {
        json(self.edge(Method::GET, "/api/sandboxes")).await
    }

    /// One sandbox, with a fresh token.
    ///
    /// # Errors
    /// 404 when it does not exist or is another org's.
    pub async fn get(&self, id: &str) -> Result<Sandbox, ClientError> {
        check_id(id)?;
        let sb: Sandbox =
            json(self.edge(Method::GET, &format!("/api/sandboxes/{id}")))
                .await?;
        self.remember(&sb);
        Ok(sb)
    }

    /// Deletes a sandbox: VM, disk and checkpoints.
    ///
    /// # Errors
    /// 404 when it does not exist.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        check_id(id)?;
        let req = self.edge(Method::DELETE, &format!("/api/sandboxes/{id}"));
        send(req).await?;
        self.lock().remove(id);
        Ok(())
    }

    /// Hibernates a sandbox: its memory, processes and disk go to the
    /// cell's object store and it stops costing anything. Idempotent.
    ///
    /// # Errors
    /// 404; 409 when it is not running; 503 when the object store is
    /// unavailable (it then runs on).
    pub async fn hibernate(
        &self,
        id: &str,
    ) -> Result<serde_json::Value, ClientError> {
        check_id(id)?;
        let path = format!("/api/sandboxes/{id}/hibernate");
        json(self.edge(Method::POST, &path)).await
    }

    /// Wakes a hibernated sandbox (a running one is left as it is).
    ///
    /// # Errors
    /// 404; 503 when no worker has room or the object store is
    /// unavailable (the checkpoint is kept).
    pub async fn wake(&self, id: &str) -> Result<Sandbox, ClientError> {
        check_id(id)?;
        let path = format!("/api/sandboxes/{id}/wake");
        json(self.edge(Method::POST, &path).json(&serde_json::json!({}))).await
    }

    /// Usage of one sandbox (`GET /api/sandboxes/{id}/usage`): totals
    /// and one point per minute over `[from, to)` (RFC 3339 or unix
    /// seconds; default the last hour). Works after a delete too.
    ///
    /// # Errors
    /// 404 for another org's or unknown sandbox, 400 for a bad window.
    pub async fn sandbox_usage(
        &self,
        id: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        check_id(id)?;
        let path = format!("/api/sandboxes/{id}/usage{}", window(from, to));
        json(self.edge(Method::GET, &path)).await
    }

    /// The org's usage per sandbox (`GET /api/usage?groupBy=sandbox`)
    /// over `[from, to)` (default the last 24 hours).
    ///
    /// # Errors
    /// 400 for a bad window.
    pub async fn usage(
        &self,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let q = window(from, to);
        let sep = if q.is_empty() { '?' } else { '&' };
        let path = format!("/api/usage{q}{sep}groupBy=sandbox");
        json(self.edge(Method::GET, &path)).await
    }

    /// Runs a command to completion.
    ///
    /// # Errors
    /// 404 for an unknown sandbox, 400 for a bad request.
    pub async fn exec(
        &self,
        id: &str,
        run: &ExecRun,
    ) -> Result<ExecResult, ClientError> {
        let resp = self
            .direct_send(id, Method::POST, "exec/run", "", |r| r.json(run))
            .await?;
        decode(resp).await
    }

    /// Reads a file whole.
    ///
    /// # Errors
    /// 404 missing, 400 a directory.
    pub async fn read_file(
        &self,
        id: &str,
        path: &str,
    ) -> Result<Bytes, ClientError> {
        let resp = self
            .direct_send(id, Method::GET, "files", &path_query(path), |r| r)
            .await?;
        resp.bytes().await.map_err(|e| http_err("reading file", e))
    }

    /// Streams a file's bytes.
    ///
    /// # Errors
    /// 404 missing, 400 a directory.
    pub async fn read_file_stream(
        &self,
        id: &str,
        path: &str,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>>, ClientError>
    {
        let resp = self
            .direct_send(id, Method::GET, "files", &path_query(path), |r| r)
            .await?;
        Ok(resp.bytes_stream().map_err(|e| http_err("reading file", e)))
    }

    /// Writes a file (parents created).
    ///
    /// # Errors
    /// 403 read-only place, 507 full disk.
    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        data: impl Into<Bytes>,
    ) -> Result<(), ClientError> {
        let data: Bytes = data.into();
        self.direct_send(id, Method::PUT, "files", &path_query(path), |r| {
            r.body(data.clone())
        })
        .await?;
        Ok(())
    }

    /// Uploads a local file, streamed.
    ///
    /// # Errors
    /// Local I/O errors or the server's answer.
    pub async fn upload(
        &self,
        id: &str,
        local: &Path,
        path: &str,
    ) -> Result<(), ClientError> {
        // A stream can be sent once; take a fresh token first so the
        // upload does not need a retry.
        self.get(id).await?;
        let (base, token) = self.route(id).await?;
        let body = if local.as_os_str() == "-" {
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(
                tokio::io::stdin(),
            ))
        } else {
            let file =
                tokio::fs::File::open(local).await.map_err(|source| {
                    ClientError::Io {
                        what: format!("opening {}", local.display()),
                        source,
                    }
                })?;
            let is_file = file.metadata().await.is_ok_and(|m| m.is_file());
            if !is_file {
                return Err(ClientError::Config(format!(
                    "{} is not a regular file",
                    local.display()
                )));
            }
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file))
        };
        let url =
            format!("{base}/api/sandboxes/{id}/files{}", path_query(path));
        send(self.http.put(url).bearer_auth(token).body(body)).await?;
        Ok(())
    }

    /// Lists a directory.
    ///
    /// # Errors
    /// 404 missing.
    pub async fn list_files(
        &self,
        id: &str,
        path: &str,
    ) -> Result<Vec<FileEntry>, ClientError> {
        let resp = self
            .direct_send(
                id,
                Method::GET,
                "files/list",
                &path_query(path),
                |r| r,
            )
            .await?;
        decode(resp).await
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (String, String)>> {
        self.direct.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, sb: &Sandbox) {
        if !sb.token.is_empty() && !sb.connect_url.is_empty() {
            self.lock().insert(
                sb.sandbox_id.clone(),
                (sb.connect_url.clone(), sb.token.clone()),
            );
        }
    }

    async fn route(&self, id: &str) -> Result<(String, String), ClientError> {
        check_id(id)?;
        if let Some(r) = self.lock().get(id).cloned() {
            return Ok(r);
        }
        let sb = self.get(id).await?;
        Ok((sb.connect_url, sb.token))
    }

    /// Sends a per-sandbox call straight to the cell; on a 401 (token
    /// expired) fetches a fresh token from the edge and tries once more.
    async fn direct_send(
        &self,
        id: &str,
        method: Method,
        rest: &str,
        query: &str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        for attempt in 0..2 {
            let (base, token) = self.route(id).await?;
            let url = format!(
                "{}/api/sandboxes/{id}/{rest}{query}",
                base.trim_end_matches('/')
            );
            let req = build(
                self.http.request(method.clone(), url).bearer_auth(token),
            );
            match send(req).await {
                Err(e) if attempt == 0 && e.status() == Some(401) => {
                    self.lock().remove(id);
                }
                other => return other,
            }
        }
        Err(ClientError::Config("unreachable: retry loop ended".into()))
    }
}

/// Refuses what cannot be a sandbox id before it reaches a URL.
fn check_id(id: &str) -> Result<(), ClientError> {
    if cellvm_wire::api::is_sandbox_id(id) {
        Ok(())
    } else {
        Err(ClientError::Config(format!(
            "{id:?} is not a sandbox id (they look like sb-0123456789abcdef)"
        )))
    }
}

fn path_query(path: &str) -> String {
    let mut out = String::from("?path=");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn http_err(url: &str, source: reqwest::Error) -> ClientError {
    ClientError::Http { url: url.to_owned(), source }
}

async fn send(req: RequestBuilder) -> Result<reqwest::Response, ClientError> {
    let resp = req.send().await.map_err(|e| {
        let url = e.url().map_or_else(String::new, ToString::to_string);
        http_err(&url, e)
    })?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let parsed: Option<ErrorBody> = serde_json::from_str(&body).ok();
    let (code, message) = match parsed {
        Some(b) => (b.code, b.error),
        None => (
            "http_error".to_owned(),
            if body.is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                body
            },
        ),
    };
    Err(ClientError::Api { status: status.as_u16(), code, message })
}

async fn json<T: serde::de::DeserializeOwned>(
    req: RequestBuilder,
) -> Result<T, ClientError> {
    decode(send(req).await?).await
}

async fn decode<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
) -> Result<T, ClientError> {
    let url = resp.url().to_string();
    resp.json().await.map_err(|e| http_err(&url, e))
}

/// `?from=..&to=..` for the usage calls (empty when both are absent).
fn window(from: Option<&str>, to: Option<&str>) -> String {
    let enc = |v: &str| v.replace('+', "%2B").replace(':', "%3A");
    let parts: Vec<String> = [("from", from), ("to", to)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", enc(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_percent_encoded() {
        assert_eq!(path_query("/tmp/a b/ü"), "?path=/tmp/a%20b/%C3%BC");
        assert_eq!(path_query("/x?y&z"), "?path=/x%3Fy%26z");
    }

    #[test]
    fn env_files_parse() {
        let dir = std::env::temp_dir()
            .join(format!("cellvm-env-{}", std::process::id()));
        std::fs::write(&dir, "CELLVM_API_URL=http://x\nCELLVM_API_KEY=k\n")
            .expect("write");
        let m = read_env_file(&dir).expect("read");
        assert_eq!(m["CELLVM_API_URL"], "http://x");
        let _ = std::fs::remove_file(dir);
    }
}
