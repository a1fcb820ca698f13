"""Writes the ONNX fixtures of tests/inference_onnx.rs into tests/fixtures/onnx/.

Run through scripts/make_onnx_fixtures.sh (it makes the venv). For each model:

- `<name>.onnx`: the model as its exporter writes it (skl2onnx, onnxmltools),
  or built with the `onnx` helper for the models that must be refused;
- `<name>.toml`: shardflow's embedded model file for it (`type = "onnx"`);
- `<name>.json`: reference rows and onnxruntime's answers for them: `rows`
  (feature values in `inputs` order, `null` for missing), `scores` (the
  positive class's probability) and `labels` (the model's label tensor), the
  missing values replaced as the TOML says (its `[impute]` value, or NaN
  where `missing = "nan"`).

The features are those of config/local.toml (and of the tests' config), so
the models score real feature vectors. Everything is seeded: rerunning gives
the same training data; the exporters' bytes may still change with their
versions (the .sh pins them).
"""

import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "onnx")
FEATURES = ["txn_count_1m", "amount_sum_1m", "amount_max_5m", "merchants_5m"]
# The ai.onnx.ml opset that tract reads: version 3 keeps TreeEnsembleClassifier
# (version 5 replaces it with TreeEnsemble, which no Rust runtime reads yet).
TARGET_OPSET = {"": 15, "ai.onnx.ml": 3}
RNG = np.random.default_rng(23)


def training_data(n=4000, missing=0.0):
    count = RNG.integers(0, 20, n).astype(np.float32)
    amount_sum = (count * RNG.gamma(2.0, 40.0, n)).astype(np.float32)
    amount_max = (RNG.normal(0.0, 150.0, n)).astype(np.float32)
    merchants = np.minimum(count, RNG.integers(0, 6, n)).astype(np.float32)
    z = -4.0 + 0.3 * count + 0.003 * amount_sum + 0.004 * amount_max + 0.3 * merchants
    y = (RNG.random(n) < 1.0 / (1.0 + np.exp(-z))).astype(np.int64)
    x = np.stack([count, amount_sum, amount_max, merchants], axis=1)
    if missing > 0:
        # Missing values that mean something (a quiet window), so that the
        # trees learn where missing goes.
        holes = RNG.random(x.shape) < missing
        holes[:, 0] = False
        x[holes] = np.nan
    return x, y


def reference_rows():
    """40 rows: 30 whole, 10 with one or more missing values."""
    rows = []
    for i in range(30):
        c = float(i % 17)
        rows.append([c, round(c * 37.5 + i * 1.37, 3), round(float(np.sin(i * 0.731) * 300.0), 3), float(i % 5)])
    rows[0] = [0.0, 0.0, 0.0, 0.0]
    rows[1] = [19.0, 2999.5, 299.75, 5.0]
    rows[2] = [3.0, 120.25, -280.5, 1.0]
    holes = [
        [1], [2], [3], [1, 2], [2, 3], [1, 2, 3], [1, 3], [3], [2], [1],
    ]
    for j, cols in enumerate(holes):
        base = list(rows[(j * 7 + 4) % 30])
        for c in cols:
            base[c] = None
        rows.append(base)
    return rows


