//! `[schema]`: the key, the event time and the typed fields of a record.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer};

use crate::time::Millis;

/// The type a schema field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    pub ty: FieldType,
    /// Written with a trailing `?` (`"f64?"`): the field may be absent or null.
    pub optional: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    F64,
    I64,
    String,
    Bool,
}

impl FieldType {
    pub fn is_numeric(self) -> bool {
        matches!(self, FieldType::F64 | FieldType::I64)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::F64 => "f64",
            FieldType::I64 => "i64",
            FieldType::String => "string",
            FieldType::Bool => "bool",
        }
    }
}

impl fmt::Display for FieldSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.ty.as_str())?;
        if self.optional {
            f.write_str("?")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let (base, optional) = match text.strip_suffix('?') {
            Some(base) => (base, true),
            None => (text.as_str(), false),
        };
        let ty = match base {
            "f64" | "float" | "number" => FieldType::F64,
            "i64" | "int" | "integer" => FieldType::I64,
            "string" | "str" => FieldType::String,
            "bool" | "boolean" => FieldType::Bool,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown field type {text:?}: expected one of f64, i64, string, bool (add `?` for an optional field, e.g. \"f64?\")"
                )))
            }
        };
        Ok(FieldSpec { ty, optional })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// Field holding the entity key (string or integer).
    pub key: String,
    /// Field holding the event time: RFC 3339 string or epoch-millis number.
    pub timestamp: String,
    /// Typed fields, in the order features and outputs see them.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
    /// Numeric fields of the event itself that join its feature vector,
    /// after the `[[features]]`, under their own names (Feast's request
    /// data): a model sees the transaction's `amount` beside its history.
    #[serde(default)]
    pub request_fields: Vec<String>,
    /// Larger records go to dead letters unread.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// Event times outside `[min_event_time, max_event_time]` are dead letters
    /// (default: years 2000 to 2200).
    #[serde(default = "default_min_event_time")]
    pub min_event_time: Millis,
    #[serde(default = "default_max_event_time")]
    pub max_event_time: Millis,
}

fn default_max_record_bytes() -> usize {
    1 << 20
}
fn default_min_event_time() -> Millis {
    946_684_800_000 // 2000-01-01T00:00:00Z
}
fn default_max_event_time() -> Millis {
    7_258_118_400_000 // 2200-01-01T00:00:00Z
}

impl SchemaConfig {
    /// Index of a field in the event's field vector.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.keys().position(|k| k == name)
    }
}

impl SchemaConfig {
    /// The first inconsistency in these settings, if any.
    pub(super) fn problem(&self) -> Option<String> {
        if self.key.is_empty() || self.timestamp.is_empty() {
            return Some("[schema] key and timestamp must name fields".into());
        }
        if self.key == self.timestamp {
            return Some(format!(
                "[schema] key and timestamp are both {:?}; they must be different fields",
                self.key
            ));
        }
        if self.max_record_bytes == 0 {
            return Some("[schema] max_record_bytes must be at least 1".into());
        }
        if self.min_event_time >= self.max_event_time {
            return Some("[schema] min_event_time must be less than max_event_time".into());
        }
        for (i, name) in self.request_fields.iter().enumerate() {
            match self.fields.get(name) {
                None => {
                    return Some(format!(
                        "[schema] request_fields lists {name:?}, which is not one of [schema] fields ({})",
                        self.fields.keys().cloned().collect::<Vec<_>>().join(", ")
                    ))
                }
                Some(spec) if !spec.ty.is_numeric() => {
                    return Some(format!(
                        "[schema] request_fields lists {name:?}, a {} field: a feature vector holds numbers (i64 or f64)",
                        spec.ty.as_str()
                    ))
                }
                Some(_) => {}
            }
            if self.request_fields[..i].contains(name) {
                return Some(format!("[schema] request_fields lists {name:?} twice"));
            }
        }
        None
    }
}
