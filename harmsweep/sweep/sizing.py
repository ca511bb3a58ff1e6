"""Sizing a job before it is submitted: per phase, GPU peak, host RAM, disk and time; passes and tokens.

Everything comes from the model's config alone: its shape (models/memory.py, peaks measured on the ``meta``
device by running the same loss and forward code a run uses) and the job's workload. A job is a sequence of
phases (load, scoring by criterion or sequential or low-rank, base reads, evaluation forwards, generation,
judging, fine-tuning); its peak is the largest phase's. Time is an estimate from FLOPs, memory bandwidth and
host throughput under stated assumptions (host-side work counts: the GPU waits for it), not a measurement.
No torch here: the arithmetic needs none.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from harmsweep.devices import GIB, SCORE_BYTES

if TYPE_CHECKING:
    from harmsweep.models.memory import ModelShape
# The StrongREJECT judge's base model (gemma-2b), so the judge can be sized offline.
GEMMA_2B = dict(model_type="gemma", hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                num_attention_heads=8, num_key_value_heads=1, head_dim=256, vocab_size=256000)  # fmt: skip


@dataclass(frozen=True)
class Throughput:
    """What one GPU (and its host) is assumed to sustain (A100/H100-class defaults); printed with every estimate."""

    tflops: float = 150.0  # bf16 dense matmul, effective (about 40-50% of an A100's peak)
    bandwidth_gbs: float = 1500.0  # HBM bytes/s while decoding (weights read once per step)
    load_gbs: float = 1.0  # checkpoint read from shared storage
    eigh_gflops: float = 500.0  # a float64 eigensolve with vectors, counted as 10 n^3 flops: ~1.4 s at n = 4096


@dataclass(frozen=True)
class FineTune:
    """One fine-tune a job runs (alignment.derive, em arms, dissociation recovery), in counts."""

    name: str
    method: str  # lora | full
    rank: int
    batch: int
    length: int
    steps: int  # optimizer steps
    accum: int = 1  # micro-batches of ``batch`` per optimizer step (grad_accum): time and passes count each


@dataclass(frozen=True)
class Workload:
    """What a job runs, in counts: taken from its config by sweep/plan.py."""

    score_sets: int  # score sets this job computes (0 when another job of the sweep made them)
    unsigned: bool  # unsigned SNIP: one backward per sample
    cal_n: int
    cal_batch: int
    cal_length: int
    cal_gen_tokens: int  # calibration responses generated (prefill/on-policy), when computed
    eval_prompts: int
    eval_batch: int
    prompt_length: int
    max_new_tokens: int
    generations: int  # answer sets this job generates, over both stages (attacked and plain; before and after)
    judge_batch: int  # 0: no judge model
    judge_tokens: int
    checkpointing: bool
    gpus: int = 1
    eval_forward_tokens: int = 0  # likelihood, perplexity, recognition, lm-eval: no-grad forward tokens
    criterion: str = "snip"  # snip | wanda
    sequential: bool = False  # layer by layer: every needed kind scored per layer (no set stored)
    sequential_kinds: int = 0
    method: str = "prune"  # prune | lowrank
    rank_harmful: int = 0
    rank_utility: int = 0
    masked: int = 0  # weights the mask selects (replace=base reads their base values)
    replace_base: bool = False
    logits_chunk: int = 2048
    dense_scores: bool = False  # scores.store=dense: every score comes to the host to be saved
    kept_fraction: float = 0.0302  # compact sets: the harm and benign tails' fractions together (host and disk)
    forward_batch: int = 8  # eval.batch_size: likelihood, perplexity, recognition forwards (1: WikiText's windows)
    forward_length: int = 256  # their longest sequence (eval.perplexity.chunk when a WikiText window is the largest)
    # the new score sets one by one: (pairs, one example per pass?); empty: score_sets sets of cal_n, as unsigned says
    set_runs: tuple[tuple[int, bool], ...] = ()
    backend: str = "hf"  # hf | vllm
    gpu_bytes: float = 80 * GIB  # one GPU's memory (vLLM takes what is free of it)
    finetunes: tuple[FineTune, ...] = ()
    # eval.generation.attack=refusal_ablation*: unsigned scorings (pairs, one per pass) of the refusal and benign
    # sets, per evaluated stage; both sides' dense fp32 scores are held (off the GPU) while the mask is selected
    attack_sets: tuple[tuple[int, bool], ...] = ()
    attack_host: float = 0.0  # host bytes the attack holds: its weight snapshot (and the refusal scores)
    extra_gen_tokens: int = 0  # tokens generated beyond the harmful answers (TriviaQA, Alpaca, financial, refusals)


@dataclass(frozen=True)
class Phase:
    """One phase of a job: GPU peak (bytes per GPU) by part, host RAM, disk and seconds."""

    name: str
    gpu: float
    parts: dict[str, float]  # what the GPU peak is made of (weights, scores, activations, kv, ...)
    host: float = 0.0  # host RAM beside the process's baseline
    disk_read: float = 0.0
    passes: int = 0  # forward(+backward) passes
    gpu_seconds: float = 0.0  # the GPUs compute
    host_seconds: float = 0.0  # the GPUs wait for the host (loading, summarising, base reads, endpoints)
    note: str = ""  # what the plan assumed, or that another job makes it (experiment_sizing)


@dataclass(frozen=True)
class JobSize:
    """One job's needs; memory in bytes per GPU, the peak being the largest of its phases."""

    n_scored: int
    weights: float
    score_buffer: float
    activations: float  # scoring's (or low-rank's) activations and temporaries above weights and buffers
    kv_cache: float
    judge: float
    peak: float
    phase: str  # which phase sets the peak
    passes: int  # scoring passes this job computes (sequential: per layer; low-rank: partial forwards)
    generated_tokens: int
    gpu_hours: float  # over all phases, host-side waits included, times the job's GPUs
    host_ram: float = 0.0  # the largest host RAM of any phase
    disk_read: float = 0.0
    phases: list[dict[str, Any]] = field(default_factory=list)
    disk: dict[str, float] = field(default_factory=dict)  # artifact -> bytes

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _phase(name: str, parts: dict[str, float], **kw: Any) -> Phase:
    return Phase(name=name, gpu=sum(parts.values()), parts={k: v for k, v in parts.items() if v}, **kw)


