//! `type = "onnx"` embedded models: an ONNX file scored in process by
//! tract, a pure-Rust runtime (no network, no C++ library).
//!
//! ```toml
//! name = "fraud-gbm"
//! version = "7"
//! type = "onnx"
//! path = "fraud_gbm.onnx"   # relative to this file
//! inputs = ["txn_count_1m", "amount_sum_1m", "amount_max_5m", "merchants_5m"]
//! missing = "nan"           # optional: features without an [impute] value go in as NaN
//! [outputs]
//! score = "probabilities"   # the tensor holding the score
//! score_column = 1          # optional: its column (default: 1 of 2, 0 of 1)
//! label = "label"           # optional: the label tensor; else label = score >= threshold
//! threshold = 0.5           # optional (default 0.5), not with `label`
//! [impute]
//! amount_sum_1m = 0.0
//! ```
//!
//! The model takes one float32 tensor `[rows, features]`, its columns the
//! `inputs` in order: configured features, or `[schema] request_fields`
//! (the event's own values, e.g. the transaction's `amount`). It is loaded, checked and optimised once, for any row
//! count (a symbolic batch dimension; a model with a fixed batch size gets
//! batches cut and padded to it), and only the part of the graph that the
//! configured outputs need is kept: an operator that tract lacks is refused
//! by name when the outputs need it, and ignored otherwise (a ZipMap after
//! `probabilities`). Binary tree classifiers as exporters write them are
//! rewritten into the layout tract scores as onnxruntime does (see
//! `two_column_binary_trees`).
//!
//! Missing values: a null feature takes its `[impute]` value; without one
//! it goes in as NaN when `missing = "nan"` (for models that route missing
//! values themselves: XGBoost, LightGBM and scikit-learn's
//! HistGradientBoosting, whose exported trees carry the direction of NaN),
//! and otherwise the row is not scored and its prediction is
//! `{"score": null, "missing": "<feature>"}`. A score that comes out NaN or
//! infinite is null too, never a number.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use serde_json::{json, Value as Json};
use tract_onnx::pb;
use tract_onnx::prelude::tract_data::internal::DimLike as _;
use tract_onnx::prelude::*;

use crate::record::FeatureVector;

/// The model file of an ONNX model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxSpec {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    /// Always `"onnx"` here (the file's type selects this spec).
    #[serde(rename = "type")]
    pub kind: String,
    /// The .onnx file, relative to the model file.
    pub path: PathBuf,
    /// The configured features that make the input tensor's columns, in order.
    pub inputs: Vec<String>,
    #[serde(default)]
    pub missing: Missing,
    #[serde(default)]
    pub impute: BTreeMap<String, f64>,
    pub outputs: OutputsSpec,
}

/// What a missing feature without an `[impute]` value does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// The row is not scored: its prediction is null and names the feature.
    #[default]
    Null,
    /// The value goes in as NaN, for models that handle missing values.
    Nan,
}

/// Which tensors answer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputsSpec {
    /// The tensor with the score (for a classifier, the class probabilities).
    pub score: String,
    /// The score's column in a `[rows, columns]` tensor.
    #[serde(default)]
    pub score_column: Option<usize>,
    /// The tensor with the label, `[rows]` or `[rows, 1]`.
    #[serde(default)]
    pub label: Option<String>,
    /// Without `label`: label = 1 when score >= threshold (default 0.5).
    #[serde(default)]
    pub threshold: Option<f64>,
}

/// One column of the input tensor.
struct Column {
    /// Its slot in the feature vector.
    slot: usize,
    name: Arc<str>,
    impute: Option<f32>,
}

enum Label {
    /// The plan's second output.
    Tensor,
    Threshold(f64),
}

/// A loaded, optimised ONNX model.
pub struct OnnxModel {
    plan: Arc<TypedSimplePlan>,
    columns: Vec<Column>,
    missing: Missing,
    /// `Some(n)` when the model takes exactly n rows at a time.
    fixed_rows: Option<usize>,
    /// The score's column, when the score tensor has two dimensions.
    score_column: Option<usize>,
    label: Label,
    describe: String,
}

