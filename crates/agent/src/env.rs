//! The environment a command starts with.
//!
//! Four layers, later ones winning: a fixed base (the agent's own
//! environment is not inherited, it is whatever the kernel gave PID 1),
//! the template's `/etc/environment` (what a recipe's `env` sets), the
//! sandbox's environment file, and the request's own variables.

use std::collections::BTreeMap;
use std::path::Path;

/// Variables every command gets unless overridden.
const BASE: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("TERM", "xterm-256color"),
    ("LANG", "C.UTF-8"),
];

/// Builds the full environment for one command.
///
/// The file is read on every exec (it is a few lines) so a sandbox's
/// environment can change without restarting the agent. A missing or
/// unreadable file counts as empty.
pub(crate) async fn build(
    image_env: Option<&Path>,
    env_file: &Path,
    request: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> =
        BASE.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    if let Some(path) = image_env {
        if let Ok(text) = tokio::fs::read_to_string(path).await {
            // pam_env's format: values may be quoted.
            env.extend(
                parse_file(&text).map(|(k, v)| (k, unquote(&v).to_owned())),
            );
        }
    }
    if let Ok(text) = tokio::fs::read_to_string(env_file).await {
        env.extend(parse_file(&text));
    }
    env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Parses `KEY=VALUE` lines; blank lines, `#` comments and lines that
/// are not an assignment to a valid name are skipped.
fn parse_file(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.lines().filter_map(|line| {
        let line = line.trim_end_matches('\r');
        if line.trim_start().starts_with('#') {
            return None;
        }
        let (key, value) = line.split_once('=')?;
        valid_name(key).then(|| (key.to_owned(), value.to_owned()))
    })
}

/// `"x"` or `'x'` to `x`; anything else as is.
fn unquote(v: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q))
        {
            return inner;
        }
    }
    v
}

fn valid_name(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_lines_are_parsed_leniently() {
        let got: Vec<_> =
            parse_file("A=1\n# c\n\nB=x=y\nbad line\n1X=2\nC=\n").collect();
        let want = [("A", "1"), ("B", "x=y"), ("C", "")];
        let want: Vec<_> = want
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn request_wins_over_file_and_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("env");
        std::fs::write(&file, "HOME=/home/x\nFOO=file\n").expect("write");
        let req = BTreeMap::from([("FOO".to_owned(), "req".to_owned())]);
        let image = dir.path().join("environment");
        std::fs::write(&image, "FOO=image\nBAR=\"quoted\"\n").expect("write");
        let env = build(Some(&image), &file, &req).await;
        assert_eq!(env["BAR"], "quoted");
        assert_eq!(env["HOME"], "/home/x");
        assert_eq!(env["FOO"], "req");
        assert_eq!(env["LANG"], "C.UTF-8");
    }
}
