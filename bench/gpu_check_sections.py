"""Sections C, D and E of bench/gpu_check.py, and the helpers every section shares.

Each section is ``fn(ctx) -> dict``: it raises ``Skip`` with a reason, or any exception (a failed check
included) to be recorded as FAIL by the runner; what it returns is the section's figures.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)  # fmt: skip
SMOKE_LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)  # fmt: skip
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=300)  # fmt: skip


class Skip(Exception):  # noqa: N818 - a section's outcome, not an error
    """The section cannot run here, for the reason given (no CUDA, no vLLM)."""


@dataclass
class Ctx:
    device: str  # where the GPU work goes: cuda, or cpu under --smoke
    smoke: bool
    tmp: Path


def check(ok: bool, what: str) -> None:
    """A failed check raises (assert would vanish under python -O)."""
    if not ok:
        raise AssertionError(what)


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if str(device).startswith("cuda"):
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> int | None:
    """Peak allocated bytes since the last reset (None off CUDA: nothing to measure there)."""
    if not str(device).startswith("cuda"):
        return None
    sync(device)
    return torch.cuda.max_memory_allocated()


def timed(fn: Any, device: str) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def build(spec: dict[str, Any], dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """Random init straight on ``device`` (no host copy of 16 GB), eval mode."""
    spec = dict(spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec), dtype=dtype)
    return model.eval()


def batches(vocab: int, n: int, length: int, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded calibration batches on the host: lengths vary, the prompt half and the padding are unscored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        ids = torch.randint(3, vocab, (rows, length), generator=g)
        lengths = torch.randint(length // 2 + 2, length + 1, (rows,), generator=g)
        lengths[0] = length  # one full row: the batch is as wide as asked
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : length // 2] = -100
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return out


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return bool((a - b).norm() <= rtol * b.norm().clamp_min(1e-12))


def scored(model: torch.nn.Module) -> dict[str, Any]:
    from harmsweep.models.parts import scored_parameters

    return scored_parameters(model)


# ---------------------------------------------------------------- C: a model split over two devices


def split_devices(ctx: Ctx) -> tuple[str, str]:
    """Two GPUs when present, else cuda:0 and the CPU (compute on both, nothing offloaded); --smoke: cpu twice."""
    if ctx.smoke:
        return "cpu", "cpu"
    if torch.cuda.device_count() > 1:
        return "cuda:0", "cuda:1"
    return "cuda:0", "cpu"


def dispatched(spec: dict[str, Any], first: str, second: str) -> torch.nn.Module:
    """The tiny model under accelerate's hooks, block 0 on ``first`` and the rest on ``second``."""
    from accelerate import dispatch_model

    model = build(spec, torch.float32, "cpu")
    last = spec["num_hidden_layers"] - 1
    device_map = {"model.embed_tokens": first, "model.layers.0": first, **{f"model.layers.{i}": second
                  for i in range(1, last + 1)}, "model.norm": second, "model.rotary_emb": second, "lm_head": second}  # fmt: skip
    main = "cpu" if "cpu" in (first, second) else first  # main=cpu: CPU blocks run on the CPU, none is offloaded
    return dispatch_model(model, device_map, main_device=main, force_hooks=True)


