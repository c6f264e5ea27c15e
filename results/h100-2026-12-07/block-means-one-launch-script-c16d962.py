# As run on the H100, 2026-12-07, from .ab/ of a working tree of c16d962 (block-means one needs the heads_fastest
# option of that tree, since dropped); kept as the record of the figures, not maintained.
"""Block means of q and k (Wan-1.3B, [B, S, H, D] memory viewed [B, H, S, D]): two launches against one launch over
24 heads, both grid orders; a clone of q for the copy rate."""
import torch, triton
from dit_compiler.kernels import triton_block_means as tbm
S, H, D = 32760, 12, 128
qk = torch.randn(1, S, 2 * H, D, device="cuda", dtype=torch.bfloat16)
q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
q2, k2 = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
both = qk.transpose(1, 2)
bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=150, return_mode="median") * 1e3
for hf in (False, True):
    for rows, warps in ((64, 4), (32, 4), (128, 8)):
        two = bench(lambda: (tbm.triton_block_means(q2, None, 128, rows=rows, num_warps=warps, heads_fastest=hf),
                             tbm.triton_block_means(k2, None, 128, rows=rows, num_warps=warps, heads_fastest=hf)))
        one = bench(lambda: tbm.triton_block_means(both, None, 128, rows=rows, num_warps=warps, heads_fastest=hf))
        print(f"heads_fastest={hf} rows={rows} warps={warps}: two launches {two:.1f} us, one launch of 24 heads "
              f"{one:.1f} us ({2 * S * H * D * 2 / one / 1e6:.2f} TB/s)")
x = q2.transpose(1, 2).contiguous()
print(f"clone of q: {bench(lambda: x.clone()):.1f} us (read + write {2 * x.numel() * 2 / 1e6:.0f} MB)")
