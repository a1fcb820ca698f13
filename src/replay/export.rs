//! `shardflow replay --export FILE`: point-in-time-correct training rows.
//!
//! One NDJSON row per accepted event: its id, key and event time, every
//! feature as the engine computed it for that event (so only from events
//! processed before it, exactly what a live run served at that moment),
//! and, with `[replay] label`, that field of the input record (`null` when
//! the record lacks it). Features are flat columns in config order:
//!
//! ```text
//! {"id":"shardId-0/49…","key":"u1","event_time":1700000000000,"txn_count_1m":3,"amount_sum_1m":12.5,"is_fraud":false}
//! ```
//!
//! A `FILE` ending in `.parquet` gets the same rows as Parquet, with typed
//! columns (see `parquet.rs`). Late events have no feature vector and give
//! no row. The label reaches
//! the row through the event's `raw` record, which the pipeline emits just
//! before its features; a label waits at most until its event's features
//! arrive (or it turns out late), so the map of waiting labels stays small.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use serde::ser::{SerializeMap as _, Serializer as _};

use super::parquet::ParquetRows;
use crate::config::Config;
use crate::flow::BoxFuture;
use crate::record::{KindSet, Output, OutputKind};
use crate::sink::Sink;

/// What `--export` asks for.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub path: PathBuf,
}

/// Column names a feature may not take.
const RESERVED: [&str; 3] = ["id", "key", "event_time"];

/// Where the rows go.
enum Rows {
    Ndjson {
        writer: BufWriter<File>,
        line: Vec<u8>,
        rows: u64,
    },
    Parquet(Box<ParquetRows>),
}

pub struct ExportSink {
    path: PathBuf,
    rows: Rows,
    label: Option<String>,
    /// Labels of events whose features have not arrived yet, by id.
    waiting: HashMap<String, serde_json::Value>,
}

impl ExportSink {
    pub fn create(options: &ExportOptions, config: &Config) -> anyhow::Result<ExportSink> {
        let label = config.replay_label().map(str::to_owned);
        for name in config.vector_names() {
            let name = &*name;
            if RESERVED.contains(&name) || Some(name) == label.as_deref() {
                anyhow::bail!("--export: feature {name:?} would share a column with the row's {name:?}; rename the feature");
            }
        }
        let path = options.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating directory {}", dir.display()))?;
        }
        let rows = if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
        {
            let features = super::parquet::Column::of_vector(config);
            Rows::Parquet(Box::new(ParquetRows::create(
                &path,
                &features,
                label.clone(),
            )?))
        } else {
            let file = File::create(&path)
                .with_context(|| format!("creating the export file {}", path.display()))?;
            Rows::Ndjson {
                writer: BufWriter::with_capacity(1 << 20, file),
                line: Vec::with_capacity(512),
                rows: 0,
            }
        };
        Ok(ExportSink {
            path,
            rows,
            label,
            waiting: HashMap::new(),
        })
    }

    fn rows(&self) -> u64 {
        match &self.rows {
            Rows::Ndjson { rows, .. } => *rows,
            Rows::Parquet(p) => p.rows(),
        }
    }

    /// Features, plus (for labels) the raw records and late events.
    pub fn kinds(&self) -> KindSet {
        let mut k: KindSet = [OutputKind::Features].into_iter().collect();
        if self.label.is_some() {
            k.insert(OutputKind::Raw);
            k.insert(OutputKind::Late);
        }
        k
    }

    fn label_of(&self, data: &[u8]) -> serde_json::Value {
        let Some(label) = &self.label else {
            return serde_json::Value::Null;
        };
        serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(data)
            .ok()
            .and_then(|mut m| m.remove(label))
            .unwrap_or(serde_json::Value::Null)
    }

    fn write_row(&mut self, r: &crate::record::FeatureRecord) -> anyhow::Result<()> {
        let label = match &self.label {
            Some(_) => Some(
                self.waiting
                    .remove(&r.id)
                    .unwrap_or(serde_json::Value::Null),
            ),
            None => None,
        };
        let (writer, line, rows) = match &mut self.rows {
            Rows::Parquet(p) => return p.push(r, label),
            Rows::Ndjson { writer, line, rows } => (writer, line, rows),
        };
        line.clear();
        let mut ser = serde_json::Serializer::new(&mut *line);
        let mut map = ser.serialize_map(None)?;
        map.serialize_entry("id", &r.id)?;
        map.serialize_entry("key", &*r.key)?;
        map.serialize_entry("event_time", &r.event_time)?;
        for (name, value) in r.features.names.iter().zip(&r.features.values) {
            map.serialize_entry(&**name, value)?;
        }
        if let (Some(name), Some(value)) = (&self.label, label) {
            map.serialize_entry(name, &value)?;
        }
        map.end()?;
        line.push(b'\n');
        writer
            .write_all(line)
            .with_context(|| format!("writing {}", self.path.display()))?;
        *rows += 1;
        Ok(())
    }
}

impl Sink for ExportSink {
    fn describe(&self) -> String {
        format!(
            "training rows to {} ({}{})",
            self.path.display(),
            match self.rows {
                Rows::Ndjson { .. } => "NDJSON",
                Rows::Parquet(_) => "Parquet",
            },
            self.label
                .as_deref()
                .map(|l| format!(", label {l:?}"))
                .unwrap_or_default()
        )
    }

    fn blocks(&self) -> bool {
        true
    }

    fn write<'a>(&'a mut self, outputs: &'a [&'a Output]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            for o in outputs {
                match o {
                    Output::Raw(r) if r.decoded.is_some() => {
                        let label = self.label_of(&r.data);
                        self.waiting.insert(r.position.id(), label);
                    }
                    Output::Late(l) => {
                        self.waiting.remove(&l.id);
                    }
                    Output::Features(f) => self.write_row(f)?,
                    _ => {}
                }
            }
            Ok(())
        })
    }

    fn flush(&mut self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async move {
            match &mut self.rows {
                Rows::Ndjson { writer, .. } => writer
                    .flush()
                    .and_then(|()| writer.get_ref().sync_data())
                    .with_context(|| format!("writing {}", self.path.display()))?,
                // Only the last barrier completes a Parquet file; flushing
                // without one means the replay stopped short.
                Rows::Parquet(p) => {
                    p.close()?;
                    if !p.is_finished() {
                        tracing::warn!(
                            rows = p.rows(),
                            file = %p.partial_path().display(),
                            "the replay did not complete: the Parquet export keeps the rows so far under its .partial name"
                        );
                    }
                }
            }
            tracing::debug!(rows = self.rows(), "export flushed");
            Ok(())
        })
    }

    fn checkpoint(&mut self, id: u64, last: bool) -> BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(async move {
            match &mut self.rows {
                Rows::Parquet(p) if last => {
                    p.finish()?;
                    tracing::info!(rows = p.rows(), file = %self.path.display(), "Parquet export written");
                }
                // Row groups are written as they fill; a footer only at the end.
                Rows::Parquet(_) => {}
                Rows::Ndjson { .. } => self.flush().await?,
            }
            Ok(id)
        })
    }
}
