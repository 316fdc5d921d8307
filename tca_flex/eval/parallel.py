"""Run the suite in worker processes and merge runs.

A small model leaves a GPU nearly idle: a decode step is bound by Python and
kernel-launch overhead on one CPU core, so N processes sharing the GPU get
through about N times as many samples while cores last. Sharding is over
sample seeds: sample ``i`` of every task uses seed ``seed + i`` and
perplexity window ``i`` likewise, whichever process runs it, so a sharded run
yields exactly the records of the serial run (timings aside).

``merge_runs`` also joins runs made separately (e.g. one per length or per
device call), refusing runs whose settings differ or whose records overlap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLL_S = 0.5  # how often the parent looks for finished workers (seconds)

# Arguments that may differ between the runs being merged: which seeds and
# lengths each part ran and where it went, not how samples were evaluated.
SHARD_ARGS = frozenset({"seed", "samples", "ppl_samples", "lengths", "out", "workers", "no_progress", "merge"})


@dataclass(frozen=True)
class Shard:
    """One worker's share: seeds ``seed .. seed + max(samples, ppl_samples) - 1``."""

    seed: int
    samples: int
    ppl_samples: int


def plan_shards(samples: int, ppl_samples: int, seed: int, workers: int) -> list[Shard]:
    """Split sample indices ``0 .. max(samples, ppl_samples) - 1`` into contiguous shards.

    Index ``i`` is a task sample when ``i < samples`` and a perplexity window
    when ``i < ppl_samples``; every index lands in exactly one shard.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n = max(samples, ppl_samples)
    workers = max(1, min(workers, n))
    bounds = [round(k * n / workers) for k in range(workers + 1)]
    shards = [Shard(seed + a, max(0, min(b, samples) - a), max(0, min(b, ppl_samples) - a))
              for a, b in zip(bounds, bounds[1:], strict=False)]
    return [s for s in shards if s.samples or s.ppl_samples]


def _record_key(r: dict[str, Any]) -> tuple:
    return r["kind"], r["length"], r["method"], r["task"], r.get("seed")


def merge_runs(dirs: list[str | Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Records and meta of several ``results.json`` runs of the same settings.

    Raises:
        ValueError: settings differ (other than the seeds, sizes and output
            folder) or two runs hold the same sample.
    """
    if not dirs:
        raise ValueError("nothing to merge: give at least one run folder")
    records: list[dict[str, Any]] = []
    metas: list[dict[str, Any]] = []
    seen: dict[tuple, Path] = {}
    for d in map(Path, dirs):
        path = d / "results.json"
        if not path.is_file():
            raise ValueError(f"{path} not found: merge takes folders written by python -m tca_flex.eval")
        data = json.loads(path.read_text())
        meta = data["meta"]
        if metas:
            first = {k: v for k, v in metas[0]["args"].items() if k not in SHARD_ARGS}
            this = {k: v for k, v in meta["args"].items() if k not in SHARD_ARGS}
            diff = sorted(k for k in first.keys() | this.keys() if first.get(k) != this.get(k))
            if diff or meta.get("tca_config") != metas[0].get("tca_config"):
                raise ValueError(f"{d} was run with other settings than {dirs[0]} ({diff or ['tca_config']}); "
                                 "merge only parts of one run")
        for r in data["records"]:
            key = _record_key(r)
            if key in seen:
                raise ValueError(f"{d} and {seen[key]} both hold {key}: their seeds overlap")
            seen[key] = d
        records += data["records"]
        metas.append(meta)
    meta = {k: v for k, v in metas[0].items() if k not in ("wall_s", "args", "parts", "workers")}
    meta["args"] = {k: v for k, v in metas[0]["args"].items() if k not in SHARD_ARGS}
    meta["args"]["lengths"] = sorted({n for m in metas for n in m["args"]["lengths"]})
    meta["parts"] = [part for d, m in zip(dirs, metas, strict=True) for part in _parts(d, m)]
    return records, meta


def _parts(run: str | Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """What each process of a run covered (a merged run lists its own parts)."""
    if "parts" in meta:
        return meta["parts"]
    a = meta["args"]
    return [{"dir": str(run), "lengths": a["lengths"], "seed": a["seed"], "samples": a["samples"],
             "ppl_samples": a["ppl_samples"], "wall_s": meta.get("wall_s"), "workers": meta.get("workers", 1)}]


def run_workers(argv: list[str], shards: list[Shard], out: Path, progress: bool = True) -> list[Path]:
    """Run ``python -m tca_flex.eval argv`` once per shard, concurrently; returns their folders.

    Each worker gets an equal share of the CPU threads and writes
    ``out/parts/<k>/`` (``log.txt`` holds its output); ``progress`` shows a bar
    of finished workers (each worker's own bars would interleave).

    Raises:
        RuntimeError: a worker failed (the tail of its log is included).
    """
    threads = str(max(1, (os.cpu_count() or 1) // len(shards)))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    procs = []
    for k, shard in enumerate(shards):
        part = out / "parts" / str(k)
        part.mkdir(parents=True, exist_ok=True)
        # argparse keeps the last value of a repeated option, so the shard's settings win.
        cmd = [sys.executable, "-m", "tca_flex.eval", *argv, "--workers", "1", "--no-progress",
               "--seed", str(shard.seed), "--samples", str(shard.samples),
               "--ppl-samples", str(shard.ppl_samples), "--out", str(part)]
        log = open(part / "log.txt", "w")  # noqa: SIM115 - closed below, after the worker exits
        procs.append((part, log, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)))
    failed = []
    pending = list(procs)
    with _bar(len(procs), progress) as bar:
        while pending:
            for item in [it for it in pending if it[2].poll() is not None]:
                part, log, proc = item
                pending.remove(item)
                log.close()
                bar.update(1)
                if proc.returncode != 0:
                    failed.append(part)
            if failed:  # the merge needs every part: stop the others now
                for _, log, proc in pending:
                    proc.terminate()
                    proc.wait()
                    log.close()
                break
            time.sleep(POLL_S)
    if failed:
        tails = "\n".join(f"--- {p}/log.txt\n" + (p / "log.txt").read_text()[-2000:] for p in failed)
        raise RuntimeError(f"{len(failed)} of {len(procs)} workers failed (the others were stopped):\n{tails}")
    return [p for p, _, _ in procs]


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="workers finished", disable=not enabled)
