"""Sparse VideoGen: each head is either spatial (attends its own and nearby frames) or temporal (attends the same
spatial positions across all frames), chosen per head and step by sampling a few query rows.

Spatial heads keep the frame-major token order (t, y, x), where nearby frames are nearby blocks. Temporal heads
reorder the video tokens position-major (y, x, t), so one position's tokens of every frame sit together and the
temporal pattern becomes a narrow band around the diagonal. Both masks rank key blocks the same way: by the gap, in
video units (frames for spatial, positions for temporal), between the units the two blocks cover, then by block
distance; each query block visits its max(1, ceil(density * nkv)) nearest key blocks. So the window (frames) or
band (positions) is exactly as wide as the density allows, whole units first, and it slides inward at the ends of
the video instead of shrinking: every row costs the same. Text blocks are always visited and text query blocks
visit everything. All functions are pure torch and trace under make_fx / torch.compile(fullgraph=True) with
symbolic sizes.

`svg-shift` (`SvgShiftPlanner`) classifies the heads the same way but moves no token: a temporal head's query block
visits itself shifted by whole frames (its keys at the same positions in every frame), as key blocks that start at
any token (the op's `kv_unit` 1), where the position-major order needs q, k, v gathered and the output gathered back
for every head on every call (on the H100 four copies of 71 µs a Wan-1.3B site: README, "End to end").
"""
from __future__ import annotations

import torch

from dit_compiler.kernels import block_mask
from dit_compiler.kernels.sampled_rows import padded_masks
from dit_compiler.passes.planners import common

_GOLDEN = 0.6180339887498949  # 1 / phi: consecutive rows land far apart in the frame, never in a short cycle
# Query rows sampled per call to classify the heads (Sparse VideoGen's num_sampled_rows); read at call time, so a
# benchmark can set it before compiling (benchmarks/quality.py --sample-rows). 21: with the three masks, 63 rows
# fill one 64-row tile of the sampled-row kernel (64 rows took three); on the harness no loss against 64 (README,
# "Quality harness").
SAMPLE_ROWS = 21


def _check_layout(frames, height, width, text_before, text_after, block_size=1) -> None:
    common.check_sizes(1, frames=frames, height=height, width=width, block_size=block_size)
    common.check_sizes(0, text_before=text_before, text_after=text_after)


def position_major_order(frames, height, width, device=None) -> torch.Tensor:
    """int64 [frames*height*width]: frame-major (t, y, x) video token ids in position-major (y, x, t) order."""
    frame_len = height * width
    slot = torch.arange(frames * frame_len, device=device)
    return slot % frames * frame_len + slot // frames


def position_major_permutation(frames, height, width, text_before, text_after, device=None):
    """(perm, inverse) int64 [S] taking the frame-major video tokens to position-major order, text in place.
    x[..., perm, :] is position-major; x_position_major[..., inverse, :] is x again."""
    _check_layout(frames, height, width, text_before, text_after)
    return common.sequence_permutation(position_major_order(frames, height, width, device), text_before,
                                           text_after)


