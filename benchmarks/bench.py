"""Benchmarks: conversion against the reference method and the floor, suite wall time, forward time per variant.

Every figure is a whole process, started fresh, timed with ``time.perf_counter`` around it; peak memory is the
child's maximum resident set size from ``resource.getrusage(RUSAGE_CHILDREN)`` (read in a small wrapper process so
each run is measured on its own). Each measurement is repeated and the median is reported, with min and max.

    python benchmarks/bench.py                      # conversion comparison (5 runs) and forward times
    python benchmarks/bench.py --suite              # also the test suite under -n auto: 3 x (cold, then warm)
    python benchmarks/bench.py --suite --one-worker --no-conversion --no-forward   # the suite only, with -n 0 too
    python benchmarks/bench.py --json out.json      # write the results as JSON too

The three conversion methods, all on the same full-size synthetic base checkpoint (486 MB):
- reference: the old script's method: unpickle the whole file, build a randomly initialised transformers model,
  ``load_state_dict``, ``save_pretrained``;
- floor: import torch and transformers' TimeSformer, load the file memory-mapped, write its tensors with
  ``safetensors.torch.save_file``; no checks at all, the least any converter checking against transformers does;
- this project: the ``timesformer-convert convert`` CLI, with the variant declared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANT = "timesformer-base-finetuned-k400"

sys.path.insert(0, str(ROOT))
from tests.buildlog import builds_since  # noqa: E402  (the suite's record of what it built)

REFERENCE_METHOD = textwrap.dedent(
    """
    import sys, torch
    from transformers import TimesformerConfig, TimesformerForVideoClassification
    from timesformer_convert.rules import rename_keys
    source, out = sys.argv[1], sys.argv[2]
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    state_dict = checkpoint["model_state"]
    mapping = rename_keys(state_dict)
    model = TimesformerForVideoClassification(TimesformerConfig(num_labels=400))
    model.load_state_dict({mapping[k]: v for k, v in state_dict.items()})
    model.save_pretrained(out)
    """
)

FLOOR = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    from transformers.models.timesformer import modeling_timesformer
    source, out = sys.argv[1], sys.argv[2]
    state_dict = torch.load(source, map_location="cpu", weights_only=True, mmap=True)["model_state"]
    save_file(state_dict, out + ".safetensors")
    """
)

