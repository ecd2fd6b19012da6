"""Evaluation of language models: `gptlab eval perplexity | icl | tasks | harness`.

- `scoring`: batched log-likelihoods of given tokens (right-padded windows through the model, the LM head
  only on the scored positions): what perplexity, multiple-choice tasks and lm-eval's requests need;
- `perplexity`: sliding-window perplexity and bits per byte of any text or prepared token split;
- `tasks`: in-context-learning task definitions (YAML + JSONL, built-in ones included);
- `icl`: k-shot prompts, multiple-choice and open-ended scoring, contextual calibration, the curve;
- `harness`: lm-evaluation-harness's `LM` over the same model, in process.

Generation goes through the shared engine (gptlab.generate), models through gptlab.loading.
"""
