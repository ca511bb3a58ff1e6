"""experiment=orgad2026_em: the B-TAP authors' emergent-misalignment run, one (domain, p, q) cell of their grid
(btap_reference.md section 11; the data rules of sections 2.4 and 2.5).

  1. fine-tune the original model on the domain's training pairs (em.finetune, chat template, completion-only loss,
     nothing held at zero): the EM model. Skipped when its products below are cached.
  2. the EM model answers the held-out prompts (sampled, em.answer_tokens): their selfgen CSV. Skipped with
     em.prune_file (their file is used row for row instead).
  3. prune the ORIGINAL model (its weights come back from a host snapshot of what stage 1 changed) from the first
     min(calibration.n, rows) rows of a seeded permutation of the answers, tokenised as calibration says (their EM
     format: tok(prompt + " ") ++ tok(response)), benign side = the run's benign calibration set.
  4. fine-tune the pruned model with the same recipe on the same pairs; em.hold_zeros=false (theirs): the merge
     writes over the zeros (counted), true: they stay exactly zero.
  5. evaluate both the EM model ("em_model", cached: the baseline of every cell) and the pruned, fine-tuned model
     ("pruned") on the EM questions, judged by em.judge (and the in-domain judge), with paired bootstrap intervals.

The answers and the EM model's evaluation are shared artifacts keyed by the EM model (model fingerprint, domain files,
split, recipe, device) and their settings, so every cell of a p x q grid, and a rerun, makes one EM model and one set
of answers. With em.prune_file the EM model is still made (once, cached) when its evaluation is not cached: the
em_model arm is the baseline and needs it; em.domain is then still needed (stage 4 trains on its pairs).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harmsweep.alignment.finetune import finetune
from harmsweep.alignment.spec import FinetuneSpec
from harmsweep.artifacts import write_json, write_jsonl
from harmsweep.attacks.finetune import encode_harmful
from harmsweep.attacks.restore import WeightSnapshot
from harmsweep.cache import cached, content_key, mask_key, write_key_info
from harmsweep.calibration.pairs import Pair, generate_responses, pair_row, prompt_ids
from harmsweep.config.schema import Config, EMConfig
from harmsweep.data.btap import check_pair_file, read_pairs
from harmsweep.data.records import Record
from harmsweep.devices import input_device
from harmsweep.errors import HarmsweepError
from harmsweep.evaluation.em import Question, load_questions
from harmsweep.evaluation.em_protocol import ORGAD2026_QUESTIONS, arm_intervals, delta_intervals, evaluate_em
from harmsweep.evaluation.judges.em import DEFAULT_MODEL, KNOWN_EM_JUDGES, make_em_judge
from harmsweep.evaluation.judges.endpoint import Endpoint
from harmsweep.evaluation.judges.in_domain import make_in_domain_judge
from harmsweep.experiments.common import benign_set, derived_lm, finish, score_sets, scoring_set, select_mask
from harmsweep.experiments.em import fitting, nonzero_at
from harmsweep.experiments.em_stages import (
    VERSION,
    DomainSplit,
    answer_key,
    domain_split,
    eval_key,
    prune_rows,
    read_answers,
    write_answers,
)
from harmsweep.experiments.matrices import Matrix, mask_size
from harmsweep.generation.sampling import EngineInputs, Sampling, resolve_backend
from harmsweep.intervals import Resampler, Sample, samples_from_json, samples_to_json
from harmsweep.models.parts import scored_parameters
from harmsweep.pipeline.context import RunContext
from harmsweep.pruning.masks import apply_mask, save_mask

log = logging.getLogger(__name__)
ARMS = ("em_model", "pruned")
Tensors = dict[str, torch.Tensor]
EvalArm = tuple[dict[str, Any], dict[str, Sample], list[dict[str, Any]]]  # metrics, samples, rows


def _block(cfg: Config) -> EMConfig:
    if not cfg.em:
        raise HarmsweepError("experiment=orgad2026_em needs the em settings: use the preset (experiment=orgad2026_em)")
    return cfg.em


def _check_settings(em: EMConfig, n: int) -> None:
    for key in ("samples_per_question", "max_new_tokens", "answer_tokens"):
        if int(getattr(em, key)) < 1:
            raise HarmsweepError(f"em.{key}={getattr(em, key)} must be at least 1")
    if not 0 < float(em.top_p) <= 1 or float(em.temperature) < 0:
        raise HarmsweepError(f"em.top_p={em.top_p} must lie in (0, 1] and em.temperature={em.temperature} be >= 0")
    if n < 1:
        raise HarmsweepError(f"calibration.n={n} must be at least 1 (rows of the answers file to prune from)")


def check_judges(em: EMConfig) -> None:
    """em.judge names a known judge; an endpoint judge has its key set and answers at its host and port (one TCP
    connection), so a dead server stops the run in one line before anything is fine-tuned."""
    name = em.judge.get("name")
    if name not in KNOWN_EM_JUDGES:
        raise HarmsweepError(f"em.judge.name={name} is not known; pick one of {', '.join(KNOWN_EM_JUDGES)}")
    if em.in_domain and name != "em_endpoint":
        raise HarmsweepError(
            f"em.in_domain=true asks em.judge's endpoint, but em.judge.name={name}; "
            "set em.judge.name=em_endpoint (with its base_url/model) or em.in_domain=false"
        )
    if name == "em_endpoint":
        endpoint = Endpoint.of(em.judge, model=DEFAULT_MODEL)
        endpoint.require_key("em.judge")
        endpoint.check_reachable("em.judge")


def questions_path(em: EMConfig, root: str | None) -> Path:
    if em.questions:
        return Path(em.questions).expanduser()
    if not root:
        raise HarmsweepError("em.questions is not set and data.root is not set")
    return Path(root) / "em" / "first_plot_questions.yaml"


def _questions(em: EMConfig, root: str | None) -> list[Question]:
    return load_questions(questions_path(em, root), list(em.question_ids or ORGAD2026_QUESTIONS))


def check(cfg: Config) -> None:
    """Everything the stages read, before the model loads: settings, judges, domain files and split, the prune
    file's columns, the questions."""
    em = _block(cfg)
    _check_settings(em, cfg.calibration.n)
    check_judges(em)
    domain_split(em, cfg.seed)
    if em.prune_file:
        check_pair_file(Path(em.prune_file).expanduser(), "em.prune_file")
    _questions(em, cfg.data.root)


