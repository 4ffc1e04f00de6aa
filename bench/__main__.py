"""python -m bench: fastce beside the cross-entropy implementations people use today.

On a GPU: median time, GB/s against the bytes floor, the ratio to a device-to-device copy of
the same bytes, peak memory, TFLOP/s (linear cross-entropy). On a CPU-only machine the Triton
kernels run on the interpreter and the suite reports bytes moved, peak memory and host syncs,
never timings. Results go to bench/results/<device>/ (CSV, JSON, markdown, PNG).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import use_best_device

ON_GPU = use_best_device()  # before anything imports triton

from . import cases as presets  # noqa: E402
from . import report, suite  # noqa: E402
from .providers import PROVIDERS  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few small cases of every operation (CI runs this on the CPU)")
    parser.add_argument("--op", nargs="+", choices=presets.OPS, help="operations (default: all)")
    parser.add_argument("--pass", dest="passes", nargs="+", choices=presets.PASSES,
                        help="passes (default: all)")
    parser.add_argument("--dtype", nargs="+", choices=list(presets.DTYPES), help="dtypes (default: all)")
    parser.add_argument("--tokens", nargs="+", type=int, help="tokens N per step")
    parser.add_argument("--vocab", nargs="+", type=int, help="vocabulary sizes V")
    parser.add_argument("--hidden", type=int, help="hidden size H of linear cross-entropy")
    parser.add_argument("--reduction", choices=presets.REDUCTIONS, default="mean",
                        help="'none' backpropagates a random grad_output (default: mean)")
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS),
                        help="implementations to compare (default: every importable one)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: bench/results/<device>, or <device>-quick with --quick)")
    parser.add_argument("--from-pytest-benchmark", type=Path, metavar="JSON",
                        help="report the JSON saved by pytest bench/ --benchmark-json=JSON instead of running")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def select_cases(args: argparse.Namespace):
    """The preset (quick or full, for this device), with every dimension given on the command
    line replacing the preset's."""
    preset = presets.preset(ON_GPU, quick=args.quick)
    chosen = {"ops": args.op, "passes": args.passes, "dtypes": args.dtype, "tokens": args.tokens,
              "vocabs": args.vocab, "hidden": args.hidden}
    preset.update({key: value for key, value in chosen.items() if value})
    if args.tokens or args.vocab:  # shapes given on the command line apply to the binary losses too
        preset["binary_shapes"] = None
    return presets.build_cases(reduction=args.reduction, **preset)


def device_folder(device: str, mode: str) -> str:
    return mode if mode != "gpu" else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_pytest_benchmark:
        rows, skipped = report.rows_from_pytest_benchmark(args.from_pytest_benchmark), {}
    else:
        providers, skipped = suite.usable_providers([PROVIDERS[name] for name in args.providers], ON_GPU)
        rows = suite.run(select_cases(args), providers, ON_GPU, progress=not args.no_progress)
    if not rows:
        print("nothing to report: no case ran", file=sys.stderr)
        return 1
    first = rows[0]
    print(report.mode_note(first["mode"]))
    print(f"{first['device']} | torch {first['torch']} | triton {first['triton']} | "
          f"fastce {first['fastce']} | commit {first['git_commit']} | {first['date']}\n")
    print(report.text_table(rows))
    for name, note in skipped.items():
        print(f"skipped {name}: {note}")
    # --quick runs go beside the committed full results, never over them (and git ignores them)
    folder = device_folder(first["device"], first["mode"]) + ("-quick" if args.quick else "")
    out_dir = args.out or RESULTS / folder
    paths = report.write(rows, skipped, out_dir)
    print("\nwrote " + ", ".join(str(path) for path in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
