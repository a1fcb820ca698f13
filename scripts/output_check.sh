#!/usr/bin/env bash
# Runs a shardflow binary over a fixed input with a few configs and keeps
# every output file, so that two builds can be compared byte for byte:
#
#   scripts/output_check.sh path/to/shardflow-before /tmp/out-before
#   scripts/output_check.sh path/to/shardflow-after  /tmp/out-after
#   diff -rq /tmp/out-before /tmp/out-after && echo identical
#
# The input (written by the script, deterministic): 200 k events over two
# files (two partitions), integer and string keys, amounts with and without
# decimals, some events too late for their windows, some out of the
# accepted lateness, a few malformed lines. The configs: the pipeline
# bench's four jobs, and one sink taking every kind with every aggregate.
set -euo pipefail
BIN=${1:?usage: output_check.sh SHARDFLOW_BINARY OUT_DIR}
OUT=${2:?usage: output_check.sh SHARDFLOW_BINARY OUT_DIR}
N=${OUTPUT_CHECK_EVENTS:-200000}
rm -rf "$OUT"
mkdir -p "$OUT"
# A fixed place: per-event ids name the input files.
WORK=${OUTPUT_CHECK_WORK:-/tmp/shardflow-output-check}
rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

python3 - "$WORK" "$N" <<'PY'
import sys
work, n = sys.argv[1], int(sys.argv[2])
x = 0x9E3779B97F4A7C15
def rnd():
    global x
    x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 7
    x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
    return x
T0 = 1_700_000_000_000
files = [open(f"{work}/a.ndjson", "w"), open(f"{work}/b.ndjson", "w")]
for i in range(n):
    f = files[rnd() % 2]
    r = rnd()
    k = r % 5000
    key = str(k) if r % 7 else f'"u{k}"'
    t = T0 + i - (rnd() % 5000)
    if r % 997 == 0:
        t -= 90_000   # late for a 1 min window with 30 s of allowed lateness
    elif r % 499 == 0:
        t -= 20_000   # an allowed-late update: re-fires
    a = rnd() % 100000
    amount = f"{a // 100}" if r % 5 == 0 else f"{a // 100}.{a % 100:02d}"
    if r % 1999 == 0:
        f.write('{"userId":' + key + ',"ts":"oops"}\n')
    elif r % 2999 == 0:
        f.write('not json\n')
    else:
        f.write('{"userId":%s,"ts":%d,"amount":%s,"note":"x\\u00e9"}\n' % (key, t, amount))
PY

feature() { # name agg field window
  printf '[[features]]\nname = "%s"\nagg = "%s"\n%swindow = %s\n\n' "$1" "$2" "${3:+field = \"$3\"
}" "$4"
}
job() { # name window kinds aggs...
  local name=$1 window=$2 kinds=$3; shift 3
  local dir="$WORK/$name"
  mkdir -p "$dir"
  {
    printf '[pipeline]\nstate_dir = "%s/state"\ncheckpoint_interval = "10s"\n\n' "$dir"
    printf '[source]\ntype = "file"\npaths = ["%s/a.ndjson", "%s/b.ndjson"]\n\n' "$WORK" "$WORK"
    printf '[schema]\nkey = "userId"\ntimestamp = "ts"\nfields = { amount = "f64", note = "string?" }\n\n'
    printf '[watermark]\nmax_out_of_orderness = "5s"\nallowed_lateness = "30s"\n\n'
    for agg in "$@"; do
      if [ "$agg" = count ]; then feature "a_$agg" "$agg" "" "$window"
      else feature "a_$agg" "$agg" amount "$window"; fi
    done
    printf '[[sinks]]\ntype = "file"\npath = "%s/%s.ndjson"\nkinds = [%s]\n' "$OUT" "$name" "$kinds"
  } > "$dir/config.toml"
  "$BIN" run --config "$dir/config.toml" --metrics-addr off --quiet 2>"$dir/log" \
    || { cat "$dir/log"; exit 1; }
}
T='{ type = "tumbling", size = "1m" }'
S='{ type = "sliding", size = "1m", slide = "10s" }'
H='{ type = "sliding", size = "1h", slide = "10s" }'
job tumbling_1m "$T" '"window"' count sum max
job sliding_1m_10s "$S" '"window"' count sum max
job features_tumbling_1m "$T" '"features"' count sum max
job features_sliding_1h_10s "$H" '"features"' count sum max
job every_kind "$S" '"features", "window", "late", "dead_letter"' count sum min max mean first last stddev distinct_count
(cd "$OUT" && sha256sum ./*.ndjson && wc -l ./*.ndjson | tail -1) >&2
