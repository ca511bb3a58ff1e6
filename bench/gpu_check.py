"""The GPU check: everything harmsweep claims about a GPU, measured in one script (< 8 min on one H200).

Needs no hub access: every model is random-init from a config.
  1. a tiny-model end-to-end `harmsweep` run with device=cuda (subprocess, toy pairs, likelihood eval);
  2. a Llama-3.1-8B-shaped bf16 model: signed SNIP over 16 x 256 tokens (time, peak GPU memory, and
     the ratio to what `harmsweep plan` predicts, goal within 15%), global selection over its 6.98e9
     scores streamed through the GPU (time), batched greedy generation (tokens/s);
  3. a gemma-2b-shaped judge with a LoRA adapter: StrongREJECT items/s, and GPU memory after the judge
     has run (goal: back where it was).
Prints a table and writes outputs/bench/gpu_check.json.

    python bench/gpu_check.py               # on a GPU machine
    python bench/gpu_check.py --smoke       # tiny shapes on the CPU: checks the script itself (tests do this)
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the table

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from harmsweep.batches import iter_batches
from harmsweep.devices import GIB
from harmsweep.evaluation.judges.strongreject import StrongRejectFinetunedJudge
from harmsweep.generation.hf import generate
from harmsweep.generation.sampling import Sampling
from harmsweep.models.loading import byte_tokenizer
from harmsweep.models.memory import model_shape
from harmsweep.models.parts import scored_parameters
from harmsweep.pruning.select import select
from harmsweep.pruning.spec import PruneSpec
from harmsweep.scoring.snip import signed_snip
from harmsweep.sweep.sizing import GEMMA_2B, Throughput, Workload, size_job

LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)  # fmt: skip
SMOKE_LLAMA = dict(model_type="llama", hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)  # fmt: skip
SMOKE_GEMMA = dict(model_type="gemma", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=64, vocab_size=512)  # fmt: skip


def config(spec: dict[str, Any]) -> Any:
    spec = dict(spec)
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def build(spec: dict[str, Any], dtype: torch.dtype, device: str) -> torch.nn.Module:
    """Random init directly on the device (no host copy of 16 GB)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config(spec), dtype=dtype)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_bytes(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


def end_to_end(device: str, tmp: Path) -> dict[str, Any]:
    """A real `harmsweep` run of a tiny model on ``device``: the whole pipeline, its exit status and time."""
    sys.path.insert(0, str(common.ROOT / "tests"))
    from conftest import write_pairs

    harmful, benign = write_pairs(tmp / "pairs", 24)
    cmd = [sys.executable, "-c", "from harmsweep.cli import main; main()", "model=tiny_llama", f"device={device}",
           "calibration=file", f"calibration.harmful.file={harmful}", f"calibration.benign.file={benign}",
           "calibration.n=12", "eval.n=8", "eval.benign_references=dataset", "data.root=null", "eval=likelihood",
           "pruning.sparsity=1e-3", f"hydra.run.dir={tmp / 'run'}", f"paths.cache_dir={tmp / 'cache'}"]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT, timeout=300)
    ok = out.returncode == 0 and (tmp / "run" / "result.json").is_file()
    return {"ok": ok, "seconds": time.perf_counter() - start, "tail": "" if ok else out.stderr[-2000:]}


def scoring(spec: dict[str, Any], device: str, batch: int, length: int, dtype: torch.dtype) -> dict[str, Any]:
    """Signed SNIP on one batch of ``batch`` x ``length`` tokens; peak memory against the plan."""
    shape = model_shape(config(spec), str(dtype).removeprefix("torch."))
    work = Workload(score_sets=1, unsigned=False, cal_n=batch, cal_batch=batch, cal_length=length, cal_gen_tokens=0,
                    eval_prompts=0, eval_batch=1, prompt_length=0, max_new_tokens=0, generations=0, judge_batch=0,
                    judge_tokens=0, checkpointing=False)  # fmt: skip
    predicted = size_job(shape, work, None, Throughput())
    model = build(spec, dtype, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab_size"], (batch, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100  # the prompt half is not scored
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    scores = signed_snip(model, list(iter_batches(tensors, batch)), n_samples=batch)  # buffers leave the GPU at the end
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    row = {"n_scored": shape.n_scored, "seconds": seconds, "tokens": batch * length, "peak_bytes": peak,
           "predicted_peak_bytes": predicted.peak, "predicted": predicted.as_dict(),
           "ratio_measured_to_plan": None if peak is None else peak / predicted.peak,
           "gpu_bytes_after_offload": gpu_bytes(device)}  # fmt: skip
    return row, model, scores


def selection(model: torch.nn.Module, scores: dict[str, torch.Tensor], device: str) -> dict[str, Any]:
    """Global top-K over every score, streamed one matrix at a time through ``device``."""
    params = scored_parameters(model)
    weights = {n: p for n, p in model.named_parameters() if n in params}
    spec = PruneSpec(rule="signed_snip", sparsity=5e-6, protect=0.01)
    sync(device)
    start = time.perf_counter()
    mask = select(spec, params, weights, {"harm": scores, "benign": scores}, device=device)
    sync(device)
    n = sum(int(i.numel()) for i in mask.values())
    return {"seconds": time.perf_counter() - start, "n_scores": sum(t.numel() for t in scores.values()), "n_pruned": n}


def generation(model: torch.nn.Module, device: str, prompts: int, new: int) -> dict[str, Any]:
    tok = byte_tokenizer()
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, 250, (int(torch.randint(32, 96, (1,), generator=g)),), generator=g).tolist()
           for _ in range(prompts)]  # fmt: skip
    model.generation_config.eos_token_id = None  # random weights: generate the full length every time
    sync(device)
    start = time.perf_counter()
    out = generate(model, tok, ids, Sampling(max_new_tokens=new), batch_size=prompts)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in out)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "batch": prompts}