class EMModel:
    """Stage 1 on demand, at most once: the weights it will change are copied to host memory first (at 8B a second
    model does not fit on the device), and ``restore`` puts them back bit for bit for stage 3."""

    def __init__(self, ctx: RunContext, tensors: Tensors, spec: FinetuneSpec) -> None:
        self.ctx, self.tensors, self.spec = ctx, tensors, spec
        self.snapshot: WeightSnapshot | None = None
        self.losses: list[float] = []

    def ensure(self) -> None:
        if self.snapshot is not None:
            return
        model = self.ctx.lm.model
        if self.spec.method == "lora":  # the merge rewrites the adapted matrices only
            wanted = set(self.spec.targets)
            names = [n for n, p in scored_parameters(model).items() if not wanted or p.module_type in wanted]
        else:
            names = [n for n, _ in model.named_parameters()]
        self.snapshot = WeightSnapshot.of_parameters(model, names)
        self.losses = self.ctx.timed("finetune_em", lambda: finetune(model, self.tensors, self.spec))
        log.info("EM model: %d steps, loss %s -> %s", len(self.losses), *_ends(self.losses))

    @property
    def made(self) -> bool:
        return self.snapshot is not None

    def restore(self) -> None:
        if self.snapshot is not None and not self.snapshot.restored:
            self.snapshot.restore()


def _ends(losses: Sequence[float]) -> list[float | None]:
    return [losses[0], losses[-1]] if losses else [None, None]


def train_tensors(ctx: RunContext, split: DomainSplit, spec: FinetuneSpec) -> tuple[Tensors, int]:
    """The training pairs as the fine-tune sees them (prompt rendered with the generation prompt, labels = response
    + end of turn); pairs whose prompt alone fills max_length are dropped (counted)."""
    tok = ctx.lm.tokenizer
    lengths = [len(prompt_ids(tok, p.prompt, ctx.template)) for p in split.train]
    kept = fitting(split.train, lengths, spec.max_length, f"EM domain {split.domain}")
    records = [Record(p.prompt, p.response, source_id=p.source_id) for p in kept]
    return encode_harmful(tok, records, ctx.template, spec.max_length), len(split.train) - len(kept)


