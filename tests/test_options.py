import pytest

from dit_compiler.options import Options, parse_options


@pytest.mark.parametrize("key", ["force_sparse", "force_cache"])
def test_defaults_and_force_from_environment(monkeypatch, key):
    for variable in ("VSPARSE_FORCE_SPARSE", "VSPARSE_FORCE_CACHE"):  # conftest sets the first for every test
        monkeypatch.delenv(variable, raising=False)
    assert parse_options() == Options()
    monkeypatch.setenv(f"VSPARSE_{key.upper()}", "1")
    assert getattr(parse_options(), key) and not getattr(parse_options({key: False}), key)


def test_values():
    opts = parse_options({"sparsity": "svg", "density": 0.1, "block_size": 64, "dense_steps": 0,
                          "dense_layers": 2, "cache": "easycache", "cache_threshold": 0.1, "cache_start": 0.1,
                          "plan_every": 3})
    assert (opts.sparsity, opts.density, opts.block_size, opts.dense_steps, opts.dense_layers, opts.cache,
            opts.cache_threshold, opts.cache_start, opts.plan_every) == ("svg", 0.1, 64, 0.0, 2, "easycache", 0.1,
                                                                         0.1, 3)


@pytest.mark.parametrize("key,value,allowed", [
    ("sparsity", "topk", "'draft', 'svg', 'dual', 'svg-shift', 'none'"),
    ("density", 0.0, "0 < x <= 1"),
    ("density", 1.5, "0 < x <= 1"),
    ("density", "half", "number"),
    ("block_size", 96, "64, 128"),
    ("dense_steps", -0.1, "0 <= x <= 1"),
    ("dense_layers", -1, "int >= 0"),
    ("dense_layers", 1.5, "int >= 0"),
    ("plan_every", 0, "int >= 1"),
    ("plan_every", True, "int >= 1"),
    ("cache", "teacache", "'easycache', 'none'"),
    ("cache_threshold", 0, "float > 0"),
    ("mode", "fast", "'default'"),
    ("force_sparse", 1, "True or False"),
    ("force_cache", "yes", "True or False"),
    ("cache_start", 1.5, "0 <= x <= 1"),
])
def test_bad_value_names_key_and_allowed(key, value, allowed):
    with pytest.raises(ValueError) as err:
        parse_options({key: value})
    assert repr(key) in str(err.value) and allowed in str(err.value)


def test_unknown_key_lists_allowed():
    with pytest.raises(ValueError, match=r"unknown vsparse option\(s\) 'sparsty'.*allowed: .*sparsity"):
        parse_options({"sparsty": "svg"})


def test_dump_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VSPARSE_DUMP_DIR", str(tmp_path))
    assert parse_options().dump_dir == str(tmp_path)
    assert parse_options({"dump_dir": "/elsewhere"}).dump_dir == "/elsewhere"


def test_mode_from_argument_or_option():
    assert parse_options(None, "max-autotune").mode == "max-autotune"
    assert parse_options({"mode": "reduce-overhead"}).mode == "reduce-overhead"
    with pytest.raises(ValueError, match="given twice"):
        parse_options({"mode": "reduce-overhead"}, "max-autotune")


def test_factory_rejects_bad_options_at_configuration_time():
    import dit_compiler

    with pytest.raises(ValueError, match="'density'"):
        dit_compiler.vsparse(density=2)


def test_sites_kept_dense_say_why():
    from dit_compiler.passes.sparse_attention import _why_dense
    from dit_compiler.patterns.types import AttentionSite, VideoLayout

    def site(**kw):
        base = dict(node="out", kind="sdpa", module_path="blocks.0.attn1", block=0, stack="blocks",
                    self_attention=True, query="q", key="k", value="v", q_shape=[1, 2, 90, 64],
                    kv_shape=[1, 2, 90, 64], head_dim=64, dtype="float32", scale=None, mask="none",
                    layout=VideoLayout(2, 5, 9, 0, 0, "90 == 2*5*9"), eligible=True, layer=0)
        return AttentionSite(**dict(base, **kw))

    opts = parse_options({"dense_layers": 1})
    assert "dense_layers=1" in _why_dense(site(layer=0), opts)
    assert _why_dense(site(layer=1), opts) is None
    cross = "cross-attention: queries from input x[0:90], keys/values from input text[0:7]"
    assert _why_dense(site(layer=1, self_attention=False, eligible=False, reason=cross), opts) == cross
    assert "head dim 80" in _why_dense(site(layer=1, head_dim=80), opts)
    assert _why_dense(site(layer=1, eligible=False, reason="per-row mask"), opts) == "per-row mask"