def _flop_s(flops: float, speed: Throughput, gpus: int) -> float:
    return flops / (speed.tflops * 1e12 * gpus)


def _decode_s(steps: float, shape: ModelShape, speed: Throughput, gpus: int) -> float:
    return steps * shape.weight_bytes / (speed.bandwidth_gbs * 1e9 * gpus)


def scoring_phase(shape: ModelShape, work: Workload, speed: Throughput) -> Phase:
    """Scoring by criterion. SNIP: fwd + bwd with saved activations beside one fp32 buffer; unsigned: per sample;
    Wanda: a no-grad forward, fp32 input norms, then each fp32 score matrix made and offloaded one at a time.
    Each finished set is summarised where it lives (scoring.writer: two streaming passes and a gather, at
    memory bandwidth); only the tails come to the host, or with scores.store=dense every score, to be saved."""
    g = max(1, work.gpus)
    weights, n = shape.weight_bytes / g, shape.n_scored
    tokens = work.cal_n * work.cal_length
    summary = work.score_sets * 3 * n * SCORE_BYTES / (speed.bandwidth_gbs * 1e9 * g)
    host = n * SCORE_BYTES if work.dense_scores else work.kept_fraction * n * 8  # (int32 index, fp32 value) pairs
    if work.criterion == "wanda":
        norms = sum(d for _, d in shape.block_matrices) * shape.n_layers * SCORE_BYTES
        act = max(shape.forward_bytes(work.cal_batch * work.cal_length), 2 * shape.largest_matrix * SCORE_BYTES)
        passes = work.score_sets * math.ceil(work.cal_n / work.cal_batch)
        return _phase("scoring", {"weights": weights, "scores": norms / g, "activations": act / g}, host=host,
                      passes=passes,
                      gpu_seconds=_flop_s(2 * shape.n_params * tokens * work.score_sets, speed, g) + summary)  # fmt: skip
    runs = work.set_runs or ((work.cal_n, work.unsigned),) * work.score_sets
    single = any(one for _, one in runs)  # a set scored one example per pass (unsigned SNIP, bf16 sums)
    step_tokens = max(((work.cal_length if one else work.cal_batch * work.cal_length) for _, one in runs), default=0)
    act = shape.step_bytes(step_tokens, work.checkpointing, work.logits_chunk)
    if single:  # |grad| (or a bf16 sum) of one matrix beside its gradient
        act += shape.largest_matrix * shape.dtype_bytes
    passes = sum(n if one else math.ceil(n / work.cal_batch) for n, one in runs)
    tokens = sum(n for n, _ in runs) * work.cal_length
    flops = (8 if work.checkpointing else 6) * shape.n_params * tokens
    return _phase("scoring", {"weights": weights, "scores": n * SCORE_BYTES / g, "activations": act / g},
                  host=host, passes=passes, gpu_seconds=_flop_s(flops, speed, g) + summary)  # fmt: skip


