"""Turn result rows into a terminal table, CSV, JSON, a markdown table and a PNG plot; read
the JSON that pytest-benchmark saves back into rows."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .cases import Case
from .interpreter import MODE_NOTE
from .providers import PROVIDERS
from .suite import Row

GPU_NOTE = "GPU: median of triton.testing.do_bench over rotated inputs; GB/s against the bytes floor"
CASE_COLUMNS = [("op", "op"), ("pass", "pass"), ("dtype", "dtype"), ("tokens", "N"), ("vocab", "V"),
                ("hidden", "H"), ("provider", "provider")]
# (row key, header, format) of the numbers each mode reports
GPU_COLUMNS = [("median_ms", "median ms", "{:.4f}"), ("gbps", "GB/s", "{:.0f}"),
               ("vs_copy", "× copy time", "{:.2f}"), ("peak_bytes", "peak MB", "{:.1f}"),
               ("tflops", "TFLOP/s", "{:.1f}"), ("max_rel_err", "max rel err", "{:.1e}")]
CPU_COLUMNS = [("floor_x", "floor ×in", "{:.0f}"), ("moved_x", "moved ×in", "{:.2f}"),
               ("distinct_x", "distinct ×in", "{:.2f}"), ("peak_x", "peak ×in", "{:.2f}"),
               ("syncs", "syncs", "{:d}"), ("launches", "launches", "{:d}"),
               ("max_rel_err", "max rel err", "{:.1e}")]


def mode_note(mode: str) -> str:
    return GPU_NOTE if mode == "gpu" else MODE_NOTE


def _cells(rows: Sequence[Row]) -> Tuple[List[str], List[List[str]]]:
    mode = rows[0]["mode"] if rows else "cpu-interpreter"
    numbers = GPU_COLUMNS if mode == "gpu" else CPU_COLUMNS
    has_hidden = any(row.get("hidden") for row in rows)
    case_columns = [c for c in CASE_COLUMNS if c[0] != "hidden" or has_hidden]
    headers = [header for _, header in case_columns] + [header for _, header, _ in numbers] + ["status"]
    body = []
    for row in rows:
        line = [str(row[key]) for key, _ in case_columns]
        for key, _, fmt in numbers:
            value = row.get(key)
            if key == "peak_bytes" and value is not None:
                value = value / 1e6
            line.append("" if value is None or row["status"] != "ok" else fmt.format(value))
        line.append(row["status"] if not row["note"] else f"{row['status']}: {row['note']}")
        body.append(line)
    return headers, body


def text_table(rows: Sequence[Row]) -> str:
    headers, body = _cells(rows)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body)]
    widths[-1] = len(headers[-1])  # the status is last and may be long: no padding

    def render(cells):  # words (op, pass, dtype) to the left, numbers and names to the right
        return "  ".join(cell.ljust(width) if index < 3 else cell.rjust(width)
                         for index, (cell, width) in enumerate(zip(cells, widths)))
    return "\n".join([render(headers), render(["-" * w for w in widths])] + [render(line) for line in body])


def _markdown(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in body]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    return _markdown(*_cells(rows))


def summary_table(rows: Sequence[Row]) -> str:
    """Markdown: one line per (op, pass, dtype) at its largest shape, one column per provider
    with its headline numbers."""
    ok = [row for row in rows if row["status"] == "ok"]
    providers = list(dict.fromkeys(row["provider"] for row in ok))
    largest: Dict[Tuple, Row] = {}
    for row in ok:
        key = (row["op"], row["pass"], row["dtype"])
        if key not in largest or Case.from_row(row).input_bytes > Case.from_row(largest[key]).input_bytes:
            largest[key] = row
    body = []
    for (op, pass_, dtype), biggest in largest.items():
        cells = {row["provider"]: _headline(row) for row in ok
                 if (row["op"], row["pass"], row["dtype"]) == (op, pass_, dtype) and _shape(row) == _shape(biggest)}
        body.append([op, pass_, dtype, _shape(biggest).replace("\n", " ")]
                    + [cells.get(provider, "–") for provider in providers])
    return _markdown(["op", "pass", "dtype", "shape"] + providers, body)


def _headline(row: Row) -> str:
    if row["mode"] == "gpu":
        return f"{row['gbps']:.0f} GB/s, {row['vs_copy']:.2f}× copy, peak {row['peak_bytes'] / 1e9:.2f} GB"
    return (f"{row['moved_x']:.2f}× requested / {row['distinct_x']:.2f}× distinct, {row['peak_x']:.2f}× peak, "
            f"{row['syncs']} sync")


def write(rows: Sequence[Row], skipped: Dict[str, str], out_dir: Path) -> Dict[str, Path]:
    """Write results.{csv,json,md,png} under ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"results.{kind}" for kind in ("csv", "json", "md", "png")}
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    mode = rows[0]["mode"] if rows else "cpu-interpreter"
    providers = {name: PROVIDERS[name].description for name in dict.fromkeys(row["provider"] for row in rows)}
    paths["json"].write_text(json.dumps({"note": mode_note(mode), "providers": providers,
                                         "skipped_providers": skipped, "rows": list(rows)}, indent=1) + "\n")
    provider_lines = "".join(f"\n- `{name}`: {description}" for name, description in providers.items())
    skipped_lines = "".join(f"\n- `{name}`: {note}" for name, note in skipped.items())
    paths["md"].write_text(f"{mode_note(mode)}\n\nProviders:{provider_lines}\n"
                           f"\n## Largest shape of each operation\n\n{summary_table(rows)}\n"
                           f"\n## Every case\n\n{markdown_table(rows)}\n"
                           + (f"\nNot measured:{skipped_lines}\n" if skipped else ""))
    plot(rows, paths["png"])
    return paths


