"""Tabulate the runs of a folder together (they differ in methods and environment, so
`--merge` refuses them), writing the report into that folder:
python benchmarks/eval/CPU-2026-12-02-kvpress-equal-kv/combine.py [FOLDER]   # default: this one"""
import json
import sys
from pathlib import Path

from tca_flex.eval.report import write_reports

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
runs = sorted(p.parent for p in here.glob("*/results.json"))
records, sources = [], []
for run in runs:
    data = json.loads((run / "results.json").read_text())
    records += data["records"]
    m = data["meta"]
    sources.append({"dir": run.name, "methods": m["args"]["methods"], "keep": m["args"]["keep"],
                    "budgets": m["args"]["budgets"], "transformers": m.get("transformers"),
                    "kvpress": m.get("kvpress"), "torch": m.get("torch"), "wall_s": m.get("wall_s")})
meta = {"combined_from": sources}
print(write_reports(here, records, meta)[1])