/// A batch turned into the input tensor: the rows that can be scored, and
/// the answers of those that cannot.
pub struct Prepared {
    /// Row-major `[fed.len(), columns]`.
    data: Vec<f32>,
    /// The rows of the batch that are in `data`, in order.
    fed: Vec<usize>,
    /// One answer per row of the batch; `None` for the fed rows until scored.
    answers: Vec<Option<Json>>,
}

impl OnnxModel {
    /// Loads `spec` (its `path` relative to `dir`) and checks it against
    /// the configured feature names, in vector order.
    pub fn load(spec: &OnnxSpec, dir: &Path, features: &[&str]) -> anyhow::Result<Self> {
        let columns = columns(spec, features)?;
        let label = match (&spec.outputs.label, spec.outputs.threshold) {
            (Some(_), Some(_)) => {
                bail!(
                    "[outputs] has both `label` and `threshold`: the label comes from one of them"
                )
            }
            (Some(_), None) => Label::Tensor,
            (None, t) => {
                let t = t.unwrap_or(0.5);
                if !t.is_finite() {
                    bail!("[outputs] threshold must be a finite number");
                }
                Label::Threshold(t)
            }
        };
        let file = dir.join(&spec.path);
        let bytes = std::fs::read(&file)
            .with_context(|| format!("cannot read ONNX file {}", file.display()))?;
        let proto = tract_onnx::onnx()
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a valid ONNX model (truncated or not ONNX?): {e:#}",
                    file.display()
                )
            })?;
        let graph = proto
            .graph
            .as_ref()
            .with_context(|| format!("{} has no graph", file.display()))?;
        let fixed_rows = check_input(graph, &columns)?;
        refuse_unsafe_tree_modes(graph, &file)?;
        let mut proto = proto;
        two_column_binary_trees(&mut proto);
        let parsed = tract_onnx::onnx()
            .parse(&proto, file.parent().and_then(Path::to_str))
            .map_err(|e| anyhow::anyhow!("cannot read the graph of {}: {e:#}", file.display()))?;
        if !parsed.unresolved_inputs.is_empty() {
            bail!(
                "{}: the graph reads tensors nothing produces: {}",
                file.display(),
                parsed.unresolved_inputs.join(", ")
            );
        }
        let mut model = parsed.model;
        let rows = match fixed_rows {
            Some(n) => n.to_dim(),
            None => TDim::from(model.sym("rows")),
        };
        model.set_input_fact(
            0,
            InferenceFact::dt_shape(f32::datum_type(), tvec![rows, columns.len().to_dim()]),
        )?;

        let mut wanted = vec![find_tensor(&model, &spec.outputs.score)?];
        if let Some(label) = &spec.outputs.label {
            wanted.push(find_tensor(&model, label)?);
        }
        model.select_output_outlets(&wanted)?;
        // Drops what the outputs do not need, so that an operator only a
        // discarded output uses (ZipMap, a label lookup) does not matter.
        let model = model.into_compact()?;
        refuse_unimplemented(&model, &file)?;
        let operators = operators(&model);

        let typed = model
            .into_optimized()
            .map_err(|e| anyhow::anyhow!("cannot prepare {} to run: {e:#}", file.display()))?;
        let score_column = check_score(&typed, &spec.outputs)?;
        if matches!(label, Label::Tensor) {
            check_label(&typed, spec.outputs.label.as_deref().unwrap_or_default())?;
        }
        let plan = typed
            .into_runnable()
            .map_err(|e| anyhow::anyhow!("cannot plan {}: {e:#}", file.display()))?;

        let describe = format!(
            "{} ({} input columns{}, score {}{}, label {}; operators {})",
            spec.path.display(),
            columns.len(),
            fixed_rows
                .map(|n| format!(", batches of exactly {n} rows"))
                .unwrap_or_default(),
            spec.outputs.score,
            score_column
                .map(|c| format!("[:, {c}]"))
                .unwrap_or_default(),
            match &label {
                Label::Tensor =>
                    format!("from {}", spec.outputs.label.as_deref().unwrap_or_default()),
                Label::Threshold(t) => format!("score >= {t}"),
            },
            operators.join(", ")
        );
        Ok(OnnxModel {
            plan,
            columns,
            missing: spec.missing,
            fixed_rows,
            score_column,
            label,
            describe,
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Builds the input tensor of a batch: cheap, done by the caller so
    /// that only [`Self::run`] needs to leave the async runtime.
    pub fn prepare(&self, rows: &[&FeatureVector]) -> Prepared {
        let mut data = Vec::with_capacity(rows.len() * self.columns.len());
        let mut fed = Vec::with_capacity(rows.len());
        let mut answers = Vec::with_capacity(rows.len());
        'rows: for (i, row) in rows.iter().enumerate() {
            let start = data.len();
            for c in &self.columns {
                let value = row
                    .values
                    .get(c.slot)
                    .copied()
                    .flatten()
                    .map(|v| v.as_f64())
                    .filter(|x| x.is_finite());
                let x = match (value, c.impute, self.missing) {
                    (Some(v), _, _) => v as f32,
                    (None, Some(i), _) => i,
                    (None, None, Missing::Nan) => f32::NAN,
                    (None, None, Missing::Null) => {
                        data.truncate(start);
                        answers.push(Some(json!({ "score": null, "missing": &*c.name })));
                        continue 'rows;
                    }
                };
                data.push(x);
            }
            fed.push(i);
            answers.push(None);
        }
        Prepared { data, fed, answers }
    }

    /// Scores a prepared batch: one prediction object per row of the batch.
    /// Blocking (it computes): run it off the async runtime.
    pub fn run(&self, mut prepared: Prepared) -> anyhow::Result<Vec<Json>> {
        let width = self.columns.len();
        let chunk = self.fixed_rows.unwrap_or(prepared.fed.len().max(1));
        let mut fed = prepared.fed.iter();
        for rows in prepared.data.chunks(chunk * width) {
            let n = rows.len() / width;
            let input = match self.fixed_rows {
                // A fixed batch size: the last chunk is padded with zeros,
                // and the padding's answers are dropped.
                Some(fixed) if n < fixed => {
                    let mut padded = rows.to_vec();
                    padded.resize(fixed * width, 0.0);
                    Tensor::from_shape(&[fixed, width], &padded)?
                }
                _ => Tensor::from_shape(&[n, width], rows)?,
            };
            let outputs = self
                .plan
                .run(tvec!(input.into_tvalue()))
                .context("the ONNX model failed")?;
            let scores = self.scores(&outputs[0], n)?;
            let labels = match self.label {
                Label::Tensor => Some(labels(&outputs[1], n)?),
                Label::Threshold(_) => None,
            };
            for (k, score) in scores.into_iter().enumerate() {
                let row = *fed.next().context("more answers than rows")?;
                let answer = match (score, &labels, &self.label) {
                    (None, _, _) => json!({ "score": null }),
                    (Some(p), Some(labels), _) => json!({ "score": p, "label": labels[k] }),
                    (Some(p), None, Label::Threshold(t)) => {
                        json!({ "score": p, "label": u8::from(p >= *t) })
                    }
                    (Some(p), None, Label::Tensor) => json!({ "score": p }),
                };
                prepared.answers[row] = Some(answer);
            }
        }
        prepared
            .answers
            .into_iter()
            .map(|a| a.context("a row got no answer from the model"))
            .collect()
    }

    /// The first `n` scores of the score tensor, `None` where not finite.
    fn scores(&self, t: &Tensor, n: usize) -> anyhow::Result<Vec<Option<f64>>> {
        let t = t.cast_to::<f64>()?;
        let view = t.to_plain_array_view::<f64>()?;
        let shape = view.shape();
        if shape.first().copied().unwrap_or(0) < n {
            bail!(
                "the ONNX model answered {} rows for {n}",
                shape.first().copied().unwrap_or(0)
            );
        }
        let column = self.score_column.unwrap_or(0);
        Ok((0..n)
            .map(|i| {
                let x = if shape.len() == 1 {
                    view[[i].as_slice()]
                } else {
                    view[[i, column].as_slice()]
                };
                Some(x).filter(|x| x.is_finite())
            })
            .collect())
    }
}

