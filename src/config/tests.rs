use std::path::Path;

use super::env::substitute_env;
use super::*;

const MINIMAL: &str = r#"
[source]
type = "generator"

[schema]
key = "userId"
timestamp = "timestamp"
fields = { amount = "f64" }

[[features]]
name = "amount_sum_1m"
agg = "sum"
field = "amount"
window = { type = "sliding", size = "1m", slide = "10s" }

[[sinks]]
type = "stdout"
kinds = ["features", "window"]
"#;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str_at(text, Path::new("test.toml"), |n| {
        (n == "SET").then(|| "yes".into())
    })
}

#[test]
fn minimal_config_parses() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.features[0].window.get_ref().slide_millis(), 10_000);
    assert_eq!(c.schema.field_index("amount"), Some(0));
}

#[test]
fn size_not_a_multiple_of_slide_is_located() {
    let text = MINIMAL.replace("slide = \"10s\"", "slide = \"7s\"");
    let e = parse(&text).unwrap_err();
    assert!(e.message.contains("size % slide"), "{e}");
    assert_eq!(e.location.unwrap().0, 14, "{e}");
}

#[test]
fn unknown_keys_are_refused_with_location() {
    let text = MINIMAL.replace("agg = \"sum\"", "agg = \"sum\"\ncolour = 1");
    let e = parse(&text).unwrap_err();
    assert!(e.message.contains("colour"), "{e}");
    assert_eq!(e.location.unwrap().0, 13, "{e}");
}

/// Parses with exactly these environment variables set.
fn parse_env(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_str_at(text, Path::new("test.toml"), |n| {
        vars.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.to_string())
    })
}

#[test]
fn env_substitution_syntax() {
    let env = |n: &str| (n == "SET").then(|| "yes".to_string());
    let sub = |v: &str| substitute_env(v, &env).unwrap().map(|(s, _)| s);
    assert_eq!(sub("${SET}").as_deref(), Some("yes"));
    assert_eq!(sub("a-${SET}-b").as_deref(), Some("a-yes-b"));
    assert_eq!(sub("${UNSET:-x}").as_deref(), Some("x"));
    assert_eq!(sub("${UNSET:-}").as_deref(), Some(""));
    assert_eq!(sub("${SET:-x}").as_deref(), Some("yes"));
    assert_eq!(sub("$${SET}").as_deref(), Some("${SET}"));
    assert_eq!(sub("$$${SET}").as_deref(), Some("$${SET}"));
    assert_eq!(sub("cost $5, $ {x}"), None);
    assert_eq!(
        substitute_env("$${SET}", &env).unwrap(),
        Some(("${SET}".to_string(), false)),
        "an escape alone is not a reference"
    );
    let e = substitute_env("ab${UNSET}", &env).unwrap_err();
    assert_eq!((e.at, e.len), (2, 8));
    assert!(e.message.contains("UNSET is not set"), "{}", e.message);
    let e = substitute_env("${SET", &env).unwrap_err();
    assert!(e.message.contains("unclosed"), "{}", e.message);
    let e = substitute_env("${A-B}", &env).unwrap_err();
    assert!(
        e.message.contains("invalid environment reference"),
        "{}",
        e.message
    );
}

#[test]
fn env_substitution_in_a_config() {
    let text = MINIMAL
        .replace("\"userId\"", "\"${SET}\"  # ${UNSET} in a comment")
        .replace("\"timestamp\"\n", "'${UNSET:-ts}' \n# ${UNSET}\n");
    let c = parse(&text).unwrap();
    assert_eq!(c.schema.key, "yes");
    assert_eq!(c.schema.timestamp, "ts", "literal strings are strings too");
    // A duration or a path can come from the environment: both are strings.
    let text = MINIMAL.replace(
        "[source]",
        "[pipeline]\ncheckpoint_interval = \"${CKPT:-2s}\"\nstate_dir = \"${DIR}/state\"\n\n[source]",
    );
    let c = parse_env(&text, &[("DIR", "/tmp/x y")]).unwrap();
    assert_eq!(c.pipeline.checkpoint_interval.millis(), 2_000);
    assert_eq!(c.pipeline.state_dir, PathBuf::from("/tmp/x y/state"));
}