def sequential_phase(shape: ModelShape, work: Workload, speed: Throughput) -> Phase:
    """pruning.sequential: per layer and needed kind one partial pass per batch (SNIP: a full forward, a backward
    down to layer l; Wanda: a forward up to layer l); one layer's scores at a time, nothing stored."""
    g, layers = max(1, work.gpus), shape.n_layers
    tokens = work.cal_n * work.cal_length
    layer_scores = shape.n_scored / layers * SCORE_BYTES * work.sequential_kinds  # every kind's, together
    per_layer = math.ceil(work.cal_n / work.cal_batch) if not work.unsigned else work.cal_n
    passes = layers * work.sequential_kinds * per_layer
    if work.criterion == "wanda":
        act = shape.forward_bytes(work.cal_batch * work.cal_length)
        flops = work.sequential_kinds * (layers + 1) * shape.n_params * tokens  # sum over l of 2N (l+1)/layers
    else:
        step_tokens = work.cal_length if work.unsigned else work.cal_batch * work.cal_length
        act = shape.step_bytes(step_tokens, work.checkpointing, work.logits_chunk)  # layer 0 keeps every block
        flops = (
            work.sequential_kinds * (2 * layers + 2 * (layers + 1)) * shape.n_params * tokens
        )  # fwd 2N, bwd 4N (layers-l)/layers
    return _phase("sequential", {"weights": shape.weight_bytes / g, "scores": layer_scores, "activations": act / g},
                  host=layer_scores, passes=passes, gpu_seconds=_flop_s(flops, speed, g))  # fmt: skip


def lowrank_phase(shape: ModelShape, work: Workload, speed: Throughput) -> Phase:
    """method=lowrank: per block, partial forwards over the harmful (and benign when r_u > 0) set fold float64
    Grams of the block's distinct inputs; then each matrix is solved (eigh) and changed. Peak: the forward beside
    the Grams, or the Grams beside the largest solve (harmsweep.pruning.lowrank_size)."""
    g, layers = max(1, work.gpus), shape.n_layers
    tokens = work.cal_batch * work.cal_length
    grams = _grams(shape.block_inputs, work.rank_utility, tokens)
    solve = max((_solve(d_out, d_in, work.rank_harmful, work.rank_utility, shape.dtype_bytes)
                 for d_out, d_in in shape.block_matrices), default=0)  # fmt: skip
    act = max(shape.forward_bytes(tokens), solve)
    sets = 2 if work.rank_utility > 0 else 1
    passes = sets * layers * math.ceil(work.cal_n / work.cal_batch)
    flops = sets * (layers + 1) * shape.n_params * work.cal_n * work.cal_length
    eigh = sum(min(d_out, d_in) ** 3 * (2 if d_out > d_in else 1) for d_out, d_in in shape.block_matrices)
    eigh_s = sets * layers * 10 * eigh / (speed.eigh_gflops * 1e9)  # ~10 s^3 flops a solve with vectors
    return _phase("lowrank", {"weights": shape.weight_bytes / g, "grams": grams, "activations": act / g},
                  host=0.0, passes=passes, gpu_seconds=_flop_s(flops, speed, g) + eigh_s)  # fmt: skip


F64 = 8
FOLD_ROWS = 4096  # as harmsweep.pruning.lowrank_size: calibration rows cast to float64 at a time


def _grams(dims: tuple[int, ...], rank_utility: int, tokens: int) -> float:
    """One block's float64 Grams (one per distinct input; twice with a utility set) and the rows being folded:
    lowrank_size.lowrank_grams, with the rows cast at once bounded by the batch (it assumes FOLD_ROWS)."""
    sets = 2 if rank_utility > 0 else 1
    return sets * sum(F64 * d * d for d in dims) + F64 * min(FOLD_ROWS, tokens) * max(dims, default=0)