/// The label tensor's first `n` values as JSON (numbers or strings).
fn labels(t: &Tensor, n: usize) -> anyhow::Result<Vec<Json>> {
    if t.len() < n {
        bail!("the ONNX model answered {} labels for {n} rows", t.len());
    }
    if t.datum_type() == String::datum_type() {
        let view = t.to_plain_array_view::<String>()?;
        return Ok(view.iter().take(n).map(|s| json!(s)).collect());
    }
    if t.datum_type().is_float() {
        let t = t.cast_to::<f64>()?;
        let view = t.to_plain_array_view::<f64>()?;
        return Ok(view.iter().take(n).map(|x| json!(x)).collect());
    }
    let t = t.cast_to::<i64>()?;
    let view = t.to_plain_array_view::<i64>()?;
    Ok(view.iter().take(n).map(|x| json!(x)).collect())
}

/// The input columns: each `inputs` entry checked against the configured
/// features and `[impute]`.
fn columns(spec: &OnnxSpec, features: &[&str]) -> anyhow::Result<Vec<Column>> {
    if spec.inputs.is_empty() {
        bail!("`inputs` is empty: list the configured features the model takes, in order");
    }
    let mut seen = BTreeSet::new();
    for name in &spec.inputs {
        if !seen.insert(name.as_str()) {
            bail!("`inputs` lists {name:?} twice");
        }
    }
    for (name, value) in &spec.impute {
        if !seen.contains(name.as_str()) {
            bail!("[impute] has {name:?}, which is not one of the model's `inputs`");
        }
        if !value.is_finite() {
            bail!(
                "[impute] {name:?} is not a finite number (for NaN, leave it out and set missing = \"nan\")"
            );
        }
    }
    spec.inputs
        .iter()
        .map(|name| {
            let slot = features.iter().position(|f| f == name).with_context(|| {
                format!(
                    "the model uses feature {name:?}, which is not one of the configured [[features]] or [schema] request_fields ({})",
                    features.join(", ")
                )
            })?;
            Ok(Column {
                slot,
                name: Arc::from(name.as_str()),
                impute: spec.impute.get(name).map(|x| *x as f32),
            })
        })
        .collect()
}

