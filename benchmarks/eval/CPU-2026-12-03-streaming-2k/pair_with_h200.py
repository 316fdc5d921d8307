"""TCA - StreamingLLM at 2K, paired by seed: the H200 runs' seeds 0-19 (TCA from the shipped-path run,
StreamingLLM from the 2026-12-02 baselines run), this folder's CPU seeds 20-29, and both together.
Run from the repository root:
python benchmarks/eval/CPU-2026-12-03-streaming-2k/pair_with_h200.py \
    benchmarks/eval/CPU-2026-12-03-streaming-2k/2k-stream-s2{0,5}/results.json"""
import json, sys
from tca_flex.eval.report import paired_difference
def load(p): return json.load(open(p))['records']
def norm(rs, keep_seeds=None):
    out=[]
    for r in rs:
        if r.get('kind')!='task' or r['length']!=2048: continue
        if keep_seeds is not None and r['seed'] not in keep_seeds: continue
        m=r['method']
        if m.startswith('tca_mask'): continue
        if m.startswith('tca['): m='tca'
        elif m.startswith('streaming'): m='streaming'
        elif m!='dense': continue
        out.append({**r,'method':m})
    return out
gpu=norm(load('benchmarks/eval/H200-2026-12-03-real-50/results.json'), set(range(20)))
gst=norm(load('benchmarks/eval/H200-2026-12-02-n20/main/results.json'), set(range(20)))
gpu=[r for r in gpu if r['method']=='tca']+[r for r in gst if r['method']=='streaming']
print('gpu', paired_difference(gpu,2048,'tca','streaming'))
cpu=[]
for p in sys.argv[1:]:
    cpu+=norm(load(p))
print('cpu', paired_difference(cpu,2048,'tca','streaming'), 'tca-dense', paired_difference(cpu,2048,'tca','dense'))
print('all', paired_difference(gpu+cpu,2048,'tca','streaming'))
