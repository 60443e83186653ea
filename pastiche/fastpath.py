"""Cheaper pieces for LoRA training on a CPU (bf16 autocast or fp32), swapped into a PEFT model.

On a 2-core CPU the matrix products of a 135M model run near the machine's bf16 peak; what
keeps a training step from it is the small element-wise work around them, each op a pass over
memory. ``torch.profiler`` on one step of `benchmarks/train_throughput.py` showed:

* LoRA dropout: PEFT casts the bf16 input to fp32 (the LoRA weights' dtype), draws one fp32
  Bernoulli sample per element (``bernoulli_``: ~2 ms for 900 x 576) and autocast casts the
  result back to bf16. ``KeepMaskDropout`` draws four 16-bit integers per 64-bit random number
  and keeps the input in bf16 (autocast casts the LoRA weights, once per step).
* PEFT's LoRA forward scales and adds [tokens x out_features] tensors; ``lora_forward``
  scales the rank-r intermediate and adds through ``addmm``.
* Llama's RMSNorm: eight forward and about a dozen backward ops in fp32. ``rms_norm`` does the
  same fp32 arithmetic in one forward and one backward formula.
* Eager attention repeats keys and values for grouped-query heads and runs its softmax as
  several passes; ``grouped_attention`` does neither (registered as ``attn_implementation='pastiche'``).

Where a C compiler is at hand, dropout, RMSNorm, the rotary embedding, the masked softmax and
SiLU-times-up run as compiled C kernels (pastiche/kernels.py), each one pass over memory;
elsewhere the PyTorch versions below run. The same model trained without these swaps gets the same loss up to bf16
rounding (tested); nothing here changes what is saved: dropout modules, norms and MLPs hold the
same parameters.
"""

from __future__ import annotations

import functools

import torch

from pastiche import kernels

RANGE = 1 << 16  # a 16-bit random integer: dropout probabilities are rounded to 1/65,536


def native(*tensors: torch.Tensor):
    """The compiled kernels if they can take these tensors (CPU, all bf16 or all fp32), else None."""
    dtype = tensors[0].dtype
    if dtype not in (torch.bfloat16, torch.float32) or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
        return None
    return kernels.library()


def is_bf16(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


class _NativeDropout(torch.autograd.Function):
    """x with the entries whose hashed random number falls below ``dropped`` zeroed; the backward
    pass zeroes the same entries of the gradient by hashing the same seed again."""

    @staticmethod
    def forward(ctx, x, seed, dropped):
        ctx.seed, ctx.dropped = seed, dropped
        return _NativeDropout.apply_mask(x, seed, dropped)

    @staticmethod
    def backward(ctx, grad):
        return _NativeDropout.apply_mask(grad, ctx.seed, ctx.dropped), None, None

    @staticmethod
    def apply_mask(x, seed, dropped):
        x = x.contiguous()
        out = torch.empty_like(x)
        kernels.load().pst_dropout(x.data_ptr(), out.data_ptr(), x.numel(), seed, dropped, is_bf16(x))
        return out


class KeepMaskDropout(torch.nn.Module):
    """``nn.Dropout(p)`` with the keep-mask drawn from 16-bit random integers."""

    def __init__(self, p: float):
        super().__init__()
        dropped = round(p * RANGE)
        self.dropped = dropped
        self.p = dropped / RANGE
        self.threshold = dropped - RANGE // 2  # int16 values below it are dropped
        self.scale = RANGE / (RANGE - dropped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked, scale = self.masked(x)
        return masked if scale == 1.0 else masked * scale

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with dropped entries zeroed, the scale still to apply): a linear layer after the
        dropout can apply the scale to its (much smaller) output instead."""
        if not self.training or self.p == 0.0:
            return x, 1.0
        if native(x) is not None:
            # The seed comes from torch's generator, so a seeded (or resumed) run repeats its masks.
            seed = int(torch.empty((), dtype=torch.int64).random_(-(2**63), None)) & (2**64 - 1)
            return _NativeDropout.apply(x, seed, self.dropped), self.scale
        n = x.numel()
        # random_(-2**63, None) fills all 64 bits; each holds four independent int16 values.
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return torch.where(keep, x, 0), self.scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _RMSNorm(torch.autograd.Function):
    """y = w * (x / rms(x)) with x, rms and the product in fp32, as Llama computes it."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.native = not ctx.needs_input_grad[1] and native(x, weight) is not None
        if ctx.native:  # one pass; the frozen weight needs no gradient
            x = x.contiguous()
            out, inv = torch.empty_like(x), torch.empty((*x.shape[:-1], 1), dtype=torch.float32)
            kernels.load().pst_rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(),
                                        inv.data_ptr(), inv.numel(), x.shape[-1], eps, is_bf16(x))
            ctx.save_for_backward(x, inv, weight)
            return out
        x32 = x.float()
        inv = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        normed = (x32 * inv).to(x.dtype)
        ctx.save_for_backward(x, inv, weight)
        return weight * normed

    @staticmethod
    def backward(ctx, grad):
        x, inv, weight = ctx.saved_tensors
        if ctx.native and grad.dtype == x.dtype:
            grad = grad.contiguous()
            grad_x = torch.empty_like(x)
            kernels.load().pst_rms_norm_backward(grad.data_ptr(), x.data_ptr(), weight.contiguous().data_ptr(),
                                                 inv.data_ptr(), grad_x.data_ptr(), inv.numel(), x.shape[-1],
                                                 is_bf16(x))
            return grad_x, None, None
        x32 = x.float()
        g = grad.float() * weight.float()
        # d/dx of x * inv: inv * (g - x * inv^2 * mean(g * x))
        grad_x = inv * (g - x32 * (inv * inv) * (g * x32).mean(-1, keepdim=True))
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * (x32 * inv).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        return grad_x.to(x.dtype), grad_w, None