/// Checks the graph's input against `columns`: one float32 tensor
/// `[rows, columns]`. Returns the row count when the model fixes it.
fn check_input(graph: &pb::GraphProto, columns: &[Column]) -> anyhow::Result<Option<usize>> {
    let initialized: BTreeSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initialized.contains(i.name.as_str()))
        .collect();
    let [input] = inputs.as_slice() else {
        bail!(
            "the model has {} inputs ({}); shardflow feeds one float tensor [rows, features]",
            inputs.len(),
            inputs
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let name = &input.name;
    let Some(pb::type_proto::Value::TensorType(tensor)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        bail!("the model's input `{name}` is not a tensor");
    };
    let elem = pb::tensor_proto::DataType::try_from(tensor.elem_type)
        .map(|t| t.as_str_name())
        .unwrap_or("an unknown type");
    if tensor.elem_type != pb::tensor_proto::DataType::Float as i32 {
        bail!(
            "the model's input `{name}` is {elem}; shardflow feeds float32 (export it with a float input, e.g. FloatTensorType)"
        );
    }
    let Some(shape) = &tensor.shape else {
        return Ok(None);
    };
    use pb::tensor_shape_proto::dimension::Value as Dim;
    let dims: Vec<Option<i64>> = shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Dim::DimValue(v)) => Some(v),
            _ => None,
        })
        .collect();
    let shown = dims
        .iter()
        .map(|d| d.map(|v| v.to_string()).unwrap_or_else(|| "?".into()))
        .collect::<Vec<_>>()
        .join(", ");
    let names = columns
        .iter()
        .map(|c| &*c.name)
        .collect::<Vec<_>>()
        .join(", ");
    if dims.len() != 2 {
        bail!(
            "the model's input `{name}` has shape [{shown}]; shardflow feeds [rows, features] ({} features: {names})",
            columns.len()
        );
    }
    if let Some(width) = dims[1] {
        if width != columns.len() as i64 {
            bail!(
                "the model's input `{name}` takes {width} values per row (shape [{shown}]), but `inputs` lists {} features ({names})",
                columns.len()
            );
        }
    }
    Ok(match dims[0] {
        Some(n) if n > 0 => Some(n as usize),
        _ => None,
    })
}

