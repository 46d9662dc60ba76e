//! A template recipe: the TOML a user writes, parsed into [`RawRecipe`]
//! and validated once into a [`Recipe`] before any work starts.
//!
//! ```toml
//! name = "python-data"
//! base = "base"
//! packages = ["python3-numpy", "jq"]
//! commands = ["python3 -c 'import numpy'"]
//! files = [{ source = "motd", dest = "/etc/motd", mode = 0o644 }]
//! env = { MPLBACKEND = "Agg" }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// Template names the guest directory uses for other things: a
/// template with one of these names would clash with `initrd.img`,
/// `manifest.json` or `vmlinuz`.
pub const RESERVED_NAMES: &[&str] = &["initrd", "manifest", "vmlinuz"];

/// Image paths a file may not be copied to: the guest mounts its own
/// `/proc`, `/sys`, `/dev` and a tmpfs `/run` over them at boot, so a
/// file there would never be seen.
const HIDDEN_AT_BOOT: &[&str] = &["/proc", "/sys", "/dev", "/run"];

/// The recipe as written. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    /// The template's name.
    pub name: String,
    /// The template it starts from.
    #[serde(default = "default_base")]
    pub base: String,
    /// Debian packages to install.
    #[serde(default)]
    pub packages: Vec<String>,
    /// Shell commands run in order in the image.
    #[serde(default)]
    pub commands: Vec<String>,
    /// Files copied into the image.
    #[serde(default)]
    pub files: Vec<RawFile>,
    /// Variables written to `/etc/environment`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_base() -> String {
    "base".to_owned()
}

/// One entry of `files` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    /// Relative to the recipe file's directory.
    pub source: PathBuf,
    /// Absolute path in the image.
    pub dest: String,
    /// Permission bits: an integer (`0o755`) or an octal string.
    pub mode: Option<RawMode>,
}

/// `mode` as TOML allows it to be written.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawMode {
    /// `mode = 0o755` (or `493`).
    Int(i64),
    /// `mode = "755"` or `"0755"`.
    Text(String),
}

/// A validated recipe: every field checked, every source found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// 1-64 lowercase letters, digits or '-', not reserved.
    pub name: String,
    /// An existing template (checked against the guest dir later).
    pub base: String,
    /// Debian package names.
    pub packages: Vec<String>,
    /// Non-empty shell commands.
    pub commands: Vec<String>,
    /// Files with resolved sources.
    pub files: Vec<FileSpec>,
    /// Valid variable names and single-line values.
    pub env: BTreeMap<String, String>,
}

/// One file to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// On the host: the recipe's directory joined with `source`.
    pub source: PathBuf,
    /// Absolute and normal (no `.`, `..`, or trailing '/').
    pub dest: String,
    /// Permission bits to set, if given.
    pub mode: Option<u32>,
}

/// One problem found in a recipe, with the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `files[1].dest`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Why a recipe was refused.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The file could not be read.
    #[error("cannot read recipe {path}")]
    Read {
        /// The recipe file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, an unknown field, or a field of the wrong type.
    #[error("recipe {path}: {message}")]
    Parse {
        /// The recipe file.
        path: PathBuf,
        /// toml's message, which names the field and line.
        message: String,
    },
    /// Parsed, but some fields are not acceptable.
    #[error("recipe {path} is invalid:{}", Listed(.problems))]
    Invalid {
        /// The recipe file.
        path: PathBuf,
        /// Every problem, in field order.
        problems: Vec<Problem>,
    },
}

impl RecipeError {
    /// The problems, when the recipe parsed but did not validate.
    #[cfg(test)]
    #[must_use]
    pub fn problems(&self) -> &[Problem] {
        match self {
            Self::Invalid { problems, .. } => problems,
            Self::Read { .. } | Self::Parse { .. } => &[],
        }
    }
}

struct Listed<'a>(&'a [Problem]);

impl fmt::Display for Listed<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in self.0 {
            write!(f, "\n  {}: {}", p.field, p.message)?;
        }
        Ok(())
    }
}

/// Reads, parses and validates the recipe at `path`.
///
/// # Errors
/// An unreadable file, bad TOML or unknown fields, or any field that
/// does not validate (all of them are listed).
pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        RecipeError::Read { path: path.to_path_buf(), source }
    })?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    parse(&text, dir).map_err(|e| match e {
        ParseError::Toml(message) => {
            RecipeError::Parse { path: path.to_path_buf(), message }
        }
        ParseError::Invalid(problems) => {
            RecipeError::Invalid { path: path.to_path_buf(), problems }
        }
    })
}

/// Why [`parse`] refused a text.
#[derive(Debug)]
pub enum ParseError {
    /// toml's message.
    Toml(String),
    /// Field problems.
    Invalid(Vec<Problem>),
}

/// Parses and validates `text`; sources are relative to `dir`.
///
/// # Errors
/// See [`ParseError`].
pub fn parse(text: &str, dir: &Path) -> Result<Recipe, ParseError> {
    let raw: RawRecipe = toml::from_str(text)
        .map_err(|e| ParseError::Toml(e.message().to_owned()))?;
    raw.validate(dir).map_err(ParseError::Invalid)
}