def section_c(ctx: Ctx) -> dict[str, Any]:
    from harmsweep.models.parts import decoder_blocks
    from harmsweep.pruning.lowrank import remove_low_rank
    from harmsweep.pruning.masks import apply_mask
    from harmsweep.pruning.select import select
    from harmsweep.pruning.spec import LowRankSpec, PruneSpec
    from harmsweep.scoring.snip import score_kind
    from harmsweep.scoring.spec import ScoringOptions

    first, second = split_devices(ctx)
    problems: list[str] = []  # every sub-check reports, not only the first that fails

    def soft(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    ref, model = build(TINY, torch.float32, "cpu"), dispatched(TINY, first, second)
    cal = batches(TINY["vocab_size"], 8, 24, 4)
    _, blocks = decoder_blocks(model)
    hooked = [b.__dict__.get("forward") for b in blocks]
    check(all(f is not None for f in hooked), "accelerate put no per-block forward hook")
    n = 8
    plain = score_kind(ref, "harm", cal, n)
    ckpt = score_kind(model, "harm", cal, n, ScoringOptions(gradient_checkpointing=True))
    kept = [b.__dict__.get("forward") is f for b, f in zip(blocks, hooked, strict=True)]
    soft(all(kept), f"checkpointing dropped accelerate's hook on blocks {[i for i, k in enumerate(kept) if not k]}")
    soft(all(close(ckpt[k], plain[k], 1e-3) for k in plain), "checkpointed SNIP across the split != plain SNIP")
    w_ref, w_split = score_kind(ref, "harm_wanda", cal, n), score_kind(model, "harm_wanda", cal, n)
    soft(all(close(w_split[k], w_ref[k], 1e-4) for k in w_ref), "Wanda across the split != on one device")
    params = scored(model)
    weights = {k: p for k, p in model.named_parameters() if k in params}
    spec = PruneSpec(sparsity=0.01, protect=0.01)
    scores = {"harm": ckpt, "benign": score_kind(model, "benign", cal, n)}
    mask = select(spec, params, weights, scores, device=first)
    mask_cpu = select(spec, params, {k: w.cpu() for k, w in weights.items()}, scores, device="cpu")
    soft(all(torch.equal(mask[k].cpu(), mask_cpu[k].cpu()) for k in mask_cpu), "selection across the split != CPU")
    apply_mask(model, mask)
    zeroed = sum(int((weights[k].detach().view(-1)[i.to(weights[k].device)] == 0).sum()) for k, i in mask.items())
    soft(zeroed == sum(i.numel() for i in mask.values()), "the mask did not zero every selected weight")
    apply_mask(ref, mask)
    ids = cal[0]["input_ids"]
    with torch.no_grad():
        soft(close(model(input_ids=ids.to(first)).logits, ref(input_ids=ids).logits, 1e-4), "split logits != ref")
    lr_spec = LowRankSpec(rank_harmful=4, rank_utility=1)
    stats = remove_low_rank(model, cal, cal[::-1], lr_spec)
    remove_low_rank(ref, cal, cal[::-1], lr_spec)
    ref_named = dict(ref.named_parameters())
    soft(all(close(p, ref_named[k], 1e-3) for k, p in model.named_parameters() if k in params),
          "low-rank across the split != on one device")  # fmt: skip
    check(not problems, "; ".join(problems))
    return {"devices": [first, second], "blocks_hooked": len(hooked), "pruned": sum(i.numel() for i in mask.values()),
            "lowrank_weights": len(stats)}  # fmt: skip


# ---------------------------------------------------------------- D: tiny end-to-end runs on the device

RUNS = {
    "magnitude": ["pruning=magnitude"],
    "random": ["pruning=random"],
    "lowrank": ["method=lowrank", "lowrank.rank_harmful=2", "lowrank.rank_utility=1"],
    "wanda": ["scoring=wanda"],
    "sequential_base": ["pruning.sequential=true", "pruning.granularity=matrix", "pruning.replace=base"],
    "head_dense": ["pruning.granularity=head", "scores.store=dense", "pruning.sparsity=0.25"],
    "checkpointing": ["scoring.gradient_checkpointing=true"],
}


def _run(name: str, extra: list[str], device: str, tmp: Path, pairs: tuple[Path, Path]) -> dict[str, Any]:
    run_dir = tmp / name
    args = ["model=tiny_llama", "calibration=file", f"calibration.harmful.file={pairs[0]}",
            f"calibration.benign.file={pairs[1]}", "calibration.n=6", "eval.n=4", "eval.benign_references=dataset",
            "eval=likelihood", "pruning.sparsity=0.02", "scores.keep=0.2", "data.root=null", f"device={device}",
            f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HARMSWEEP_CACHE": str(tmp / f"cache_{name}"), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "harmsweep.cli", *args], cwd=tmp, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    ok = out.returncode == 0 and (run_dir / "result.json").is_file()
    return {"ok": ok, "seconds": round(time.perf_counter() - start, 1), "tail": "" if ok else out.stderr[-1500:]}


def section_d(ctx: Ctx) -> dict[str, Any]:
    pairs = common.pair_files(ctx.tmp, 12)
    with ThreadPoolExecutor(max_workers=min(len(RUNS), os.cpu_count() or 1, 8)) as pool:
        futures = {n: pool.submit(_run, n, extra, ctx.device, ctx.tmp, pairs) for n, extra in RUNS.items()}
        runs = {n: f.result() for n, f in futures.items()}
    failed = [n for n, r in runs.items() if not r["ok"]]
    check(not failed, "; ".join(f"{n}: {runs[n]['tail'][-400:]}" for n in failed))
    return {n: r["seconds"] for n, r in runs.items()}


# ---------------------------------------------------------------- E: Llama-3.1-8B-shaped bf16


def workload(**values: Any) -> Any:
    """A sizing.Workload from the fields it has (others' edits may add or drop fields with defaults)."""
    from harmsweep.sweep.sizing import Workload

    base = dict(score_sets=1, unsigned=False, cal_n=1, cal_batch=1, cal_length=1, cal_gen_tokens=0, eval_prompts=0,
                eval_batch=1, prompt_length=0, max_new_tokens=0, generations=0, judge_batch=0, judge_tokens=0,
                checkpointing=False)  # fmt: skip
    names = {f.name for f in dataclasses.fields(Workload)}
    return Workload(**{k: v for k, v in {**base, **values}.items() if k in names})


def planned(spec: dict[str, Any], dtype: str, phase: str, **work: Any) -> float:
    """The planner's GPU peak (bytes) of one ``phase`` of a job doing ``work`` (harmsweep/sweep/sizing.py)."""
    from harmsweep.models.memory import model_shape
    from harmsweep.sweep.sizing import Throughput, size_job

    spec = dict(spec)
    shape = model_shape(AutoConfig.for_model(spec.pop("model_type"), **spec), dtype)
    size = size_job(shape, workload(**work), None, Throughput())
    phases = {p["name"]: p["gpu"] for p in getattr(size, "phases", []) or []}
    if phase not in phases:
        raise AssertionError(f"the planner has no {phase} phase (phases: {sorted(phases)})")
    return float(phases[phase])


def measured(out: dict[str, Any], name: str, device: str, plan: float, goal: tuple[float, float]) -> str | None:
    """Record ``name``'s peak against the plan; the problem, if the ratio is off ``goal`` (None off CUDA)."""
    out[f"{name}_peak"], out[f"{name}_plan"] = peak(device), plan
    ratio = None if out[f"{name}_peak"] is None else out[f"{name}_peak"] / plan
    out[f"{name}_ratio"] = ratio
    if ratio is not None and not goal[0] <= ratio <= goal[1]:
        return f"{name} peak / plan = {ratio:.3f} (goal {goal[0]}-{goal[1]})"
    return None


def section_e(ctx: Ctx) -> dict[str, Any]:
    from harmsweep.evaluation.utility import perplexity
    from harmsweep.models.loading import byte_tokenizer
    from harmsweep.pruning.lowrank import remove_low_rank
    from harmsweep.pruning.select import select
    from harmsweep.pruning.spec import LowRankSpec, PruneSpec
    from harmsweep.scoring import store, writer
    from harmsweep.scoring.snip import score_kind
    from harmsweep.scoring.spec import StoreSpec

    dev, spec = ctx.device, SMOKE_LLAMA if ctx.smoke else LLAMA_8B
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    name = str(dtype).removeprefix("torch.")
    batch, length = (4, 32) if ctx.smoke else (8, 256)
    cal_work = dict(cal_n=batch, cal_batch=batch, cal_length=length)
    out: dict[str, Any] = {"layers": spec["num_hidden_layers"], "batch": batch, "length": length}
    problems: list[str | None] = []
    model = build(spec, dtype, dev)
    cal = batches(spec["vocab_size"], batch, length, batch)
    reset_peak(dev)
    scores, out["snip_s"] = timed(lambda: score_kind(model, "harm", cal, batch), dev)
    problems.append(measured(out, "snip", dev, planned(spec, name, "scoring", **cal_work), (0.85, 1.15)))
    check(all(torch.isfinite(s).all() for s in scores.values()), "SNIP scores are not finite")
    # global selection over every score, each matrix streamed from host memory through the device
    params = scored(model)
    weights = {n: p for n, p in model.named_parameters() if n in params}
    sel_spec = PruneSpec(sparsity=1e-5, protect=0.0)
    mask, out["select_s"] = timed(lambda s=scores: select(sel_spec, params, weights, {"harm": s}, device=dev), dev)
    out["select_scores"] = sum(t.numel() for t in scores.values())
    check(sum(i.numel() for i in mask.values()) == round(1e-5 * out["select_scores"]), "global selection count")
    # the compact write from the GPU against the same write from host memory (the first 4 layers' scores at 8B)
    names = [n for n in scores if ".layers." not in n or int(n.split(".layers.")[1].split(".")[0]) < 4]
    host = {n: scores[n].cpu() for n in names}
    del scores
    on_dev = {n: t.to(dev) for n, t in host.items()}
    paths = ctx.tmp / "e_dev.safetensors", ctx.tmp / "e_host.safetensors"
    _, out["write_device_s"] = timed(lambda on_dev=on_dev: writer.write(on_dev, paths[0], "harm", StoreSpec()), dev)
    del on_dev
    _, out["write_host_s"] = timed(lambda host=host: writer.write(host, paths[1], "harm", StoreSpec()), dev)
    out["write_scores"] = sum(t.numel() for t in host.values())
    a, b = store.open_scores(paths[0]), store.open_scores(paths[1])
    check(all(torch.equal(a.stored(n)[0], b.stored(n)[0]) for n in names), "GPU and host writes keep other tails")
    del host
    reset_peak(dev)
    wanda, out["wanda_s"] = timed(lambda: score_kind(model, "harm_wanda", cal, batch), dev)
    problems.append(measured(out, "wanda", dev, planned(spec, name, "scoring", criterion="wanda", **cal_work),
                             (0.0, 1.15)))  # fmt: skip
    del wanda
    two = [n for n in scored(model) if ".layers.0." in n or ".layers.1." in n]
    reset_peak(dev)
    lr_spec = LowRankSpec(rank_harmful=16, rank_utility=4)
    stats, out["lowrank_s"] = timed(lambda: remove_low_rank(model, cal, cal[::-1], lr_spec, names=two), dev)
    lr_plan = planned(spec, name, "lowrank", method="lowrank", rank_harmful=16, rank_utility=4, **cal_work)
    problems.append(measured(out, "lowrank", dev, lr_plan, (0.0, 1.15)))  # the plan's peak is per block
    check(all(0 < s["relative_norm"] < 1 for s in stats.values()), "low-rank relative norms outside (0, 1)")
    ev = yaml.safe_load((common.ROOT / "conf" / "eval" / "gpu.yaml").read_text())
    ppl_batch, ppl_len = (2, 64) if ctx.smoke else (ev["batch_size"], ev["perplexity"]["max_length"])
    texts = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(ppl_len + 16)) for i in range(ppl_batch)]
    reset_peak(dev)
    ppl, out["perplexity_s"] = timed(lambda: perplexity(model, byte_tokenizer(), texts, ppl_batch, ppl_len), dev)
    ppl_plan = planned(spec, name, "evaluation", eval_forward_tokens=ppl_batch * ppl_len, forward_batch=ppl_batch,
                       forward_length=ppl_len)  # fmt: skip
    problems.append(measured(out, "perplexity", dev, ppl_plan, (0.0, 1.15)))
    out["perplexity"] = ppl["perplexity"]
    check(ppl["perplexity"] > 1, "perplexity is not > 1")
    found = [p for p in problems if p]
    check(not found, "; ".join(found))
    return out


def tmpdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="gpu_check-")
