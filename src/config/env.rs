//! `${VAR}` substitution: the environment goes into the parsed string
//! values, never into the TOML text, so a value cannot change the file's
//! structure; spans still point into the file as written.

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Appended to a TOML syntax error on a line holding `${`.
pub(super) const NOT_A_STRING_HINT: &str = " (`${VAR}` is substituted only inside quoted strings, e.g. key = \"${VAR}\"; a number, boolean, array or table cannot come from the environment)";

/// Whether the line of `offset` holds a `${` (a reference TOML could not
/// parse, so presumably written outside a string).
pub(super) fn env_reference_outside_string(text: &str, offset: usize) -> bool {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[start..end];
    let code = line.split_once('#').map_or(line, |(code, _)| code);
    code.contains("${")
}

/// A `${...}` that cannot be substituted: where it starts in the string
/// value, its text, and what is wrong with it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct EnvRefError {
    pub(super) at: usize,
    pub(super) len: usize,
    pub(super) message: String,
}

/// Substitutes the environment into one string value: `${VAR}`,
/// `${VAR:-default}`, and `$${` for a literal `${`. The result is the new
/// value (None when there is nothing to substitute) and whether a reference
/// (not just an escape) was replaced. Values are inserted verbatim: the
/// string is already parsed, so nothing in them is TOML.
pub(super) fn substitute_env(
    value: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<(String, bool)>, EnvRefError> {
    if !value.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(value.len());
    let mut referenced = false;
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let at = value.len() - rest.len() + i;
        let after = &rest[i..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        if !after.starts_with("${") {
            out.push('$');
            rest = &after[1..];
            continue;
        }
        let Some(close) = after.find('}') else {
            return Err(EnvRefError {
                at,
                len: 2,
                message: "unclosed ${ in an environment reference: write ${NAME} or ${NAME:-default}, or $${ for a literal ${".into(),
            });
        };
        let inner = &after[2..close];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let fail = |message: String| EnvRefError {
            at,
            len: close + 1,
            message,
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(fail(format!(
                "invalid environment reference ${{{inner}}}: a name is letters, digits and _"
            )));
        }
        match (env(name), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(fail(format!(
                    "environment variable {name} is not set (write ${{{name}:-default}} to give a default)"
                )));
            }
        }
        referenced = true;
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(Some((out, referenced)))
}

/// The string values a reference was substituted into: span, result.
type Substituted = Vec<(std::ops::Range<usize>, String)>;

/// Where the substitution walk is and what it found.
struct EnvWalk<'a, F> {
    text: &'a str,
    env: &'a F,
    /// The key path of the value being visited, e.g. `features[0].name`.
    path: String,
    substituted: Substituted,
    /// The earliest problem in the file (the walk visits keys in map
    /// order, not file order).
    error: Option<(usize, String)>,
}

impl<F: Fn(&str) -> Option<String>> EnvWalk<'_, F> {
    fn fail(&mut self, at: usize, message: String) {
        if self.error.as_ref().is_none_or(|(first, _)| at < *first) {
            self.error = Some((at, message));
        }
    }

    fn table(&mut self, table: &mut DeTable<'_>) {
        for (key, value) in table.iter_mut() {
            let len = self.path.len();
            let name = key.get_ref();
            if !self.path.is_empty() {
                self.path.push('.');
            }
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                self.path.push_str(name);
            } else {
                self.path.push_str(&format!("{name:?}"));
            }
            if name.contains("${") {
                let message = format!(
                    "the key `{}` holds `${{`: keys are never substituted; the environment is substituted only into string values",
                    self.path
                );
                self.fail(key.span().start, message);
            }
            self.value(value);
            self.path.truncate(len);
        }
    }

    fn value(&mut self, value: &mut Spanned<DeValue<'_>>) {
        let span = value.span();
        match value.get_mut() {
            DeValue::String(s) => match substitute_env(s, self.env) {
                Ok(None) => {}
                Ok(Some((new, referenced))) => {
                    if referenced {
                        self.substituted.push((span, new.clone()));
                    }
                    *s = std::borrow::Cow::Owned(new);
                }
                Err(e) => {
                    let at = locate_in_string(self.text, span, s, &e);
                    let message = format!("`{}`: {}", self.path, e.message);
                    self.fail(at, message);
                }
            },
            DeValue::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    let len = self.path.len();
                    self.path.push_str(&format!("[{i}]"));
                    self.value(item);
                    self.path.truncate(len);
                }
            }
            DeValue::Table(table) => self.table(table),
            DeValue::Integer(_)
            | DeValue::Float(_)
            | DeValue::Boolean(_)
            | DeValue::Datetime(_) => {}
        }
    }
}

/// The file offset of a bad reference in a string value: found in the
/// value's source text (the k-th occurrence for the k-th in the value); the
/// start of the value when escapes hide it.
fn locate_in_string(
    text: &str,
    span: std::ops::Range<usize>,
    value: &str,
    e: &EnvRefError,
) -> usize {
    let needle = &value[e.at..e.at + e.len];
    let nth = value[..e.at].matches(needle).count();
    text.get(span.clone())
        .and_then(|raw| raw.match_indices(needle).nth(nth))
        .map_or(span.start, |(i, _)| span.start + i)
}

/// Substitutes the environment into every string value of a parsed file
/// (keys, numbers, booleans and the structure are left alone). Returns the
/// values that took a reference (span, result), or the first problem in the
/// file (offset, message).
pub(super) fn substitute_env_in(
    root: &mut Spanned<DeTable<'_>>,
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Substituted, (usize, String)> {
    let mut walk = EnvWalk {
        text,
        env,
        path: String::new(),
        substituted: Vec::new(),
        error: None,
    };
    walk.table(root.get_mut());
    match walk.error {
        Some(e) => Err(e),
        None => Ok(walk.substituted),
    }
}