def _nearest_units_visit(unit_len, layout, block_size, density, device) -> torch.Tensor:
    """[n, n] bool: each query block visits its budget of key blocks nearest in video units of `unit_len` tokens
    (the gap between the unit ranges two blocks cover, 0 when they share a unit), ties broken by block distance."""
    frames, height, width, text_before, text_after = layout
    video_len = frames * height * width
    seq_len = text_before + video_len + text_after
    n = block_mask.num_blocks(seq_len, block_size)
    ids = torch.arange(n, device=device)
    # Unit range of each block's video tokens; text-only blocks get a clamped range but are forced anyway.
    # (Divide, then clamp: Inductor in torch 2.13 fails to compile a floor division of a clamped arange.)
    last_unit = (video_len - 1) // unit_len
    first = ((ids * block_size - text_before) // unit_len).clamp(0, last_unit)
    last = ((ids * block_size + block_size - 1 - text_before) // unit_len).clamp(0, last_unit)
    unit_gap = (first - last[:, None]).clamp(min=0) + (first[:, None] - last).clamp(min=0)
    block_gap = (ids - ids[:, None]).abs()
    nearness = -(unit_gap * n + block_gap)
    text = common.text_blocks(seq_len, text_before, text_after, block_size, device)
    return common.keep_strongest(nearness, density, text)


def _spatial_visit(layout, block_size, density, device) -> torch.Tensor:
    """Frame-major order; units are frames."""
    frames, height, width, _, _ = layout
    return _nearest_units_visit(height * width, layout, block_size, density, device)


def _temporal_visit(layout, block_size, density, device) -> torch.Tensor:
    """Position-major order; units are spatial positions, `frames` tokens each."""
    return _nearest_units_visit(layout[0], layout, block_size, density, device)


def spatial_block_mask(frames, height, width, text_before, text_after, block_size, density, device=None):
    """Spatial-head mask in frame-major order: each query block visits the key blocks of its own and the nearest
    frames, max(1, ceil(density * nkv)) of them (text blocks forced, see the module docstring).
    Returns (kv_num_blocks int32 [1, 1, nq], kv_indices int32 [1, 1, nq, nkv])."""
    _check_layout(frames, height, width, text_before, text_after, block_size)
    visit = _spatial_visit((frames, height, width, text_before, text_after), block_size, density, device)
    return block_mask.from_block_bool(visit[None, None])


def temporal_block_mask(frames, height, width, text_before, text_after, block_size, density, device=None):
    """Temporal-head mask in position-major order (`position_major_permutation`): each query block visits the key
    blocks of its own and the nearest spatial positions across all frames, a band of max(1, ceil(density * nkv))
    blocks (text blocks forced). Returns (kv_num_blocks int32 [1, 1, nq], kv_indices int32 [1, 1, nq, nkv])."""
    _check_layout(frames, height, width, text_before, text_after, block_size)
    visit = _temporal_visit((frames, height, width, text_before, text_after), block_size, density, device)
    return block_mask.from_block_bool(visit[None, None])


SHIFT_NEIGHBOURS = 1  # svg-shift also ranks each frame's copy moved by up to this many blocks either way


def frame_shift_unsupported(layout, block_size: int):
    """Why svg-shift cannot plan `layout`, or None: a frame must be longer than the 2*SHIFT_NEIGHBOURS + 1 blocks its
    shifted copies may span, so that no two of one query block's key blocks overlap."""
    frames, height, width, _, _ = layout
    span = (2 * SHIFT_NEIGHBOURS + 1) * block_size
    if height * width <= span:
        return (f"svg-shift needs frames longer than {span} tokens ({2 * SHIFT_NEIGHBOURS + 1} blocks of "
                f"{block_size}), got height*width = {height * width}")
    return None


def frame_shift_temporal_mask(layout, block_size: int, density: float, device=None):
    """Temporal-head mask in frame-major order, key blocks as token starts (the op's kv_unit 1): video query block i
    (tokens [i*bs, i*bs + bs)) visits the text blocks, then its candidates [i*bs + d*frame_len + e*bs, + bs) for
    frames d in [-frames, frames] and neighbours e in [-SHIFT_NEIGHBOURS, SHIFT_NEIGHBOURS], nearest first (|e|,
    then |d|), max(forced, ceil(density * nkv)) in all (`common.block_budget`; d = e = 0 is its own block). A
    candidate must lie inside the whole video-only blocks (below the sequence end when no text follows), so none
    overlaps a text block or, frames being longer than 2*SHIFT_NEIGHBOURS + 1 blocks, another candidate. So a query
    block straddling two frames loses the copy that would reach before the video, and next to text a copy reaching
    into a text block is dropped (its video tokens there stay visible through the text block; up to a block's rows
    lose that frame at each end). Text query blocks visit every block.
    Returns (kv_num_blocks int32 [1, 1, n], kv_indices int32 [1, 1, n, n])."""
    frames, height, width, text_before, text_after = layout
    frame_len = height * width
    video_end = text_before + frames * frame_len
    seq_len = video_end + text_after
    n = block_mask.num_blocks(seq_len, block_size)
    text = common.text_blocks(seq_len, text_before, text_after, block_size, device)
    _, kept = common.block_budget(density, text)
    starts = torch.arange(n, device=device) * block_size
    d = torch.arange(-frames, frames + 1, device=device)
    e = torch.arange(-SHIFT_NEIGHBOURS, SHIFT_NEIGHBOURS + 1, device=device)
    shift = (d[:, None] * frame_len + e * block_size).flatten()  # [C], d-major
    rank = (e.abs() * (2 * frames + 2) * 2 + (2 * d.abs() + (d < 0))[:, None]).flatten()
    candidate = starts[:, None] + shift  # [n, C]
    first = (text_before + block_size - 1) // block_size * block_size
    last = seq_len - 1 if text_after == 0 else video_end // block_size * block_size - block_size
    valid = (candidate >= first) & (candidate <= last) & ~text[:, None]
    # One ranking over the aligned blocks and the candidates: text blocks first (all blocks for a text query
    # block), then the valid candidates nearest first; kv_indices are the first n of it.
    aligned = torch.where(text[None, :] | text[:, None], float("inf"), -float("inf")).expand(n, n)
    scores = torch.cat([aligned, torch.where(valid, -rank.double(), -float("inf"))], dim=1)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]
    entry_starts = torch.where(order < n, order * block_size, candidate.gather(1, (order - n).clamp(min=0)))
    visible = text.sum() + valid.sum(1)
    kv_num_blocks = torch.where(text, n, torch.minimum(kept.long(), visible)).to(torch.int32)
    return kv_num_blocks[None, None], entry_starts.to(torch.int32)[None, None]


def _sampled_rows(frames, height, width, text_before, num_sample_rows, device) -> torch.Tensor:
    """int64 [num_sample_rows]: video query rows (text rows visit everything under both masks), stratified over the
    frames (row r in frame r * frames // R) and spread inside each by the golden-ratio sequence (position
    frac(r / phi + 1/2) of the frame, in raster order). An even step over the video aliases with the frame length:
    21 rows of Wan's 21 frames all fell on each frame's first token."""
    frame_len = height * width
    r = torch.arange(num_sample_rows, device=device)
    position = ((r * _GOLDEN + 0.5) % 1 * frame_len).long().clamp(max=frame_len - 1)
    return text_before + r * frames // num_sample_rows * frame_len + position


def svg_constants(layout, block_size: int, density: float, num_sample_rows: int = SAMPLE_ROWS, device=None) -> dict:
    """Everything of a plan that depends on the layout alone: the position-major permutation, both head masks and,
    for the sampled query rows, the full, spatial and temporal masks at token level in the original (frame-major)
    order ("sample_masks", [3, R, S] bool, the candidates of `sampled_errors`)."""
    _check_layout(*layout, block_size)
    common.check_sizes(1, num_sample_rows=num_sample_rows)
    frames, height, width, text_before, text_after = layout
    seq_len = text_before + frames * height * width + text_after
    spatial_visit = _spatial_visit(layout, block_size, density, device)
    temporal_visit = _temporal_visit(layout, block_size, density, device)
    position_major, inverse = position_major_permutation(*layout, device=device)
    rows = _sampled_rows(frames, height, width, text_before, num_sample_rows, device)
    spatial_blocks = torch.arange(seq_len, device=device) // block_size
    temporal_blocks = inverse // block_size
    spatial_num, spatial_indices = block_mask.from_block_bool(spatial_visit)
    temporal_num, temporal_indices = block_mask.from_block_bool(temporal_visit)
    return {"position_major": position_major, "position_major_inverse": inverse, "sample_rows": rows,
            "sample_masks": padded_masks(torch.stack([
                torch.ones(rows.shape[0], seq_len, dtype=torch.bool, device=device),
                spatial_visit[rows // block_size][:, spatial_blocks],
                temporal_visit[temporal_blocks[rows]][:, temporal_blocks]])),
            "spatial_num": spatial_num, "spatial_indices": spatial_indices,
            "spatial_order": block_mask.heaviest_first(spatial_num),
            "temporal_num": temporal_num, "temporal_indices": temporal_indices,
            "temporal_order": block_mask.heaviest_first(temporal_num)}


def _check_qkv(q, k, v, layout) -> None:
    frames, height, width, text_before, text_after = layout
    seq_len = text_before + frames * height * width + text_after
    if q.dim() != 4 or q.shape != k.shape or q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must be [B, H, S, D] self-attention inputs, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-2] != seq_len:
        raise ValueError(f"sequence length {q.shape[-2]} != text_before + frames*height*width + text_after "
                         f"= {seq_len}")


def sampled_errors(q, k, v, constants: dict, scale=None, skip=None) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, H], [B, H]) float32: mean squared error of the sampled rows' spatial-mask and temporal-mask outputs
    against their full-attention output, all three from one `sampled_rows_attention` call (one pass over K and V on
    CUDA). `skip` (0-dim bool, the dense phase) set: zeros, computed by nothing."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outputs = torch.ops.vsparse.sampled_rows_attention(q, k, v, constants["sample_rows"], constants["sample_masks"],
                                                       scale, skip)
    full, spatial, temporal = outputs.unbind(2)
    return (spatial - full).square().mean(dim=(-2, -1)), (temporal - full).square().mean(dim=(-2, -1))