def _solve(d_out: int, d_in: int, rank_harmful: int, rank_utility: int, dtype_bytes: int) -> float:
    """Peak of one matrix's change beside the Grams: harmsweep.pruning.lowrank_size.lowrank_bytes when it is
    there; else the float64 weight copy, M = W G W^T (or A^T A), its eigenvectors and the solver's workspace."""
    try:
        from harmsweep.pruning.lowrank_size import lowrank_bytes
    except ImportError:
        lowrank_bytes = None
    if lowrank_bytes is not None:
        return float(lowrank_bytes(d_in, d_out, rank_harmful, rank_utility, dtype_bytes))
    n = min(d_out, d_in)
    return F64 * (d_out * d_in * 2 + 5 * n * n)


def base_read_phase(shape: ModelShape, work: Workload, speed: Throughput) -> Phase:
    """replace=base: the base checkpoint's masked tensors, read one at a time on the host, only rows with hits."""
    row = shape.largest_matrix / max(1, shape.hidden)
    read = min(shape.n_scored, work.masked * row) * shape.dtype_bytes
    return _phase("base reads", {"weights": shape.weight_bytes / max(1, work.gpus)},
                  host=shape.largest_matrix * shape.dtype_bytes, disk_read=read,
                  host_seconds=read / (speed.load_gbs * 1e9))  # fmt: skip


def evaluation_phase(shape: ModelShape, work: Workload, speed: Throughput) -> Phase:
    """Likelihood, perplexity, recognition, lm-eval: no-grad forwards at eval.batch_size, the fp32 logits held
    at once bounded by model.logits_chunk."""
    g = max(1, work.gpus)
    act = shape.eval_bytes(work.forward_batch * work.forward_length, work.logits_chunk)
    return _phase("evaluation", {"weights": shape.weight_bytes / g, "activations": act / g},
                  passes=math.ceil(work.eval_forward_tokens / max(1, work.forward_batch * work.forward_length)),
                  gpu_seconds=_flop_s(2 * shape.n_params * work.eval_forward_tokens, speed, g))  # fmt: skip


def generation_phase(shape: ModelShape, work: Workload, speed: Throughput) -> Phase:
    """Held-out answers (and calibration responses): HF keeps a KV cache beside the weights; vLLM loads its own
    copy of the weights and fills what is free of the GPU, less 2 GiB, with KV cache."""
    g = max(1, work.gpus)
    weights = shape.weight_bytes / g
    context = work.prompt_length + work.max_new_tokens
    prompts = work.generations * work.eval_prompts
    steps = work.generations * math.ceil(work.eval_prompts / work.eval_batch) * work.max_new_tokens
    steps += math.ceil((work.cal_gen_tokens + work.extra_gen_tokens) / max(1, work.eval_batch))
    seconds = _decode_s(steps, shape, speed, g) + _flop_s(2 * shape.n_params * prompts * work.prompt_length, speed, g)
    if work.backend == "vllm":
        engine = max(0.0, min(0.95 * work.gpu_bytes, work.gpu_bytes - 2 * GIB) - weights)
        parts = {"weights": weights, "vllm weights": weights, "kv": max(0.0, engine - weights)}
    else:
        kv = shape.kv_bytes_per_token * work.eval_batch * context / g
        parts = {
            "weights": weights,
            "kv": kv,
            "activations": shape.forward_bytes(work.eval_batch * work.prompt_length) / g,
        }
    return _phase("generation", parts, gpu_seconds=seconds)


def attack_phase(shape: ModelShape, work: Workload, speed: Throughput) -> Phase:
    """Refusal ablation: its two unsigned scorings per stage, as scoring_phase counts them, with both sides' dense
    fp32 scores and the weight snapshot in host memory (scoring.offload) instead of a stored tail."""
    from dataclasses import replace

    runs = replace(work, set_runs=work.attack_sets, score_sets=len(work.attack_sets), dense_scores=False)
    phase = scoring_phase(shape, runs, speed)
    return replace(phase, name="attack scoring", host=work.attack_host)


def judging_phase(judge: ModelShape, work: Workload, shape: ModelShape, speed: Throughput) -> Phase:
    """The judge model visits the GPU beside the run's weights (inference only, one block's temporaries)."""
    transient = work.judge_batch * work.judge_tokens * (4 * judge.hidden + 2 * judge.intermediate) * judge.dtype_bytes
    flops = 2 * judge.n_params * work.generations * work.eval_prompts * work.judge_tokens
    return _phase("judging", {"weights": shape.weight_bytes / max(1, work.gpus), "judge": judge.weight_bytes + transient},
                  host=judge.weight_bytes, gpu_seconds=_flop_s(flops, speed, 1))  # fmt: skip


