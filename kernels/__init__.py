"""Block-sparse attention and token-permutation ops. Importing this package registers `torch.ops.vsparse.*`."""
from dit_compiler.kernels.block_sparse_attention import (
    block_sparse_attention,
    reference_block_sparse_attention,
    set_mask_value_checks,
)

__all__ = ["block_sparse_attention", "reference_block_sparse_attention", "set_mask_value_checks"]
