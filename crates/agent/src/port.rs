//! The agent's end of the host link: a virtio-serial port.
//!
//! The guest side of a virtio-serial port reads end-of-file while no
//! host is connected, and writes block until one is. The host speaks
//! first (a `Ping`), so the agent polls for that first byte, serves the
//! connection, and when the host goes away opens the port again.
//!
//! For tests on a host machine the "port" may also be a Unix socket,
//! which the agent connects to.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::UnixStream;

use crate::{log, serve_split, Agent, ServeError, ServeSummary};

/// Where the kernel lists virtio-serial ports and their names.
pub const SYS_PORTS: &str = "/sys/class/virtio-ports";

/// How often to look for a connected host while none is.
const HOST_POLL: Duration = Duration::from_millis(20);
/// Pause before opening the port again after it failed.
const RETRY: Duration = Duration::from_millis(200);

/// Why the port could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// No port carries the wanted name (yet: modules may still load).
    #[error("no virtio-serial port named {0}")]
    NotFound(String),
    /// Reading the sysfs listing failed.
    #[error("listing {0}")]
    List(String, #[source] io::Error),
    /// Opening or connecting failed.
    #[error("opening {0}")]
    Open(String, #[source] io::Error),
    /// Serving the connection failed.
    #[error("serving the host")]
    Serve(#[source] ServeError),
}

/// Finds the device of the port whose `name` file equals `name`.
///
/// # Errors
/// [`PortError::NotFound`] when none matches, [`PortError::List`] when
/// the directory cannot be read.
pub fn find(sys_dir: &Path, name: &str) -> Result<PathBuf, PortError> {
    let shown = sys_dir.display().to_string();
    let dir = std::fs::read_dir(sys_dir)
        .map_err(|e| PortError::List(shown.clone(), e))?;
    for item in dir {
        let item = item.map_err(|e| PortError::List(shown.clone(), e))?;
        let Ok(found) = std::fs::read_to_string(item.path().join("name"))
        else {
            continue;
        };
        if found.trim_end() == name {
            return Ok(Path::new("/dev").join(item.file_name()));
        }
    }
    Err(PortError::NotFound(name.to_owned()))
}

/// Serves the host over the port for ever. `fixed` names the port;
/// otherwise it is looked up by [`cellvm_wire::agent::PORT_NAME`].
///
/// A host that disconnects is waited for on the same open port: closing
/// it would make the kernel drop bytes a reconnecting host has already
/// sent. The port is opened again only after an error.
pub async fn serve_forever(agent: Arc<Agent>, fixed: Option<PathBuf>) {
    let mut last_err = String::new();
    loop {
        let Err(e) = serve_port(&agent, fixed.as_deref()).await;
        let msg = chain(&e);
        // Logged once per distinct failure: a missing port is retried
        // five times a second.
        if msg != last_err {
            log::warn(format_args!("{msg}"));
            last_err = msg;
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Opens the port and serves one host after another until it fails.
async fn serve_port(
    agent: &Arc<Agent>,
    fixed: Option<&Path>,
) -> Result<std::convert::Infallible, PortError> {
    let path = match fixed {
        Some(p) => p.to_path_buf(),
        None => find(Path::new(SYS_PORTS), cellvm_wire::agent::PORT_NAME)?,
    };
    let shown = path.display().to_string();
    let open_err = |e| PortError::Open(shown.clone(), e);
    let is_socket = std::fs::metadata(&path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false);
    if is_socket {
        // A socket peer that hangs up is gone for good: connect anew.
        let stream = UnixStream::connect(&path).await.map_err(open_err)?;
        let (r, w) = stream.into_split();
        let s = serve(agent, r, w).await?;
        log_end(s);
        return Err(PortError::Open(
            shown,
            io::ErrorKind::ConnectionReset.into(),
        ));
    }
    // Blocking reads and writes on two threads: the port's readiness
    // under non-blocking epoll was seen to miss a wake-up under load
    // (the channel stalled with data queued on the host side), while a
    // blocking read waits on the port's own wait queue and cannot.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(open_err)?;
    let writer = file.try_clone().map_err(open_err)?;
    let (out_tx, out_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || write_port(writer, &out_rx));
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    std::thread::spawn(move || read_port(file, &in_tx));
    loop {
        // One session per host connection: it starts with the host's
        // first bytes and ends when the port reports the host gone.
        let Some(first) = in_rx.recv().await else {
            return Err(PortError::Open(
                shown,
                io::ErrorKind::BrokenPipe.into(),
            ));
        };
        if first.is_empty() {
            continue;
        }
        let (agent_side, pump_side) = tokio::io::duplex(256 * 1024);
        let (agent_r, agent_w) = tokio::io::split(agent_side);
        let (mut pump_r, mut pump_w) = tokio::io::split(pump_side);
        let out = out_tx.clone();
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match pump_r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let feed = async {
            use tokio::io::AsyncWriteExt as _;
            if pump_w.write_all(&first).await.is_err() {
                return;
            }
            // An empty chunk is the reader thread's "host gone".
            while let Some(chunk) = in_rx.recv().await {
                if chunk.is_empty() || pump_w.write_all(&chunk).await.is_err()
                {
                    break;
                }
            }
            let _ = pump_w.shutdown().await;
        };
        let session = serve(agent, agent_r, agent_w);
        let (result, ()) = tokio::join!(session, feed);
        drain.abort();
        log_end(result?);
    }
}

/// Blocking reader thread: forwards what the host sends; an empty
/// chunk means the host is not connected (the port reads end-of-file
/// then), after which it polls until the host is back.
fn read_port(
    mut file: std::fs::File,
    tx: &tokio::sync::mpsc::Sender<Vec<u8>>,
) {
    use std::io::Read as _;
    let mut buf = vec![0u8; 64 * 1024];
    let mut connected = false;
    loop {
        match file.read(&mut buf) {
            Ok(0) => {
                if connected {
                    connected = false;
                    if tx.blocking_send(Vec::new()).is_err() {
                        return;
                    }
                }
                std::thread::sleep(HOST_POLL);
            }
            Ok(n) => {
                connected = true;
                if tx.blocking_send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn(format_args!("reading the port: {e}"));
                std::thread::sleep(RETRY);
            }
        }
    }
}

/// Blocking writer thread: writes whole chunks in order. A write blocks
/// while no host is connected, which is what we want: replies wait.
fn write_port(
    mut file: std::fs::File,
    rx: &std::sync::mpsc::Receiver<Vec<u8>>,
) {
    use std::io::Write as _;
    while let Ok(chunk) = rx.recv() {
        if let Err(e) = file.write_all(&chunk) {
            log::warn(format_args!("writing the port: {e}"));
        }
    }
}

fn log_end(s: ServeSummary) {
    log::warn(format_args!(
        "host disconnected after {} frames, {} channels",
        s.frames, s.channels
    ));
}

async fn serve<R, W>(
    agent: &Arc<Agent>,
    r: R,
    w: W,
) -> Result<ServeSummary, PortError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    serve_split(Arc::clone(agent), r, w).await.map_err(PortError::Serve)
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_name() {
        let sys = tempfile::tempdir().expect("tempdir");
        for (dev, name) in [("vport0p1", "other"), ("vport1p1", "org.x")] {
            let d = sys.path().join(dev);
            std::fs::create_dir(&d).expect("mkdir");
            std::fs::write(d.join("name"), format!("{name}\n")).expect("w");
        }
        let got = find(sys.path(), "org.x").expect("found");
        assert_eq!(got, Path::new("/dev/vport1p1"));
        assert!(matches!(
            find(sys.path(), "nope"),
            Err(PortError::NotFound(_))
        ));
    }
}
