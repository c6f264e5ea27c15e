"""Block-sparse attention, sampled-row attention, token-permutation, block-means, row-order and materialize ops.
Importing this package registers `torch.ops.vsparse.*`."""
from dit_compiler.kernels.attention_op import (
    block_sparse_attention,
    reference_block_sparse_attention,
    set_mask_value_checks,
)
from dit_compiler.kernels.block_means import block_means, reference_block_means
from dit_compiler.kernels.materialize import materialize
from dit_compiler.kernels.permute import permute_tokens, reference_permute_tokens
from dit_compiler.kernels.row_order import descending_order, reference_descending_order
from dit_compiler.kernels.sampled_rows import reference_sampled_rows_attention, sampled_rows_attention
from dit_compiler.kernels.block_mask import invert_permutation

__all__ = ["block_sparse_attention", "reference_block_sparse_attention", "set_mask_value_checks", "permute_tokens",
           "reference_permute_tokens", "invert_permutation", "sampled_rows_attention",
           "reference_sampled_rows_attention", "descending_order", "reference_descending_order", "block_means",
           "reference_block_means", "materialize"]
