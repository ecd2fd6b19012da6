"""Fine-tuning a pretrained GPT for a task: `gptlab finetune`, on the same loop as pretraining (`train.fit`).

Tasks
  sft       causal LM on prompt -> response; the loss covers response tokens only (prompt targets are -100)
  classify  a linear head on the final hidden state of the last real token (the <|endoftext|> appended
            to every text, as GPT-1 reads its "extract" token)
  tag       a linear head on each word's first token: BIO tags per word (NER), read with the sentence seen
            once before (--tag-context echo) or only the words to the left (left)
Methods
  full      every parameter trains
  lora      the base is frozen; low-rank adapters on the chosen linear layers train (gptlab.lora)
  freeze    only the top --train-layers blocks, the final LayerNorm and the classification head train
            (the SFT output matrix is tied to the token embedding, the bottom of the network, so it stays frozen)

Data: DIR/train.jsonl and DIR/val.jsonl (what `gptlab data build` writes), one JSON object per line:
  {"instruction": ..., "input": ... (optional), "output": ...}    instruction data (sft)
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}    chat data (sft)
  {"text": ..., "label": ...}    classification
  {"tokens": [...], "tags": [...]}    token classification (one IOB2 tag per word)
Both SFT formats are rendered in the run's prompt style (--prompt-style, default `instruction`; see
gptlab.prompts), which the checkpoint records so that serving and evaluation prompt the model the same
way; an instruction with an input becomes the user message "instruction\\n\\ninput". Only the
assistant's replies (with the style's end of turn) are trained.

Batches are padded, not packed: each row is one example, right-padded with <|endoftext|> whose
targets are -100. Causal attention never looks right, so padding cannot change a real token's output.
Checkpoints hold only what training changes (the LoRA matrices, the unfrozen blocks, the head) plus the
path of the base model they apply to; runs from scratch (--from-scratch) save every weight.

Modules, bottom up: config (FinetuneConfig), model (the wrapped GPT and what trains), data (records,
examples, batches), tasks (the training tasks and their scores, `gptlab eval-task`), predict (`gptlab
predict`, the server's /v1/predict), run (`gptlab finetune`), artifacts (`merge-lora`, `export-lora`). Loading a fine-tuned checkpoint is gptlab.loading's.
"""
