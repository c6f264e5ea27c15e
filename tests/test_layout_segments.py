"""A layout is the ordered list of text and grid segments of a site's sequence; several grids in one sequence are
reported as such and stay dense (the planners take one grid)."""
import dataclasses

import tiny_models
from dit_compiler.patterns import analyze
from test_patterns import capture


def test_two_grids_in_one_sequence_are_segments():
    model, inputs = tiny_models.two_grids(frames=2, height=6, width=10, history_frames=4, text=3)
    gm, example_inputs, _ = capture(model, inputs)
    (site,) = analyze(gm, example_inputs).sites
    layout = site.layout
    assert site.self_attention and layout is not None and not layout.single_grid
    # prompt (3), the latent's 2x3x5 grid, the history's 2x3x5 grid (4 frames, 12x20 pixels, patch 2x4x4)
    assert [(s.kind, s.length, s.frames, s.height, s.width) for s in layout.segments] == [
        ("text", 3, None, None, None), ("grid", 30, 2, 3, 5), ("grid", 30, 2, 3, 5)]
    assert (layout.frames, layout.text_before) == (None, None)  # the planners' single-grid form does not apply
    assert layout.proof == "63 == 3 + 30 + 30"
    assert not site.eligible and "2 video grids in one sequence" in site.reason
    dataclasses.asdict(site)  # the dump serializes it


def test_one_grid_layout_keeps_the_planners_fields():
    model, inputs = tiny_models.explicit(frames=2, height=6, width=10)
    gm, example_inputs, _ = capture(model, inputs)
    self_sites = [s for s in analyze(gm, example_inputs).sites if s.self_attention]
    for site in self_sites:
        layout = site.layout
        assert layout.single_grid and layout.attention == "full"
        assert [s.kind for s in layout.segments] == ["grid"]
        assert (layout.frames, layout.height, layout.width, layout.text_before, layout.text_after) == (2, 3, 5, 0, 0)