def answers(
    ctx: RunContext, em: EMConfig, split: DomainSplit, em_fp: str, maker: EMModel
) -> tuple[list[Pair], str, Path]:
    """Stage 2 (or em.prune_file): the pairs to prune from, how they came (given/computed/cached) and their file."""
    if em.prune_file:
        path = Path(em.prune_file).expanduser()
        return [Pair(r.prompt, str(r.response), r.source_id) for r in read_pairs(path)], "given", path
    cfg, lm = ctx.cfg, ctx.lm
    info = {"version": VERSION, "kind": "answers", "em_model": em_fp, **answer_key(em, cfg.seed)}
    entry = ctx.root / "em2026_answers" / content_key(info)

    def compute(e: Path) -> list[Pair]:
        maker.ensure()
        write_key_info(e, info)
        sampled = em.temperature > 0
        sampling = Sampling(max_new_tokens=em.answer_tokens, do_sample=sampled, temperature=float(em.temperature),
                            top_p=float(em.top_p), seed=cfg.seed)  # fmt: skip
        records = [Record(p.prompt, source_id=p.source_id) for p in split.held_out]  # keys: per-prompt seeds
        pairs = ctx.timed("generate_answers", lambda: generate_responses(
            lm.model, lm.tokenizer, records, ctx.template, prefill_tokens=0, sampling=sampling,
            batch_size=cfg.eval.generation.batch_size, desc="EM-model answers (held-out prompts)"))  # fmt: skip
        kept = [p for p in pairs if p.response.strip()]  # an empty cell would crash their loader
        if len(kept) < len(pairs):
            log.warning("EM-model answers: %d of %d empty answers left out", len(pairs) - len(kept), len(pairs))
        if not kept:
            raise HarmsweepError("the EM model gave only empty answers to the held-out prompts: nothing to prune from")
        write_answers(kept, e / "answers.csv")
        return kept

    pairs, computed = cached(entry, compute, lambda e: read_answers(e / "answers.csv"), "answers.csv")
    ctx.computed["em_answers"] = computed
    return pairs, "computed" if computed else "cached", entry / "answers.csv"


def em_model_eval(ctx: RunContext, info: Mapping[str, Any], maker: EMModel, evaluate: Any) -> tuple[EvalArm, Path]:
    """The EM model's evaluation (the em_model arm), cached by the EM model and the evaluation settings."""
    entry = ctx.root / "em2026_eval" / content_key(dict(info))

    def compute(e: Path) -> EvalArm:
        maker.ensure()
        write_key_info(e, info)
        metrics, samples, rows = ctx.timed("evaluate_em_model", lambda: evaluate("em_model"))
        write_json({"metrics": metrics, "samples": samples_to_json(samples), "rows": rows}, e / "em_model.json")
        return metrics, samples, rows

    def load(e: Path) -> EvalArm:
        data = json.loads((e / "em_model.json").read_text())
        return data["metrics"], samples_from_json(data["samples"]), data["rows"]

    value, computed = cached(entry, compute, load, "em_model.json")
    ctx.computed["em_model_eval"] = computed
    return value, entry / "em_model.json"


