"""The compiled CPU kernels: built once into the cache folder, equal to the PyTorch ops they fuse,
and absent cleanly (PyTorch versions run) where they cannot be built."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pastiche import fastpath, kernels

needs_compiler = pytest.mark.skipif(kernels.compiler() is None, reason="no C compiler on this machine")
DTYPES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]


def close(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float) -> bool:
    ours, theirs = ours.detach().float(), theirs.detach().float()
    return torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance * float(theirs.abs().max()))


@pytest.fixture()
def lib():
    library = kernels.library()
    if library is None:
        pytest.skip("the kernels could not be built here")
    return library


@needs_compiler
def test_library_is_built_once_into_the_cache_folder(_pastiche_home):
    library = kernels.library()
    assert library is not None and kernels.library() is library
    path = Path(library._name)
    assert path.name == "libpastiche_cpu.so" and path.parent.parent == _pastiche_home / "kernels"
    built_at = path.stat().st_mtime_ns
    kernels.load.cache_clear()  # as a new process would: the library is found, not built again
    try:
        assert kernels.library()._name == library._name and path.stat().st_mtime_ns == built_at
    finally:
        kernels.load.cache_clear()


def test_without_a_compiler_or_when_turned_off_there_is_no_library(monkeypatch, tmp_path):
    kernels.load.cache_clear()
    try:
        monkeypatch.setenv("PASTICHE_KERNELS", "0")
        assert kernels.library() is None
        monkeypatch.delenv("PASTICHE_KERNELS")
        with kernels.turned_off():
            assert kernels.library() is None
        monkeypatch.setenv("PASTICHE_HOME", str(tmp_path))
        monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")  # a compiler that always fails
        assert kernels.library() is None
        assert list(tmp_path.rglob("*.so")) == []  # nothing half-written left behind
        # The PyTorch versions run instead and still drop what they should.
        dropout = fastpath.KeepMaskDropout(0.5).train()
        assert 0.45 < (dropout(torch.ones(100, 100)) == 0).float().mean().item() < 0.55
    finally:
        kernels.load.cache_clear()


@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_rms_norm_of_a_frozen_weight_matches_llama(lib, dtype, tolerance):
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    norm = modeling_llama.LlamaRMSNorm(576, eps=1e-5).to(dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(576))
    x, grad = torch.randn(5, 9, 576, dtype=dtype) * 3, torch.randn(5, 9, 576, dtype=dtype)
    results = []
    for forward in (norm.forward, lambda h: fastpath.rms_norm(norm, h)):
        xi = x.clone().requires_grad_()
        out = forward(xi)
        out.backward(grad)
        results.append((out, xi.grad))
    assert results[1][0].dtype == dtype
    for ours, theirs in zip(results[1], results[0]):
        assert close(ours, theirs, tolerance)


@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_silu_times_up_and_its_gradients_match_pytorch(lib, dtype, tolerance):
    torch.manual_seed(0)
    gate, up = (torch.randn(7, 1536, dtype=dtype) * 4).requires_grad_(), torch.randn(7, 1536, dtype=dtype).requires_grad_()
    gate.data[0, :4] = torch.tensor([-100.0, -30.0, 30.0, 100.0])  # saturated sigmoid both ways
    grad = torch.randn(7, 1536, dtype=dtype)
    ours = fastpath._SiluMul.apply(gate, up)
    theirs = F.silu(gate) * up
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    assert close(ours, theirs, tolerance)
    for a, b in zip(torch.autograd.grad(ours, (gate, up), grad), torch.autograd.grad(theirs, (gate, up), grad)):
        assert close(a, b, tolerance)


@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_masked_softmax_matches_pytorch_and_gives_blocked_keys_zero(lib, dtype, tolerance):
    torch.manual_seed(0)
    batch, groups, per_group, length = 2, 2, 3, 37
    keep = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, length, length).clone()
    keep[0, :, 20:, :20] = False  # row 0 packs two records: leading blocked keys
    keep[1, :, :, 30:] = False  # row 1 is padded: trailing blocked keys
    mask = fastpath.additive_mask(keep, length, length, "cpu")
    # Rows ordered (query, head in group); a block of queries 10-36 over the first 33 keys.
    first, keys = 10, 33
    scores = torch.randn(batch, groups, (length - first) * per_group, keys, dtype=dtype) * 5
    probs = fastpath.masked_softmax(scores, mask, first, per_group)
    with kernels.turned_off():
        expected = fastpath.masked_softmax(scores, mask, first, per_group)
    rows_mask = mask.view(batch, 1, length, 1, length)[:, :, first:, :, :keys]
    reference = torch.softmax(scores.float().view(batch, groups, -1, per_group, keys) + rows_mask, -1)
    assert probs.dtype == dtype and close(probs, reference.view_as(probs), tolerance)
    assert close(expected, reference.view_as(probs), 1e-6)
    blocked = (rows_mask == float("-inf")).expand_as(reference).reshape(probs.shape)
    assert torch.all(probs[blocked] == 0) and torch.all(probs[~blocked] > 0)


@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_cross_entropy_kernel_gives_the_loss_and_turns_logits_into_their_gradient(lib, dtype, tolerance):
    torch.manual_seed(0)
    logits = torch.randn(9, 49152, dtype=dtype) * 4
    targets = torch.randint(0, 49152, (9,))
    reference = logits.float().requires_grad_()
    loss = F.cross_entropy(reference, targets, reduction="sum")
    loss.backward()
    ours = logits.clone()
    total = lib.pst_cross_entropy_grad(ours.data_ptr(), targets.data_ptr(), 9, 49152, fastpath.is_bf16(ours))
    assert abs(total - loss.item()) < 1e-4 * loss.item()
    assert close(ours, reference.grad, tolerance)


def test_dropout_kernel_masks_the_gradient_where_it_masked_the_input(lib):
    dropout = fastpath.KeepMaskDropout(0.3).train()
    x = torch.randn(257, 33, requires_grad=True)  # an odd size: the last 64-bit draw is part-used
    torch.manual_seed(3)
    out = dropout(x)
    out.backward(torch.ones_like(out))
    dropped = out == 0
    assert torch.equal(x.grad, (~dropped).float() * dropout.scale)
    assert abs(dropped.float().mean().item() - 0.3) < 0.02
    torch.manual_seed(3)
    assert torch.equal(dropout(x) == 0, dropped)  # the seed comes from torch's generator


def test_dropout_kernel_draws_neighbouring_entries_independently(lib):
    dropout = fastpath.KeepMaskDropout(0.3).train()
    torch.manual_seed(0)
    dropped = (dropout(torch.ones(400_000)) == 0).float()
    assert abs(dropped.mean().item() - 0.3) < 0.005
    # Entries share a 64-bit draw four at a time; within and across draws, pairs must drop
    # together at p^2 = 0.09, not p (standard deviation ~0.0005 at this size).
    for gap in (1, 3, 4, 8):
        assert abs((dropped[:-gap] * dropped[gap:]).mean().item() - 0.09) < 0.003


@pytest.mark.parametrize("dtype,tolerance", DTYPES)
def test_rotary_kernel_matches_llama_and_writes_the_grouped_layout(lib, dtype, tolerance):
    from transformers.models.llama import modeling_llama

    torch.manual_seed(0)
    batch, length, heads, groups, dim = 2, 13, 6, 2, 64
    x = torch.randn(batch, length, heads, dim, dtype=dtype, requires_grad=True)
    angles = torch.randn(batch, length, dim // 2) * 3  # a position per row and token, as packed rows have
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    ours = fastpath._Rotary.apply(x, cos, sin, groups, 0.5)
    assert ours.shape == (batch, groups, length * heads // groups, dim) and ours.dtype == dtype
    xf = x.detach().float().requires_grad_()
    rotated, _ = modeling_llama.apply_rotary_pos_emb(xf.transpose(1, 2), xf.transpose(1, 2), cos.float(), sin.float())
    # [b, h, l, d] -> [b, groups, l, heads per group, d] -> rows ordered (position, head in group)
    theirs = (rotated * 0.5).view(batch, groups, heads // groups, length, dim).transpose(2, 3)
    theirs = theirs.reshape(batch, groups, -1, dim)
    assert close(ours, theirs, tolerance)
    grad = torch.randn_like(ours)
    assert close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, xf, grad.float())[0], tolerance)
