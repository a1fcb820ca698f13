//! Training rows as a Parquet file (`--export FILE.parquet`).
//!
//! One concept, one file: about 500 lines of code, its tests below.
//!
//! The columns are those of the NDJSON export, typed:
//!
//! | column | Parquet type |
//! |---|---|
//! | `id`, `key` | required `BYTE_ARRAY` (`STRING`) |
//! | `event_time` | required `INT64` (`TIMESTAMP(MILLIS, UTC)`) |
//! | a `count` or `distinct_count` feature | optional `INT64` |
//! | any other feature | optional `DOUBLE` (null where NDJSON has `null`) |
//! | the label | optional; typed by the labels of the first row group |
//!
//! A label column is `BOOLEAN` when those labels are all booleans, `INT64`
//! when all are integers, `DOUBLE` when all are numbers, and `STRING`
//! otherwise (a string as itself, anything else as its JSON text). A later
//! label the column cannot hold fails the export with the event's id
//! rather than becoming a null: a training set must not lose labels
//! silently. NDJSON keeps every label as it was.
//!
//! Rows are buffered by column and written as row groups of
//! [`ROW_GROUP_ROWS`], so memory stays bounded for any archive. The file
//! is written as `FILE.partial` and renamed to `FILE` when the replay
//! completes: a `FILE` that exists is whole. A failed replay leaves
//! `FILE.partial`, closed and readable, holding the rows written so far.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use parquet::basic::{Compression, LogicalType, Repetition, TimeUnit, Type as PhysicalType};
use parquet::column::writer::ColumnWriter;
use parquet::data_type::ByteArray;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::Type;

use crate::record::{FeatureRecord, Value};

/// Rows per row group: large enough for column statistics and compression
/// to pay off, small enough to keep the buffer to tens of MiB.
pub const ROW_GROUP_ROWS: usize = 131_072;

/// The label column's type, fixed when the first row group is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LabelColumn {
    Bool,
    Int,
    Float,
    Text,
}

impl LabelColumn {
    /// The narrowest type holding every label in `labels` (nulls aside).
    fn infer<'a>(labels: impl Iterator<Item = &'a serde_json::Value>) -> LabelColumn {
        let mut kind: Option<LabelColumn> = None;
        for label in labels {
            let this = match label {
                serde_json::Value::Null => continue,
                serde_json::Value::Bool(_) => LabelColumn::Bool,
                serde_json::Value::Number(n) if n.as_i64().is_some() => LabelColumn::Int,
                serde_json::Value::Number(_) => LabelColumn::Float,
                _ => return LabelColumn::Text,
            };
            kind = Some(match (kind, this) {
                (None, k) => k,
                (Some(a), b) if a == b => a,
                (
                    Some(LabelColumn::Int | LabelColumn::Float),
                    LabelColumn::Int | LabelColumn::Float,
                ) => LabelColumn::Float,
                _ => return LabelColumn::Text,
            });
        }
        // No label seen at all: text holds whatever comes later.
        kind.unwrap_or(LabelColumn::Text)
    }

    fn name(self) -> &'static str {
        match self {
            LabelColumn::Bool => "BOOLEAN",
            LabelColumn::Int => "INT64",
            LabelColumn::Float => "DOUBLE",
            LabelColumn::Text => "STRING",
        }
    }
}

/// One feature's buffered values: present values, and a definition level
/// per row (1 present, 0 null).
#[derive(Default)]
struct Optional<T> {
    values: Vec<T>,
    levels: Vec<i16>,
}

impl<T> Optional<T> {
    fn push(&mut self, v: Option<T>) {
        match v {
            Some(v) => {
                self.values.push(v);
                self.levels.push(1);
            }
            None => self.levels.push(0),
        }
    }

    fn clear(&mut self) {
        self.values.clear();
        self.levels.clear();
    }
}

enum FeatureBuffer {
    Int(Optional<i64>),
    Float(Optional<f64>),
}

