"""gptlab.interpret against references: transformers' attention weights, the model's own logits, the
completeness of integrated gradients, what activation patching must give at the last layer."""

from __future__ import annotations

import json

import pytest
import torch

from gptlab import hf
from gptlab.interpret import analysis
from gptlab.model import GPT
from tests import test_playground
from tests.conftest import run_cli, tiny_model_config

ARTIFACTS = test_playground.ARTIFACTS
browser = test_playground.browser  # the headless Chromium fixture


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A random-init transformers GPT-2 and the same weights converted to gptlab."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1000, n_positions=64, n_embd=64, n_layer=3, n_head=4)
    reference = GPT2LMHeadModel(config).eval()
    ours = GPT(hf.config_from_hf(config.to_dict()))
    ours.load_state_dict(hf.state_from_hf(reference.state_dict()), strict=False)
    return reference, ours.eval()


def test_attention_weights_equal_transformers_output_attentions(hf_pair):
    reference, ours = hf_pair
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(1)).tolist()[0]
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        expected = torch.stack(reference(torch.tensor([ids]), output_attentions=True).attentions)[:, 0]
    internals = analysis.run_with_internals(ours, ids)
    assert internals.attention.shape == (3, 4, 40, 40)
    assert (internals.attention - expected).abs().max().item() <= 1e-5
    # the explicit path gives the fast path's logits, and leaves the model on the fast path afterwards
    with torch.no_grad():
        fast = ours(torch.tensor([ids]))[0][0]
    assert (internals.logits - fast).abs().max().item() <= 1e-5
    assert not any(block.attn.keep_weights or block.attn.weights is not None for block in ours.transformer.h)


def test_logit_lens_last_layer_is_the_models_prediction(hf_pair):
    _, ours = hf_pair
    ids = list(range(5, 30))
    internals = analysis.run_with_internals(ours, ids)
    top, probs = analysis.logit_lens(ours, internals.residuals, k=5)
    assert top.shape == (4, 25, 5)  # embedding + 3 layers
    expected_probs, expected_top = internals.logits.softmax(-1).topk(5, dim=-1)
    assert torch.equal(top[-1], expected_top)
    assert torch.allclose(probs[-1], expected_probs, atol=1e-6)
    assert not torch.equal(top[0], top[-1])  # the earlier layers are read, not the last one again


def test_integrated_gradients_are_complete(hf_pair):
    _, ours = hf_pair
    prompt, target = [11, 402, 77, 5, 630, 18, 250], [91, 7]
    attributions, at_input, at_baseline = analysis.integrated_gradients(ours, prompt, target, baseline_id=0)
    assert attributions.shape == (7,)
    difference = at_input - at_baseline
    assert abs(difference) > 1e-3
    assert abs(attributions.sum().item() - difference) <= 0.01 * abs(difference)


def test_activation_patching_at_the_last_layer(hf_pair):
    _, ours = hf_pair
    clean, corrupt, target = [4, 8, 15, 16, 23, 42], [4, 8, 99, 16, 23, 42], [108]
    effects, clean_lp, corrupt_lp = analysis.activation_patching(ours, clean, corrupt, target)
    assert effects.shape == (3, 6)
    assert clean_lp != pytest.approx(corrupt_lp, abs=1e-4)
    # the last block's output at the last prompt position is all the first target token depends on ...
    assert effects[-1, -1].item() == pytest.approx(clean_lp, abs=1e-4)
    # ... and at the other positions it feeds nothing
    assert torch.allclose(effects[-1, :-1], torch.full((5,), corrupt_lp), atol=1e-4)
    # the positions before the corrupted token are the same in both runs: restoring them changes nothing
    assert torch.allclose(effects[:, :2], torch.full((3, 2), corrupt_lp), atol=1e-4)
    with pytest.raises(analysis.InspectError, match="same number of tokens"):
        analysis.activation_patching(ours, clean, corrupt[:-1], target)


def test_random_init_model_has_no_induction_head():
    torch.manual_seed(0)
    model = GPT(tiny_model_config(block_size=64, n_layer=2, n_head=4))
    scores = analysis.induction_scores(model, length=32)
    assert scores.shape == (2, 4)
    assert scores.max().item() < 0.1


# --- `gptlab inspect`: the command and its HTML page in headless Chromium ------------------------------------
@pytest.fixture(scope="module")
def report_dir(chat_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "report"
    result = run_cli("inspect", "--ckpt", str(chat_ckpt), "--prompt", "The cat sat on the mat because it",
                     "--target", " was tired", "--corrupt", "The dog sat on the mat because it", "--ig-steps", "16",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["out"] == str(out)
    return out


def test_inspect_writes_report_json_and_pngs(report_dir):
    data = json.loads((report_dir / "report.json").read_text())
    assert data["tokens"][: data["n_prompt"]] == ["The", " cat", " sat", " on", " the", " mat", " because", " it"]
    assert "".join(data["tokens"][data["n_prompt"]:]) == " was tired"
    T = len(data["tokens"])
    assert len(data["attention"]) == 2 and len(data["attention"][0]) == 2 and len(data["attention"][0][0]) == T
    assert len(data["patching"]) == 2 and len(data["patching"][0]) == data["n_prompt"]
    assert data["corrupt_tokens"][1] == " dog"
    for name in ("tokens", "attention", "logit_lens", "attribution", "induction", "patching"):
        assert (report_dir / f"{name}.png").read_bytes().startswith(b"\x89PNG")


def test_inspect_refuses_bad_input_in_one_line(chat_ckpt, report_dir, tmp_path):
    mismatched = run_cli("inspect", "--ckpt", str(chat_ckpt), "--prompt", "The cat sat", "--corrupt", "A dog",
                         "--out", str(tmp_path / "new"))
    assert mismatched.returncode == 2
    assert mismatched.stderr.startswith("gptlab: error: the corrupted prompt has 2 tokens, the prompt 3")
    assert len(mismatched.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()
    before = (report_dir / "report.json").read_bytes()
    existing = run_cli("inspect", "--ckpt", str(chat_ckpt), "--prompt", "Hi", "--out", str(report_dir))
    assert existing.returncode == 2 and "already exists" in existing.stderr
    assert (report_dir / "report.json").read_bytes() == before


def test_report_page_selector_redraws_the_heat_map(report_dir, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: errors.append(f"network: {request.url}")
            if not request.url.startswith(("file:", "data:")) else None)
    page.goto((report_dir / "report.html").as_uri())
    assert page.title() == "gptlab inspect"
    pixels = "() => document.getElementById('attention').toDataURL()"
    first = page.evaluate(pixels)
    page.select_option("#layer", "1")
    assert page.get_attribute("#attention", "data-layer") == "1"
    second = page.evaluate(pixels)
    page.select_option("#head", "1")
    assert page.get_attribute("#attention", "data-head") == "1"
    third = page.evaluate(pixels)
    assert len({first, second, third}) == 3
    assert page.locator("#lens tr").count() == 1 + 3  # header, embedding, 2 layers
    assert page.locator("#patching-section td").count() == 2 * 8
    assert errors == []
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "inspect.png"), full_page=True)
    page.close()
