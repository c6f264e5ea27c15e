"""vsparse: a torch.compile backend for video diffusion transformers.

    torch.compile(model, backend="vsparse", options={"sparsity": "draft", "density": 0.25})
    torch.compile(model, backend=dit_compiler.vsparse(sparsity="draft", density=0.25))
    dit_compiler.compile_repeated_blocks(transformer, sparsity="draft")  # regional compilation, sparse

Installing the distribution registers the backend name through the `torch_dynamo_backends` entry point.
The driver is imported on first use, so `import dit_compiler.kernels` (the ops alone) stays light.
"""
__all__ = ["vsparse", "vsparse_backend", "compile_repeated_blocks", "Options", "parse_options", "stats"]


def __getattr__(name):
    if name in ("vsparse", "vsparse_backend"):
        from dit_compiler import backend

        return getattr(backend, name)
    if name == "compile_repeated_blocks":
        from dit_compiler.regional import compile_repeated_blocks

        return compile_repeated_blocks
    if name == "stats":
        from dit_compiler.call_stats import stats

        return stats
    if name in ("Options", "parse_options"):
        from dit_compiler import options

        return getattr(options, name)
    raise AttributeError(f"module 'dit_compiler' has no attribute {name!r}")