/// A Parquet file of training rows being written.
pub struct ParquetRows {
    path: PathBuf,
    partial: PathBuf,
    feature_names: Vec<String>,
    label_name: Option<String>,
    /// Created with the first row group, when the label's type is known.
    writer: Option<SerializedFileWriter<File>>,
    label_kind: Option<LabelColumn>,
    /// The event whose label typed the column, for error messages.
    label_typed_by: Option<String>,
    ids: Vec<ByteArray>,
    keys: Vec<ByteArray>,
    times: Vec<i64>,
    features: Vec<FeatureBuffer>,
    labels: Vec<serde_json::Value>,
    rows: u64,
    row_group_rows: usize,
    /// Closed: nothing more is written.
    closed: bool,
    /// Closed and renamed to its final name.
    finished: bool,
}

/// The Parquet type of a feature column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    /// `count`, `distinct_count`, an i64 request field.
    Int,
    Float,
}

impl Column {
    /// The column of each value of `config`'s feature vectors, by name.
    pub fn of_vector(config: &crate::config::Config) -> Vec<(String, Column)> {
        use crate::config::{AggKind, FieldType};
        let features = config.features.iter().map(|f| {
            let column = match f.agg {
                AggKind::Count | AggKind::DistinctCount => Column::Int,
                _ => Column::Float,
            };
            (f.name.get_ref().clone(), column)
        });
        let request = config.schema.request_fields.iter().map(|name| {
            let column = match config.schema.fields.get(name).map(|s| s.ty) {
                Some(FieldType::I64) => Column::Int,
                _ => Column::Float,
            };
            (name.clone(), column)
        });
        features.chain(request).collect()
    }
}

