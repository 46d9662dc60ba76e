//! A minimal QMP (QEMU monitor protocol) client.
//!
//! QMP is line-delimited JSON over a unix socket: a greeting, then
//! `qmp_capabilities`, then commands answered by `return` or `error`,
//! with asynchronous `event` lines interleaved that we skip. One command
//! is in flight at a time; callers serialise through `&mut self`.

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use crate::VmmError;

/// An open, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects to `socket`, reads the greeting and enters command mode.
    ///
    /// # Errors
    /// I/O errors, or [`VmmError::Qmp`] when QEMU does not speak QMP.
    pub async fn connect(socket: &Path) -> Result<Self, VmmError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| VmmError::io("connecting to qmp", e))?;
        let (r, w) = stream.into_split();
        let mut qmp = Self { reader: BufReader::new(r), writer: w };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(VmmError::Qmp(format!("no greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` with optional `arguments` and returns its `return`.
    ///
    /// # Errors
    /// [`VmmError::Qmp`] with QEMU's error description, or I/O errors.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(|e| VmmError::io("writing to qmp", e))?;
        loop {
            let reply = self.read_message().await?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let desc = err["desc"].as_str().unwrap_or("unknown error");
                return Err(VmmError::Qmp(format!("{command}: {desc}")));
            }
            // Anything else is an asynchronous event; not ours to answer.
        }
    }

    async fn read_message(&mut self) -> Result<Value, VmmError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .await
            .map_err(|e| VmmError::io("reading from qmp", e))?;
        if n == 0 {
            return Err(VmmError::Qmp("monitor closed".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| VmmError::Qmp(format!("bad json from qmp: {e}")))
    }
}