def rms_norm(module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Forward of a Llama-style RMSNorm module (``weight``, ``variance_epsilon``) in two formulas."""
    return _RMSNorm.apply(hidden_states, module.weight, module.variance_epsilon)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, first_query: int, per_query: int) -> torch.Tensor:
    """softmax(scores + mask) in the dtype of ``scores`` [batch, groups, queries * per_query, keys].

    Rows are ordered (query, head within the group); ``mask`` is the whole fp32 [batch or 1, 1, 1,
    length, all keys] mask, of which the rows from ``first_query`` and the first ``keys`` columns apply.
    """
    batch, groups, rows, keys = scores.shape
    queries, all_keys = rows // per_query, mask.shape[-1]
    lib = native(scores)
    if lib is not None and mask.shape[0] in (1, batch) and mask.is_contiguous() and scores.is_contiguous():
        probs = torch.empty_like(scores)
        start = mask.data_ptr() + first_query * all_keys * mask.element_size()
        lib.pst_masked_softmax(scores.data_ptr(), start, probs.data_ptr(), scores.numel() // keys, keys, queries,
                               per_query, groups * rows, mask[0].numel() if mask.shape[0] > 1 else 0, all_keys,
                               is_bf16(scores))
        return probs
    # bf16 scores + an fp32 mask of 0 / -inf give fp32 scores in one pass; the fp32 softmax is
    # also faster on CPU than the bf16 one (measured: 0.75 vs 1.6 ms for 1.7M scores).
    rows_mask = mask.view(mask.shape[0], 1, -1, 1, all_keys)[:, :, first_query:first_query + queries, :, :keys]
    scores = scores.view(batch, groups, queries, per_query, keys) + rows_mask
    return torch.softmax(scores, dim=-1).view(batch, groups, rows, keys)


class _GroupedAttention(torch.autograd.Function):
    """softmax(q k^T * scale, masked) v for grouped-query heads, without repeating k and v.

    The query heads that share a key/value head are stacked into one taller matrix ``qg``
    [batch, groups, length * heads per group, dim], rows ordered (position, head) and already
    scaled, so each product is one batched matmul per key/value head. Under a causal
    mask the queries are split in two blocks (``query_blocks``): the first half sees only the
    first half of the keys, so a quarter of the score matrix is never computed. The backward
    pass is written out (dV = P^T dO, dS = softmax' (dO V^T), dQ = dS K, dK = dS^T Q) and saves
    only q, k, v and P.
    """

    @staticmethod
    def forward(ctx, qg, k, v, mask, blocks, per_group):
        batch, groups, _, dim = k.shape
        length = qg.shape[2] // per_group  # queries
        outs, probs = [], []
        for first, last, keys in blocks:
            scores = torch.matmul(qg[:, :, first * per_group:last * per_group], k[:, :, :keys].transpose(-1, -2))
            probs.append(masked_softmax(scores, mask, first, per_group).to(v.dtype))
            outs.append(torch.matmul(probs[-1], v[:, :, :keys]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        ctx.save_for_backward(qg, k, v, *probs)
        ctx.blocks = blocks
        return out.view(batch, groups, length, per_group, dim).transpose(1, 2).reshape(batch, length, -1, dim)

    @staticmethod
    def backward(ctx, grad_out):
        qg, k, v, *probs = ctx.saved_tensors
        batch, length, heads, dim = grad_out.shape
        groups = k.shape[1]
        per_group = heads // groups
        d_out = grad_out.reshape(batch, length, groups, per_group, dim).transpose(1, 2)
        d_out = d_out.reshape(batch, groups, length * per_group, dim)
        d_q, d_k, d_v = [], None, None
        for (first, last, keys), p in reversed(list(zip(ctx.blocks, probs))):
            rows = slice(first * per_group, last * per_group)
            d_scores = torch._softmax_backward_data(torch.matmul(d_out[:, :, rows], v[:, :, :keys].transpose(-1, -2)),
                                                    p, -1, p.dtype)
            d_q.append(torch.matmul(d_scores, k[:, :, :keys]))
            dv_part = torch.matmul(p.transpose(-1, -2), d_out[:, :, rows])
            dk_part = torch.matmul(d_scores.transpose(-1, -2), qg[:, :, rows])
            if d_v is None:
                d_v, d_k = dv_part, dk_part  # the last block sees every key: walked first
            else:
                d_v[:, :, :keys] += dv_part
                d_k[:, :, :keys] += dk_part
        d_q = d_q[0] if len(d_q) == 1 else torch.cat(d_q[::-1], dim=2)
        return d_q, d_k, d_v, None, None, None


def query_blocks(mask: torch.Tensor) -> tuple:
    """(first query, end query, keys it sees) per block: two blocks for rows of 256 and more
    whose first half of queries may not look at the second half of the keys (any causal mask),
    so that half multiplies only the first half of the keys; one block otherwise."""
    length, keys = mask.shape[-2:]
    half = length // 2
    if keys != length or length < 256 or not bool((mask[..., :half, half:] == float("-inf")).all()):
        return ((0, length, keys),)
    return ((0, half, half), (half, length, keys))


def additive_mask(attention_mask, length: int, keys: int, device) -> torch.Tensor:
    """fp32 [batch or 1, 1, 1, length, keys]: 0 where a query may look, -inf where not.

    ``attention_mask`` is None (causal) or the boolean mask of ``sdpa_mask`` (True = may look).
    A query may always see itself, so a padding row is never all -inf (which would give NaN).
    """
    if attention_mask is None:
        blocked = torch.ones(length, keys, dtype=torch.bool, device=device).triu_(keys - length + 1)
    else:
        if attention_mask.dtype != torch.bool:  # an additive float mask: blocked where very negative
            attention_mask = attention_mask > torch.finfo(attention_mask.dtype).min / 2
        blocked = ~attention_mask & ~torch.eye(length, keys, dtype=torch.bool, device=device)
    mask = torch.zeros(blocked.shape, dtype=torch.float32, device=device).masked_fill_(blocked, float("-inf"))
    return mask.view(-1, 1, 1, length, keys)


def layer_shared_mask(attention_mask, length: int, keys: int, device) -> tuple[torch.Tensor, tuple]:
    """(``additive_mask``, its ``query_blocks``), built once per forward pass: every layer gets the
    same ``attention_mask`` object, so they are kept on it (0.1-0.35 ms a layer saved). A plain
    causal mask (``attention_mask`` None) depends on the shape alone and is kept per shape."""
    if attention_mask is None:
        return causal_mask(length, keys, str(device))
    cached = getattr(attention_mask, "_pastiche_additive", None)
    if cached is None or cached[0].shape[-2:] != (length, keys):
        mask = additive_mask(attention_mask, length, keys, device)
        cached = attention_mask._pastiche_additive = (mask, query_blocks(mask))
    return cached


@functools.lru_cache(maxsize=8)
def causal_mask(length: int, keys: int, device: str) -> tuple[torch.Tensor, tuple]:
    mask = additive_mask(None, length, keys, device)
    return mask, query_blocks(mask)


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """A ``transformers`` attention function (registered as ``pastiche``) built on ``_GroupedAttention``."""
    if dropout:
        raise ValueError("pastiche attention has no attention dropout; use attn_implementation='eager'.")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    batch, heads, length, dim = query.shape
    groups = key.shape[1]
    # [batch, groups, length * heads per group, dim]; query arrives as a transposed view of [b, l, h, d].
    qg = query.transpose(1, 2).reshape(batch, length, groups, heads // groups, dim).transpose(1, 2)
    qg = (qg * scale).reshape(batch, groups, length * (heads // groups), dim)
    mask, blocks = layer_shared_mask(attention_mask, length, key.shape[2], query.device)
    return _GroupedAttention.apply(qg, key, value, mask, blocks, heads // groups), None


class _Rotary(torch.autograd.Function):
    """scale * rotary(x) for x [batch, length, heads, dim], written as [batch, groups, length *
    heads per group, dim], the layout ``_GroupedAttention`` multiplies (compiled kernels only)."""

    @staticmethod
    def forward(ctx, x, cos, sin, groups, scale):
        x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
        batch, length, heads, dim = x.shape
        out = torch.empty((batch, groups, length * (heads // groups), dim), dtype=x.dtype)
        ctx.trig_stride = length * dim if cos.shape[0] > 1 else 0
        kernels.load().pst_rotary(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), batch, length, heads,
                                  groups, dim, ctx.trig_stride, scale, 0, is_bf16(x))
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.groups, ctx.scale = x.shape, groups, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        batch, length, heads, dim = ctx.shape
        grad = grad.to(cos.dtype).contiguous()
        grad_x = torch.empty(ctx.shape, dtype=grad.dtype)
        kernels.load().pst_rotary(grad.data_ptr(), cos.data_ptr(), sin.data_ptr(), grad_x.data_ptr(), batch, length,
                                  heads, ctx.groups, dim, ctx.trig_stride, ctx.scale, 1, is_bf16(grad))
        return grad_x, None, None, None, None


def attention_forward(module, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    """Forward of a Llama-style attention layer while training on a CPU: one compiled pass applies
    the rotary embedding to q (with the softmax scale) and k and writes them in the layout
    ``_GroupedAttention`` multiplies, where transformers' forward runs about ten element-wise ops
    and two copies. Anything else (a KV cache, attention dropout, another attention function,
    dtypes the kernels do not take) goes through the layer's own forward."""
    cached = any(kwargs.get(name) is not None for name in ("cache", "past_key_values", "past_key_value"))
    cos, sin = position_embeddings if position_embeddings is not None else (None, None)
    if (cached or cos is None or module.config._attn_implementation != "pastiche" or module.head_dim > 512
            or (module.training and getattr(module, "attention_dropout", 0.0)) or native(cos, sin) is None):
        return type(module).forward(module, hidden_states, position_embeddings=position_embeddings,
                                    attention_mask=attention_mask, **kwargs)
    batch, length = hidden_states.shape[:2]
    dim, groups = module.head_dim, module.config.num_key_value_heads
    q = module.q_proj(hidden_states).view(batch, length, -1, dim)
    k = module.k_proj(hidden_states).view(batch, length, groups, dim)
    v = module.v_proj(hidden_states).view(batch, length, groups, dim).transpose(1, 2)
    if native(q, k, cos, sin) is None:  # e.g. projections in another dtype than the embedding tables
        q, k = q.to(cos.dtype), k.to(cos.dtype)
    qg, k = _Rotary.apply(q, cos, sin, groups, module.scaling), _Rotary.apply(k, cos, sin, groups, 1.0)
    mask, blocks = layer_shared_mask(attention_mask, length, length, hidden_states.device)
    out = _GroupedAttention.apply(qg, k, v, mask, blocks, qg.shape[2] // length)
    return module.o_proj(out.reshape(batch, length, -1)), None


def register_attention() -> str:
    """Make ``attn_implementation='pastiche'`` known to ``transformers`` (boolean masks, as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("pastiche", grouped_attention)
    AttentionMaskInterface.register("pastiche", sdpa_mask)
    return "pastiche"


def lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT LoRA Linear's forward for one plain adapter: base(x) + (A(drop(x)) * s) B^T as one addmm.

    PEFT computes ``result + lora_B(lora_A(dropout(x))) * scaling``: the scaling multiplies and the
    sum adds a [tokens x out_features] tensor. Scaling the rank-r intermediate instead (with the
    dropout's 1/(1-p) folded in) and adding through ``addmm`` computes the same sum with neither
    pass. Anything else (merged, disabled, several or mixed adapters, DoRA and other variants,
    LoRA bias, non-Linear bases) goes through PEFT's own forward.
    """
    active = layer.active_adapters
    plain = (len(active) == 1 and not layer.disable_adapters and not layer.merged and not layer.lora_variant
             and "adapter_names" not in kwargs and not args and not kwargs
             and isinstance(layer.get_base_layer(), torch.nn.Linear) and active[0] in layer.lora_A
             and (torch.is_autocast_enabled(x.device.type) or x.dtype == layer.lora_A[active[0]].weight.dtype))
    if not plain or layer.lora_B[active[0]].bias is not None:
        return type(layer).forward(layer, x, *args, **kwargs)
    name = active[0]
    result = layer.base_layer(x)
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, KeepMaskDropout):
        x, scale = dropout.masked(x)
    else:
        x, scale = dropout(x), 1.0
    low_rank = torch.nn.functional.linear(x, layer.lora_A[name].weight) * (layer.scaling[name] * scale)
    flat = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]),
                       layer.lora_B[name].weight.t())
    return flat.view(result.shape)


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up in one pass and both gradients in one more (compiled kernels only)."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(gate)
        kernels.load().pst_silu_mul(gate.data_ptr(), up.data_ptr(), h.data_ptr(), h.numel(), is_bf16(h))
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad = grad.to(gate.dtype).contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        kernels.load().pst_silu_mul_backward(grad.data_ptr(), gate.data_ptr(), up.data_ptr(), grad_gate.data_ptr(),
                                             grad_up.data_ptr(), grad.numel(), is_bf16(grad))
        return grad_gate, grad_up