impl ParquetRows {
    /// `features`: each vector value's name and column type, in order.
    pub fn create(
        path: &Path,
        features: &[(String, Column)],
        label: Option<String>,
    ) -> anyhow::Result<ParquetRows> {
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        // Fail now, not after an hour of replay, if the file cannot be made.
        File::create(&partial)
            .with_context(|| format!("creating the export file {}", partial.display()))?;
        Ok(ParquetRows {
            path: path.to_owned(),
            partial,
            feature_names: features.iter().map(|(n, _)| n.clone()).collect(),
            features: features
                .iter()
                .map(|(_, column)| match column {
                    Column::Int => FeatureBuffer::Int(Optional::default()),
                    Column::Float => FeatureBuffer::Float(Optional::default()),
                })
                .collect(),
            label_name: label,
            writer: None,
            label_kind: None,
            label_typed_by: None,
            ids: Vec::new(),
            keys: Vec::new(),
            times: Vec::new(),
            labels: Vec::new(),
            rows: 0,
            row_group_rows: ROW_GROUP_ROWS,
            closed: false,
            finished: false,
        })
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Buffers one row; writes a row group when the buffer is full.
    pub fn push(
        &mut self,
        r: &FeatureRecord,
        label: Option<serde_json::Value>,
    ) -> anyhow::Result<()> {
        if self.closed {
            anyhow::bail!(
                "event {}: {} is already closed",
                r.id,
                self.partial.display()
            );
        }
        if r.features.values.len() != self.features.len() {
            anyhow::bail!(
                "event {}: {} feature values for {} columns",
                r.id,
                r.features.values.len(),
                self.features.len()
            );
        }
        // Everything is checked before anything is buffered: a refused row
        // must not leave the columns with different lengths.
        for ((buffer, value), name) in self
            .features
            .iter()
            .zip(&r.features.values)
            .zip(&self.feature_names)
        {
            if let (FeatureBuffer::Int(_), Some(Value::Float(v))) = (buffer, value) {
                anyhow::bail!(
                    "event {}: feature {name:?} has the non-integer value {v} in an INT64 column",
                    r.id
                );
            }
        }
        let label = self
            .label_name
            .as_ref()
            .map(|_| label.unwrap_or(serde_json::Value::Null));
        if let Some(label) = &label {
            if self.label_kind.is_some() {
                self.check_label(&r.id, label)?;
            } else if !label.is_null() && self.label_typed_by.is_none() {
                self.label_typed_by = Some(r.id.clone());
            }
        }
        for (buffer, value) in self.features.iter_mut().zip(&r.features.values) {
            match (buffer, *value) {
                (FeatureBuffer::Int(b), v) => b.push(v.and_then(|v| match v {
                    Value::Int(v) => Some(v),
                    Value::Float(_) => None, // refused above
                })),
                // As in NDJSON: a non-finite result is null.
                (FeatureBuffer::Float(b), v) => {
                    b.push(v.map(Value::as_f64).filter(|v| v.is_finite()))
                }
            }
        }
        self.ids.push(ByteArray::from(r.id.as_bytes().to_vec()));
        self.keys.push(ByteArray::from(r.key.as_bytes().to_vec()));
        self.times.push(r.event_time);
        if let Some(label) = label {
            self.labels.push(label);
        }
        self.rows += 1;
        if self.ids.len() >= self.row_group_rows {
            self.write_row_group()?;
        }
        Ok(())
    }

    fn check_label(&self, id: &str, label: &serde_json::Value) -> anyhow::Result<()> {
        let kind = self.label_kind.expect("checked by the caller");
        let fits = match (kind, label) {
            (_, serde_json::Value::Null) | (LabelColumn::Text, _) => true,
            (LabelColumn::Bool, serde_json::Value::Bool(_)) => true,
            (LabelColumn::Int, serde_json::Value::Number(n)) => n.as_i64().is_some(),
            (LabelColumn::Float, serde_json::Value::Number(_)) => true,
            _ => false,
        };
        if fits {
            return Ok(());
        }
        anyhow::bail!(
            "--export: the label {:?} of event {id} is {label}, which the {} column cannot hold (its type comes from the first {} rows, e.g. event {}); export to NDJSON to keep mixed labels",
            self.label_name.as_deref().unwrap_or_default(),
            kind.name(),
            self.row_group_rows,
            self.label_typed_by.as_deref().unwrap_or("?"),
        )
    }

    fn schema(&self, label: Option<LabelColumn>) -> anyhow::Result<Type> {
        let string = |name: &str| {
            Type::primitive_type_builder(name, PhysicalType::BYTE_ARRAY)
                .with_repetition(Repetition::REQUIRED)
                .with_logical_type(Some(LogicalType::String))
                .build()
        };
        let mut fields = vec![
            Arc::new(string("id")?),
            Arc::new(string("key")?),
            Arc::new(
                Type::primitive_type_builder("event_time", PhysicalType::INT64)
                    .with_repetition(Repetition::REQUIRED)
                    .with_logical_type(Some(LogicalType::timestamp(true, TimeUnit::MILLIS)))
                    .build()?,
            ),
        ];
        for (name, buffer) in self.feature_names.iter().zip(&self.features) {
            let physical = match buffer {
                FeatureBuffer::Int(_) => PhysicalType::INT64,
                FeatureBuffer::Float(_) => PhysicalType::DOUBLE,
            };
            fields.push(Arc::new(
                Type::primitive_type_builder(name, physical)
                    .with_repetition(Repetition::OPTIONAL)
                    .build()?,
            ));
        }
        if let (Some(name), Some(kind)) = (&self.label_name, label) {
            let (physical, logical) = match kind {
                LabelColumn::Bool => (PhysicalType::BOOLEAN, None),
                LabelColumn::Int => (PhysicalType::INT64, None),
                LabelColumn::Float => (PhysicalType::DOUBLE, None),
                LabelColumn::Text => (PhysicalType::BYTE_ARRAY, Some(LogicalType::String)),
            };
            fields.push(Arc::new(
                Type::primitive_type_builder(name, physical)
                    .with_repetition(Repetition::OPTIONAL)
                    .with_logical_type(logical)
                    .build()?,
            ));
        }
        Ok(Type::group_type_builder("training_row")
            .with_fields(fields)
            .build()?)
    }

    fn write_row_group(&mut self) -> anyhow::Result<()> {
        if self.writer.is_none() {
            let label = self
                .label_name
                .as_ref()
                .map(|_| LabelColumn::infer(self.labels.iter()));
            self.label_kind = label;
            let schema = Arc::new(self.schema(label)?);
            let file = File::create(&self.partial)
                .with_context(|| format!("creating the export file {}", self.partial.display()))?;
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_created_by(format!("shardflow {}", env!("CARGO_PKG_VERSION")))
                .build();
            self.writer = Some(
                SerializedFileWriter::new(file, schema, Arc::new(props))
                    .with_context(|| format!("writing {}", self.partial.display()))?,
            );
        }
        if self.ids.is_empty() {
            return Ok(());
        }
        self.write_columns()
            .with_context(|| format!("writing {}", self.partial.display()))?;
        self.ids.clear();
        self.keys.clear();
        self.times.clear();
        self.labels.clear();
        for f in &mut self.features {
            match f {
                FeatureBuffer::Int(b) => b.clear(),
                FeatureBuffer::Float(b) => b.clear(),
            }
        }
        Ok(())
    }

    fn write_columns(&mut self) -> anyhow::Result<()> {
        let writer = self.writer.as_mut().expect("created above");
        let mut group = writer.next_row_group()?;
        let mut column = 0usize;
        while let Some(mut col) = group.next_column()? {
            let n_features = self.features.len();
            match (column, col.untyped()) {
                (0, ColumnWriter::ByteArrayColumnWriter(w)) => {
                    w.write_batch(&self.ids, None, None)?;
                }
                (1, ColumnWriter::ByteArrayColumnWriter(w)) => {
                    w.write_batch(&self.keys, None, None)?;
                }
                (2, ColumnWriter::Int64ColumnWriter(w)) => {
                    w.write_batch(&self.times, None, None)?;
                }
                (c, w) if c >= 3 && c < 3 + n_features => match (&self.features[c - 3], w) {
                    (FeatureBuffer::Int(b), ColumnWriter::Int64ColumnWriter(w)) => {
                        w.write_batch(&b.values, Some(&b.levels), None)?;
                    }
                    (FeatureBuffer::Float(b), ColumnWriter::DoubleColumnWriter(w)) => {
                        w.write_batch(&b.values, Some(&b.levels), None)?;
                    }
                    _ => anyhow::bail!("column {c}: feature buffer and schema disagree"),
                },
                (c, w) if c == 3 + n_features => write_labels(&self.labels, w)?,
                (c, _) => anyhow::bail!("column {c}: not in the schema this file was made with"),
            }
            col.close()?;
            column += 1;
        }
        group.close()?;
        Ok(())
    }

    /// Writes what is buffered, closes the file and gives it its name.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        if self.closed {
            anyhow::bail!(
                "{} was closed before the replay completed",
                self.partial.display()
            );
        }
        self.close()?;
        self.finished = true;
        std::fs::rename(&self.partial, &self.path).with_context(|| {
            format!(
                "renaming {} to {}",
                self.partial.display(),
                self.path.display()
            )
        })?;
        Ok(())
    }

    /// Writes what is buffered and closes `FILE.partial` (a readable
    /// Parquet file) without renaming it: the replay did not complete.
    pub fn close(&mut self) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        self.write_row_group()?;
        if let Some(writer) = self.writer.take() {
            let file = writer
                .into_inner()
                .with_context(|| format!("closing {}", self.partial.display()))?;
            file.sync_all()
                .with_context(|| format!("writing {}", self.partial.display()))?;
        }
        Ok(())
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    pub fn partial_path(&self) -> &Path {
        &self.partial
    }
}