def finetune_phase(shape: ModelShape, work: Workload, tune: FineTune, speed: Throughput) -> Phase:
    """LoRA: fp32 adapters, their gradients and AdamW's two fp32 states; full: a gradient per weight and two fp32
    AdamW states per weight. Activations as in a scoring step at the fine-tune's batch and length."""
    g = max(1, work.gpus)
    per_block = sum(tune.rank * (d_out + d_in) for d_out, d_in in shape.block_matrices)
    if tune.method == "full":
        state = shape.n_params * (shape.dtype_bytes + 2 * 4)
    else:
        state = per_block * shape.n_layers * 4 * 4  # weight, gradient, two moments
    tokens = tune.batch * tune.length
    act = shape.step_bytes(tokens, work.checkpointing, work.logits_chunk)
    passes = tune.steps * max(1, tune.accum)
    flops = (6 if tune.method == "full" else 4) * shape.n_params * tokens * passes
    return _phase(f"finetune {tune.name}", {"weights": shape.weight_bytes / g, "optimizer": state / g,
                  "activations": act / g}, passes=passes, gpu_seconds=_flop_s(flops, speed, g))  # fmt: skip


def job_phases(shape: ModelShape, work: Workload, judge: ModelShape | None, speed: Throughput) -> list[Phase]:
    """Every phase the job runs, in order."""
    g = max(1, work.gpus)
    out = [_phase("load", {"weights": shape.weight_bytes / g}, disk_read=shape.weight_bytes,
                  host_seconds=shape.weight_bytes / (speed.load_gbs * 1e9))]  # fmt: skip
    out += [finetune_phase(shape, work, t, speed) for t in work.finetunes if t.name == "derive"]
    if work.method == "lowrank":
        out.append(lowrank_phase(shape, work, speed))
    elif work.sequential and work.sequential_kinds:
        out.append(sequential_phase(shape, work, speed))
    elif work.score_sets:
        out.append(scoring_phase(shape, work, speed))
    if work.replace_base and work.masked:
        out.append(base_read_phase(shape, work, speed))
    if work.eval_forward_tokens:
        out.append(evaluation_phase(shape, work, speed))
    if work.attack_sets:
        out.append(attack_phase(shape, work, speed))
    if work.generations or work.cal_gen_tokens or work.extra_gen_tokens:
        out.append(generation_phase(shape, work, speed))
    if judge is not None and work.judge_batch and work.generations:
        out.append(judging_phase(judge, work, shape, speed))
    out += [finetune_phase(shape, work, t, speed) for t in work.finetunes if t.name != "derive"]
    return out


def size_job(
    shape: ModelShape, work: Workload, judge: ModelShape | None, speed: Throughput, phases: list[Phase] | None = None
) -> JobSize:
    """Per-phase GPU peak, host RAM, disk and time of one job; its peak, passes, tokens and GPU-hours.
    ``phases``: job_phases' with an experiment's stages added (experiment_sizing.size_staged)."""
    g = max(1, work.gpus)
    phases = job_phases(shape, work, judge, speed) if phases is None else phases
    top = max(phases, key=lambda p: p.gpu)
    work_phase = next((p for p in phases if p.name in ("scoring", "sequential", "lowrank")), None)
    parts = work_phase.parts if work_phase else {}
    jud = next((p for p in phases if p.name == "judging"), None)
    seconds = sum(p.gpu_seconds + p.host_seconds for p in phases)
    return JobSize(
        n_scored=shape.n_scored,
        weights=shape.weight_bytes / g,
        score_buffer=parts.get("scores", 0.0) if work_phase and work_phase.name == "scoring" else 0.0,
        activations=parts.get("activations", 0.0),
        kv_cache=max((p.parts.get("kv", 0.0) for p in phases), default=0.0),
        judge=jud.parts.get("judge", 0.0) if jud else 0.0,
        peak=top.gpu,
        phase=top.name,
        passes=work_phase.passes if work_phase else 0,
        generated_tokens=work.generations * work.eval_prompts * work.max_new_tokens
        + work.cal_gen_tokens
        + work.extra_gen_tokens,
        gpu_hours=seconds * g / 3600,
        host_ram=max(p.host for p in phases),
        disk_read=sum(p.disk_read for p in phases),
        phases=[asdict(p) for p in phases],
    )


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"