def mlp_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a Llama-style MLP (down(silu(gate(x)) * up(x))) with the activation fused."""
    gate, up = module.gate_proj(x), module.up_proj(x)
    if native(gate, up) is None:
        return module.down_proj(module.act_fn(gate) * up)
    return module.down_proj(_SiluMul.apply(gate, up))


def reuse_freed_memory(limit_mb: int = 256) -> bool:
    """Ask glibc to serve allocations up to ``limit_mb`` from its heap and keep freed memory.

    By default glibc maps every block over 128 KB fresh from the kernel and returns it on free,
    so each step's activations (1-200 MB each) are page-faulted and zeroed again: 2.3 million
    minor page faults in two epochs of the training benchmark. Linux/glibc only; False elsewhere.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    size = limit_mb << 20
    return bool(mallopt(m_mmap_threshold, size)) and bool(mallopt(m_trim_threshold, 2 * size))


def speed_up(model) -> dict:
    """Swap the cheaper pieces into a PEFT LoRA model trained on a CPU; returns what was swapped."""
    import types

    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    swapped = {"dropout": 0, "rms_norm": 0, "lora_forward": 0, "mlp": 0, "attention": 0}
    fused = kernels.library() is not None
    for module in model.modules():
        # With the `kernels` package installed, transformers re-selects the forward of its
        # kernel-capable layers (RMSNorm among them) on every train()/eval(), which silently
        # dropped our RMSNorm. Kernels from the hub are for GPUs; on this path they stay off.
        if getattr(module, "use_kernels", False):
            module.use_kernels = False
    for module in model.modules():
        if isinstance(module, LoraLayer):
            # Under autocast the LoRA matmuls run in bf16 anyway; PEFT's cast to fp32 is a round trip.
            module.cast_input_dtype_enabled = False
            for name, dropout in module.lora_dropout.items():
                if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                    module.lora_dropout[name] = KeepMaskDropout(dropout.p)
                    swapped["dropout"] += 1
            if type(module) is LoraLinear:
                module.forward = types.MethodType(lora_forward, module)
                swapped["lora_forward"] += 1
        elif type(module).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm") and \
                hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(rms_norm, module)
            swapped["rms_norm"] += 1
        elif fused and type(module).__name__ in ("LlamaMLP", "Qwen2MLP", "MistralMLP") and \
                type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            module.forward = types.MethodType(mlp_forward, module)
            swapped["mlp"] += 1
        elif fused and type(module).__name__ in ("LlamaAttention", "Qwen2Attention", "MistralAttention") and \
                all(hasattr(module, name) for name in ("head_dim", "scaling", "q_proj", "k_proj", "v_proj", "o_proj")):
            module.forward = types.MethodType(attention_forward, module)
            swapped["attention"] += 1
    return swapped
