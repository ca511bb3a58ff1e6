"""The paper's attacks on a (pruned) model: refusal ablation and a harmful LoRA fine-tune (``eval.generation.attack``)."""
