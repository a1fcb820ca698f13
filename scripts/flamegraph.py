#!/usr/bin/env python3
"""A flame graph (SVG) from `perf script` output, without other tools.

    perf record -F 499 --call-graph dwarf,16384 -o perf.data -- shardflow run ...
    perf script -i perf.data | scripts/flamegraph.py --title "tumbling 1 min" > docs/x.svg

Stacks are folded per thread name (the bottom frame is the thread, e.g.
`shardflow-engine`), frames are function names with their arguments and
hashes cut; each box's tooltip gives its share of all samples. Boxes
narrower than 0.1 % are left out.
"""
import argparse
import collections
import html
import re
import sys


def frames_of(line):
    # "    55d0c0ffee sym+0x12 (/path/dso)"
    parts = line.strip().split(None, 1)
    if len(parts) < 2:
        return None
    sym = parts[1]
    sym = re.sub(r"\s+\(\S+\)$", "", sym)
    sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
    sym = re.sub(r"::h[0-9a-f]{16}$", "", sym)
    if sym.startswith("[unknown]"):
        return None
    return sym


def fold(lines):
    stacks = collections.Counter()
    comm, frames = None, []
    for line in lines:
        if not line.strip():
            if comm is not None:
                stacks[tuple([comm] + frames[::-1])] += 1
            comm, frames = None, []
            continue
        if not line.startswith((" ", "\t")):
            comm = line.split()[0]
            # Tokio's and RocksDB's workers by kind, not by number.
            comm = re.sub(r"[-_]?\d+$", "", comm) or comm
            frames = []
            continue
        f = frames_of(line)
        if f is not None:
            frames.append(f)
    if comm is not None:
        stacks[tuple([comm] + frames[::-1])] += 1
    return stacks


def tree(stacks):
    root = {"n": 0, "c": {}}
    for stack, n in stacks.items():
        node = root
        node["n"] += n
        for f in stack:
            node = node["c"].setdefault(f, {"n": 0, "c": {}})
            node["n"] += n
    return root


def colour(name):
    h = sum(ord(c) for c in name)
    if "shardflow" in name:
        return "rgb(%d,%d,%d)" % (230, 120 + h % 60, 40 + h % 40)
    if "rocksdb" in name:
        return "rgb(%d,%d,%d)" % (120 + h % 50, 170 + h % 50, 220)
    if name.startswith(("mi_", "_mi_", "__mem", "alloc::")):
        return "rgb(%d,%d,%d)" % (200 + h % 40, 80 + h % 40, 80)
    return "rgb(%d,%d,%d)" % (220 + h % 30, 160 + h % 60, 60 + h % 40)


def svg(root, title, width=1600, row=16):
    total = root["n"]
    boxes = []
    depth_max = [0]

    def walk(node, x, depth):
        for name, child in sorted(node["c"].items()):
            w = child["n"] / total * width
            if child["n"] / total >= 0.001:
                boxes.append((x, depth, w, name, child["n"]))
                depth_max[0] = max(depth_max[0], depth)
                walk(child, x, depth + 1)
            x += w

    walk(root, 0.0, 0)
    height = (depth_max[0] + 3) * row + 30
    out = [
        '<?xml version="1.0" standalone="no"?>',
        f'<svg version="1.1" width="{width}" height="{height}" '
        'xmlns="http://www.w3.org/2000/svg" font-family="monospace" font-size="11">',
        f'<rect width="100%" height="100%" fill="#fdfdf6"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="15">'
        f"{html.escape(title)} ({total} samples)</text>",
    ]
    for x, depth, w, name, n in boxes:
        y = height - (depth + 2) * row
        label = html.escape(name)
        pct = 100.0 * n / total
        chars = int(w / 6.6)
        text = ""
        if chars >= 3:
            shown = name if len(name) <= chars else name[: chars - 2] + ".."
            text = f'<text x="{x + 3:.1f}" y="{y + row - 4}">{html.escape(shown)}</text>'
        out.append(
            f"<g><title>{label} ({n} samples, {pct:.2f}%)</title>"
            f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.1):.1f}" height="{row - 1}" '
            f'fill="{colour(name)}" rx="1"/>{text}</g>'
        )
    out.append("</svg>")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--title", default="flame graph")
    args = p.parse_args()
    root = tree(fold(sys.stdin))
    sys.stdout.write(svg(root, args.title))


if __name__ == "__main__":
    main()
