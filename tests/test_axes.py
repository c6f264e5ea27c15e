"""Axis labels through reshapes: the factors of each output dim say exactly which input index every element has."""
import itertools

import sympy
import torch
from hypothesis import given, settings, strategies as st

from dit_compiler.patterns.axes import Factor, _reshape
from dit_compiler.patterns.graph import Sizes


@st.composite
def reshapes(draw):
    """A shape, and a reshape target that splits its dims into prime factors and merges neighbouring ones."""
    primes = draw(st.lists(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=1, max_size=3), min_size=1, max_size=3))
    source = [int(torch.tensor(p).prod()) for p in primes]  # each source dim a product of its primes
    flat = [p for dim in primes for p in dim]
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(flat) - 1)), max_size=len(flat) - 1)))
    target = [int(torch.tensor(flat[i:j]).prod()) for i, j in zip([0] + cuts, cuts + [len(flat)])]
    return source, target


def _digits(index, sizes):
    """Row-major digits of `index` for the given sizes."""
    out = []
    for size in reversed(sizes):
        out.append(index % size)
        index //= size
    return list(reversed(out))


@settings(max_examples=60, deadline=None)
@given(reshapes())
def test_reshape_labels_locate_every_element(case):
    source, target = case
    sizes = Sizes(torch.fx.symbolic_trace(torch.nn.Identity()))  # static sizes: no shape environment
    labels = tuple((Factor(("x", d), sympy.Integer(s), sympy.Integer(1)),) if s != 1 else () for d, s in
                   enumerate(source))
    out = _reshape(sizes, labels, [sympy.Integer(s) for s in source], [sympy.Integer(s) for s in target])
    assert out is not None and all(o is not None for o in out)
    values = torch.arange(int(torch.tensor(source).prod())).reshape(source)
    reshaped = values.reshape(target)
    for position in itertools.product(*[range(s) for s in target]):
        expected = torch.unravel_index(reshaped[position], source)
        found = [0] * len(source)
        for d, factors in enumerate(out):
            for factor, digit in zip(factors, _digits(position[d], [int(f.size) for f in factors])):
                found[factor.axis[1]] += digit * int(factor.inner)
        assert found == [int(e) for e in expected], (source, target, out, position)