impl RawRecipe {
    /// Checks every field; sources are looked up relative to `dir`.
    ///
    /// # Errors
    /// Every problem found, not only the first.
    pub fn validate(self, dir: &Path) -> Result<Recipe, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut bad = |field: String, message: String| {
            problems.push(Problem { field, message });
        };
        if let Err(m) = check_name(&self.name) {
            bad("name".into(), m);
        } else if RESERVED_NAMES.contains(&self.name.as_str()) {
            bad("name".into(), format!("{:?} is reserved", self.name));
        }
        if let Err(m) = check_name(&self.base) {
            bad("base".into(), m);
        } else if self.base == self.name {
            bad("base".into(), "a template cannot be its own base".into());
        }
        for (i, p) in self.packages.iter().enumerate() {
            if !is_package(p) {
                bad(
                    format!("packages[{i}]"),
                    format!("{p:?} is not a Debian package name"),
                );
            }
        }
        for (i, c) in self.commands.iter().enumerate() {
            if c.trim().is_empty() {
                bad(format!("commands[{i}]"), "is empty".into());
            } else if c.contains('\0') {
                bad(format!("commands[{i}]"), "contains a NUL byte".into());
            }
        }
        let mut files = Vec::new();
        for (i, f) in self.files.iter().enumerate() {
            match check_file(f, dir) {
                Ok(spec) => files.push(spec),
                Err((sub, m)) => bad(format!("files[{i}].{sub}"), m),
            }
        }
        for (k, v) in &self.env {
            if !is_env_name(k) {
                bad(
                    format!("env.{k}"),
                    "is not a variable name (letters, digits, '_')".into(),
                );
            } else if v.contains(['\n', '\r', '\0']) {
                bad(format!("env.{k}"), "must be a single line".into());
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Recipe {
            name: self.name,
            base: self.base,
            packages: self.packages,
            commands: self.commands,
            files,
            env: self.env,
        })
    }
}

/// The rule the worker and the API apply to template names.
///
/// # Errors
/// The message says what is wrong.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} must be 1-64 lowercase letters, digits or '-'"))
    }
}

/// Debian policy: lowercase letters, digits, `+ - .`, at least two
/// characters, starting with a letter or digit (so never an option).
/// An `=version` pin is allowed.
fn is_package(p: &str) -> bool {
    let (name, version) = match p.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (p, None),
    };
    let name_ok = name.len() >= 2
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'+' | b'-' | b'.')
        });
    let version_ok = version.is_none_or(|v| {
        !v.is_empty()
            && v.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'.' | b'+' | b'~' | b':' | b'-')
            })
    });
    name_ok && version_ok
}

fn is_env_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

fn check_file(
    f: &RawFile,
    dir: &Path,
) -> Result<FileSpec, (&'static str, String)> {
    let dest = normal_dest(&f.dest).map_err(|m| ("dest", m))?;
    let mode = match &f.mode {
        None => None,
        Some(m) => Some(parse_mode(m).map_err(|m| ("mode", m))?),
    };
    if f.source.is_absolute() {
        return Err((
            "source",
            format!(
                "{} must be relative to the recipe's directory",
                f.source.display()
            ),
        ));
    }
    let source = dir.join(&f.source);
    let meta = std::fs::metadata(&source)
        .map_err(|e| ("source", format!("{}: {e}", source.display())))?;
    if !meta.is_file() && !meta.is_dir() {
        return Err((
            "source",
            format!("{} is neither a file nor a directory", source.display()),
        ));
    }
    if meta.is_dir() && mode.is_some() {
        return Err(("mode", "applies to a file, not a directory".into()));
    }
    Ok(FileSpec { source, dest, mode })
}

/// `dest` made normal, or why it cannot be used.
fn normal_dest(dest: &str) -> Result<String, String> {
    let path = Path::new(dest);
    if !path.is_absolute() {
        return Err(format!("{dest:?} must be an absolute path"));
    }
    if dest.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(p) => parts.push(p.to_string_lossy()),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("{dest:?} may not contain '..'"));
            }
        }
    }
    if parts.is_empty() {
        return Err("must name a path below '/'".into());
    }
    let normal = format!("/{}", parts.join("/"));
    for hidden in HIDDEN_AT_BOOT {
        if normal == *hidden || normal.starts_with(&format!("{hidden}/")) {
            return Err(format!(
                "{normal} is under {hidden}, which the guest mounts over \
                 at boot"
            ));
        }
    }
    Ok(normal)
}

