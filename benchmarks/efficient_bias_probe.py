"""Which inputs make PyTorch's CUDA memory-efficient backward right for half precision with a bias?

Run 1 on H100 (torch 2.11) gave wrong bf16 dQ/dK (rel err 0.1-inf) for a band bias
expanded from one [Sq, Sk] mask, while float32 was right. This tries the variants
against a float64 reference and prints each one's dQ error.

Seen on H100, torch 2.11.0+cu130 (bf16, the only dtype reached before the last variant
crashed on an unaligned bias, since fixed here and not re-run): with the op's own out/LSE dQ
is right (2.9e-3) in every variant; with the oracle's out/LSE it is wrong: 0.13 with no bias,
NaN with the expanded bias, 0.22 with a materialised one.
"""

import torch

aten = torch.ops.aten
torch.manual_seed(0)
b, h, sq, sk, d = 1, 4, 500, 700, 128
scale = d ** -0.5


def reference(q, k, v, dout, bias):
    q, k, v, dout = (x.double().requires_grad_(x is not dout) for x in (q, k, v, dout))
    s = q @ k.transpose(-1, -2) * scale + (0 if bias is None else bias.double())
    out = torch.softmax(s, -1) @ v
    out.backward(dout)
    return out.detach(), torch.logsumexp(s, -1).detach(), q.grad


for dtype in (torch.bfloat16, torch.float16, torch.float32):
    q, dout = (torch.randn(b, h, sq, d, device="cuda", dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, h, sk, d, device="cuda", dtype=dtype) for _ in range(2))
    i, j = torch.arange(sq, device="cuda")[:, None], torch.arange(sk, device="cuda")[None, :]
    visible = (i + 64 - j <= 100) & (i + 64 - j >= -37)
    padded = torch.zeros(sq, 704, device="cuda", dtype=dtype)
    padded[:, :sk].masked_fill_(~visible, float("-inf"))
    variants = {
        "no bias": None,
        "expanded [Sq,Sk] view, padded rows": padded[:, :sk].expand(b, h, sq, sk),
        "materialised [B,H,Sq,Sk] padded rows": padded.expand(b, h, sq, 704).contiguous()[..., :sk],
        "finite -1e4 instead of -inf": padded.clone().masked_fill_(padded == float("-inf"), -1e4)[:, :sk]
        .expand(b, h, sq, sk),
    }
    for name, bias in variants.items():
        ref_out, ref_lse, ref_dq = reference(q, k, v, dout, bias)
        out, lse, seed, offset = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False,
                                                                              scale=scale)
        for source, (o, l) in {"own out/lse": (out, lse),
                               "oracle out/lse": (ref_out.to(dtype), torch.nn.functional.pad(ref_lse.float(),
                                                                                             (0, 512 - sq)))}.items():
            dq = aten._scaled_dot_product_efficient_attention_backward(
                dout, q, k, v, bias, o, l, seed, offset, 0.0, [True, True, True, False], False, scale=scale)[0]
            err = ((dq.double() - ref_dq).norm() / ref_dq.norm()).item()
            print(f"{str(dtype):15} {name:40} {source:15} dq rel err {err:.2e}")
