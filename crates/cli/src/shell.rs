//! `cellvm shell <id>`: an interactive terminal in a sandbox.
//!
//! Opens a terminal the size of ours, puts ours in raw mode (when stdin
//! is a terminal) so every key goes to the remote shell, pipes stdin and
//! stdout, passes on size changes (SIGWINCH) and exits with the shell's
//! status when the server closes the session. The terminal is restored
//! on every way out: a normal end, an error, SIGTERM/SIGHUP/SIGINT, and
//! a panic.
//!
//! The shell lives in the sandbox, not in this connection: when the
//! sandbox hibernates or moves, the server closes the connection
//! (1001) and the shell runs on; `--attach SESSION` attaches to it
//! again (its last 1 MiB of output is replayed first).

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Mutex;

use cellvm_client::{Client, Credentials, Event};
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

/// Options of `cellvm shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// Sandbox id.
    id: String,
    /// Attach to this terminal session instead of opening a new one.
    #[arg(long, value_name = "SESSION")]
    attach: Option<String>,
}

/// The close code of a server that detaches us from a terminal that
/// runs on (the sandbox hibernates or moves).
const GOING_AWAY: u16 = 1001;

/// Size used when no terminal tells us one.
const DEFAULT_SIZE: (u32, u32) = (80, 24);

/// Runs `cellvm shell`.
///
/// # Errors
/// API errors, or a terminal that cannot be put in raw mode.
pub async fn run(args: ShellArgs) -> anyhow::Result<ExitCode> {
    let client = Client::new(Credentials::discover()?);
    let id = args.id;
    let stdin_tty = is_tty(libc::STDIN_FILENO);
    let (cols, rows) = term_size().unwrap_or(DEFAULT_SIZE);
    let sid = match args.attach {
        Some(sid) => sid,
        None => client.create_pty(&id, cols, rows).await?,
    };
    let session = client.attach_pty(&id, &sid).await?;
    // An attached terminal may have another size; best effort.
    let _ = client.resize_pty(&id, &sid, cols, rows).await;
    let (mut tx, mut rx) = session.split();

    let raw = if stdin_tty { Some(RawMode::enter()?) } else { None };

    // A plain thread, not tokio's stdin: a read blocked in the kernel
    // must not keep the runtime from shutting down when the shell ends.
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if in_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let mut winch = signal(SignalKind::window_change())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stdin_open = true;
    let mut stdout = std::io::stdout();
    let outcome = loop {
        tokio::select! {
            event = rx.recv() => match event {
                Event::Data(bytes) => {
                    if stdout.write_all(&bytes).and_then(|()| stdout.flush()).is_err() {
                        break Outcome::Local(1);
                    }
                }
                Event::Text(text) => {
                    let _ = stdout.write_all(text.as_bytes());
                    let _ = stdout.flush();
                }
                Event::Closed { code, reason } => break Outcome::Closed { code, reason },
            },
            chunk = in_rx.recv(), if stdin_open => match chunk {
                Some(bytes) => {
                    if tx.send(bytes).await.is_err() {
                        // The reader sees why on its next event.
                        stdin_open = false;
                    }
                }
                None => {
                    stdin_open = false;
                    // End of piped input: ^D, which the remote terminal
                    // turns into end-of-file for the shell.
                    if !stdin_tty {
                        let _ = tx.send(vec![4u8]).await;
                    }
                }
            },
            _ = winch.recv() => {
                if let Some((cols, rows)) = term_size() {
                    // Best effort: a lost resize only leaves the old size.
                    let _ = client.resize_pty(&id, &sid, cols, rows).await;
                }
            }
            _ = term.recv() => break Outcome::Local(128 + libc::SIGTERM),
            _ = hup.recv() => break Outcome::Local(128 + libc::SIGHUP),
            _ = int.recv() => break Outcome::Local(128 + libc::SIGINT),
        }
    };
    drop(raw);
    match outcome {
        Outcome::Closed { code: Some(GOING_AWAY), reason }
            if !reason.is_empty() =>
        {
            eprintln!(
                "cellvm: terminal detached: {reason}\n\
                 cellvm: the shell runs on; attach again with \
                 `cellvm shell {id} --attach {sid}`"
            );
            Ok(ExitCode::from(1))
        }
        Outcome::Closed { code, reason } => {
            Ok(ExitCode::from(closed_status(code, &reason)))
        }
        Outcome::Local(status) => {
            let _ = tx.close().await;
            // Do not leave the shell running for nobody.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                client.close_pty(&id, &sid),
            )
            .await;
            Ok(ExitCode::from(u8::try_from(status).unwrap_or(1)))
        }
    }
}