fn write_labels(labels: &[serde_json::Value], w: &mut ColumnWriter<'_>) -> anyhow::Result<()> {
    let levels: Vec<i16> = labels.iter().map(|l| i16::from(!l.is_null())).collect();
    let present = || labels.iter().filter(|l| !l.is_null());
    match w {
        ColumnWriter::BoolColumnWriter(w) => {
            let v: Vec<bool> = present().filter_map(|l| l.as_bool()).collect();
            w.write_batch(&v, Some(&levels), None)?;
        }
        ColumnWriter::Int64ColumnWriter(w) => {
            let v: Vec<i64> = present().filter_map(|l| l.as_i64()).collect();
            w.write_batch(&v, Some(&levels), None)?;
        }
        ColumnWriter::DoubleColumnWriter(w) => {
            let v: Vec<f64> = present().filter_map(|l| l.as_f64()).collect();
            w.write_batch(&v, Some(&levels), None)?;
        }
        ColumnWriter::ByteArrayColumnWriter(w) => {
            let v: Vec<ByteArray> = present()
                .map(|l| match l {
                    serde_json::Value::String(s) => ByteArray::from(s.as_bytes().to_vec()),
                    other => ByteArray::from(other.to_string().into_bytes()),
                })
                .collect();
            w.write_batch(&v, Some(&levels), None)?;
        }
        _ => anyhow::bail!("the label column has an unexpected type"),
    }
    Ok(())
}

