"""LoRA: parameter budget on GPT-2, exact merge, gradients only where they belong, and PEFT interop."""

import json

import pytest
import torch

from gptlab import cli, loading, lora
from gptlab.config import GPTConfig
from gptlab.finetune.config import configs_from_sources
from gptlab.finetune.run import finetune
from gptlab.model import GPT
from tests.conftest import run_cli, tiny_model_config

ALL = lora.TARGETS
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only spins


def _adapted_tiny(targets=ALL, seed=0) -> GPT:
    """A tiny GPT with LoRA whose B matrices are random, so the adapters really change the outputs."""
    torch.manual_seed(seed)
    model = lora.apply_lora(GPT(tiny_model_config()), lora.LoRAConfig(rank=4, alpha=8, targets=targets))
    for layer in lora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model.eval()


def test_gpt2_preset_trains_under_one_percent():
    with torch.device("meta"):  # shapes only: counting needs no 124M real weights
        model = GPT(GPTConfig.from_preset("gpt2"))
        n_base = model.num_params()
        for targets, rank in ((("attn.c_attn", "attn.c_proj"), 8), (ALL, 8)):
            adapted = lora.apply_lora(GPT(GPTConfig.from_preset("gpt2")), lora.LoRAConfig(rank=rank, targets=targets))
            trainable, total = lora.count_parameters(adapted)
            # per block: rank * (in + out) for each adapted matrix
            shapes = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072),
                      "mlp.c_proj": (3072, 768)}
            assert trainable == 12 * sum(rank * sum(shapes[t]) for t in targets)
            assert total == n_base + trainable
            assert trainable / total <= 0.01, (targets, trainable / total)


def test_starts_as_the_base_model_and_only_adapters_get_gradients():
    torch.manual_seed(0)
    base = GPT(tiny_model_config()).eval()
    tokens = torch.randint(0, 512, (2, 16))
    before = base(tokens)[0]
    adapted = lora.apply_lora(base, lora.LoRAConfig(rank=4))
    assert torch.equal(adapted(tokens)[0], before)  # B = 0 at the start
    loss = adapted(tokens, tokens)[1]
    loss.backward()
    with_grad = {n for n, p in adapted.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in adapted.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if "lora_" not in n)


def test_merged_and_unmerged_logits_agree():
    model = _adapted_tiny()
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = model(tokens)[0]
        base_logits = lora.remove_lora(_adapted_tiny(), merge=False)(tokens)[0]
        merged_model = lora.merge_lora(model)
        merged = merged_model(tokens)[0]
    assert (unmerged - base_logits).abs().max() > 1e-2  # the adapters do change the model
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert not lora.lora_layers(merged_model)
    assert set(merged_model.state_dict()) == set(GPT(tiny_model_config()).state_dict())


def test_token_rows_train_in_the_embedding_and_the_tied_head_and_merge_exactly():
    torch.manual_seed(0)
    base = GPT(tiny_model_config()).eval()
    assert base.lm_head.weight is base.transformer.wte.weight  # the tiny model ties them, like GPT-2
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = base(tokens)[0]
    rows = (3, 5, int(tokens[0, 0]))
    model = lora.apply_lora(base, lora.LoRAConfig(rank=4, token_ids=rows))
    assert torch.equal(model(tokens)[0], before)  # the rows start as the base's
    model(tokens, tokens)[1].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B", "tokens_delta"))}
    delta = lora.token_rows(model).trainable_tokens_delta
    assert delta.grad.abs().sum(1).gt(0).all()  # each row learns: as an input (row 0) or as an output
    with torch.no_grad():
        torch.nn.init.normal_(delta, std=0.5)
        unmerged = model(tokens)[0]
        # the output layer scores the new rows: logits of the other tokens move only through the inputs
        assert (unmerged - before)[..., list(rows)].abs().max() > 1e-2
        merged_model = lora.merge_lora(model)
        merged = merged_model(tokens)[0]
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert merged_model.lm_head.weight is merged_model.transformer.wte.weight  # still one matrix
    assert torch.equal(merged_model.transformer.wte.weight[list(rows)], delta.detach())
    assert set(merged_model.state_dict()) == set(GPT(tiny_model_config()).state_dict())


def test_bad_settings_are_clear_errors():
    with pytest.raises(lora.LoRAError, match="rank"):
        lora.LoRAConfig(rank=0)
    with pytest.raises(lora.LoRAError, match="targets"):
        lora.LoRAConfig(targets=("attn.q_proj",))
    with pytest.raises(lora.LoRAError, match="no LoRA layers"):
        lora.merge_lora(GPT(tiny_model_config()))
    with pytest.raises(lora.LoRAError, match="outside the vocabulary of 512"):
        lora.apply_lora(GPT(tiny_model_config()), lora.LoRAConfig(token_ids=(512,)))


def test_peft_loads_the_exported_adapter_with_the_same_logits(tmp_path, tiny_pretrained, capsys):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    records = [{"instruction": "Spell out this date.", "input": f"20{i:02d}-0{1 + i % 9}-1{i % 10}",
                "output": f"1{i % 10} month {i}"} for i in range(24)]
    for split in ("train", "val"):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg, ft = configs_from_sources(
        None, dict(init=str(tiny_pretrained), data=str(tmp_path / "data"), out=str(tmp_path / "run"), max_steps=6,
                   batch_size=8, warmup_steps=1, lr=2e-2, precision="fp32"),
        dict(method="lora", lora_rank=4, lora_alpha=8, lora_targets=",".join(ALL), lora_tokens="0123456789",
             eval_items=2, max_new_tokens=2))
    finetune(cfg, ft, log=lambda _: None)
    capsys.readouterr()
    cli.main(["export-lora", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "export")])
    exported = json.loads(capsys.readouterr().out)
    # on a full disk (every file may hold fewer bytes than the base weights): one line, and nothing written
    full = run_cli("export-lora", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "full"),
                   max_file_bytes=(tmp_path / "export" / "base" / "model.safetensors").stat().st_size // 2)
    assert full.returncode == 2 and "Traceback" not in full.stderr
    assert full.stderr == f"gptlab: error: cannot write {tmp_path / 'full' / 'base' / 'model.safetensors'}: File too large\n"
    assert not [p for p in tmp_path.iterdir() if "full" in p.name]  # no output, no temporary directory
    adapter_config = json.loads((tmp_path / "export" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == sorted(ALL)
    assert adapter_config["base_model_name_or_path"] == "../base"  # portable: relative to the adapter directory
    digits = sorted(set(loading.load(tiny_pretrained).tokenizer.encode("0123456789")))
    assert adapter_config["trainable_token_indices"] == digits
    # blocks * rank * (in + out) of each adapted matrix, 64 wide, and a 64-wide row per digit token
    assert exported["adapter_params"] == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64)) + 64 * len(digits)

    ours = loading.load(tmp_path / "run").model
    tokens = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    base_hf = GPT2LMHeadModel.from_pretrained(tmp_path / "export" / "base").eval()
    with torch.no_grad():
        base_logits = base_hf(tokens).logits
        peft_logits = PeftModel.from_pretrained(base_hf, tmp_path / "export" / "adapter").eval()(tokens).logits
        our_logits = ours(tokens)[0]
    assert (peft_logits - base_logits).abs().max() > 1e-3  # the trained adapter matters
    # the digit rows trained, and PEFT reads them (as inputs and, tied, as outputs) like we do
    assert (peft_logits - base_logits)[..., digits].abs().max() > 1e-3
    assert (peft_logits - our_logits).abs().max().item() <= 1e-4
