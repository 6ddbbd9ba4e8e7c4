"""QA-LoRA on the tiny model family: what merging an adapter into a 4/3/2-bit base costs,
per skill, as a markdown table (the one pasted in docs/qalora.md).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/qalora_quality.py [--zoo DIR] [--limit N]
        [--bits 4 3 2] [--group 8] [--steps 4000] [--lr 1e-2] [--rank 16] [--init converted]
        [--synthetic 1024] [--select accuracy] [--patience 80]
        [--skills caesar date]

Per skill (the LoRA trained on tiny-llama-3.0) and bit width, four models, scored on the
skill's test split (exact match of greedy completions, and perplexity = exp(mean completion
loss)):
- fp merged: the fp32 base + the LoRA (no quantization: the ceiling);
- naive: W + B@A merged in fp32, then quantized (round to nearest, same bits and group);
- QA-LoRA conv.: the base quantized, the LoRA projected to its best group-constant form
  (`to_qalora`) and merged into the zero points;
- QA-LoRA rec.: a QA-LoRA student (`student_adapter`: --init, --rank) on the frozen quantized
  base, distilled by `recover` from the fp merged model (the teacher): --synthetic task inputs
  from Trans-LoRA's generate/filter stages answered by the teacher, plus the 16 seed examples;
  cross-entropy on the completions + KL to the teacher on every position; early stop on the
  seeds; then merged into the zero points. `--synthetic 0` trains on the seeds alone.
"exact" is the largest |logit| difference between each merged QA-LoRA model and the quantized
base running the QA-LoRA unmerged (the merge is exact up to float rounding). The last lines
measure the size of a 4-bit g64 14336 x 4096 expert in our packed file against bf16 safetensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters_ops import qalora as Q  # noqa: E402
from adapters_ops import zoo  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402
from adapters_ops.evaluate import evaluate_model, load_model, load_tokenizer, read_examples  # noqa: E402


def score(model, tok, examples) -> tuple[float, float]:
    r = evaluate_model(model, tok, examples)
    return r.accuracy, float(torch.tensor(r.loss).exp())


@torch.inference_mode()
def merge_gap(qm, qa, tok, examples) -> float:
    """max |logits(merged) - logits(quantized base + QA-LoRA unmerged)| on a few test prompts."""
    unmerged = qm.to_model()
    Q.attach_qalora(unmerged, qa)
    unmerged.eval()
    merged = qm.merge(qa).to_model()
    enc = tok([ex["prompt"] + ex["completion"] for ex in examples[:8]], return_tensors="pt", padding=True)
    a = merged(**enc).logits.float()
    b = unmerged(**enc).logits.float()
    return float((a - b).abs().max())


def expert_size(rows: int = 14336, cols: int = 4096, group: int = 64) -> tuple[int, int]:
    """File bytes of one 4-bit g64 expert in our format, and of the same weight as bf16 safetensors."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    parts = []
    for start in range(0, rows, 2048):  # row blocks keep the peak memory small
        w = torch.randn(min(2048, rows - start), cols, generator=gen) * 0.02
        parts.append(Q.quantize_weight(w, 4, group))
    qw = Q.QuantizedWeight(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), 4, group)
    with tempfile.TemporaryDirectory() as tmp:
        qm = Q.QuantizedModel({}, Q.QuantSpec(4, group), {"model.layers.0.mlp.experts.0.down_proj.weight": qw}, {})
        qm.save(tmp)
        ours = (Path(tmp) / Q.QUANT_FILE).stat().st_size
        w = torch.randn(rows, cols, generator=gen).bfloat16()
        save_file({"w": w}, str(Path(tmp) / "bf16.safetensors"))
        bf16 = (Path(tmp) / "bf16.safetensors").stat().st_size
    return ours, bf16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", help="a built zoo folder (default: the cached one, built if needed)")
    ap.add_argument("--base", default="tiny-llama-3.0")
    ap.add_argument("--skills", nargs="*", help="default: every skill with an adapter")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--group", type=int, default=8, help="8: hidden 128 -> 16 groups a row")
    ap.add_argument("--steps", type=int, default=4000,
                    help="most recovery steps (early stop on the seeds); 0: no recovery (column n/m)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16, help="QA-LoRA rank of the student")
    ap.add_argument("--init", choices=("converted", "fresh"), default="converted")
    ap.add_argument("--ce", type=float, default=1.0, help="weight of the cross-entropy on the completions")
    ap.add_argument("--kl", type=float, default=1.0, help="weight of the KL to the teacher")
    ap.add_argument("--patience", type=int, default=80, help="seed checks (every 50 steps) without progress")
    ap.add_argument("--select", choices=Q.SELECTIONS, default="accuracy",
                    help="seed score that picks the kept state: loss, or exact match (ties: later state)")
    ap.add_argument("--synthetic", type=int, default=1024, help="synthetic inputs requested (0: seeds only)")
    ap.add_argument("--limit", type=int, default=100, help="test examples per skill")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-size", action="store_true", help="skip the expert size measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    root = Path(args.zoo) if args.zoo else zoo.ensure_built()
    base = root / "bases" / args.base
    skills = args.skills or sorted(p.name for p in (root / "adapters").iterdir() if p.is_dir())
    tok = load_tokenizer(base)
    qbase = {bits: Q.quantize_base(base, bits, args.group) for bits in args.bits}

    rcfg = Q.RecoveryConfig(steps=args.steps, lr=args.lr, batch_size=args.batch, ce_weight=args.ce,
                            kl_weight=args.kl, init=args.init, rank=args.rank, patience=args.patience,
                            select=args.select)
    hidden = next(iter(qbase.values())).config["hidden_size"]
    print(f"# QA-LoRA on {args.base}, group {args.group} ({hidden // args.group} groups a row of hidden {hidden}), "
          f"recovery: {args.init} init, rank {args.rank}, <= {args.steps} steps (lr {args.lr}, batch {args.batch}, "
          f"ce {args.ce} + kl {args.kl}) on {args.synthetic} synthetic inputs + the seeds, early stop on the seeds "
          f"by {args.select} (patience {args.patience} x 50 steps); {args.limit} test examples per skill, {args.threads} threads")
    for bits, qm in qbase.items():
        s = qm.summary()
        print(f"# base {bits}-bit: {bits + 32 / args.group:g} bits a weight, mean relative weight error "
              f"{s['mean_rel_error']:.4f} over {s['layers']} layers")
    print()
    print("| skill | bits | fp merged | naive merge->quant | QA-LoRA conv. | QA-LoRA rec. | conv. error | exact "
          "| rec. steps (best/run) | rec. s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for skill in skills:
        adapter = Adapter.load(root / "adapters" / skill)
        test = read_examples(root / "tasks" / skill / "test.jsonl")[:args.limit]
        seeds = read_examples(root / "tasks" / skill / "seed.jsonl")
        teacher = load_model(base, adapter)
        fp = score(teacher, tok, test)
        qa, conv = Q.to_qalora(adapter, args.group)
        data = seeds
        if args.synthetic and args.steps:
            syn, info = Q.synthetic_examples(base, adapter, seeds, n=args.synthetic)
            data = syn + seeds
            print(f"# {skill}: {len(syn)} synthetic examples ({info['generate']['by_generator']}, "
                  f"{info['filter']['kept']} kept by the filter, {info['label']['labelled']} labelled)", flush=True)
        student = Q.student_adapter(adapter, args.group, init=args.init, rank=args.rank)
        for bits, qm in qbase.items():
            naive = score(Q.naive_merge_quantize(base, adapter, bits, args.group).to_model(), tok, test)
            converted = score(qm.merge(qa).to_model(), tok, test)
            if args.steps:
                rec, rep = Q.recover(qm, student, data, teacher=teacher, tokenizer=tok, config=rcfg,
                                     eval_examples=seeds)
                recovered = score(qm.merge(rec).to_model(), tok, test)
                gap = max(merge_gap(qm, qa, tok, test), merge_gap(qm, rec, tok, test))
                steps = f"{rep['best_step']}/{rep['steps_run']} | {rep['seconds']:.0f}"
            else:  # --steps 0: no recovery run, the column says so
                recovered, gap, steps = None, merge_gap(qm, qa, tok, test), "- | -"
            cells = ["n/m" if c is None else f"{c[0]:.2f} (ppl {c[1]:.3f})" for c in (fp, naive, converted, recovered)]
            print(f"| {skill} | {bits} | " + " | ".join(cells) + f" | {conv['rel_error']:.3f} | {gap:.1e} "
                  f"| {steps} |", flush=True)
    if not args.no_size:
        ours, bf16 = expert_size()
        print(f"\n# size of a 14336 x 4096 expert: bf16 safetensors {bf16 / 2**20:.1f} MiB, 4-bit g64 packed "
              f"{ours / 2**20:.1f} MiB -> {bf16 / ours:.2f}x smaller")
    print(f"# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