fn parse_mode(m: &RawMode) -> Result<u32, String> {
    let v = match m {
        RawMode::Int(i) => u32::try_from(*i).map_err(|_| format!("{i}"))?,
        RawMode::Text(s) => {
            let digits = s.strip_prefix("0o").unwrap_or(s);
            u32::from_str_radix(digits, 8)
                .map_err(|_| format!("{s:?} is not an octal mode"))?
        }
    };
    if v > 0o7777 {
        return Err(format!("{v:#o} is more than 0o7777"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A recipe directory with one source file, `hello.txt`.
    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("hello.txt"), "hi\n").unwrap();
        d
    }

    fn problems(text: &str) -> Vec<Problem> {
        let d = dir();
        match parse(text, d.path()) {
            Err(ParseError::Invalid(p)) => p,
            other => panic!("want field problems, got {other:?}"),
        }
    }

    fn fields(text: &str) -> Vec<String> {
        problems(text).into_iter().map(|p| p.field).collect()
    }

    #[test]
    fn a_full_recipe_parses() {
        let d = dir();
        let r = parse(
            r#"
            name = "py-data"
            base = "base"
            packages = ["python3-numpy", "jq", "libc6=2.36-9"]
            commands = ["echo hi > /etc/hi"]
            files = [
              { source = "hello.txt", dest = "/opt/./x//hello", mode = 0o640 },
              { source = "hello.txt", dest = "/opt/y", mode = "755" },
            ]
            env = { FOO = "bar baz", _X1 = "" }
            "#,
            d.path(),
        )
        .unwrap();
        assert_eq!(r.name, "py-data");
        assert_eq!(r.packages.len(), 3);
        assert_eq!(r.files[0].dest, "/opt/x/hello");
        assert_eq!(r.files[0].mode, Some(0o640));
        assert_eq!(r.files[1].mode, Some(0o755));
        assert_eq!(r.files[0].source, d.path().join("hello.txt"));
        assert_eq!(r.env["FOO"], "bar baz");
    }

    #[test]
    fn base_defaults_to_base_and_lists_to_empty() {
        let d = dir();
        let r = parse("name = \"t\"", d.path()).unwrap();
        assert_eq!(r.base, "base");
        assert!(r.packages.is_empty() && r.files.is_empty());
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", "Py", "a_b", "a/b", "../x", "x y", &"a".repeat(65)] {
            let f = fields(&format!("name = {name:?}"));
            assert_eq!(f, ["name"], "name {name:?}");
        }
        for name in RESERVED_NAMES {
            assert_eq!(fields(&format!("name = {name:?}")), ["name"]);
        }
        assert_eq!(fields("name = \"a\"\nbase = \"B\""), ["base"]);
        assert_eq!(fields("name = \"a\"\nbase = \"a\""), ["base"]);
    }

    #[test]
    fn unknown_fields_are_refused_with_their_name() {
        let d = dir();
        for text in [
            "name = \"a\"\npackage = [\"jq\"]",
            "name = \"a\"\n\
             files = [{source=\"hello.txt\", dest=\"/x\", owner=\"u\"}]",
        ] {
            match parse(text, d.path()) {
                Err(ParseError::Toml(m)) => {
                    assert!(m.contains("unknown field"), "{m}");
                }
                other => panic!("want a toml error, got {other:?}"),
            }
        }
    }

    #[test]
    fn dest_must_be_absolute_normal_and_visible() {
        let f = |dest: &str| {
            fields(&format!(
                "name = \"a\"\n\
                 files = [{{source=\"hello.txt\", dest={dest:?}}}]"
            ))
        };
        for dest in
            ["etc/x", "", "/", "/etc/../x", "/run/x", "/proc", "/dev/y"]
        {
            assert_eq!(f(dest), ["files[0].dest"], "dest {dest:?}");
        }
        let d = dir();
        let ok = "name = \"a\"\n\
            files = [{source=\"hello.txt\", dest=\"/running/x\"}]";
        assert!(parse(ok, d.path()).is_ok(), "/run is matched by component");
    }

    #[test]
    fn missing_or_absolute_source_is_refused() {
        let f = |src: &str| {
            problems(&format!(
                "name = \"a\"\nfiles = [{{source={src:?}, dest=\"/x\"}}]"
            ))
        };
        let p = f("nope.txt");
        assert_eq!(p[0].field, "files[0].source");
        assert!(p[0].message.contains("nope.txt"), "{}", p[0].message);
        assert_eq!(f("/etc/hostname")[0].field, "files[0].source");
    }

    #[test]
    fn bad_modes_packages_commands_and_env_are_named() {
        let p = fields(
            r#"
            name = "a"
            packages = ["-oops", "ok", "Caps", "x"]
            commands = ["  "]
            files = [{ source = "hello.txt", dest = "/x", mode = 0o17777 },
                     { source = "hello.txt", dest = "/y", mode = "rw" }]
            env = { "1X" = "v", GOOD = "a\nb" }
            "#,
        );
        assert_eq!(
            p,
            [
                "packages[0]",
                "packages[2]",
                "packages[3]",
                "commands[0]",
                "files[0].mode",
                "files[1].mode",
                "env.1X",
                "env.GOOD",
            ]
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let d = dir();
        let path = d.path().join("r.toml");
        std::fs::write(&path, "name = \"A\"\nbase = \"\"\n").unwrap();
        let e = load(&path).unwrap_err();
        assert_eq!(e.problems().len(), 2);
        let text = e.to_string();
        assert!(text.contains("name:") && text.contains("base:"), "{text}");
    }
}
