"""The cheaper CPU training pieces compute what the pieces they replace compute."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from pastiche import fastpath


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_mask_dropout_drops_p_in_every_lane_and_rescales_the_rest(dtype):
    dropout = fastpath.KeepMaskDropout(0.05).train()
    torch.manual_seed(0)
    out = dropout(torch.ones(1000, 1024, dtype=dtype))
    assert out.dtype == dtype and out.shape == (1000, 1024)
    dropped = out == 0
    # 1,024,000 draws: the dropped share's standard deviation is 0.0002.
    assert abs(dropped.float().mean().item() - 0.05) < 0.001
    # Four int16 values come from each 64-bit random number; each of the four lanes must drop p
    # (a 63-bit draw would leave the fourth lane's sign bit always 0 and never drop there).
    for lane in range(4):
        assert abs(dropped[:, lane::4].float().mean().item() - 0.05) < 0.002
    kept = out[~dropped].float()
    assert torch.all(kept == torch.tensor(dropout.scale, dtype=dtype).float())
    assert abs(dropout.p - 0.05) < 1 / 65536 and abs(dropout.scale - 1 / (1 - dropout.p)) < 1e-12


def test_keep_mask_dropout_follows_the_seed_and_is_identity_in_eval():
    dropout = fastpath.KeepMaskDropout(0.3)
    x = torch.randn(64, 96)
    masks = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        masks.append(dropout.train()(x) == 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert dropout.eval()(x) is x
    assert fastpath.KeepMaskDropout(0.0).train()(x) is x


def test_keep_mask_dropout_gradient_is_the_mask_times_the_scale():
    dropout = fastpath.KeepMaskDropout(0.25).train()
    x = torch.randn(50, 40, requires_grad=True)
    out = dropout(x)
    out.sum().backward()
    expected = (out != 0).float() * dropout.scale
    assert torch.equal(x.grad, expected)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_matches_llama_forward_and_backward(dtype, tolerance):
    torch.manual_seed(0)
    reference = modeling_llama.LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(48))
    x = torch.randn(3, 7, 48, dtype=dtype) * 3
    grad = torch.randn(3, 7, 48, dtype=dtype)
    results = []
    for forward in (reference.forward, lambda h: fastpath.rms_norm(reference, h)):
        xi = x.clone().requires_grad_()
        reference.weight.grad = None
        out = forward(xi)
        (out.float() * grad.float()).sum().backward()
        results.append((out.detach().float(), xi.grad.float(), reference.weight.grad.float()))
    for ours, theirs in zip(results[1], results[0]):
        assert torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance * float(theirs.abs().max()))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled kernels", "pytorch versions"])
def test_speed_up_swaps_dropout_and_norms_and_keeps_loss_and_gradients(tiny_base, smol_tokenizer, compiled,
                                                                       monkeypatch):
    """A LoRA model with the swaps: same modules saved, same loss and LoRA gradients without dropout."""
    from pastiche import kernels

    if compiled and kernels.library() is None:
        pytest.skip("the kernels could not be built here")
    if not compiled:
        monkeypatch.setattr(kernels, "_turned_off", 1)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pastiche.batching import Collator, encode
    from pastiche.loop import completion_loss

    batch = Collator(smol_tokenizer.pad_token_id)([
        encode(smol_tokenizer, {"prompt": "Write about the tide.", "completion": "The tide keeps the ledger. " * k})
        for k in (1, 3)])
    results = []
    for swap in (False, True):
        torch.manual_seed(0)
        attention = fastpath.register_attention() if swap else "eager"
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation=attention),
                               LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear",
                                          init_lora_weights=False, lora_dropout=0.1))
        keys = set(model.state_dict())
        if swap:
            # 2 layers x 7 projections; 2 x 2 layer norms + the final norm; 2 MLPs and attentions.
            fused = 2 if kernels.library() is not None else 0
            assert fastpath.speed_up(model) == {"dropout": 14, "rms_norm": 5, "lora_forward": 14, "mlp": fused,
                                                "attention": fused}
            assert set(model.state_dict()) == keys
        model.train()
        model.eval()  # dropout off: the two models must then compute the same thing
        norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
        # The swaps survive train()/eval() (transformers' kernel re-selection once undid the norms).
        assert sum(getattr(m.forward, "__func__", None) is fastpath.rms_norm for m in norms) == (5 if swap else 0)
        loss = completion_loss(model, batch)[0]
        loss.backward()
        results.append((loss.item(), [p.grad for p in model.parameters() if p.requires_grad]))
    (plain_loss, plain_grads), (fast_loss, fast_grads) = results
    assert abs(plain_loss - fast_loss) < 1e-5 * plain_loss
    for a, b in zip(plain_grads, fast_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_forward_equals_peft_with_the_same_dropout_draws(dropout):
    """base(x) + (A(drop(x)) * s) B^T through addmm == PEFT's base(x) + B(A(drop(x))) * s."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(24, 40)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=12, target_modules=["proj"], lora_dropout=dropout,
                                             init_lora_weights=False))
    peft_layer = model.base_model.model.proj
    assert fastpath.speed_up(model)["lora_forward"] == 1
    model.train()
    x = torch.randn(3, 5, 24)
    results = []
    for forward in (type(peft_layer).forward, fastpath.lora_forward):  # PEFT's, then ours
        torch.manual_seed(7)  # the same dropout draws for both
        model.zero_grad()
        out = forward(peft_layer, x)
        (out * torch.arange(out.numel()).view(out.shape).sin()).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert (results[0][0] != 0).all() and results[0][0].shape == (3, 5, 40)
    for ours, theirs in zip(results[1], results[0]):  # fp32 sums in another order
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6 * float(theirs.abs().max()))
    # With the adapter disabled the layer is the base alone (PEFT's own path).
    with model.disable_adapter():
        assert torch.allclose(peft_layer(x), peft_layer.base_layer(x))


