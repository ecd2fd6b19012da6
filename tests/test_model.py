import math

import pytest
import torch
import torch.nn.functional as F

from gptlab.model import GPT
from tests.conftest import tiny_model_config


def test_forward_shapes_loss_and_tied_head():
    torch.manual_seed(0)
    model = GPT(tiny_model_config())
    x = torch.randint(0, 512, (3, 16))
    logits, _ = model(x)
    assert logits.shape == (3, 16, 512)
    no_logits, loss = model(x, x)  # with targets only the (chunked) loss is computed
    assert no_logits is None
    assert loss.item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), x.flatten()).item(), rel=1e-6)
    # an untrained model predicts close to uniform: loss near ln(vocab)
    assert abs(loss.item() - math.log(512)) < 0.5
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # counted from the architecture, the tied head once: embeddings, 12C^2 + 13C per block, the final LayerNorm
    vocab, block, layers, width = 512, 32, 2, 32
    per_block = (2 * width) + (3 * width * width + 3 * width) + (width * width + width) + (2 * width) \
        + (4 * width * width + 4 * width) + (4 * width * width + width)
    assert model.num_params() == vocab * width + block * width + layers * per_block + 2 * width


def test_attention_is_causal():
    torch.manual_seed(0)
    for variant in (dict(), dict(norm_position="post"), dict(pos_encoding="sinusoidal")):
        model = GPT(tiny_model_config(**variant)).eval()
        x = torch.randint(0, 512, (1, 12))
        y = x.clone()
        y[0, 8:] = (y[0, 8:] + 1) % 512  # change only the future
        assert torch.allclose(model(x)[0][0, :8], model(y)[0][0, :8], atol=1e-6)
        assert not torch.allclose(model(x)[0][0, 8:], model(y)[0][0, 8:])


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(tiny_model_config(n_layer=8, n_embd=128, n_head=4))
    proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(proj - 0.02 / math.sqrt(16)) < 0.002
    assert abs(fc - 0.02) < 0.002


def test_context_length_is_enforced():
    model = GPT(tiny_model_config())
    try:
        model(torch.zeros(1, 33, dtype=torch.long))
    except ValueError as err:
        assert "context length 32" in str(err)
    else:
        raise AssertionError("expected a ValueError")