#[test]
fn unset_variable_is_located_with_its_key_path() {
    let e = parse(&MINIMAL.replace("\"userId\"", "\"${NOPE}\"")).unwrap_err();
    assert!(e.message.contains("NOPE is not set"), "{e}");
    assert!(e.message.contains("schema.key"), "{e}");
    assert_eq!(e.location, Some((6, 8)), "{e}");
    // In an array inside an array of tables.
    let text = MINIMAL.replace("[\"features\", \"window\"]", "[\"features\", \"${NOPE}\"]");
    let e = parse(&text).unwrap_err();
    assert!(e.message.contains("sinks[0].kinds[1]"), "{e}");
    assert_eq!(e.location, Some((18, 23)), "{e}");
    // In an inline table.
    let text = MINIMAL.replace("slide = \"10s\"", "slide = \"${NOPE}\"");
    let e = parse(&text).unwrap_err();
    assert!(e.message.contains("features[0].window.slide"), "{e}");
    assert_eq!(e.location, Some((14, 52)), "{e}");
    // After an escape and after `$${`, at the right spot still.
    let text = MINIMAL.replace("\"userId\"", r#""\u0041 $${NOPE} ${NOPE}""#);
    let e = parse(&text).unwrap_err();
    assert_eq!(e.location, Some((6, 24)), "{e}");
}

#[test]
fn the_first_bad_reference_in_the_file_is_reported() {
    // [source] comes first in the file, though after [schema] in key order.
    let text = MINIMAL
        .replace(
            "type = \"generator\"",
            "type = \"generator\"\nseed_name = \"${FIRST}\"",
        )
        .replace("\"userId\"", "\"${SECOND}\"");
    let e = parse(&text).unwrap_err();
    assert!(e.message.contains("FIRST"), "{e}");
    assert_eq!(e.location.unwrap().0, 4, "{e}");
}

/// Values that would rewrite the file if they were pasted into its text.
const HOSTILE: &[&str] = &[
    "a\"b",
    "line1\nline2",
    "x]",
    "= 1\n[source]",
    "\"\n[pipeline]\nbatch_size = 1\n#",
    "\"}]\n[[sinks]]\ntype = \"stdout\"\nkinds = [\"raw\"]\n#",
    "'''\"\"\"\\u0000\t\r${SET}",
    "${NOT_EXPANDED_AGAIN}",
];

#[test]
fn hostile_values_are_inserted_verbatim() {
    let text = MINIMAL.replace("\"userId\"", "\"${HOSTILE}\"").replace(
        "kinds = [\"features\", \"window\"]",
        "kinds = [\"features\", \"window\"]\n\n[replay]\nsource = { type = \"s3\", bucket = \"archive\" }\nlabel = \"pre-${HOSTILE}-post\"",
    );
    let plain = parse_env(&text, &[("HOSTILE", "plain")]).unwrap();
    for value in HOSTILE {
        let mut c = parse_env(&text, &[("HOSTILE", value), ("SET", "no")])
            .unwrap_or_else(|e| panic!("{value:?}: {e}"));
        assert_eq!(c.schema.key, *value);
        assert_eq!(c.replay_label(), Some(&*format!("pre-{value}-post")));
        // Nothing else moved: same tables, sinks, defaults (and spans).
        assert_eq!(c.pipeline.batch_size, 256);
        assert_eq!(c.sinks.len(), 1);
        assert_eq!(c.source().type_name(), "generator");
        c.schema.key = "plain".into();
        c.replay = plain.replay.clone();
        assert_eq!(format!("{c:?}"), format!("{plain:?}"), "{value:?}");
    }
}

#[test]
fn hostile_defaults_are_inserted_verbatim() {
    // A default is file text, but it is taken from the parsed string.
    let text = MINIMAL.replace("\"userId\"", r#""${UNSET:-a\"b\n[source]}""#);
    let c = parse(&text).unwrap();
    assert_eq!(c.schema.key, "a\"b\n[source]");
}

#[test]
fn references_outside_strings_are_refused_clearly() {
    let text = MINIMAL.replace("type = \"generator\"", "type = \"generator\"\ncount = ${N}");
    let e = parse_env(&text, &[("N", "10")]).unwrap_err();
    assert!(
        e.message.contains("substituted only inside quoted strings"),
        "{e}"
    );
    assert_eq!(e.location.unwrap().0, 4, "{e}");
    // Quoted, it is a string where a number belongs: said so.
    let text = MINIMAL.replace(
        "type = \"generator\"",
        "type = \"generator\"\ncount = \"${N}\"",
    );
    let e = parse_env(&text, &[("N", "10")]).unwrap_err();
    assert!(e.message.contains("invalid type: string \"10\""), "{e}");
    assert!(e.message.contains("substituted only into strings"), "{e}");
    assert_eq!(e.location, Some((4, 9)), "{e}");
    // Keys are not values.
    let text = MINIMAL.replace(
        "{ amount = \"f64\" }",
        "{ amount = \"f64\", \"${SET}\" = \"f64\" }",
    );
    let e = parse(&text).unwrap_err();
    assert!(e.message.contains("keys are never substituted"), "{e}");
    assert!(e.message.contains("schema.fields.\"${SET}\""), "{e}");
    assert_eq!(e.location, Some((8, 28)), "{e}");
}

#[test]
fn serde_errors_keep_their_location_after_substitution() {
    let text = MINIMAL
        .replace("\"userId\"", "\"${SET}\"")
        .replace("agg = \"sum\"", "agg = \"sum\"\ncolour = \"${SET}\"");
    let e = parse(&text).unwrap_err();
    assert!(e.message.contains("colour"), "{e}");
    assert_eq!(e.location.unwrap().0, 13, "{e}");
    let text = MINIMAL.replace("slide = \"10s\"", "slide = \"${SET}\"");
    let e = parse(&text).unwrap_err();
    assert!(e.message.contains("invalid duration \"yes\""), "{e}");
    assert_eq!(e.location.unwrap().0, 14, "{e}");
}

/// The keys serde accepts in one table, read from its own refusal of an
/// unknown key ("unknown field `zz`, expected one of `a`, `b`").
fn accepted_keys(table: &str) -> std::collections::BTreeSet<String> {
    let text = format!("{table}\nzz_not_a_key = 1\n");
    let e = parse(&text).expect_err("an unknown key must be refused");
    let (_, expected) = e
        .message
        .split_once("expected")
        .unwrap_or_else(|| panic!("no list of keys in {e}"));
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Backticked key names in a README table cell (`a` / `b`, `a`, `b` (…)).
fn cell_keys(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_string)
        .collect()
}

/// The README's configuration reference, table by table: the table's
/// name (`[pipeline]`, `[source] file`, `[[sinks]] s3`, ...) and its keys.
fn readme_tables() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("\n## Configuration reference")
        .expect("a configuration reference");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut tables =
        std::collections::BTreeMap::<String, std::collections::BTreeSet<String>>::new();
    let (mut heading, mut variant) = (String::new(), String::new());
    let mut header = String::new();
    for line in section.lines() {
        if let Some(h) = line.strip_prefix("### ") {
            heading = h.trim_matches('`').to_string();
            variant.clear();
        } else if let Some(rest) = line.strip_prefix("`type = \"") {
            variant = rest.split('"').next().unwrap().to_string();
        } else if line.starts_with("| key") || line.starts_with("| type") {
            header = line.to_string();
        } else if line.starts_with("| `") {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if header.starts_with("| type") {
                let name = format!("{heading} {}", cell_keys(cells[1])[0]);
                tables.entry(name).or_default().extend(cell_keys(cells[2]));
            } else {
                let name = if variant.is_empty() {
                    heading.clone()
                } else {
                    format!("{heading} {variant}")
                };
                let mut keys = cell_keys(cells[1]);
                if cells[1] == "`[[replay.sinks]]`" {
                    keys = vec!["sinks".into()];
                }
                tables.entry(name).or_default().extend(keys);
            }
        } else if !line.starts_with('|') {
            header.clear();
        }
    }
    tables
}

/// The README's reference names every key serde accepts and no other: a
/// key added to a struct without a README row (or a row left for a key
/// that is gone) fails here.
#[test]
fn the_readme_reference_lists_exactly_the_accepted_keys() {
    let base = "[schema]\nkey = \"k\"\ntimestamp = \"t\"\n[[sinks]]\ntype = \"stdout\"\nkinds = [\"features\"]\n[source]\ntype = \"generator\"\n";
    let tables: &[(&str, String)] = &[
        ("[pipeline]", format!("{base}[pipeline]")),
        ("[api]", format!("{base}[api]")),
        (
            "[checkpoint_store] s3",
            format!("{base}[checkpoint_store]\ntype = \"s3\""),
        ),
        ("[cluster]", format!("{base}[cluster]")),
        (
            "[source] generator",
            "[source]\ntype = \"generator\"".into(),
        ),
        ("[source] file", "[source]\ntype = \"file\"".into()),
        ("[source] kinesis", "[source]\ntype = \"kinesis\"".into()),
        ("[source] s3", "[source]\ntype = \"s3\"".into()),
        ("[replay]", format!("{base}[replay]")),
        (
            "[schema]",
            "[source]\ntype = \"generator\"\n[schema]".into(),
        ),
        ("[watermark]", format!("{base}[watermark]")),
        ("[[features]]", format!("{base}[[features]]")),
        ("[inference]", format!("{base}[inference]")),
        (
            "[[sinks]] stdout",
            format!("{base}[[sinks]]\ntype = \"stdout\""),
        ),
        (
            "[[sinks]] file",
            format!("{base}[[sinks]]\ntype = \"file\""),
        ),
        (
            "[[sinks]] kinesis",
            format!("{base}[[sinks]]\ntype = \"kinesis\""),
        ),
        ("[[sinks]] s3", format!("{base}[[sinks]]\ntype = \"s3\"")),
        (
            "[[sinks]] dynamodb",
            format!("{base}[[sinks]]\ntype = \"dynamodb\""),
        ),
    ];
    let readme = readme_tables();
    let documented: std::collections::BTreeSet<&str> = readme.keys().map(String::as_str).collect();
    let checked: std::collections::BTreeSet<&str> = tables.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        documented, checked,
        "README tables and the tables this test knows differ"
    );
    for (name, toml) in tables {
        let accepted = accepted_keys(toml);
        assert_eq!(
            &readme[*name], &accepted,
            "README {name}: left as in the README, right as serde accepts"
        );
    }
}