/// Every row of a Parquet file as a JSON object (timestamps as epoch ms),
/// for tests and tools comparing it with the NDJSON export.
pub fn read_rows(path: &Path) -> anyhow::Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    use parquet::file::reader::{FileReader as _, SerializedFileReader};
    use parquet::record::Field;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)?;
    let mut rows = Vec::new();
    for row in reader.get_row_iter(None)? {
        let row = row?;
        let mut out = serde_json::Map::new();
        for (name, field) in row.get_column_iter() {
            let value = match field {
                Field::Null => serde_json::Value::Null,
                Field::Bool(b) => (*b).into(),
                Field::Long(v) | Field::TimestampMillis(v) => (*v).into(),
                Field::Double(v) => (*v).into(),
                Field::Str(s) => s.clone().into(),
                other => anyhow::bail!("column {name}: unexpected {other:?}"),
            };
            out.insert(name.clone(), value);
        }
        rows.push(out);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::FeatureVector;
    use serde_json::json;

    fn record(i: i64, count: Option<i64>, sum: Option<f64>) -> FeatureRecord {
        let names: crate::record::FeatureNames = vec![Arc::from("n"), Arc::from("total")].into();
        FeatureRecord {
            id: format!("p/{i}"),
            key: format!("k{}", i % 3).into(),
            event_time: 1_700_000_000_000 + i,
            features: FeatureVector {
                names,
                values: vec![count.map(Value::Int), sum.map(Value::Float)],
            },
            arrival: 0,
        }
    }

    fn columns() -> Vec<(String, Column)> {
        vec![("n".into(), Column::Int), ("total".into(), Column::Float)]
    }

    #[test]
    fn request_fields_are_columns_of_their_field_type() {
        let text = "[source]\ntype = \"generator\"\n[schema]\nkey = \"k\"\ntimestamp = \"t\"\n\
                    fields = { amount = \"f64\", qty = \"i64\" }\nrequest_fields = [\"qty\", \"amount\"]\n\
                    [[features]]\nname = \"c\"\nagg = \"count\"\nwindow = { type = \"tumbling\", size = 10 }\n\
                    [[features]]\nname = \"s\"\nagg = \"sum\"\nfield = \"amount\"\nwindow = { type = \"tumbling\", size = 10 }\n\
                    [[sinks]]\ntype = \"stdout\"\nkinds = [\"features\"]\n";
        let config =
            crate::config::Config::from_str_at(text, std::path::Path::new("t.toml"), |_| None)
                .unwrap();
        let columns = Column::of_vector(&config);
        let want = [
            ("c", Column::Int),
            ("s", Column::Float),
            ("qty", Column::Int),
            ("amount", Column::Float),
        ];
        let got: Vec<(&str, Column)> = columns.iter().map(|(n, c)| (n.as_str(), *c)).collect();
        assert_eq!(got, want);
    }

    /// A writer of `columns()` to `t.parquet` in a fresh directory.
    fn writer(label: Option<&str>) -> (tempfile::TempDir, PathBuf, ParquetRows) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let w = ParquetRows::create(&path, &columns(), label.map(str::to_owned)).unwrap();
        (dir, path, w)
    }

    #[test]
    fn rows_round_trip_with_typed_columns_and_nulls() {
        let (_dir, path, mut w) = writer(Some("y"));
        w.row_group_rows = 3;
        let labels = [
            json!(null),
            json!(1),
            json!(0),
            json!(1),
            json!(null),
            json!(0),
            json!(1),
        ];
        for (i, label) in labels.iter().enumerate() {
            let i = i as i64;
            let sum = match i {
                2 => None,
                4 => Some(f64::NAN),
                _ => Some(i as f64 * 1.5),
            };
            w.push(&record(i, Some(i + 1), sum), Some(label.clone()))
                .unwrap();
        }
        // Not renamed until finished.
        assert!(!path.exists());
        w.finish().unwrap();
        assert!(path.exists() && !w.partial_path().exists());
        w.close().unwrap();

        let rows = read_rows(&path).unwrap();
        assert_eq!(rows.len(), 7);
        assert_eq!(
            serde_json::Value::Object(rows[1].clone()),
            json!({"id": "p/1", "key": "k1", "event_time": 1_700_000_000_001i64, "n": 2, "total": 1.5, "y": 1})
        );
        assert_eq!(rows[0]["y"], json!(null));
        assert_eq!(rows[2]["total"], json!(null));
        assert_eq!(rows[4]["total"], json!(null), "NaN is null, as in NDJSON");
        assert_eq!(rows[6]["n"], json!(7));

        use parquet::file::reader::{FileReader as _, SerializedFileReader};
        let reader = SerializedFileReader::new(File::open(&path).unwrap()).unwrap();
        let meta = reader.metadata();
        assert_eq!(meta.num_row_groups(), 3);
        let schema = meta.file_metadata().schema_descr();
        let types: Vec<_> = (0..schema.num_columns())
            .map(|i| schema.column(i).physical_type())
            .collect();
        use PhysicalType as P;
        assert_eq!(
            types,
            [
                P::BYTE_ARRAY,
                P::BYTE_ARRAY,
                P::INT64,
                P::INT64,
                P::DOUBLE,
                P::INT64
            ]
        );
        assert_eq!(
            schema.column(2).logical_type_ref(),
            Some(&LogicalType::timestamp(true, TimeUnit::MILLIS))
        );
    }

    #[test]
    fn a_label_the_column_cannot_hold_fails_and_leaves_a_readable_partial_file() {
        let (_dir, path, mut w) = writer(Some("fraud"));
        w.row_group_rows = 2;
        for (i, label) in [json!(true), json!(false), json!(null)]
            .into_iter()
            .enumerate()
        {
            w.push(&record(i as i64, Some(1), Some(1.0)), Some(label))
                .unwrap();
        }
        let e = w
            .push(&record(3, Some(1), Some(1.0)), Some(json!("yes")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p/3") && e.contains("BOOLEAN") && e.contains("p/0"),
            "{e}"
        );
        w.close().unwrap();
        assert!(!path.exists());
        let rows = read_rows(w.partial_path()).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1]["fraud"], json!(false));
        assert!(w.finish().is_err());
    }

    #[test]
    fn an_empty_export_is_a_valid_file() {
        let (_dir, path, mut w) = writer(None);
        w.finish().unwrap();
        assert!(read_rows(&path).unwrap().is_empty());
    }

    #[test]
    fn label_type_is_the_narrowest_holding_every_label() {
        let infer = |v: serde_json::Value| LabelColumn::infer(v.as_array().unwrap().iter());
        assert_eq!(infer(json!([true, null, false])), LabelColumn::Bool);
        assert_eq!(infer(json!([0, 1, null])), LabelColumn::Int);
        assert_eq!(infer(json!([0, 1.5])), LabelColumn::Float);
        assert_eq!(infer(json!(["a", 1])), LabelColumn::Text);
        assert_eq!(infer(json!([true, 1])), LabelColumn::Text);
        assert_eq!(infer(json!([null, null])), LabelColumn::Text);
        assert_eq!(infer(json!([{"a": 1}])), LabelColumn::Text);
    }
}