def plot(rows: Sequence[Row], path: Path) -> None:
    """One line of panels per (op, pass, dtype). Left: per shape and provider, GB/s beside what
    a copy of the same bytes reaches (GPU), or bytes moved beside the floor (CPU, log scale).
    Right: peak memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [row for row in rows if row["status"] == "ok"]
    on_gpu = bool(ok) and ok[0]["mode"] == "gpu"
    groups = list(dict.fromkeys((row["op"], row["pass"], row["dtype"]) for row in ok)) or [("no results", "", "")]
    providers = list(dict.fromkeys(row["provider"] for row in ok))
    colors = {name: f"C{index}" for index, name in enumerate(providers)}
    width = 0.8 / max(len(providers), 1)
    figure, axes = plt.subplots(len(groups), 2, figsize=(13, 3.4 * len(groups)), squeeze=False)
    for (op, pass_, dtype), (left, right) in zip(groups, axes):
        group = [row for row in ok if (row["op"], row["pass"], row["dtype"]) == (op, pass_, dtype)]
        shapes = list(dict.fromkeys(_shape(row) for row in group))
        for row in group:
            x = shapes.index(_shape(row)) + (providers.index(row["provider"]) - (len(providers) - 1) / 2) * width
            peak = row["peak_bytes"] / 1e9 if on_gpu else row["peak_x"]
            right.bar(x, peak, width, color=colors[row["provider"]])
            if on_gpu:
                left.bar(x, row["gbps"], width, color=colors[row["provider"]])
            else:  # requested bytes (pale), and the distinct bytes a DRAM would see (solid)
                left.bar(x, row["moved_x"], width, color=colors[row["provider"]], alpha=0.35)
                left.bar(x, row["distinct_x"], width * 0.6, color=colors[row["provider"]])
        if on_gpu:
            copy_gbps = {_shape(row): Case.from_row(row).floor_bytes / row["copy_ms"] / 1e6 for row in group}
            left.plot(range(len(shapes)), [copy_gbps[s] for s in shapes], "k_", markersize=30)
            left.set_ylabel("GB/s over the floor (higher is better)")
            right.set_ylabel("peak GB")
        else:
            left.axhline(group[0]["floor_x"], color="k", linestyle="--", linewidth=1)
            left.set_yscale("log")
            left.set_ylabel("bytes ÷ input: requested (pale), distinct (solid)")
            right.set_ylabel("peak ÷ input")
        for axis in (left, right):
            axis.set_title(f"{op} {pass_} {dtype}", fontsize=10)
            axis.set_xticks(range(len(shapes)))
            axis.set_xticklabels(shapes, fontsize=8)
    handles = [matplotlib.patches.Patch(color=colors[name], label=name) for name in providers]
    handles.append(matplotlib.lines.Line2D([], [], color="k", linestyle="none" if on_gpu else "--",
                                           marker="_" if on_gpu else None, markersize=15,
                                           label="device-to-device copy" if on_gpu else "bytes floor"))
    title = mode_note("gpu" if on_gpu else "cpu-interpreter") + (f" — {ok[0]['device']}" if on_gpu else "")
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, bbox_to_anchor=(0.5, 0.985))
    figure.suptitle(title, fontsize=11, y=0.998)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.6 / (3.4 * len(groups))))
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _shape(row: Row) -> str:
    return f"N={row['tokens']}\nV={row['vocab']}" + (f"\nH={row['hidden']}" if row.get("hidden") else "")


def rows_from_pytest_benchmark(path: Path) -> List[Row]:
    """Rows from the JSON of ``pytest bench/ --benchmark-json=PATH``: each benchmark test keeps
    its row in ``extra_info``."""
    return [dict(benchmark["extra_info"]) for benchmark in json.loads(Path(path).read_text())["benchmarks"]]