def eager_reference(q, k, v, keep):
    """Grouped-query attention as transformers' eager path computes it, from a boolean keep-mask."""
    class Heads(torch.nn.Module):
        num_key_value_groups = q.shape[1] // k.shape[1]

    additive = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
    out, _ = modeling_llama.eager_attention_forward(Heads().eval(), q, k, v, additive, scaling=0.125)
    return out


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled kernels", "pytorch versions"])
@pytest.mark.parametrize("length", [11, 300], ids=["one query block", "two query blocks"])
@pytest.mark.parametrize("case", ["causal", "right padding", "packed"])
def test_grouped_attention_matches_eager_attention(case, length, compiled, monkeypatch):
    from pastiche import kernels

    if not compiled:
        monkeypatch.setattr(kernels, "_turned_off", 1)
    torch.manual_seed(0)
    batch, heads, groups, dim = 2, 6, 2, 16
    q = torch.randn(batch, length, heads, dim).transpose(1, 2)  # the layout q has inside the model
    k, v = torch.randn(batch, groups, length, dim), torch.randn(batch, groups, length, dim)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    keep = causal.expand(batch, 1, length, length).clone()
    real = torch.ones(batch, length, dtype=torch.bool)
    if case == "right padding":
        real[1, length * 7 // 11:] = False
        keep &= real[:, None, None, :]
    elif case == "packed":  # two records in row 0: positions 0-4 and 5-10 (or 0-135, 136-299)
        keep[0, :, length * 5 // 11:, :length * 5 // 11] = False
    mask = None if case == "causal" else keep
    grad = torch.randn(batch, length, heads, dim)
    outputs = []
    for attend in (lambda *t: eager_reference(*t, keep),
                   lambda *t: fastpath.grouped_attention(None, *t, mask, scaling=0.125)[0]):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*inputs)
        assert out.shape == (batch, length, heads, dim)
        (out * grad * real[:, :, None, None]).sum().backward()  # padding positions' outputs are unused
        outputs.append([out * real[:, :, None, None]] + [t.grad for t in inputs])
    for ours, theirs in zip(outputs[1], outputs[0]):
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_query_blocks_split_only_long_rows_whose_first_half_cannot_see_the_second():
    causal = fastpath.additive_mask(None, 300, 300, "cpu")
    assert fastpath.query_blocks(causal) == ((0, 150, 150), (150, 300, 300))
    assert fastpath.query_blocks(fastpath.additive_mask(None, 255, 255, "cpu")) == ((0, 255, 255),)
    peeking = torch.ones(300, 300, dtype=torch.bool).tril()
    peeking[3, 200] = True  # one early query may see a late key: every score is needed
    assert fastpath.query_blocks(fastpath.additive_mask(peeking[None, None], 300, 300, "cpu")) == ((0, 300, 300),)
    # Built once per forward pass, not once per layer: kept on the mask object, or per shape when causal.
    shared = fastpath.layer_shared_mask(peeking[None, None], 300, 300, "cpu")
    assert fastpath.layer_shared_mask(peeking[None, None], 300, 300, "cpu") is not shared  # another object
    assert shared[1] == ((0, 300, 300),)
    keep = peeking[None, None]
    assert fastpath.layer_shared_mask(keep, 300, 300, "cpu") is fastpath.layer_shared_mask(keep, 300, 300, "cpu")
    assert fastpath.layer_shared_mask(None, 300, 300, "cpu") is fastpath.layer_shared_mask(None, 300, 300, "cpu")
    assert fastpath.layer_shared_mask(None, 300, 300, "cpu")[1] == ((0, 150, 150), (150, 300, 300))


def test_grouped_attention_refuses_attention_dropout():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="attention dropout"):
        fastpath.grouped_attention(None, q, q, q, None, dropout=0.1)


def test_reuse_freed_memory_is_accepted_by_glibc():
    import sys

    assert fastpath.reuse_freed_memory() is sys.platform.startswith("linux")


def test_grouped_attention_with_fewer_queries_than_keys_matches_eager_attention():
    """The last 3 positions of 11 against all 11 keys, as with a KV cache: one block, any length."""
    torch.manual_seed(0)
    batch, heads, groups, dim, queries, keys = 2, 6, 2, 16, 3, 11
    q = torch.randn(batch, queries, heads, dim).transpose(1, 2)
    k, v = torch.randn(batch, groups, keys, dim), torch.randn(batch, groups, keys, dim)
    keep = (torch.arange(keys)[None, :] <= torch.arange(keys - queries, keys)[:, None]).expand(batch, 1, queries, keys)
    ours = fastpath.grouped_attention(None, q, k, v, keep, scaling=0.125)[0]
    assert ours.shape == (batch, queries, heads, dim)
    assert torch.allclose(ours, eager_reference(q, k, v, keep), atol=1e-5)
