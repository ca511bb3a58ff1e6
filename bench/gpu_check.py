"""The GPU check: what the first GPU sweep depends on, in one script (<= 8 minutes on one H200).

Random-init models only (no hub, no download). Sections, each timed and reported PASS/FAIL/SKIP:
  A  fp64 matmul throughput; eigh in fp32 and fp64 on a rank-deficient 8192^2 Gram; low-rank's projector on it
  B  every selection path (5 rules x protect on/0 x global, matrix, row, nm, head; ties=topk; order=bottom;
     dense and compact score sets) on the device, equal to its CPU result
  C  a model split over two devices with accelerate's hooks (two GPUs, else cuda:0 + CPU): checkpointing
     keeps the hooks; SNIP, Wanda, selection, masks and low-rank across the split equal one device's
  D  tiny end-to-end `harmsweep` runs on the device: magnitude, random, low-rank, Wanda, sequential with
     replace=base, head with a dense store, gradient checkpointing
  E  Llama-3.1-8B-shaped bf16: padded 8 x 256 SNIP (peak vs the planner, goal within 15%), the compact
     write from the GPU vs from host memory (first 4 layers' scores), Wanda peak, low-rank on two blocks,
     perplexity peak at conf/eval/gpu.yaml's sizes
  F  vLLM (if installed): HF and vLLM agree before and after a mask and after a dense change; the engine's
     memory is handed back before HF forwards
A failing section never stops the others. Prints one table, writes outputs/bench/gpu_check.json, and
exits 1 if any section failed.

    python bench/gpu_check.py                   # on a GPU machine
    python bench/gpu_check.py --smoke           # CPU-sized models on the CPU: checks the script (tests do this)
    python bench/gpu_check.py --smoke --only B  # some sections; --fail-section X breaks X on purpose
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the table
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch
from gpu_check_sections import TINY, Ctx, Skip, build, check, scored, section_c, section_d, section_e, timed, tmpdir

FAIL_ENV = "HARMSWEEP_GPU_CHECK_FAIL"  # comma-separated sections to break on purpose (the test's hook)


# ---------------------------------------------------------------- A: fp64 and eigh


def section_a(ctx: Ctx) -> dict[str, Any]:
    from harmsweep.pruning.lowrank import projector

    dev, n = ctx.device, 256 if ctx.smoke else 8192
    torch.manual_seed(0)
    a = torch.randn(n, n, dtype=torch.float64, device=dev)
    a @ a  # warm-up
    _, seconds = timed(lambda a=a: a @ a, dev)
    out: dict[str, Any] = {"n": n, "fp64_tflops": 2 * n**3 / seconds / 1e12}
    x = torch.randn(n, n // 2, dtype=torch.float64, device=dev)
    gram = x @ x.T  # rank n/2: half its eigenvalues are zero up to rounding
    del a, x
    for dtype, tol in ((torch.float32, 1e-3), (torch.float64, 1e-9)):
        g = gram.to(dtype)
        (w, v), seconds = timed(lambda g=g: torch.linalg.eigh(g), dev)
        name = str(dtype).removeprefix("torch.")
        rel = float(((v * w) @ v.T - g).norm() / g.norm())
        rank = int((w > w.max() * (1e-4 if dtype == torch.float32 else 1e-10)).sum())
        out[f"eigh_{name}_s"], out[f"eigh_{name}_residual"], out[f"eigh_{name}_rank"] = seconds, rel, rank
        check(bool(torch.isfinite(w).all()) and rel < tol, f"eigh {name}: residual {rel:.2e} (tolerance {tol:g})")
        check(abs(rank - n // 2) <= n // 100, f"eigh {name}: numerical rank {rank}, not {n // 2}")
        del g, w, v
    weight = torch.randn(n, n, device=dev)
    p, out["projector_s"] = timed(lambda: projector(weight, gram.float(), 16), dev)
    trace = float(p.trace())
    out["projector_trace"] = trace
    check(bool(torch.isfinite(p).all()) and abs(trace - 16) < 0.1, f"projector on the Gram: trace {trace}, not 16")
    return out


# ---------------------------------------------------------------- B: every selection path, device vs CPU


def selection_specs() -> list[Any]:
    from harmsweep.pruning.spec import GRANULARITIES, RULES, PruneSpec

    specs = []
    for rule in RULES:
        for protect in (0.01, 0.0):
            for gran in GRANULARITIES:
                specs.append(PruneSpec(rule=rule, protect=protect, granularity=gran,
                                       sparsity=0.25 if gran == "head" else 0.01, seed=3))  # fmt: skip
            specs.append(PruneSpec(rule=rule, protect=protect, granularity="matrix", ties="topk", sparsity=0.01))
            specs.append(PruneSpec(rule=rule, protect=protect, order="bottom", sparsity=0.01))
    return specs


def section_b(ctx: Ctx) -> dict[str, Any]:
    from harmsweep.pruning.select import select
    from harmsweep.scoring import store, writer
    from harmsweep.scoring.spec import StoreSpec

    dev = ctx.device
    model = build({**TINY, "num_hidden_layers": 1} if ctx.smoke else TINY, torch.float32, "cpu")  # --smoke: 7 matrices
    params = scored(model)
    weights = {n: p.detach() for n, p in model.named_parameters() if n in params}
    g = torch.Generator().manual_seed(1)
    kinds = ("harm", "benign", "harm_unsigned", "benign_unsigned")
    dense = {k: {n: torch.randn(w.shape, generator=g) for n, w in weights.items()} for k in kinds}
    for k in ("harm_unsigned", "benign_unsigned"):
        dense[k] = {n: t.abs() for n, t in dense[k].items()}
    rows = {n: p.rows_dim for n, p in params.items()}
    compact: dict[str, dict[str, Any]] = {}
    for unit in ("global", "matrix", "row"):
        compact[unit] = {}
        for k in kinds[:3]:  # benign_unsigned is read by benign_importance=unsigned only (dense here)
            path = ctx.tmp / f"b_{k}_{unit}.safetensors"
            writer.write(dense[k], path, k, StoreSpec(keep=0.2, keep_benign=0.2), unit=unit, order=store.order_of(k),
                        rows_dims=rows)  # fmt: skip
            compact[unit][k] = store.open_scores(path)
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]

    def on(device: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        w = {n: t.clone().to(device) for n, t in weights.items()}
        return w, {k: {n: t.clone().to(device) for n, t in s.items()} for k, s in dense.items()}

    failures, paths, seconds = [], 0, 0.0
    for spec in selection_specs():
        label = f"{spec.rule}/protect={spec.protect}/{spec.granularity}/ties={spec.ties}/order={spec.order}"
        try:
            ref = select(spec, params, *on("cpu"), device="cpu", head_dim=head_dim)
            sets = [("dense", on(dev))] if dev != "cpu" else []  # on the CPU the reference is that run
            unit = "matrix" if spec.ties == "topk" else spec.granularity
            if spec.needed_scores() and not spec.reads_every_score() and unit in compact:
                sets.append(("compact", (on(dev)[0], compact[unit])))
            for kind, (w, s) in sets:
                paths += 1
                got, t = timed(
                    lambda w=w, s=s, spec=spec: select(spec, params, w, s, device=dev, head_dim=head_dim), dev
                )
                seconds += t
                same = got.keys() == ref.keys() and all(torch.equal(got[n].cpu(), ref[n].cpu()) for n in ref)
                if not same:
                    failures.append(f"{label}/{kind}: differs from CPU")
        except Exception as exc:  # every path is reported, not only the first
            failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    check(not failures, f"{len(failures)} paths failed: " + " | ".join(failures[:8]))
    return {"paths": paths, "specs": len(selection_specs()), "select_s": seconds}


# ---------------------------------------------------------------- F: vLLM against HF


def section_f(ctx: Ctx) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise Skip("no CUDA device: vLLM needs a GPU")
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise Skip("vLLM is not installed") from None
    import yaml

    from harmsweep.generation import vllm as engine
    from harmsweep.generation.hf import generate
    from harmsweep.generation.sampling import Sampling
    from harmsweep.models.loading import build_tiny
    from harmsweep.pruning.masks import pruned

    spec = yaml.safe_load((common.ROOT / "conf" / "model" / "tiny_llama.yaml").read_text())["variants"]["aligned"]
    lm = build_tiny(dict(spec["tiny"]), torch.float32)
    model, tok = lm.model.to("cuda").eval(), lm.tokenizer
    model.generation_config.eos_token_id = None  # random weights: the full length every time
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 250, (12 + i,), generator=g).tolist() for i in range(8)]
    sampling = Sampling(max_new_tokens=16)
    free0 = torch.cuda.mem_get_info()[0]
    out: dict[str, Any] = {"free_before_engine": free0}

    def agree(mask: Any, fingerprint: str, what: str) -> float:
        theirs = engine.generate_vllm(model, tok, prompts, sampling, lm.source, fingerprint, mask)
        engine.sleep_engine()
        free = torch.cuda.mem_get_info()[0]
        out[f"free_after_sleep_{what}"] = free
        check(free >= free0 - 4 * 2**30, f"{what}: {(free0 - free) / 2**30:.1f} GiB still held by the asleep engine")
        ours = generate(model, tok, prompts, sampling, batch_size=len(prompts))
        same = sum(a[: len(b)] == b[: len(a)] for a, b in zip(ours, theirs, strict=True)) / len(prompts)
        out[f"agree_{what}"] = same
        return same

    try:
        check(agree(None, lm.fingerprint, "before") >= 0.75, "HF and vLLM disagree before pruning")
        named = dict(model.named_parameters())
        mask = {n: torch.randperm(named[n].numel(), generator=g)[: named[n].numel() // 20].sort().values
                for n in scored(model)}  # fmt: skip
        with pruned(model, mask):
            check(agree(mask, lm.fingerprint, "mask") >= 0.75, "HF and vLLM disagree after a mask")
        with torch.no_grad():
            for n in scored(model):
                named[n].mul_(0.9)  # a dense change: no mask describes it
        check(agree(None, lm.fingerprint + "-dense", "dense") >= 0.75, "HF and vLLM disagree after a dense change")
    finally:
        engine.release_engine()
    return out


# ---------------------------------------------------------------- the runner

SECTIONS: dict[str, tuple[str, Callable[[Ctx], dict[str, Any]]]] = {
    "A": ("fp64 throughput, eigh fp32/fp64 on a rank-deficient Gram", section_a),
    "B": ("every selection path on the device == CPU", section_b),
    "C": ("model split over two devices (hooks, SNIP, Wanda, masks, low-rank)", section_c),
    "D": ("tiny end-to-end runs on the device", section_d),
    "E": ("Llama-3.1-8B-shaped: SNIP vs plan, write, Wanda, low-rank, perplexity", section_e),
    "F": ("vLLM vs HF: before/after a mask, a dense change; memory back", section_f),
}


def run_section(key: str, ctx: Ctx, broken: set[str]) -> dict[str, Any]:
    """One section's status, reason, seconds and figures; never raises."""
    title, fn = SECTIONS[key]
    start = time.perf_counter()
    row: dict[str, Any] = {"title": title}
    try:
        if key in broken:
            raise RuntimeError(f"deliberately broken (--fail-section / {FAIL_ENV})")
        row.update(status="PASS", reason="", figures=fn(ctx))
    except Skip as exc:
        row.update(status="SKIP", reason=str(exc))
    except Exception as exc:  # a failed section is recorded; the others still run
        tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]
        row.update(status="FAIL", reason=f"{type(exc).__name__}: {str(exc)[:300]}", traceback=tail)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def summary(row: dict[str, Any]) -> str:
    """The figures worth a glance, in one cell."""
    if row["status"] != "PASS":
        return row["reason"]
    f = row["figures"]
    gib = lambda b: "n/a" if b is None else f"{b / 2**30:.1f} GiB"  # noqa: E731
    if "fp64_tflops" in f:
        return (f"fp64 {f['fp64_tflops']:.1f} TFLOP/s; eigh {f['n']}^2 fp32 {f['eigh_float32_s']:.2f} s, "
                f"fp64 {f['eigh_float64_s']:.2f} s")  # fmt: skip
    if "snip_peak" in f:
        r = lambda k: "" if f[f"{k}_ratio"] is None else f" = {f[f'{k}_ratio']:.2f} x plan"  # noqa: E731
        return (f"SNIP {f['snip_s']:.1f} s peak {gib(f['snip_peak'])}{r('snip')}; select {f['select_scores']:.2e} "
                f"scores {f['select_s']:.1f} s; write dev "
                f"{f['write_device_s']:.1f} s host {f['write_host_s']:.1f} s; Wanda {gib(f['wanda_peak'])}{r('wanda')}; "
                f"low-rank {f['lowrank_s']:.1f} s {gib(f['lowrank_peak'])}{r('lowrank')}; "
                f"ppl {gib(f['perplexity_peak'])}{r('perplexity')}")  # fmt: skip
    return ", ".join(f"{k}={v}" for k, v in f.items() if not isinstance(v, dict))[:200]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU-sized models on the CPU (checks the script)")
    p.add_argument("--only", default="".join(SECTIONS), help="sections to run, e.g. BCE")
    p.add_argument("--fail-section", default="", help="break these sections on purpose (checks the runner)")
    p.add_argument("--out", default=str(common.ROOT / "outputs" / "bench" / "gpu_check.json"))
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --smoke to check the script on the CPU)", file=sys.stderr)
        return 2
    broken = set(f"{args.fail_section},{os.environ.get(FAIL_ENV, '')}".upper()) - {","}
    record: dict[str, Any] = {"machine": common.machine(), "smoke": args.smoke, "device": device}
    if device == "cuda":
        record.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                      gpu_total_bytes=torch.cuda.get_device_properties(0).total_memory)  # fmt: skip
    record["sections"] = {}
    start = time.perf_counter()
    for key in [k for k in SECTIONS if k in args.only.upper()]:
        with tmpdir() as tmp:
            row = run_section(key, Ctx(device=device, smoke=args.smoke, tmp=Path(tmp)), broken)
        record["sections"][key] = row
        print(f"[{key}] {row['status']} {row['seconds']:.1f} s  {row['title']}", flush=True)
        if row["status"] == "FAIL":
            print(row["traceback"], file=sys.stderr, flush=True)
    record["seconds"] = round(time.perf_counter() - start, 1)
    common.write(args.out, json.loads(json.dumps(record, default=str)))
    print(f"\n{'':2}{'status':<6} {'time':>8}  detail")
    for key, row in record["sections"].items():
        print(f"{key:<2}{row['status']:<6} {row['seconds']:>7.1f}s  {row['title']}: {summary(row)}")
    print(f"total {record['seconds']:.1f} s; written: {args.out}")
    return 1 if any(r["status"] == "FAIL" for r in record["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
