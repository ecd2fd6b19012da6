"""What a fine-tuning run becomes: a self-contained checkpoint (`gptlab merge-lora`) or an HF GPT-2 base
model plus a PEFT adapter (`gptlab export-lora`). A multimodal run's vision tower is part of the model: a merged
checkpoint keeps it, and formats that cannot hold it (HF GPT-2, PEFT) refuse the run (`refuse_vision`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from gptlab import checkpoint, hf, loading, lora
from gptlab.checkpoint import CheckpointError
from gptlab.finetune.config import FinetuneConfig
from gptlab.outputs import atomic_directory, check_new_output


def merge_checkpoint(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """`gptlab merge-lora`: a self-contained full checkpoint of a fine-tuned run (LoRA merged in).

    SFT runs become ordinary gptlab checkpoints (that keep their prompt style); classifiers, taggers and
    multimodal runs stay fine-tuning checkpoints with every weight (the head or the vision tower included).
    """
    out = check_new_output(out)
    payload = checkpoint.load(ckpt)
    if "finetune" not in payload:
        raise CheckpointError(f"{ckpt} is not a `gptlab finetune` checkpoint")
    loaded, info = loading.from_payload(payload), payload["finetune"]
    kept = {"tokenizer": payload["tokenizer"], "step": payload["step"], "prompt_style": loaded.prompt_style.name}
    if loaded.task == "sft":
        gpt = loaded.gpt()
        checkpoint.save(out, {"model": gpt.state_dict(), "model_config": gpt.config.to_dict(), **kept})
        return {"out": str(out), "params": gpt.num_params()}
    model = loaded.model
    if lora.lora_layers(model.gpt):
        lora.merge_lora(model.gpt)
    model.partial_state = False  # every weight, and no base to rebuild from
    checkpoint.save(out, {"model": model.state_dict(), "model_config": model.config.to_dict(), **kept,
                          "finetune": {**info, "config": {**info["config"], "method": "full"}, "base": None}})
    return {"out": str(out), "params": lora.count_parameters(model)[1]}


def refuse_vision(ckpt: str | Path, target: str) -> None:
    """The one error for exporting a multimodal run to a text-only format: writing its GPT alone would silently
    drop the image encoder and projector the model cannot answer without."""
    raise CheckpointError(f"{ckpt} is a multimodal (--task vqa) run and {target} cannot hold its vision tower; "
                          f"`gptlab merge-lora` writes one self-contained gptlab checkpoint with it")


def export_lora(ckpt: str | Path, out: str | Path) -> dict[str, Any]:
    """`gptlab export-lora`: OUT/base (HF GPT-2 export of the base model) + OUT/adapter (PEFT LoRA adapter)."""
    out = check_new_output(out)
    payload = checkpoint.load(ckpt)
    info = payload.get("finetune")
    if info is not None and info["config"]["task"] == "vqa":
        refuse_vision(ckpt, "a PEFT adapter on an HF GPT-2 base")
    if info is None or info["config"]["method"] != "lora" or info["config"]["task"] != "sft":
        raise CheckpointError(f"{ckpt} is not a LoRA fine-tuning of a language model (--task sft --method lora)")
    loaded = loading.from_payload(payload)
    base = copy.deepcopy(loaded.model.gpt)
    lora.remove_lora(base, merge=False)
    lora_config = FinetuneConfig(**info["config"]).lora_config(loaded.tokenizer)
    tmp = None
    try:  # both parts appear together or not at all: a full disk leaves nothing behind
        with atomic_directory(out) as tmp:
            hf.save_hf(base, loaded.tokenizer, tmp / "base")
            # the base as a path from the adapter directory: OUT still works after it is moved or copied
            lora.save_peft_adapter(loaded.model.gpt, lora_config, tmp / "adapter", base_model_path="../base")
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"cannot write {out}: {checkpoint.os_reason(err)}") from None
    except CheckpointError as err:  # save_hf's own: name the output, not the removed temporary directory
        raise CheckpointError(str(err).replace(str(tmp), str(out))) from None
    trainable = sum(t.numel() for t in lora.adapter_state(loaded.model.gpt).values())
    return {"base": str(out / "base"), "adapter": str(out / "adapter"), "adapter_params": trainable}
