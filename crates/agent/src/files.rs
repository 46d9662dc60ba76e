//! File requests: read, write, list, stat, make a directory, remove.
//!
//! Paths must be absolute: the agent has no notion of a current
//! directory the host could rely on. Bulk content streams in
//! [`CHUNK`]-sized data frames either way.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cellvm_wire::agent::{Entry, Reply};
use cellvm_wire::frame::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::channel::{Channel, Inbound};
use crate::error::OpError;
use crate::exec::CHUNK;

/// Mode of a written file when the request names none.
const DEFAULT_MODE: u32 = 0o644;

/// Checks that `path` is absolute and returns it as a path.
///
/// # Errors
/// [`OpError::Invalid`] for a relative or empty path.
pub(crate) fn absolute(path: &str) -> Result<PathBuf, OpError> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Err(OpError::Invalid(format!("path must be absolute: {path:?}")))
    }
}

/// Streams a regular file as `Stdout` data frames.
pub(crate) async fn read(path: &str, ch: &Channel) -> Result<Reply, OpError> {
    let p = absolute(path)?;
    let mut file = tokio::fs::File::open(&p)
        .await
        .map_err(|e| OpError::fs("open", path, e))?;
    let meta =
        file.metadata().await.map_err(|e| OpError::fs("stat", path, e))?;
    if meta.is_dir() {
        return Err(OpError::IsDirectory(path.to_owned()));
    }
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = tokio::select! {
            r = file.read(&mut buf) => {
                r.map_err(|e| OpError::fs("read", path, e))?
            }
            () = ch.cancel.cancelled() => return Err(OpError::Cancelled),
        };
        if n == 0 {
            return Ok(Reply::Done { bytes: total });
        }
        ch.out.data(Stream::Stdout, &buf[..n]).await?;
        total += n as u64;
    }
}

/// Writes a file from `Stdin` data frames, atomically: into a
/// temporary file beside it, renamed over the target on `Eof`.
pub(crate) async fn write(
    path: &str,
    mode: Option<u32>,
    ch: &mut Channel,
) -> Result<Reply, OpError> {
    // A symlink is written through, like `>` in a shell: the link
    // stays and its target gets the content.
    let p = follow_links(absolute(path)?).await;
    let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
        return Err(OpError::Invalid(format!("not a file path: {path:?}")));
    };
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(|e| OpError::fs("create parents of", path, e))?;
    let existing = tokio::fs::metadata(&p).await.ok();
    if let Some(meta) = &existing {
        if meta.is_dir() {
            return Err(OpError::IsDirectory(path.to_owned()));
        }
        // Renaming over a device or FIFO would replace it with a
        // regular file (a write to /dev/null must not do that).
        if !meta.is_file() {
            return Err(OpError::Invalid(format!(
                "{path} is not a regular file"
            )));
        }
    }
    // Overwriting keeps the file's permissions and owner unless the
    // request names a mode.
    let mode = mode.or_else(|| existing.as_ref().map(|m| m.mode() & 0o7777));
    let owner = existing.as_ref().map(|m| (m.uid(), m.gid()));
    let mut tmp = TempFile { path: parent.join(temp_name(name)), keep: false };
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp.path)
        .await
        .map_err(|e| OpError::fs("create", path, e))?;
    if let Some((uid, gid)) = owner {
        // Owner first: chown clears set-id bits, which the chmod below
        // puts back.
        std::os::unix::fs::chown(&tmp.path, Some(uid), Some(gid))
            .map_err(|e| OpError::fs("chown", path, e))?;
    }
    // Set explicitly so the agent's umask does not alter the request.
    let perms = std::fs::Permissions::from_mode(mode.unwrap_or(DEFAULT_MODE));
    file.set_permissions(perms)
        .await
        .map_err(|e| OpError::fs("chmod", path, e))?;
    let mut total = 0u64;
    loop {
        let msg = tokio::select! {
            m = ch.inbox.recv() => m.ok_or(OpError::HostGone)?,
            () = ch.cancel.cancelled() => return Err(OpError::Cancelled),
        };
        match msg {
            Inbound::Data(Stream::Stdin, bytes) => {
                file.write_all(&bytes)
                    .await
                    .map_err(|e| OpError::fs("write", path, e))?;
                total += bytes.len() as u64;
            }
            Inbound::Data(s @ (Stream::Stdout | Stream::Stderr), _) => {
                return Err(OpError::Protocol(format!(
                    "file content must be stdin data, got {s:?}"
                )));
            }
            Inbound::Control(_) => {}
            Inbound::Eof => break,
        }
    }
    // Buffered bytes surface ENOSPC here, not at rename.
    file.flush().await.map_err(|e| OpError::fs("write", path, e))?;
    drop(file);
    tokio::fs::rename(&tmp.path, &p)
        .await
        .map_err(|e| OpError::fs("rename onto", path, e))?;
    tmp.keep = true;
    Ok(Reply::Done { bytes: total })
}

