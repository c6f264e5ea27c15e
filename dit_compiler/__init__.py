"""vsparse: a torch.compile backend for video diffusion transformers.

    torch.compile(model, backend="vsparse", options={...})
    torch.compile(model, backend=dit_compiler.vsparse(**options))
"""