/// A README default written as a TOML value (`16`, `"5s"`, `false`,
/// `["score"]`) is what the code defaults to: setting the key to it
/// changes nothing. (Defaults written in words, `none`, `now`, `AWS
/// chain`, are not checked.)
#[test]
fn the_readme_defaults_are_the_code_defaults() {
    let base = "[schema]\nkey = \"k\"\ntimestamp = \"t\"\n[[sinks]]\ntype = \"stdout\"\nkinds = [\"features\"]\n";
    let generator = "[source]\ntype = \"generator\"\n";
    // (README table, the table's header and required keys, what it parses into)
    type Section = fn(&Config) -> String;
    let tables: &[(&str, String, Section)] = &[
        ("[pipeline]", format!("{generator}{base}[pipeline]\n"), |c| format!("{:?}", c.pipeline)),
        ("[api]", format!("{generator}{base}[api]\n"), |c| format!("{:?}", c.api)),
        ("[checkpoint_store] s3", format!("{generator}{base}[checkpoint_store]\ntype = \"s3\"\nbucket = \"bucket\"\n"), |c| format!("{:?}", c.checkpoint_store.as_ref().map(|s| s.get_ref()))),
        ("[cluster]", format!("{base}[source]\ntype = \"kinesis\"\nstream_name = \"s\"\n[checkpoint_store]\ntype = \"s3\"\nbucket = \"bucket\"\n[cluster]\nlease_table = \"leases\"\n"), |c| format!("{:?}", c.cluster.as_ref().map(|s| s.get_ref()))),
        ("[source] generator", format!("{base}{generator}"), |c| format!("{:?}", c.source())),
        ("[source] file", format!("{base}[source]\ntype = \"file\"\npath = \"x\"\n"), |c| format!("{:?}", c.source())),
        ("[source] kinesis", format!("{base}[source]\ntype = \"kinesis\"\nstream_name = \"s\"\n"), |c| format!("{:?}", c.source())),
        ("[source] s3", format!("{base}[source]\ntype = \"s3\"\nbucket = \"bucket\"\n"), |c| format!("{:?}", c.source())),
        ("[schema]", format!("{generator}[[sinks]]\ntype = \"stdout\"\nkinds = [\"features\"]\n[schema]\nkey = \"k\"\ntimestamp = \"t\"\n"), |c| format!("{:?}", c.schema)),
        ("[watermark]", format!("{generator}{base}[watermark]\n"), |c| format!("{:?}", c.watermark)),
        ("[inference]", format!("{generator}{base}[inference]\nbackend = \"sagemaker\"\nendpoint_name = \"e\"\n"), |c| format!("{:?}", c.inference)),
        ("[[sinks]] dynamodb", format!("{generator}{base}[[sinks]]\ntype = \"dynamodb\"\ntable = \"features\"\nkinds = [\"features\"]\n"), |c| format!("{:?}", c.sinks[1].get_ref())),
    ];
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut checked = 0;
    for (table, text, section) in tables {
        let plain = parse(text).unwrap_or_else(|e| panic!("{table}: {e}"));
        for (key, default) in readme_defaults(&readme, table) {
            if text.contains(&format!("\n{key} = ")) {
                continue;
            }
            let with = parse(&format!("{text}{key} = {default}\n"))
                .unwrap_or_else(|e| panic!("README {table} {key} = {default}: {e}"));
            assert_eq!(
                section(&with),
                section(&plain),
                "README {table}: {key} defaults to {default}, the code to something else"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 40,
        "only {checked} defaults checked: has the README's table shape changed?"
    );
}

/// `(key, default)` of the rows of one README table whose default cell is
/// a TOML value in backticks.
fn readme_defaults(readme: &str, table: &str) -> Vec<(String, String)> {
    let (heading, variant) = table.split_once(' ').unwrap_or((table, ""));
    let start = readme.find(&format!("### `{heading}`")).unwrap();
    let mut section = &readme[start..];
    if !variant.is_empty() {
        section = &section[section.find(&format!("`type = \"{variant}\"`")).unwrap()..];
    }
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in section.lines().skip(1) {
        if line.starts_with("### ") {
            break;
        }
        if line.starts_with("| `") {
            in_table = true;
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (key, default) = (cells[1], cells[2]);
            let literal = default.len() > 2
                && default.starts_with('`')
                && default.ends_with('`')
                && !default[1..default.len() - 1].contains('`');
            if literal && !key.contains('/') {
                rows.push((
                    key.trim_matches('`').to_string(),
                    default.trim_matches('`').to_string(),
                ));
            }
        } else if in_table && !line.starts_with('|') {
            break;
        }
    }
    rows
}

#[test]
fn dynamodb_sinks_take_only_keyed_vectors_and_keep_their_attributes() {
    let sink = |extra: &str| {
        format!("{MINIMAL}\n[[sinks]]\ntype = \"dynamodb\"\ntable = \"user-features\"\n{extra}\n")
    };
    let c = parse(&sink("kinds = [\"features\"]")).unwrap();
    let SinkConfig::Dynamodb(d) = c.sinks[1].get_ref() else {
        panic!("{:?}", c.sinks[1])
    };
    assert_eq!(
        (d.key_attribute.as_str(), d.write_mode, d.concurrency),
        ("key", WriteMode::Conditional, 16)
    );

    let e = parse(&sink("kinds = [\"features\", \"window\"]")).unwrap_err();
    assert!(
        e.message
            .contains("type = \"dynamodb\": kinds may only hold \"features\" and \"prediction\""),
        "{e}"
    );
    assert!(e.message.contains("\"window\" records are not"), "{e}");
    assert_eq!(e.location.unwrap().0, 20, "{e}");

    let e = parse(&sink("kinds = [\"features\"]\nwrite_mode = \"fast\"")).unwrap_err();
    assert!(e.message.contains("unknown variant `fast`"), "{e}");

    let e = parse(&sink(
        "kinds = [\"features\"]\nkey_attribute = \"amount_sum_1m\"",
    ))
    .unwrap_err();
    assert!(
        e.message
            .contains("feature \"amount_sum_1m\" would be written over the item's own attribute")
            && e.message.contains("or set another key_attribute"),
        "{e}"
    );
    let renamed = MINIMAL.replace("amount_sum_1m", "event_time");
    let e = parse(&format!(
        "{renamed}\n[[sinks]]\ntype = \"dynamodb\"\ntable = \"t12\"\nkinds = [\"features\"]\n"
    ))
    .unwrap_err();
    assert!(
        e.message
            .contains("feature \"event_time\" would be written over"),
        "{e}"
    );

    let e = parse(&sink("kinds = [\"features\"]").replace("user-features", "a b")).unwrap_err();
    assert!(e.message.contains("is not a DynamoDB table name"), "{e}");
    for (extra, want) in [
        ("concurrency = 0", "concurrency must be between 1 and 256"),
        ("max_attempts = 0", "max_attempts must be between 1 and 20"),
        (
            "max_buffered_keys = 0",
            "max_buffered_keys must be at least 1",
        ),
        (
            "endpoint_url = \"localhost:8000\"",
            "endpoint_url must start with http://",
        ),
    ] {
        let e = parse(&sink(&format!("kinds = [\"features\"]\n{extra}"))).unwrap_err();
        assert!(e.message.contains(want), "{extra}: {e}");
    }
}

#[test]
fn the_api_is_off_unless_configured_and_checked() {
    assert!(parse(MINIMAL).unwrap().api.is_none());
    let api = parse(&format!("{MINIMAL}\n[api]\n")).unwrap().api.unwrap();
    assert_eq!(api.addr.to_string(), DEFAULT_API_ADDR);
    assert_eq!(api.max_in_flight, 256);
    let c = parse(&format!(
        "{MINIMAL}\n[api]\naddr = \"0.0.0.0:9000\"\nmax_in_flight = 1\nrequest_timeout = \"50ms\"\n"
    ))
    .unwrap();
    let api = c.api.unwrap();
    assert_eq!(api.addr.port(), 9000);
    assert_eq!(api.request_timeout.millis(), 50);
    let text = format!("{MINIMAL}\n[api]\nmax_in_flight = 0\n");
    let e = parse(&text).unwrap_err();
    assert!(
        e.message.contains("[api] max_in_flight must be at least 1"),
        "{e}"
    );
    let line = e.location.expect("located").0;
    assert_eq!(text.lines().nth(line - 1), Some("[api]"), "{e}");
    let e = parse(&format!("{MINIMAL}\n[api]\naddr = \"localhost\"\n")).unwrap_err();
    assert!(e.message.contains("invalid socket address"), "{e}");
}

#[test]
fn request_fields_are_numeric_schema_fields_under_a_name_of_their_own() {
    let with = |fields: &str, request: &str| {
        MINIMAL.replace(
            "fields = { amount = \"f64\" }",
            &format!("fields = {fields}\nrequest_fields = {request}"),
        )
    };
    let c = parse(&with("{ amount = \"f64\", qty = \"i64?\" }", "[\"qty\"]")).unwrap();
    assert_eq!(
        c.vector_names().iter().map(|n| &**n).collect::<Vec<_>>(),
        ["amount_sum_1m", "qty"]
    );
    for (fields, request, why) in [
        (
            "{ amount = \"f64\" }",
            "[\"qty\"]",
            "\"qty\", which is not one of [schema] fields (amount)",
        ),
        (
            "{ amount = \"f64\", m = \"string\" }",
            "[\"m\"]",
            "\"m\", a string field",
        ),
        (
            "{ amount = \"f64\" }",
            "[\"amount\", \"amount\"]",
            "\"amount\" twice",
        ),
        (
            "{ amount = \"f64\", amount_sum_1m = \"f64\" }",
            "[\"amount_sum_1m\"]",
            "also a feature's name",
        ),
    ] {
        let e = parse(&with(fields, request)).expect_err(request);
        assert!(e.message.contains(why), "{e}");
    }
}