def classify_with(q, k, v, constants: dict, scale=None, skip=None) -> torch.Tensor:
    """[B, H] bool, True where the temporal mask's sampled output is closer (MSE) to full attention's
    (`sampled_errors`; with `skip` set every head is spatial, and nothing is computed)."""
    spatial_error, temporal_error = sampled_errors(q, k, v, constants, scale, skip)
    return temporal_error < spatial_error


def carried_classes(q, k, v, constants: dict, scale, dense=None, carried=None) -> torch.Tensor:
    """[B, H] bool head classes for a call: sampled (`classify_with`), or an earlier call's (`carried`, a
    planners.Carried) where it says not to sample anew, the sampled-row kernel then skipped on the device. In the
    dense phase (`dense` set) every head is spatial: the plan goes unused there, so nothing moves."""
    if carried is None:
        return classify_with(q, k, v, constants, scale, skip=dense)
    skip = ~carried.resample if dense is None else dense | ~carried.resample
    sampled = classify_with(q, k, v, constants, scale, skip=skip)
    return torch.where(carried.resample, sampled, carried.choice if dense is None else carried.choice & ~dense)


def plan_with(temporal: torch.Tensor, constants: dict, seq_len):
    """(perm, inverse, kv_num_blocks, kv_indices, q_block_order) per head from the head classes: spatial heads keep
    the identity order and the spatial mask, temporal heads take the position-major order and the temporal mask."""
    identity = torch.arange(seq_len, device=temporal.device)
    head_perm = torch.where(temporal[..., None], constants["position_major"], identity)
    head_inverse = torch.where(temporal[..., None], constants["position_major_inverse"], identity)
    return head_perm, head_inverse, *masks_by_class(temporal, constants)