/// How the session loop ended.
enum Outcome {
    /// The server closed (or the connection ended).
    Closed {
        /// Close code, when one was sent.
        code: Option<u16>,
        /// Close reason.
        reason: String,
    },
    /// We stopped: a signal, or stdout is gone; our exit status.
    Local(i32),
}

/// The exit status for a session the server ended: the shell's status
/// when the close reason carries it (`{"exitCode":N}`, `exit N`, `N`...,
/// the first number in it), else 0 for a normal close and 1, with the
/// reason on stderr, for an abnormal one.
fn closed_status(code: Option<u16>, reason: &str) -> u8 {
    if let Some(n) = exit_code_in(reason) {
        return u8::try_from(n.rem_euclid(256)).unwrap_or(1);
    }
    match code {
        Some(1000 | 1001) => 0,
        None if reason.is_empty() => 0,
        _ => {
            let code = code.map_or_else(
                || "no close code".to_owned(),
                |c| format!("code {c}"),
            );
            eprintln!("cellvm: terminal session ended ({code}): {reason}");
            1
        }
    }
}

/// The first decimal number (optionally negative) in `reason`.
fn exit_code_in(reason: &str) -> Option<i64> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(reason) {
        if let Some(n) = v.get("exitCode").and_then(serde_json::Value::as_i64)
        {
            return Some(n);
        }
    }
    let start = reason.find(|c: char| c.is_ascii_digit())?;
    let digits: String =
        reason[start..].chars().take_while(char::is_ascii_digit).collect();
    let n: i64 = digits.parse().ok()?;
    let negative = reason[..start].ends_with('-');
    Some(if negative { -n } else { n })
}

fn is_tty(fd: i32) -> bool {
    #[allow(unsafe_code)]
    // SAFETY: isatty only inspects the descriptor.
    unsafe {
        libc::isatty(fd) == 1
    }
}

/// Columns and rows of the first of stdout, stdin, stderr that is a
/// terminal.
fn term_size() -> Option<(u32, u32)> {
    for fd in [libc::STDOUT_FILENO, libc::STDIN_FILENO, libc::STDERR_FILENO] {
        let mut ws =
            libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        #[allow(unsafe_code)]
        // SAFETY: TIOCGWINSZ writes one winsize into the struct we own.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
        if rc == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
            return Some((u32::from(ws.ws_col), u32::from(ws.ws_row)));
        }
    }
    None
}

/// The terminal settings to put back, for the panic hook.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

fn restore_saved() {
    let saved =
        SAVED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let Some(t) = saved {
        #[allow(unsafe_code)]
        // SAFETY: tcsetattr reads the termios we pass.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSAFLUSH, &t);
        }
    }
}

/// Stdin in raw mode while this lives; restored on drop (and by a
/// panic hook, before the panic message is printed).
struct RawMode;

impl RawMode {
    fn enter() -> anyhow::Result<Self> {
        // SAFETY (both blocks): termios is plain data; tcgetattr fills
        // it, cfmakeraw and tcsetattr read and write only it.
        #[allow(unsafe_code)]
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        #[allow(unsafe_code)]
        let rc = unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) };
        if rc != 0 {
            anyhow::bail!(
                "reading terminal settings: {}",
                std::io::Error::last_os_error()
            );
        }
        *SAVED.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(t);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous(info);
        }));
        let mut raw = t;
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSAFLUSH, &raw)
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            restore_saved();
            anyhow::bail!("setting raw mode: {err}");
        }
        Ok(Self)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_saved();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_comes_from_the_close_reason() {
        assert_eq!(closed_status(Some(1000), "exit 3"), 3);
        assert_eq!(closed_status(Some(1000), r#"{"exitCode":42}"#), 42);
        assert_eq!(closed_status(Some(1000), "0"), 0);
        assert_eq!(closed_status(Some(1000), "exited with status 130"), 130);
        assert_eq!(closed_status(Some(1000), "exit -1"), 255);
        assert_eq!(closed_status(Some(1000), ""), 0);
        assert_eq!(closed_status(None, ""), 0);
        assert_eq!(closed_status(Some(1011), "worker connection lost"), 1);
    }
}
