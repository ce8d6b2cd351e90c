"""Benchmarks: conversion against the reference method and the floor, suite wall time, forward time per variant.

Every figure is a whole process, started fresh, timed with ``time.perf_counter`` around it; peak memory is the
child's maximum resident set size from ``resource.getrusage(RUSAGE_CHILDREN)`` (read in a small wrapper process so
each run is measured on its own). Each measurement is repeated and the median is reported, with min and max.

    python benchmarks/bench.py                      # conversion comparison (5 runs) and forward times
    python benchmarks/bench.py --suite              # also the test suite with 1 worker and -n auto, cold and warm
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


def bench_suite(work: Path) -> dict:
    env = {**os.environ, "TIMESFORMER_CONVERT_CACHE": str(work / "suite-cache")}
    results = {}
    for label, workers, cold in (
        ("-n 0, cold", "0", True),
        ("-n auto, cold", "auto", True),
        ("-n auto, warm", "auto", False),
    ):
        if cold:
            shutil.rmtree(work / "suite-cache", ignore_errors=True)
        started = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-n", workers, "-p", "no:cacheprovider"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        results[label] = {
            "seconds": time.perf_counter() - started,
            "exit": run.returncode,
            "summary": run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "",
        }
        builds = list((work / "suite-cache").glob("suite-*/builds.log"))
        results[label]["builds"] = sum(len(p.read_text().splitlines()) for p in builds)
    shutil.rmtree(work / "suite-cache", ignore_errors=True)
    return results


def format_results(results: dict) -> str:
    lines = [f"{results['date']}, {results['machine']}", ""]
    lines.append(
        "| conversion (whole process) | wall s, median (min-max) | peak MiB, median | wall / floor | peak / floor |"
    )
    lines.append("| --- | --- | --- | --- | --- |")
    for name, r in results["conversion"].items():
        lines.append(
            f"| {name} | {r['wall']['median']:.2f} ({r['wall']['min']:.2f}-{r['wall']['max']:.2f}) | "
            f"{r['peak_mib']['median']:.0f} | {r['wall_vs_floor']:.2f} | {r['peak_vs_floor']:.2f} |"
        )
    if results.get("forward"):
        lines += ["", f"| forward, {results['forward_blocks']} blocks, reference model | seconds |", "| --- | --- |"]
        lines += [f"| {shape} | {seconds:.2f} |" for shape, seconds in results["forward"].items()]
    if results.get("suite"):
        lines += ["", "| test suite | seconds | builds | result |", "| --- | --- | --- | --- |"]
        lines += [
            f"| pytest {label} | {r['seconds']:.0f} | {r['builds']} | {r['summary']} |"
            for label, r in results["suite"].items()
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="counted runs per conversion method (default 5)")
    parser.add_argument("--forward-blocks", type=int, default=1, help="blocks in the forward-time model (default 1)")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward timings")
    parser.add_argument("--suite", action="store_true", help="also time the test suite (several minutes)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    results = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    with tempfile.TemporaryDirectory(prefix="timesformer-bench-") as work:
        results["conversion"] = bench_conversion(Path(work), args.runs)
        if not args.no_forward:
            results["forward_blocks"] = args.forward_blocks
            results["forward"] = bench_forward(args.forward_blocks)
        if args.suite:
            results["suite"] = bench_suite(Path(work))
    print(format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