def masks_by_class(temporal: torch.Tensor, constants: dict):
    """(kv_num_blocks, kv_indices, q_block_order) per head: the temporal mask and schedule where `temporal` [B, H]
    is set, the spatial ones elsewhere."""
    kv_num_blocks = torch.where(temporal[..., None], constants["temporal_num"], constants["spatial_num"])
    kv_indices = torch.where(temporal[..., None, None], constants["temporal_indices"], constants["spatial_indices"])
    order = torch.where(temporal[..., None], constants["temporal_order"], constants["spatial_order"])
    return kv_num_blocks, kv_indices, order


def classify_heads(q, k, v, *, frames, height, width, text_before, text_after, block_size, density,
                   num_sample_rows=SAMPLE_ROWS, scale=None) -> torch.Tensor:
    """Sparse VideoGen's online profiling for q, k, v [B, H, S, D] in frame-major order: for `num_sample_rows`
    evenly spaced video query rows, compute the attention output under the full mask, the spatial mask and the
    temporal mask (the latter in position-major order), and call a head temporal where the temporal output is
    closer (MSE) to full. Costs about 2 * num_sample_rows / S of the attention's FLOPs. `scale` defaults to
    1/sqrt(D). Returns bool [B, H]."""
    layout = (frames, height, width, text_before, text_after)
    constants = svg_constants(layout, block_size, density, num_sample_rows, q.device)
    _check_qkv(q, k, v, layout)
    return classify_with(q, k, v, constants, scale)


def svg_plan(q, k, v, *, frames, height, width, text_before, text_after, block_size, density,
             num_sample_rows=SAMPLE_ROWS, scale=None):
    """Sparse VideoGen's plan for one self-attention call, q, k, v [B, H, S, D] in frame-major order.

    Spatial heads keep the identity order and the spatial mask; temporal heads (`classify_heads`) get the
    position-major permutation and the temporal mask. The caller gathers q, k, v along S with `perm`, runs the
    block-sparse op, and gathers the output back with `inverse`.
    Returns (perm int64 [B, H, S], inverse int64 [B, H, S], kv_num_blocks int32 [B, H, nq],
    kv_indices int32 [B, H, nq, nkv]).
    """
    layout = (frames, height, width, text_before, text_after)
    constants = svg_constants(layout, block_size, density, num_sample_rows, q.device)
    _check_qkv(q, k, v, layout)
    return plan_with(classify_with(q, k, v, constants, scale), constants, q.shape[-2])[:4]


