"""Every public function of zhuzilin/ring-flash-attention exists here with a compatible signature.

The expected parameter lists below are that project's public API (its
``ring_flash_attn/__init__.py``); a compatible signature has the same leading
parameters, in order, with the same defaults. Extras we add are keyword-only.
"""

import inspect

import pytest

import ring_flash_attn

COMMON = ["dropout_p", "softmax_scale", "causal", "window_size", "alibi_slopes", "deterministic",
          "return_attn_probs", "group"]
DEFAULTS = {"dropout_p": 0.0, "softmax_scale": None, "causal": False, "window_size": (-1, -1), "alibi_slopes": None,
            "deterministic": False, "return_attn_probs": False, "group": None}
LLAMA3 = ["cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "heads_k_stride", "local_k_slice"]

EXPECTED = {}
for prefix in ("ring_flash_attn", "zigzag_ring_flash_attn", "stripe_flash_attn"):
    EXPECTED[f"{prefix}_func"] = ["q", "k", "v"] + COMMON
    EXPECTED[f"{prefix}_kvpacked_func"] = ["q", "kv"] + COMMON
    EXPECTED[f"{prefix}_qkvpacked_func"] = ["qkv"] + COMMON
for prefix in ("ring_flash_attn", "zigzag_ring_flash_attn"):
    EXPECTED[f"{prefix}_varlen_func"] = ["q", "k", "v", "cu_seqlens", "max_seqlen"] + COMMON
    EXPECTED[f"{prefix}_varlen_kvpacked_func"] = ["q", "kv", "cu_seqlens", "max_seqlen"] + COMMON
    EXPECTED[f"{prefix}_varlen_qkvpacked_func"] = ["qkv", "cu_seqlens", "max_seqlen"] + COMMON
EXPECTED["llama3_flash_attn_varlen_func"] = ["q", "k", "v"] + LLAMA3 + COMMON
EXPECTED["llama3_flash_attn_varlen_kvpacked_func"] = ["q", "kv"] + LLAMA3 + COMMON
EXPECTED["llama3_flash_attn_varlen_qkvpacked_func"] = ["qkv"] + LLAMA3 + COMMON
EXPECTED["llama3_flash_attn_prepare_cu_seqlens"] = ["cu_seqlens", "causal", "rank", "world_size"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_public_name_and_signature(name):
    fn = getattr(ring_flash_attn, name, None)
    assert fn is not None, f"ring_flash_attn.{name} is missing"
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert [p.name for p in positional] == EXPECTED[name]
    # Every parameter before the common flash-attn ones is required (all of prepare_cu_seqlens's are).
    n_required = len(EXPECTED[name]) - (len(COMMON) if EXPECTED[name][-len(COMMON):] == COMMON else 0)
    for n, p in enumerate(positional):
        if n >= n_required:
            assert p.default == DEFAULTS[p.name], f"{name}({p.name}=...) default {p.default!r}"
        else:
            assert p.default is inspect.Parameter.empty, f"{name}: {p.name} must be required"
    extras = [p for p in params if p not in positional]
    assert all(p.kind == p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in extras)


@pytest.mark.parametrize("name", sorted(EXPECTED) + ["ring_attention", "RingAttention"])
def test_docstring_documents_every_argument(name):
    """help(fn) is enough to call it: every parameter named, with what is returned and what raises."""
    fn = getattr(ring_flash_attn, name)
    doc = inspect.getdoc(fn) or ""
    target = fn.__init__ if inspect.isclass(fn) else fn
    for param in inspect.signature(target).parameters:
        if param != "self":
            assert param in doc, f"{name}: argument {param!r} is not documented"
    assert "Returns" in doc or "returns" in doc.lower(), name
    assert "Raises" in doc or "raises" in doc.lower(), name
