#!/usr/bin/env python3
"""Plots the load test's samples (load.csv from tests/reliability_load.rs):
RSS over time on top, throughput and the longest checkpoint below.

usage: plot_load.py load.csv rss.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"{src}: no samples")
    t = [float(r["seconds"]) / 60 for r in rows]
    rss = [float(r["rss_mib"]) for r in rows]
    rate = [float(r["records_per_s"]) for r in rows]
    cp = [float(r["checkpoint_max_s"]) for r in rows]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    top.plot(t, rss, color="tab:blue")
    top.set_ylabel("RSS (MiB)")
    top.set_ylim(bottom=0)
    top.set_title(
        f"shardflow under sustained load: peak RSS {max(rss):.0f} MiB, "
        f"mean {sum(rate) / len(rate):.0f} records/s"
    )
    top.grid(alpha=0.3)
    bottom.plot(t, rate, color="tab:green", label="records/s")
    bottom.set_ylabel("records/s")
    bottom.set_xlabel("minutes")
    bottom.grid(alpha=0.3)
    right = bottom.twinx()
    right.plot(t, cp, color="tab:red", alpha=0.6, label="longest checkpoint (s)")
    right.set_ylabel("longest checkpoint (s)")
    right.set_ylim(bottom=0)
    # One legend for both y axes, inside the plot so it never covers the axis labels.
    lines = bottom.get_lines() + right.get_lines()
    bottom.legend(lines, [line.get_label() for line in lines], loc="upper left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)
    print(f"wrote {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