/// Rewrites binary tree classifiers into the two-class layout, where tract
/// and onnxruntime agree.
///
/// Exporters (skl2onnx, onnxmltools for XGBoost and LightGBM) write a
/// binary TreeEnsembleClassifier with every leaf scoring class 0: the
/// positive class's margin m, plus one base value b, LOGISTIC after.
/// onnxruntime answers probabilities [1 - σ(m + b), σ(m + b)] and the label
/// of the larger. tract refuses one base value for two class labels, and
/// padded with a 0 it gets the probabilities right but takes the label
/// from the columns before its complement step, which inverts it. With
/// each leaf scoring both classes, -w for class 0 and w for class 1, and
/// base values [-b, b], the same trees give [σ(-(m + b)), σ(m + b)]: the
/// same probabilities, and a label that is their argmax, as onnxruntime's.
/// Other post-transforms are left as they are.
fn two_column_binary_trees(proto: &mut pb::ModelProto) {
    let Some(graph) = proto.graph.as_mut() else {
        return;
    };
    for node in graph
        .node
        .iter_mut()
        .filter(|n| n.op_type == "TreeEnsembleClassifier")
    {
        let classes = attribute(&node.attribute, "classlabels_int64s")
            .map(|i| node.attribute[i].ints.len())
            .or_else(|| {
                attribute(&node.attribute, "classlabels_strings")
                    .map(|i| node.attribute[i].strings.len())
            });
        let logistic = attribute(&node.attribute, "post_transform")
            .is_some_and(|i| node.attribute[i].s == b"LOGISTIC");
        let (Some(ids), Some(nodes), Some(trees), Some(weights)) = (
            attribute(&node.attribute, "class_ids"),
            attribute(&node.attribute, "class_nodeids"),
            attribute(&node.attribute, "class_treeids"),
            attribute(&node.attribute, "class_weights"),
        ) else {
            continue;
        };
        let binary_layout = node.attribute[ids].ints.iter().all(|c| *c == 0);
        let leaves = node.attribute[ids].ints.len();
        let consistent = [nodes, trees]
            .iter()
            .all(|i| node.attribute[*i].ints.len() == leaves)
            && node.attribute[weights].floats.len() == leaves;
        let base =
            attribute(&node.attribute, "base_values").map(|i| node.attribute[i].floats.clone());
        let b = match base.as_deref() {
            None | Some([]) => 0.0,
            Some([b]) => *b,
            Some(_) => continue,
        };
        if classes != Some(2) || !logistic || !binary_layout || !consistent {
            continue;
        }
        let twice = |v: &[i64]| v.iter().flat_map(|x| [*x, *x]).collect::<Vec<_>>();
        node.attribute[ids].ints = (0..leaves).flat_map(|_| [0, 1]).collect();
        node.attribute[nodes].ints = twice(&node.attribute[nodes].ints);
        node.attribute[trees].ints = twice(&node.attribute[trees].ints);
        node.attribute[weights].floats = node.attribute[weights]
            .floats
            .iter()
            .flat_map(|w| [-w, *w])
            .collect();
        match attribute(&node.attribute, "base_values") {
            Some(i) => node.attribute[i].floats = vec![-b, b],
            None => node.attribute.push(pb::AttributeProto {
                name: "base_values".into(),
                r#type: pb::attribute_proto::AttributeType::Floats as i32,
                floats: vec![-b, b],
                ..Default::default()
            }),
        }
    }
}

/// The index of the attribute `name` of a node.
fn attribute(attributes: &[pb::AttributeProto], name: &str) -> Option<usize> {
    attributes.iter().position(|a| a.name == name)
}

/// The outlet of the tensor named `name`: a graph output or any tensor
/// inside (e.g. `probabilities` before a ZipMap).
fn find_tensor(model: &InferenceModel, name: &str) -> anyhow::Result<OutletId> {
    model.find_outlet_label(name).with_context(|| {
        let outputs: Vec<&str> = model
            .output_outlets()
            .map(|o| o.iter().filter_map(|o| model.outlet_label(*o)).collect())
            .unwrap_or_default();
        format!(
            "[outputs] names tensor {name:?}, which the model does not have (its outputs: {})",
            outputs.join(", ")
        )
    })
}

