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
    """A sizing.Workload from the fields it has today (others' edits may add fields with defaults)."""
    from harmsweep.sweep.sizing import Workload

    names = {f.name for f in dataclasses.fields(Workload)}
    return Workload(**{k: v for k, v in values.items() if k in names})


def plan_scoring_peak(spec: dict[str, Any], dtype: str, batch: int, length: int) -> tuple[float, dict[str, Any]]:
    """What the planner says scoring one set of ``batch`` x ``length`` tokens peaks at (bytes per GPU)."""
    from harmsweep.models.memory import model_shape
    from harmsweep.sweep.sizing import Throughput, size_job

    spec = dict(spec)
    shape = model_shape(AutoConfig.for_model(spec.pop("model_type"), **spec), dtype)
    work = workload(score_sets=1, unsigned=False, cal_n=batch, cal_batch=batch, cal_length=length, cal_gen_tokens=0,
                    eval_prompts=0, eval_batch=1, prompt_length=0, max_new_tokens=0, generations=0, judge_batch=0,
                    judge_tokens=0, checkpointing=False)  # fmt: skip
    size = size_job(shape, work, None, Throughput())
    phases = getattr(size, "phases", None)  # per-phase figures, once plan has them
    scoring = phases.get("scoring") if isinstance(phases, dict) else None
    figure = scoring if isinstance(scoring, int | float) else size.weights + size.score_buffer + size.activations
    return float(figure), {"n_scored": shape.n_scored, "weights": size.weights, "activations": size.activations}


def section_e(ctx: Ctx) -> dict[str, Any]:
    from harmsweep.evaluation.utility import perplexity
    from harmsweep.models.loading import byte_tokenizer
    from harmsweep.pruning.lowrank import remove_low_rank
    from harmsweep.pruning.spec import LowRankSpec
    from harmsweep.scoring import store
    from harmsweep.scoring.snip import score_kind
    from harmsweep.scoring.spec import StoreSpec

    dev, spec = ctx.device, SMOKE_LLAMA if ctx.smoke else LLAMA_8B
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    batch, length = (4, 32) if ctx.smoke else (8, 256)
    out: dict[str, Any] = {"layers": spec["num_hidden_layers"], "batch": batch, "length": length}
    model = build(spec, dtype, dev)
    cal = batches(spec["vocab_size"], batch, length, batch)
    planned, out["plan"] = plan_scoring_peak(spec, str(dtype).removeprefix("torch."), batch, length)
    reset_peak(dev)
    scores, out["snip_s"] = timed(lambda: score_kind(model, "harm", cal, batch), dev)
    out["snip_peak"], out["snip_plan_peak"] = peak(dev), planned
    out["snip_ratio"] = None if out["snip_peak"] is None else out["snip_peak"] / planned
    check(all(torch.isfinite(s).all() for s in scores.values()), "SNIP scores are not finite")
    # the compact write from the GPU against the same write from host memory (a slice of the layers at 8B)
    names = [n for n in scores if ".layers." not in n or int(n.split(".layers.")[1].split(".")[0]) < 4]
    host = {n: scores[n] for n in names}
    del scores
    on_dev = {n: t.to(dev) for n, t in host.items()}
    paths = ctx.tmp / "e_dev.safetensors", ctx.tmp / "e_host.safetensors"
    _, out["write_device_s"] = timed(lambda on_dev=on_dev: store.write(on_dev, paths[0], "harm", StoreSpec()), dev)
    del on_dev
    _, out["write_host_s"] = timed(lambda host=host: store.write(host, paths[1], "harm", StoreSpec()), dev)
    out["write_scores"] = sum(t.numel() for t in host.values())
    a, b = store.open_scores(paths[0]), store.open_scores(paths[1])
    check(all(torch.equal(a.stored(n)[0], b.stored(n)[0]) for n in names), "GPU and host writes keep other tails")
    del host
    reset_peak(dev)
    wanda, out["wanda_s"] = timed(lambda: score_kind(model, "harm_wanda", cal, batch), dev)
    out["wanda_peak"] = peak(dev)
    del wanda
    two = [n for n in scored(model) if ".layers.0." in n or ".layers.1." in n]
    reset_peak(dev)
    lr_spec = LowRankSpec(rank_harmful=16, rank_utility=4)
    stats, out["lowrank_s"] = timed(lambda: remove_low_rank(model, cal, cal[::-1], lr_spec, names=two), dev)
    out["lowrank_peak"] = peak(dev)
    check(all(0 < s["relative_norm"] < 1 for s in stats.values()), "low-rank relative norms outside (0, 1)")
    ev = yaml.safe_load((common.ROOT / "conf" / "eval" / "gpu.yaml").read_text())
    ppl_batch, ppl_len = (2, 64) if ctx.smoke else (ev["batch_size"], ev["perplexity"]["max_length"])
    texts = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(ppl_len + 16)) for i in range(ppl_batch)]
    reset_peak(dev)
    ppl, out["perplexity_s"] = timed(lambda: perplexity(model, byte_tokenizer(), texts, ppl_batch, ppl_len), dev)
    out["perplexity_peak"], out["perplexity"] = peak(dev), ppl["perplexity"]
    check(ppl["perplexity"] > 1, "perplexity is not > 1")
    if out["snip_ratio"] is not None:
        check(0.85 <= out["snip_ratio"] <= 1.15, f"SNIP peak / plan = {out['snip_ratio']:.3f} (goal 0.85-1.15)")
    return out


def tmpdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="gpu_check-")