def matrix(rows, impute, nan_missing):
    x = np.zeros((len(rows), len(FEATURES)), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v is not None:
                x[i, j] = v
            elif FEATURES[j] in impute:
                x[i, j] = impute[FEATURES[j]]
            elif nan_missing:
                x[i, j] = np.nan
            else:
                raise ValueError(f"row {i}: {FEATURES[j]} is missing and has no impute value")
    return x


def toml_value(v):
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return repr(v)


def write(name, model, description, score, label=None, column=None, impute=None, nan_missing=False, rows=None,
          reference=None, batch=None):
    """Saves the model, its TOML and onnxruntime's answers for `rows`.

    `reference`: the (probabilities, label) graph outputs to ask
    onnxruntime for, where `score` and `label` are inner tensors. `batch`:
    the model takes exactly that many rows (the last run is padded).
    """
    impute = impute or {}
    path = os.path.join(OUT, name + ".onnx")
    onnx.save_model(model, path)
    lines = [
        f"# {description}",
        "# Written by scripts/make_onnx_fixtures.py.",
        f'name = "{name}"',
        'version = "1"',
        'type = "onnx"',
        f'path = "{name}.onnx"',
        f"inputs = {toml_value(FEATURES)}",
    ]
    if nan_missing:
        lines.append('missing = "nan"')
    lines.append("")
    lines.append("[outputs]")
    lines.append(f'score = "{score}"')
    if column is not None:
        lines.append(f"score_column = {column}")
    if label is not None:
        lines.append(f'label = "{label}"')
    if impute:
        lines.append("")
        lines.append("[impute]")
        for k, v in impute.items():
            lines.append(f"{k} = {toml_value(float(v))}")
    with open(os.path.join(OUT, name + ".toml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if rows is None:
        return
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = matrix(rows, impute, nan_missing)
    input_name = session.get_inputs()[0].name
    if batch:
        padded = np.zeros((-(-len(x) // batch) * batch, x.shape[1]), dtype=np.float32)
        padded[: len(x)] = x
        runs = [session.run([score], {input_name: padded[i : i + batch]})[0] for i in range(0, len(padded), batch)]
        answers = [np.concatenate(runs)[: len(x)]]
    elif reference:
        maps, labels = session.run(list(reference), {input_name: x})
        answers = [np.array([[m[0], m[1]] for m in maps]), labels]
    else:
        outputs = [o.name for o in session.get_outputs()]
        # The label is onnxruntime's even where shardflow takes a threshold.
        wanted = [score] + ([label] if label else ["label"] if "label" in outputs else [])
        answers = session.run(wanted, {input_name: x})
    probabilities = np.asarray(answers[0], dtype=np.float64)
    if probabilities.ndim == 2:
        scores = probabilities[:, 1 if column is None and probabilities.shape[1] == 2 else (column or 0)]
    else:
        scores = probabilities
    result = {
        "model": name,
        "description": description,
        "onnxruntime": ort.__version__,
        "inputs": FEATURES,
        "rows": rows,
        "scores": [float(s) for s in scores],
    }
    if len(answers) > 1:
        result["labels"] = [int(v) for v in np.asarray(answers[1]).reshape(-1)]
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"{name}: {os.path.getsize(path)} bytes, ops {sorted({n.op_type for n in model.graph.node})}")


def sklearn_models(rows):
    from skl2onnx import to_onnx
    from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    x, y = training_data()
    impute = {"amount_sum_1m": 0.0, "amount_max_5m": 0.0, "merchants_5m": 0.0}
    # No ZipMap: shardflow reads tensors (and tract has no ZipMap); the
    # probabilities come out as a [N, 2] float tensor.
    options = {"zipmap": False}

    lr = LogisticRegression(max_iter=1000).fit(x, y)
    m = to_onnx(lr, x[:1], target_opset=TARGET_OPSET, options=options)
    write("logreg", m, "sklearn LogisticRegression, skl2onnx (LinearClassifier, Normalizer)",
          "probabilities", label="label", impute=impute, rows=rows)

    # The exporter's default: a ZipMap turns the probabilities into a list
    # of {class: p} maps. shardflow names the tensor before it, and the
    # ZipMap (which tract lacks) is pruned away.
    m = to_onnx(lr, x[:1], target_opset=TARGET_OPSET)
    write("logreg_zipmap", m, "sklearn LogisticRegression, skl2onnx with its default ZipMap output",
          "probabilities", label="label", impute=impute, rows=rows,
          reference=("output_probability", "output_label"))

    gbm = GradientBoostingClassifier(n_estimators=100, max_depth=3, random_state=0).fit(x, y)
    m = to_onnx(gbm, x[:1], target_opset=TARGET_OPSET, options=options)
    write("gbm", m, "sklearn GradientBoostingClassifier, 100 trees of depth 3, skl2onnx (TreeEnsembleClassifier)",
          "probabilities", label="label", impute=impute, rows=rows)

    xm, ym = training_data(missing=0.15)
    hgb = HistGradientBoostingClassifier(max_iter=60, max_leaf_nodes=15, random_state=0).fit(xm, ym)
    m = to_onnx(hgb, xm[:1], target_opset=TARGET_OPSET, options=options)
    write("hgb", m, "sklearn HistGradientBoostingClassifier trained with missing values, skl2onnx",
          "probabilities", label="label", nan_missing=True, rows=rows)

    # Scaled inputs, as an MLP needs; the scaling is folded into the first
    # layer's weights so that the graph is MatMul/Add/Relu/Sigmoid only
    # (skl2onnx writes a StandardScaler as ai.onnx.ml Scaler, which tract lacks).
    mean, std = x.mean(axis=0), x.std(axis=0)
    mlp = MLPClassifier(hidden_layer_sizes=(16, 8), max_iter=600, random_state=0).fit((x - mean) / std, y)
    w0 = mlp.coefs_[0] / std[:, None]
    b0 = mlp.intercepts_[0] - (mean / std) @ mlp.coefs_[0]
    mlp.coefs_[0] = w0.astype(np.float64)
    mlp.intercepts_[0] = b0.astype(np.float64)
    m = to_onnx(mlp, x[:1], target_opset=TARGET_OPSET, options=options)
    write("mlp", m, "sklearn MLPClassifier (16, 8), skl2onnx (MatMul, Add, Relu, Sigmoid)",
          "probabilities", impute=impute, rows=rows)


def boosting_libraries(rows):
    import lightgbm
    import onnxmltools
    import xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    xm, ym = training_data(missing=0.15)
    types = [("input", FloatTensorType([None, len(FEATURES)]))]

    xgb = xgboost.XGBClassifier(n_estimators=60, max_depth=4, learning_rate=0.2, random_state=0).fit(xm, ym)
    m = onnxmltools.convert_xgboost(xgb, initial_types=types, target_opset=TARGET_OPSET[""])
    write("xgboost", m, "XGBoost XGBClassifier trained with missing values, onnxmltools",
          "probabilities", label="label", nan_missing=True, rows=rows)

    lgb = lightgbm.LGBMClassifier(n_estimators=60, num_leaves=15, random_state=0, verbose=-1).fit(xm, ym)
    m = onnxmltools.convert_lightgbm(lgb, initial_types=types, target_opset=TARGET_OPSET[""], zipmap=False)
    write("lightgbm", m, "LightGBM LGBMClassifier trained with missing values, onnxmltools",
          "probabilities", label="label", nan_missing=True, rows=rows)


def fixed_batch_model(rows):
    """A logistic layer whose input fixes the batch at 6 rows, as some
    exporters write it: shardflow cuts batches into 6 rows and pads the last."""
    n, batch = len(FEATURES), 6
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, n])
    p = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 1])
    weights = helper.make_tensor("w", TensorProto.FLOAT, [n, 1], [0.3, 0.004, 0.01, 0.2])
    bias = helper.make_tensor("b", TensorProto.FLOAT, [1], [-6.0])
    nodes = [
        helper.make_node("Gemm", ["input", "w", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probabilities"]),
    ]
    graph = helper.make_graph(nodes, "fixed_batch", [x], [p], [weights, bias])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(m)
    impute = {"amount_sum_1m": 0.0, "amount_max_5m": 0.0, "merchants_5m": 0.0}
    write("fixed_batch", m, "Gemm and Sigmoid over a batch fixed at 6 rows (built with the onnx helper)",
          "probabilities", impute=impute, rows=rows, batch=batch)


def refused_models():
    """Models shardflow must refuse, built with the onnx helper."""
    n = len(FEATURES)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n])
    p = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 1])
    weights = helper.make_tensor("w", TensorProto.FLOAT, [n, 1], [0.1] * n)
    # ai.onnx.ml Scaler, as skl2onnx writes a StandardScaler: tract has no Scaler.
    nodes = [
        helper.make_node("Scaler", ["input"], ["scaled"], domain="ai.onnx.ml", offset=[1.0] * n, scale=[0.5] * n),
        helper.make_node("MatMul", ["scaled", "w"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probabilities"]),
    ]
    graph = helper.make_graph(nodes, "unsupported", [x], [p], [weights])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15), helper.make_opsetid("ai.onnx.ml", 3)])
    onnx.checker.check_model(m)
    write("unsupported", m, "a model with an operator tract does not implement (ai.onnx.ml Scaler)", "probabilities")

    xd = helper.make_tensor_value_info("input", TensorProto.DOUBLE, ["N", n])
    pd = helper.make_tensor_value_info("probabilities", TensorProto.DOUBLE, ["N", 1])
    wd = helper.make_tensor("w", TensorProto.DOUBLE, [n, 1], [0.1] * n)
    nodes = [helper.make_node("MatMul", ["input", "w"], ["z"]), helper.make_node("Sigmoid", ["z"], ["probabilities"])]
    graph = helper.make_graph(nodes, "double_input", [xd], [pd], [wd])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(m)
    write("double_input", m, "a model whose input is double, not float", "probabilities")


def main():
    os.makedirs(OUT, exist_ok=True)
    rows = reference_rows()
    sklearn_models(rows)
    boosting_libraries(rows)
    fixed_batch_model(rows)
    refused_models()
    return 0


if __name__ == "__main__":
    sys.exit(main())