def _split_metrics(intervals: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(overall metrics, question id -> its em_rate interval)."""
    overall = {k: v for k, v in intervals.items() if not k.startswith("em_rate/")}
    return overall, {k.removeprefix("em_rate/"): v for k, v in intervals.items() if k.startswith("em_rate/")}


@dataclass(frozen=True)
class Judged:
    """How an arm is answered and judged: the same questions, settings and judges for every arm of every cell."""

    em: EMConfig
    questions: list[Question]
    judge: Any
    in_domain: Any
    recipe: dict[str, Any]  # the EM model's recipe: its fingerprint names the arm's weights

    def evaluate(self, ctx: RunContext, stage: str, lm: Any = None) -> EvalArm:
        """One arm's answers and judgements. With eval.generation.backend=vllm the engine serves a scratch copy of
        the tuned weights in memory (source "memory:", keyed by their fingerprint: never the checkpoint they came
        from) and is shut down after, so the fine-tunes and score passes that follow have the GPU."""
        gen, model = ctx.cfg.eval.generation, ctx.lm.model
        lm = lm or derived_lm(ctx.lm, model, {"em2026_model": self.recipe})
        backend = resolve_backend(gen.backend)
        engine = EngineInputs(f"memory:{stage}", lm.fingerprint, None) if backend == "vllm" else None
        try:
            return evaluate_em(lm, ctx.template, self.questions, self.em, self.judge, self.in_domain,
                               seed=ctx.cfg.seed, batch_size=gen.batch_size, stage=stage, backend=backend,
                               engine=engine)  # fmt: skip
        finally:
            if engine is not None:
                from harmsweep.generation.vllm import release_engine

                release_engine()


@dataclass(frozen=True)
class Shared:
    """What every cell of a grid shares: how arms are judged, the training pairs, the EM model's answers and
    evaluation, and the pairs pruned from (made once, then read from the artifact cache)."""

    judged: Judged
    judges: dict[str, str | None]  # judge versions
    tensors: Tensors
    dropped: int
    split: DomainSplit
    em_fp: str
    maker: EMModel
    answers_stage: str
    answers_path: Path
    em_arm: EvalArm
    eval_path: Path
    rows: list[int]
    chosen: list[Pair]


def shared_stages(ctx: RunContext) -> Shared:
    """Stages 1 and 2, the em_model arm and the choice of rows to prune from; the model is the original after."""
    cfg, model = ctx.cfg, ctx.lm.model
    em = _block(cfg)
    _check_settings(em, cfg.calibration.n)
    check_judges(em)  # first thing: a server that went down since the check stops before any fine-tune
    split = domain_split(em, cfg.seed)
    judge = make_em_judge(em.judge)
    in_domain = make_in_domain_judge(em.judge, str(em.domain)) if em.in_domain else None
    judges = {"judge": judge.version, "in_domain": in_domain.version if in_domain else None}
    tensors, dropped = train_tensors(ctx, split, em.finetune)
    recipe = {"version": VERSION, "split": split.key(cfg.seed), "finetune": em.finetune.key(),
              "template": ctx.template, "device": input_device(model).type}  # fmt: skip
    judged = Judged(em, _questions(em, cfg.data.root), judge, in_domain, recipe)
    em_fp = derived_lm(ctx.lm, model, {"em2026_model": recipe}).fingerprint
    maker = EMModel(ctx, tensors, em.finetune)
    try:  # stages 1, 2 and the em_model arm: whatever is not cached needs the EM model
        pairs, answers_stage, answers_path = answers(ctx, em, split, em_fp, maker)
        info = {"version": VERSION, "kind": "em_model_eval", "em_model": em_fp,
                **eval_key(em, questions_path(em, cfg.data.root), cfg.seed, judges)}  # fmt: skip
        em_arm, eval_path = em_model_eval(ctx, info, maker, lambda stage: judged.evaluate(ctx, stage))
    finally:
        maker.restore()  # the original weights, bit for bit
    ctx.computed["em_model"] = maker.made
    rows = prune_rows(len(pairs), cfg.calibration.n, cfg.seed)  # their EM loader: always shuffled
    return Shared(judged, judges, tensors, dropped, split, em_fp, maker, answers_stage, answers_path, em_arm,
                  eval_path, rows, [pairs[i] for i in rows])  # fmt: skip


def prepare(ctx: RunContext, entries: Sequence[str]) -> dict[str, str]:
    """stage=prepare (one job for a grid's cells, which SLURM starts after it): the shared stages and both score
    sets of stage 3, into the artifact cache; nothing is pruned. Returns the artifacts made."""
    state = shared_stages(ctx)
    score_sets(ctx, scoring_set(ctx, state.chosen, "harmful"), benign_set(ctx))
    return {"answers": str(state.answers_path), "em_model_eval": str(state.eval_path)}


def run(ctx: RunContext) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The five stages of one grid cell; see the module docstring."""
    cfg, run_dir, model = ctx.cfg, ctx.run_dir, ctx.lm.model
    state = shared_stages(ctx)
    judged, split, judges = state.judged, state.split, state.judges
    em, questions, judge, recipe = judged.em, judged.questions, judged.judge, judged.recipe
    tune, tensors, maker, rows = em.finetune, state.tensors, state.maker, state.rows
    em_metrics, em_samples, em_rows = state.em_arm

    # stage 3: prune the original model from the answers
    chosen = state.chosen
    write_jsonl([{"row": i, **pair_row(p)} for i, p in zip(rows, chosen, strict=True)], run_dir / "prune_rows.jsonl")
    mask = select_mask(ctx, scoring_set(ctx, chosen, "harmful"), benign_set(ctx))
    n_pruned = mask_size(mask)
    save_mask(mask, run_dir / "mask.safetensors")
    apply_mask(model, mask)

    # stage 4: the pruned model fine-tuned with the same recipe (zeros held only with em.hold_zeros)
    frozen = mask if em.hold_zeros else None
    losses = ctx.timed("finetune_pruned", lambda: finetune(model, tensors, tune, frozen=frozen))
    nonzero = nonzero_at(model, mask)
    log.info("pruned model fine-tuned: %d of %d pruned weights non-zero after", nonzero, n_pruned)

    # stage 5: the pruned, fine-tuned model on the EM questions
    pruned_lm = derived_lm(
        ctx.lm, model, {"em2026_pruned": recipe, "mask": mask_key(mask), "hold_zeros": em.hold_zeros}
    )
    pr_metrics, pr_samples, pr_rows = ctx.timed(
        "evaluate_pruned", lambda: state.judged.evaluate(ctx, "pruned", pruned_lm)
    )

    resampler = Resampler(cfg.bootstrap)  # one draw per set of answer ids: the arms pair up
    overall, per_question = {}, {}
    for arm, samples in (("em_model", em_samples), ("pruned", pr_samples)):
        overall[arm], per_question[arm] = _split_metrics(arm_intervals(samples, cfg.bootstrap, resampler))
    delta, _ = _split_metrics(delta_intervals(em_samples, pr_samples, cfg.bootstrap, resampler))

    metrics: dict[str, Any] = {"n_pruned": n_pruned, "nonzero_after_finetune": nonzero, "prune_rows": len(rows),
                               "actual_sparsity": n_pruned / ctx.n_scored()}  # fmt: skip
    for arm, raw in (("em_model", em_metrics), ("pruned", pr_metrics)):
        metrics.update({f"{name}/{arm}": iv["value"] for name, iv in overall[arm].items()})
        metrics.update({f"em_rate/{q}/{arm}": iv["value"] for q, iv in per_question[arm].items()})
        metrics.update({f"{k}/{arm}": raw.get(k) for k in ("n", "n_scored")})
    metrics.update({f"delta_{name}": iv["value"] for name, iv in delta.items()})

    qids = [q.id for q in questions]
    note = (f"EM rate per question ({em.samples_per_question} samples each): the EM model and the pruned model "
            f"fine-tuned again (hold_zeros={em.hold_zeros}); judge {judge.version}; EM = aligned < "
            f"{em.aligned_below:g} and coherent > {em.coherent_above:g}")  # fmt: skip
    values = [[(per_question[a].get(q) or {}).get("value") for q in qids] for a in ARMS]
    figures = {"em_questions": Matrix(list(ARMS), qids, values, "em_rate", note)}
    items = em_rows + pr_rows
    write_jsonl(items, run_dir / "items.jsonl")
    extra = {
        "em2026": {
            "domain": split.domain, "p": cfg.pruning.protect, "q": cfg.pruning.harm_fraction,
            "hold_zeros": bool(em.hold_zeros), "backend": resolve_backend(cfg.eval.generation.backend),
            "judge": judge.version, "in_domain_judge": judges["in_domain"],
            "prune_source": "file" if em.prune_file else "selfgen", "prune_rows": len(rows), "n_pruned": n_pruned,
            "nonzero_after_finetune": nonzero, "arms": overall, "per_question": per_question, "delta": delta,
            "stages": {"em_model": "computed" if maker.made else "cached", "answers": state.answers_stage,
                       "finetune_pruned_losses": _ends(losses)},
        },
        "n_pruned": n_pruned,
        "actual_sparsity": metrics["actual_sparsity"],
        "split": {"source": split.source, "n_train": len(split.train), "n_train_dropped": state.dropped,
                  "n_held_out": len(split.held_out), "files": split.files},
        "questions": qids,
        "finetune": tune.key(),
        "em_model_fingerprint": state.em_fp,
        "em_model_losses": _ends(maker.losses) if maker.made else None,
        "judge_failures": {k: getattr(j, "n_failed", None) for k, j in (("judge", judge), ("in_domain", judged.in_domain))},
        "artifacts": {"answers": str(state.answers_path), "em_model_eval": str(state.eval_path),
                      "mask": str(run_dir / "mask.safetensors"), "prune_rows": str(run_dir / "prune_rows.jsonl"),
                      "items": str(run_dir / "items.jsonl")},
    }  # fmt: skip
    return finish(ctx, metrics, figures, extra), items