/// Refuses tree ensembles whose nodes tract would misread. tract 0.23's
/// tree operator takes the node modes LEQ, LT, GT, EQ and NEQ (and leaves)
/// but not `BRANCH_GTE`: such a node is not an error there but becomes
/// garbage at evaluation, a silent wrong score. No common exporter writes
/// it (skl2onnx, onnxmltools' XGBoost and LightGBM write LEQ or LT), so the
/// model is refused, naming the node, rather than rewritten.
fn refuse_unsafe_tree_modes(graph: &pb::GraphProto, file: &Path) -> anyhow::Result<()> {
    for node in graph
        .node
        .iter()
        .filter(|n| n.op_type.starts_with("TreeEnsemble"))
    {
        let Some(i) = attribute(&node.attribute, "nodes_modes") else {
            continue;
        };
        let gte = node.attribute[i]
            .strings
            .iter()
            .filter(|m| m.as_slice() == b"BRANCH_GTE")
            .count();
        if gte > 0 {
            bail!(
                "{}: {} node {:?} has {gte} BRANCH_GTE split(s), which shardflow's ONNX runtime \
                 (tract) would evaluate wrongly; re-export the model with BRANCH_LEQ or BRANCH_LT \
                 splits (the default of skl2onnx, XGBoost and LightGBM exports)",
                file.display(),
                node.op_type,
                node.name
            );
        }
    }
    Ok(())
}

/// Refuses a graph that still holds operators tract does not implement,
/// naming them.
fn refuse_unimplemented(model: &InferenceModel, file: &Path) -> anyhow::Result<()> {
    let mut missing: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for node in model.nodes() {
        let op = node.op.name();
        if let Some(name) = op
            .strip_prefix("Unimplemented(")
            .and_then(|s| s.strip_suffix(')'))
        {
            missing
                .entry(name.to_string())
                .or_default()
                .push(&node.name);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "{} uses operators that shardflow's ONNX runtime (tract) does not implement: {}",
        file.display(),
        missing
            .iter()
            .map(|(op, nodes)| format!("{op} (node {})", nodes.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    )
}

/// The distinct operators of the graph, for `describe`.
fn operators(model: &InferenceModel) -> Vec<String> {
    let mut ops = BTreeSet::new();
    for node in model.nodes() {
        let name = node.op.name();
        if name != "Source" && name != "Const" {
            ops.insert(name.to_string());
        }
    }
    ops.into_iter().collect()
}

/// Checks the score tensor: floats, `[rows]` or `[rows, columns]`. Returns
/// the column the score is read from.
fn check_score(model: &TypedModel, outputs: &OutputsSpec) -> anyhow::Result<Option<usize>> {
    let fact = model.output_fact(0)?;
    let name = &outputs.score;
    if !fact.datum_type.is_float() {
        bail!(
            "[outputs] score tensor {name:?} holds {:?}, not floats: name the probabilities tensor",
            fact.datum_type
        );
    }
    match fact.rank() {
        1 => match outputs.score_column {
            None | Some(0) => Ok(None),
            Some(c) => bail!("[outputs] score tensor {name:?} has one value per row: score_column {c} does not exist"),
        },
        2 => {
            let width = fact.shape[1].to_usize().ok();
            let column = match (outputs.score_column, width) {
                (Some(c), _) => c,
                (None, Some(1)) => 0,
                (None, Some(2)) => 1,
                (None, w) => bail!(
                    "[outputs] score tensor {name:?} has {} columns: set score_column to the positive class's",
                    w.map(|w| w.to_string()).unwrap_or_else(|| "a variable number of".into())
                ),
            };
            if let Some(w) = width.filter(|w| column >= *w) {
                bail!("[outputs] score_column {column} is out of range: {name:?} has {w} columns");
            }
            Ok(Some(column))
        }
        r => bail!("[outputs] score tensor {name:?} has {r} dimensions; expected [rows] or [rows, classes]"),
    }
}

/// Checks the label tensor: one value per row.
fn check_label(model: &TypedModel, name: &str) -> anyhow::Result<()> {
    let fact = model.output_fact(1)?;
    let per_row = match fact.rank() {
        1 => true,
        2 => fact.shape[1].to_usize().ok() == Some(1),
        _ => false,
    };
    if !per_row {
        bail!(
            "[outputs] label tensor {name:?} has shape {:?}; expected one value per row",
            fact.shape
        );
    }
    Ok(())
}

/// Runs `f`, which blocks, from async code that cannot hand it to the
/// blocking pool: on a multi-threaded runtime the worker thread's other
/// tasks move elsewhere first; elsewhere it just runs.
pub fn block_in_place<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
