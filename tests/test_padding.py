"""Left-padded batches: pads are masked in attention and kept out of the key groups' ranges."""

from __future__ import annotations

import pytest
import torch
from kivi_helpers import tiny_model

import kivi_compile
from kivi_compile import KiviCacheTensor, KiviConfig
from kivi_compile.padding import backfill_hidden_keys, key_validity

LENGTHS = [37, 20, 29, 11]


def test_validity_reads_the_last_query_row_of_bool_and_additive_masks():
    visible = torch.tensor([[False, False, True, True], [True, True, True, True]])
    causal = torch.ones(3, 4, dtype=torch.bool).tril(diagonal=1)
    bool_mask = visible[:, None, None, :] & causal
    additive = torch.zeros(2, 1, 3, 4).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    assert torch.equal(key_validity(bool_mask), visible)
    assert torch.equal(key_validity(additive), visible)
    assert torch.equal(key_validity(torch.ones(4, dtype=torch.bool).expand(1, 1, 1, 4)), torch.ones(1, 4, dtype=torch.bool))


def test_backfill_takes_the_nearest_visible_token_of_the_row():
    keys = torch.randn(3, 2, 5, 4)
    visible = torch.tensor([[False, False, True, True, True], [True, True, True, False, False], [False] * 5])
    filled = backfill_hidden_keys(keys, visible)
    assert torch.equal(filled[0, :, :2], keys[0, :, 2:3].expand(2, 2, 4))  # left pads -> first real
    assert torch.equal(filled[1, :, 3:], keys[1, :, 2:3].expand(2, 2, 4))  # right pads -> last real
    assert torch.equal(filled[2], keys[2])  # nothing visible: unchanged
    assert torch.equal(filled.transpose(1, 2)[visible], keys.transpose(1, 2)[visible])  # visible untouched


def left_padded(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def generate(model, ids, mask, new_tokens):
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits)


def test_padded_batch_rows_generate_what_each_prompt_generates_alone_at_8_bits():
    model = tiny_model("llama")
    model.forward = torch.compile(
        model.forward, backend=kivi_compile.backend(KiviConfig(key_bits=8, value_bits=8, residual_length=32, compiler="eager"))
    )
    prompts = [torch.randint(3, model.config.vocab_size, (n,)) for n in LENGTHS]
    ids, mask = left_padded(prompts, pad_id=0)
    batch_tokens, _ = generate(model, ids, mask, 60)
    for row, prompt in enumerate(prompts):
        alone, _ = generate(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long), 60)
        assert torch.equal(batch_tokens[row], alone[0]), f"row {row} (prompt of {len(prompt)} tokens) differs"


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_k2v2_real_rows_do_not_depend_on_pad_tokens(compiler):
    model = tiny_model("llama")
    model.forward = torch.compile(
        model.forward, backend=kivi_compile.backend(KiviConfig(residual_length=32, compiler=compiler))
    )
    prompts = [torch.randint(3, model.config.vocab_size, (n,)) for n in LENGTHS]
    logits = []
    for pad_id in (0, 1, 2):
        ids, mask = left_padded(prompts, pad_id)
        logits.append(generate(model, ids, mask, 40)[1])
    for other in logits[1:]:
        print(f"max |logit difference| with other pads: {(other - logits[0]).abs().max():.2e}")
        torch.testing.assert_close(other, logits[0], rtol=1e-5, atol=1e-5)


def test_without_the_mask_pads_would_widen_key_groups():
    """Sensitivity check: the same prompt keys with different pad contents quantize differently
    unless hidden positions are excluded, so the test above can fail."""
    spec = KiviConfig(residual_length=32).key_spec()
    keys = torch.randn(1, 2, 40, 32)
    visible = torch.arange(40)[None] >= 7  # 7 left pads
    noisy = keys.clone()
    noisy[:, :, :7] *= 100
    with_mask = [KiviCacheTensor.from_dense(k, spec, visible=visible).dequantize() for k in (keys, noisy)]
    without = [KiviCacheTensor.from_dense(k, spec).dequantize() for k in (keys, noisy)]
    assert torch.equal(with_mask[0][:, :, 7:], with_mask[1][:, :, 7:])
    assert not torch.allclose(without[0][:, :, 7:32], without[1][:, :, 7:32])
