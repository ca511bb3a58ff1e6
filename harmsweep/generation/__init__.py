"""Generation: sampling settings and two backends behind one call (HF generate, vLLM)."""