/// Lists a directory, sorted by name.
pub(crate) async fn list(path: &str) -> Result<Reply, OpError> {
    let p = absolute(path)?;
    let mut dir = tokio::fs::read_dir(&p)
        .await
        .map_err(|e| OpError::fs("list", path, e))?;
    let mut entries = Vec::new();
    loop {
        let next = dir.next_entry().await;
        let Some(item) = next.map_err(|e| OpError::fs("list", path, e))?
        else {
            break;
        };
        let full = item.path();
        // An entry removed while we list is skipped, not an error.
        match tokio::fs::symlink_metadata(&full).await {
            Ok(meta) => entries.push(entry(&full, &meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(OpError::fs("stat", &full.to_string_lossy(), e));
            }
        }
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Reply::Entries { entries })
}

/// Describes one path (a symlink as itself).
pub(crate) async fn stat(path: &str) -> Result<Reply, OpError> {
    let p = absolute(path)?;
    let meta = tokio::fs::symlink_metadata(&p)
        .await
        .map_err(|e| OpError::fs("stat", path, e))?;
    Ok(Reply::Entries { entries: vec![entry(&p, &meta)] })
}

/// Creates a directory and its parents; an existing one is fine.
pub(crate) async fn make_dir(path: &str) -> Result<Reply, OpError> {
    let p = absolute(path)?;
    tokio::fs::create_dir_all(&p)
        .await
        .map_err(|e| OpError::fs("mkdir", path, e))?;
    Ok(Reply::Done { bytes: 0 })
}

/// Removes a file, a symlink (not its target) or a whole tree.
pub(crate) async fn remove(path: &str) -> Result<Reply, OpError> {
    let p = absolute(path)?;
    if p.parent().is_none() {
        // Almost surely a host bug; the user can still `rm -rf /`.
        return Err(OpError::Invalid("refusing to remove /".into()));
    }
    let meta = tokio::fs::symlink_metadata(&p)
        .await
        .map_err(|e| OpError::fs("stat", path, e))?;
    let result = if meta.is_dir() {
        tokio::fs::remove_dir_all(&p).await
    } else {
        tokio::fs::remove_file(&p).await
    };
    result.map_err(|e| OpError::fs("remove", path, e))?;
    Ok(Reply::Done { bytes: 0 })
}

fn entry(path: &Path, meta: &std::fs::Metadata) -> Entry {
    let name = path.file_name().map_or_else(
        || path.to_string_lossy().into_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    Entry {
        name,
        path: path.to_string_lossy().into_owned(),
        is_dir: meta.is_dir(),
        size: meta.len(),
        mode: meta.mode(),
        mod_time: meta.mtime(),
    }
}

/// A unique hidden name beside the target, so the rename stays on one
/// filesystem and a half-written file never shows under the real name.
/// Resolves `p` through symlinks (up to a bound), including a dangling
/// final link, whose target is where the new file goes.
async fn follow_links(mut p: PathBuf) -> PathBuf {
    for _ in 0..40 {
        match tokio::fs::symlink_metadata(&p).await {
            Ok(m) if m.file_type().is_symlink() => {
                let Ok(target) = tokio::fs::read_link(&p).await else {
                    return p;
                };
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            _ => return p,
        }
    }
    p
}

fn temp_name(name: &std::ffi::OsStr) -> std::ffi::OsString {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".cellvm-{}-{seq}.tmp", std::process::id()));
    tmp
}

/// Removes the temporary file unless the write completed and renamed
/// it into place.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            // Blocking, but a single unlink, on error paths only.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use cellvm_wire::agent::{ErrorKind, Request};

    use super::*;
    use crate::testkit::{Host, Outcome};

    fn path(dir: &tempfile::TempDir, rel: &str) -> String {
        dir.path().join(rel).to_string_lossy().into_owned()
    }

    fn error_kind(got: &Outcome) -> ErrorKind {
        let Reply::Error(e) = &got.reply else {
            panic!("not an error: {:?}", got.reply)
        };
        e.kind
    }

    fn entries(got: Outcome) -> Vec<Entry> {
        let Reply::Entries { entries } = got.reply else {
            panic!("not entries: {:?}", got.reply)
        };
        entries
    }

    async fn write(host: &mut Host, chan: u32, p: &str, data: &[u8]) {
        let req = Request::WriteFile { path: p.into(), mode: Some(0o600) };
        host.open(chan, &req).await;
        host.stdin(chan, data).await;
        host.eof(chan).await;
        let got = host.finish(chan).await;
        assert_eq!(got.reply, Reply::Done { bytes: data.len() as u64 });
    }

    #[tokio::test]
    async fn binary_file_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut host = Host::start();
        let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        let p = path(&dir, "a/b/c.bin");
        write(&mut host, 1, &p, &data).await;
        let got = host.call(2, &Request::ReadFile { path: p.clone() }).await;
        assert_eq!(got.reply, Reply::Done { bytes: data.len() as u64 });
        assert_eq!(got.stdout, data);
        assert!(got.max_chunk <= CHUNK);
        let st = entries(host.call(3, &Request::Stat { path: p }).await);
        assert_eq!(st[0].mode & 0o777, 0o600);
        assert_eq!(st[0].size, data.len() as u64);
        assert_eq!(st[0].name, "c.bin");
        // Nothing but the target in the directory: no temp file left.
        let names = std::fs::read_dir(dir.path().join("a/b"))
            .expect("listable")
            .count();
        assert_eq!(names, 1);
    }

    #[tokio::test]
    async fn cancelled_write_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut host = Host::start();
        let p = path(&dir, "half");
        host.open(1, &Request::WriteFile { path: p, mode: None }).await;
        host.stdin(1, b"partial").await;
        host.cancel(1).await;
        let got = host.finish(1).await;
        assert_eq!(error_kind(&got), ErrorKind::Cancelled);
        let left = std::fs::read_dir(dir.path()).expect("listable").count();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn lists_sorted_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("b"), b"12").expect("write");
        std::fs::write(dir.path().join("a"), b"").expect("write");
        std::fs::create_dir(dir.path().join("c")).expect("mkdir");
        let mut host = Host::start();
        let req = Request::ListDir { path: path(&dir, "") };
        let list = entries(host.call(1, &req).await);
        let names: Vec<_> = list.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!((list[1].size, list[1].is_dir), (2, false));
        assert!(list[2].is_dir);
    }

    #[tokio::test]
    async fn make_dir_and_remove_a_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut host = Host::start();
        let deep = path(&dir, "x/y/z");
        let got = host.call(1, &Request::MakeDir { path: deep.clone() }).await;
        assert_eq!(got.reply, Reply::Done { bytes: 0 });
        let mkdir = Request::MakeDir { path: deep.clone() };
        let again = host.call(2, &mkdir).await;
        assert_eq!(again.reply, Reply::Done { bytes: 0 });
        write(&mut host, 3, &format!("{deep}/f"), b"x").await;
        let top = path(&dir, "x");
        let got = host.call(4, &Request::Remove { path: top.clone() }).await;
        assert_eq!(got.reply, Reply::Done { bytes: 0 });
        assert!(!dir.path().join("x").exists());
        let got = host.call(5, &Request::Remove { path: top }).await;
        assert_eq!(error_kind(&got), ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn bad_paths_are_typed_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut host = Host::start();
        let cases = [
            (
                Request::Stat { path: "etc/passwd".into() },
                ErrorKind::InvalidInput,
            ),
            (
                Request::ReadFile { path: "rel".into() },
                ErrorKind::InvalidInput,
            ),
            (
                Request::ReadFile { path: path(&dir, "missing") },
                ErrorKind::NotFound,
            ),
            (
                Request::ReadFile { path: path(&dir, "") },
                ErrorKind::IsDirectory,
            ),
            (
                Request::Stat { path: path(&dir, "missing") },
                ErrorKind::NotFound,
            ),
            (Request::Remove { path: "/".into() }, ErrorKind::InvalidInput),
            (
                Request::ListDir { path: "/etc/passwd".into() },
                ErrorKind::NotDirectory,
            ),
        ];
        for (chan, (req, kind)) in (1..).zip(cases) {
            let got = host.call(chan, &req).await;
            assert_eq!(error_kind(&got), kind, "{req:?}");
        }
    }

    #[tokio::test]
    async fn write_onto_a_directory_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut host = Host::start();
        let req = Request::WriteFile { path: path(&dir, ""), mode: None };
        host.open(1, &req).await;
        host.eof(1).await;
        let got = host.finish(1).await;
        assert_eq!(error_kind(&got), ErrorKind::IsDirectory);
    }

    #[tokio::test]
    async fn writes_go_through_symlinks_and_keep_the_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("target");
        std::fs::write(&target, b"old").expect("write");
        std::fs::set_permissions(
            &target,
            std::fs::Permissions::from_mode(0o751),
        )
        .expect("chmod");
        std::os::unix::fs::symlink("target", dir.path().join("link"))
            .expect("symlink");
        let mut host = Host::start();
        let req = Request::WriteFile { path: path(&dir, "link"), mode: None };
        host.open(1, &req).await;
        host.stdin(1, b"new").await;
        host.eof(1).await;
        let got = host.finish(1).await;
        assert_eq!(got.reply, Reply::Done { bytes: 3 });
        assert!(std::fs::symlink_metadata(dir.path().join("link"))
            .expect("link kept")
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).expect("read"), b"new");
        let mode = std::fs::metadata(&target).expect("meta").mode() & 0o7777;
        assert_eq!(mode, 0o751);
    }

    #[tokio::test]
    async fn refuses_to_replace_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("sock");
        let _listener =
            std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let mut host = Host::start();
        let req = Request::WriteFile { path: path(&dir, "sock"), mode: None };
        host.open(1, &req).await;
        host.eof(1).await;
        let got = host.finish(1).await;
        assert_eq!(error_kind(&got), ErrorKind::InvalidInput);
        assert!(!std::fs::symlink_metadata(&sock)
            .expect("still there")
            .file_type()
            .is_file());
    }
}