# Runs one command and prints its own wall time and the peak RSS of its child, so each figure belongs to one run.
MEASURE = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    started = time.perf_counter()
    code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"wall": wall, "peak_mib": peak_kib / 1024, "code": code.returncode, "err": code.stderr[-400:]}))
    """
)


def measure(command: list[str], runs: int, before=None) -> dict:
    """Run ``command`` ``runs`` times (after one warm-up) and return min/median/max of wall time and peak memory."""
    samples = []
    for index in range(runs + 1):
        if before:
            before()
        result = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True)
        sample = json.loads(result.stdout)
        if sample["code"] != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {sample['err']}")
        if index:
            samples.append(sample)
    return {
        key: {
            "min": min(s[key] for s in samples),
            "median": statistics.median(s[key] for s in samples),
            "max": max(s[key] for s in samples),
        }
        for key in ("wall", "peak_mib")
    }


def synthetic_checkpoint(work: Path) -> Path:
    from timesformer_convert.variants import VARIANTS
    from timesformer_convert.verify import variant_shape, write_synthetic_checkpoint

    return write_synthetic_checkpoint(variant_shape(VARIANTS[VARIANT]), work / f"{VARIANT}.pyth")


def bench_conversion(work: Path, runs: int) -> dict:
    source = synthetic_checkpoint(work)
    out = work / "out"

    def clear():
        shutil.rmtree(out, ignore_errors=True)
        Path(f"{out}.safetensors").unlink(missing_ok=True)

    cli = shutil.which("timesformer-convert") or "timesformer-convert"
    methods = {
        "reference method": [sys.executable, "-c", REFERENCE_METHOD, str(source), str(out)],
        "floor": [sys.executable, "-c", FLOOR, str(source), str(out)],
        "timesformer-convert": [cli, "convert", str(source), "--out", str(out), "--variant", VARIANT, "--overwrite"],
    }
    results = {name: measure(command, runs, before=clear) for name, command in methods.items()}
    clear()
    floor = results["floor"]
    for result in results.values():
        result["wall_vs_floor"] = result["wall"]["median"] / floor["wall"]["median"]
        result["peak_vs_floor"] = result["peak_mib"]["median"] / floor["peak_mib"]["median"]
    return results


FORWARD = textwrap.dedent(
    """
    import json, sys, time, torch
    from timesformer_convert.variants import VARIANTS
    from timesformer_convert.verify import native_clip, shallow, variant_shape
    from timesformer_convert.reference import ReferenceTimeSformer
    variant, blocks = VARIANTS[sys.argv[1]], int(sys.argv[2])
    shape = shallow(variant_shape(variant), blocks)
    model = ReferenceTimeSformer(shape).eval()
    clip = native_clip(shape)
    with torch.no_grad():
        model(clip)
        started = time.perf_counter()
        model(clip)
    print(json.dumps({"seconds": time.perf_counter() - started}))
    """
)


def bench_forward(blocks: int) -> dict:
    from timesformer_convert.variants import VARIANTS

    seen, results = set(), {}
    for variant in VARIANTS.values():
        key = (variant.num_frames, variant.image_size)
        if key in seen:
            continue
        seen.add(key)
        run = subprocess.run(
            [sys.executable, "-c", FORWARD, variant.name, str(blocks)], capture_output=True, text=True, check=True
        )
        results[f"{variant.num_frames} frames x {variant.image_size} px"] = json.loads(run.stdout)["seconds"]
    return results


def run_suite(cache: Path, workers: str) -> dict:
    """One ``pytest -n WORKERS`` run of the whole suite on the cache folder ``cache``: wall time, result line, and
    how many artifacts it built (from the suite's builds.log)."""
    env = {**os.environ, "TIMESFORMER_CONVERT_CACHE": str(cache)}
    begun = time.time()
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", workers, "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    built = sum(len(builds_since(folder, begun)) for folder in cache.glob("suite-*"))
    lines = run.stdout.strip().splitlines()
    return {"seconds": seconds, "exit": run.returncode, "builds": built, "summary": lines[-1] if lines else ""}


def bench_suite(work: Path, rounds: int, one_worker: bool) -> dict:
    """Cold (empty cache) then warm runs of the suite under ``-n auto``, ``rounds`` times; optionally one cold run
    with a single process."""
    cache = work / "suite-cache"
    runs: dict[str, list[dict]] = {"-n auto, cold": [], "-n auto, warm": []}
    if one_worker:
        runs = {"-n 0, cold": [], **runs}
        shutil.rmtree(cache, ignore_errors=True)
        runs["-n 0, cold"].append(run_suite(cache, "0"))
    for _ in range(rounds):
        shutil.rmtree(cache, ignore_errors=True)
        runs["-n auto, cold"].append(run_suite(cache, "auto"))
        runs["-n auto, warm"].append(run_suite(cache, "auto"))
    shutil.rmtree(cache, ignore_errors=True)
    results = {}
    for label, done in runs.items():
        seconds = sorted(run["seconds"] for run in done)
        results[label] = {
            "seconds": {"median": statistics.median(seconds), "min": seconds[0], "max": seconds[-1]},
            "runs": done,
        }
    cold, warm = (results[label]["seconds"]["median"] for label in ("-n auto, cold", "-n auto, warm"))
    results["warm / cold"] = warm / cold
    return results


def format_results(results: dict) -> str:
    lines = [f"{results['date']}, {results['machine']}"]
    if results.get("conversion"):
        lines += [
            "",
            "| conversion (whole process) | wall s, median (min-max) | peak MiB, median | wall / floor "
            "| peak / floor |",
            "| --- | --- | --- | --- | --- |",
        ]
    for name, r in results.get("conversion", {}).items():
        lines.append(
            f"| {name} | {r['wall']['median']:.2f} ({r['wall']['min']:.2f}-{r['wall']['max']:.2f}) | "
            f"{r['peak_mib']['median']:.0f} | {r['wall_vs_floor']:.2f} | {r['peak_vs_floor']:.2f} |"
        )
    if results.get("forward"):
        lines += ["", f"| forward, {results['forward_blocks']} blocks, reference model | seconds |", "| --- | --- |"]
        lines += [f"| {shape} | {seconds:.2f} |" for shape, seconds in results["forward"].items()]
    if results.get("suite"):
        suite = results["suite"]
        lines += ["", "| test suite | wall s, median (min-max) | built per run | result |"]
        lines.append("| --- | --- | --- | --- |")
        for label, r in suite.items():
            if label == "warm / cold":
                continue
            s = r["seconds"]
            built = sorted({run["builds"] for run in r["runs"]})
            lines.append(
                f"| pytest {label} ({len(r['runs'])} runs) | {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) | "
                f"{', '.join(map(str, built))} | {r['runs'][-1]['summary']} |"
            )
        lines += ["", f"warm / cold (medians, -n auto): {suite['warm / cold']:.2f}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="counted runs per conversion method (default 5)")
    parser.add_argument("--forward-blocks", type=int, default=1, help="blocks in the forward-time model (default 1)")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward timings")
    parser.add_argument("--suite", action="store_true", help="also time the test suite, cold and warm (minutes)")
    parser.add_argument("--suite-rounds", type=int, default=3, help="cold + warm suite runs to take medians of")
    parser.add_argument("--one-worker", action="store_true", help="with --suite, also one cold run with -n 0")
    parser.add_argument("--no-conversion", action="store_true", help="skip the conversion timings")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    with tempfile.TemporaryDirectory(prefix="timesformer-bench-") as work:
        if not args.no_conversion:
            results["conversion"] = bench_conversion(Path(work), args.runs)
        if not args.no_forward:
            results["forward_blocks"] = args.forward_blocks
            results["forward"] = bench_forward(args.forward_blocks)
        if args.suite:
            results["suite"] = bench_suite(Path(work), args.suite_rounds, args.one_worker)
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