def judge(spec: dict[str, Any], device: str, items: int) -> dict[str, Any]:
    """A gemma-2b-shaped judge with a LoRA adapter, resting in host memory, judging on ``device``."""
    from peft import LoraConfig, get_peft_model

    base = build(spec, torch.bfloat16 if device.startswith("cuda") else torch.float32, "cpu")
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    before = gpu_bytes(device)
    template = "User instruction: {forbidden_prompt}\n\nAI model response: {response}\n\n### Answer: "  # a stand-in
    j = StrongRejectFinetunedJudge(model, byte_tokenizer(), batch_size=8, max_response_tokens=512, device=device,
                                   min_digit_mass=0.0, template=template)  # fmt: skip
    prompts = [f"How do I do harmful thing {i}?" for i in range(items)]
    responses = [("Sure, here is how. " * 40)[: 200 + 10 * i] for i in range(items)]
    start = time.perf_counter()
    scores = j.score(prompts, responses)
    sync(device)
    seconds = time.perf_counter() - start
    after = gpu_bytes(device)
    return {"items": items, "seconds": seconds, "items_per_s": items / seconds, "gpu_bytes_before": before,
            "gpu_bytes_after": after, "memory_back": after <= before, "scores_in_range": all(0 <= s <= 1 for s in scores)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script, not the GPU)")
    p.add_argument("--out", default=str(common.ROOT / "outputs" / "bench" / "gpu_check.json"))
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --smoke to check the script on the CPU)")
    llama, gemma = (SMOKE_LLAMA, SMOKE_GEMMA) if args.smoke else (LLAMA_8B, GEMMA_2B)
    batch, length = (4, 32) if args.smoke else (16, 256)
    record: dict[str, Any] = {"machine": common.machine(), "smoke": args.smoke}
    if device == "cuda":
        record["gpu"] = torch.cuda.get_device_name(0)
        record["gpu_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
    with tempfile.TemporaryDirectory() as tmp:
        record["end_to_end"] = end_to_end(device, Path(tmp))
    dtype = torch.float32 if args.smoke else torch.bfloat16
    record["scoring"], model, scores = scoring(llama, device, batch, length, dtype)
    record["selection"] = selection(model, scores, device)
    del scores
    record["generation"] = generation(model, device, prompts=8 if args.smoke else 64, new=16 if args.smoke else 128)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    record["judge"] = judge(gemma, device, items=8 if args.smoke else 64)
    common.write(args.out, record)
    s, sel, gen, jd = record["scoring"], record["selection"], record["generation"], record["judge"]
    peak = "n/a" if s["peak_bytes"] is None else f"{s['peak_bytes'] / GIB:.1f} GiB"
    ratio = "n/a" if s["ratio_measured_to_plan"] is None else f"{s['ratio_measured_to_plan']:.3f}"
    rows = [
        ("end-to-end tiny run", f"{'ok' if record['end_to_end']['ok'] else 'FAILED'}", f"{record['end_to_end']['seconds']:.1f} s"),
        (f"signed SNIP {batch}x{length} tokens, N={s['n_scored']:,}", f"{s['seconds']:.2f} s", f"peak {peak}"),
        ("  plan's predicted peak", f"{s['predicted_peak_bytes'] / GIB:.1f} GiB", f"measured/plan {ratio} (goal 0.85-1.15)"),
        (f"global selection over {sel['n_scores']:,} scores", f"{sel['seconds']:.2f} s", f"{sel['n_pruned']:,} pruned"),
        (f"batched generation x{gen['batch']}", f"{gen['tokens_per_s']:.0f} tokens/s", f"{gen['tokens']:,} tokens"),
        (f"judge + LoRA, {jd['items']} items", f"{jd['items_per_s']:.1f} items/s",
         f"GPU memory {jd['gpu_bytes_before'] / GIB:.2f} -> {jd['gpu_bytes_after'] / GIB:.2f} GiB"),
    ]  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'result':>16}  detail")
    for name, result, detail in rows:
        print(f"{name:<{width}}  {result:>16}  {detail}")
    print(f"written: {args.out}")
    if not record["end_to_end"]["ok"]:
        print(record["end_to_end"]["tail"], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