def svg_shift_constants(layout, block_size: int, density: float, num_sample_rows: int = SAMPLE_ROWS,
                        device=None) -> dict:
    """svg-shift's layout constants: the spatial mask of `svg_constants` and `frame_shift_temporal_mask`, both as
    token starts, their schedules, and the sampled rows with their full, spatial and temporal token masks."""
    _check_layout(*layout, block_size)
    common.check_sizes(1, num_sample_rows=num_sample_rows)
    reason = frame_shift_unsupported(layout, block_size)
    if reason:
        raise ValueError(reason)
    frames, height, width, text_before, text_after = layout
    seq_len = text_before + frames * height * width + text_after
    spatial_num, spatial_blocks = block_mask.from_block_bool(_spatial_visit(layout, block_size, density, device))
    spatial_indices = spatial_blocks * block_size
    temporal_num, temporal_indices = frame_shift_temporal_mask(layout, block_size, density, device)
    rows = _sampled_rows(frames, height, width, text_before, num_sample_rows, device)
    row_blocks = rows // block_size
    masks = [block_mask.token_visits(num[0, 0, row_blocks], idx[0, 0, row_blocks], seq_len, block_size, 1)
             for num, idx in ((spatial_num[None, None], spatial_indices[None, None]), (temporal_num, temporal_indices))]
    return {"sample_rows": rows,
            "sample_masks": padded_masks(torch.stack([
                torch.ones(rows.shape[0], seq_len, dtype=torch.bool, device=device), *masks])),
            "spatial_num": spatial_num, "spatial_indices": spatial_indices,
            "spatial_order": block_mask.heaviest_first(spatial_num),
            "temporal_num": temporal_num[0, 0], "temporal_indices": temporal_indices[0, 0],
            "temporal_order": block_mask.heaviest_first(temporal_num[0, 0])}


class SvgPlanner:
    """The planner contract (passes/planners/__init__.py) for Sparse VideoGen: both head masks and orders are
    constants of the layout; per call, the sampled-row classification picks one per head, and the temporal heads
    are the plan's `reordered_heads`."""

    name = "svg"
    fixed_order = False
    carries_choice = True

    def constants(self, layout, block_size: int, density: float, device) -> dict:
        return svg_constants(layout, block_size, density, SAMPLE_ROWS, device)

    def plan(self, q, k, v, constants, layout, *, block_size: int, density: float, scale: float, dense=None,
             carried=None):
        from dit_compiler.passes.planners import Plan

        _check_qkv(q, k, v, layout)
        # Only temporal heads move (the op gathers them): a spatial head's order is the identity.
        temporal = carried_classes(q, k, v, constants, scale, dense, carried)
        return Plan(constants["position_major"], constants["position_major_inverse"],
                    *masks_by_class(temporal, constants), reordered_heads=temporal, choice=temporal)

    def mask(self, q, k, plan, constants, layout, *, block_size: int, density: float, scale: float):
        return plan.kv_num_blocks, plan.kv_indices


class SvgShiftPlanner:
    """Sparse VideoGen's head classes with no token permutation: temporal heads visit their query block shifted by
    whole frames (`frame_shift_temporal_mask`), every mask in token starts (kv_unit 1)."""

    name = "svg-shift"
    fixed_order = False
    carries_choice = True
    kv_unit = 1

    def unsupported(self, layout, block_size: int):
        return frame_shift_unsupported(layout, block_size)

    def constants(self, layout, block_size: int, density: float, device) -> dict:
        return svg_shift_constants(layout, block_size, density, SAMPLE_ROWS, device)

    def plan(self, q, k, v, constants, layout, *, block_size: int, density: float, scale: float, dense=None,
             carried=None):
        from dit_compiler.passes.planners import Plan

        _check_qkv(q, k, v, layout)
        temporal = carried_classes(q, k, v, constants, scale, dense, carried)
        return Plan(None, None, *masks_by_class(temporal, constants), choice=temporal)

    def mask(self, q, k, plan, constants, layout, *, block_size: int, density: float, scale: float):
        return plan.kv_num_blocks, plan.kv_indices
