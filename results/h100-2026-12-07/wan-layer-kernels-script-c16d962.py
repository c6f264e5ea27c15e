# As run on the H100, 2026-12-07, from .ab/ of a working tree of c16d962 (block-means one needs the heads_fastest
# option of that tree, since dropped); kept as the record of the figures, not maintained.
"""One Wan-1.3B layer under plain Inductor and under vsparse (sparsity none): the generated code and the per-kernel
profile, to read why the fused RMSNorm + RoPE kernel runs ~3x its byte floor. Writes $OUT/{inductor,vsparse}_code.txt
and $OUT/{inductor,vsparse}_kernels.txt."""
import glob, os, sys, tempfile
cache = tempfile.mkdtemp()
os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
sys.path.insert(0, "benchmarks")
import torch, triton
from end_to_end import CONFIGS, build_wan
from profiling import kernel_table
out_dir = os.environ["OUT"]
args, (f, h, w), text, dev = CONFIGS[os.environ.get("CONFIG", "wan-1.3b")]
torch.manual_seed(0)
model = build_wan(dict(args, num_layers=1), dev, torch.bfloat16)
inputs = dict(hidden_states=torch.randn(1, 16, f, h, w, device=dev, dtype=torch.bfloat16),
              timestep=torch.tensor([500.0], device=dev),
              encoder_hidden_states=torch.randn(1, text, args["text_dim"], device=dev, dtype=torch.bfloat16), return_dict=False)
seen = set()
for name, how in (("inductor", {}), ("vsparse", dict(backend="vsparse", options={"sparsity": "none", "cache": "none"}))):
    torch._dynamo.reset()
    fn = torch.compile(model, fullgraph=True, **how)
    with torch.no_grad():
        fn(**inputs)
    rows = kernel_table(lambda: fn(**inputs), torch.device(dev), top=None)
    with open(f"{out_dir}/{name}_kernels.txt", "w") as fh:
        for r in rows:
            fh.write(f"{r[2]:10.1f} us  x{r[1]}  {r[0]}\n")
    print(name)
    for r in rows[:8]:
        print(f"{r[2]:10.1f} us  x{r[1]}  {r[0][:110]}")
    codes = [p for p in glob.glob(f"{cache}/**/*.py", recursive=True) if p not in seen and "def call(" in open(p).read()]
    seen.update(glob.glob(f"{cache}/**/*.py", recursive=True))
    with open(f"{out_dir}/{name}_code.txt", "w") as fh:
        for p in codes:
            fh.write(f"# ==== {p}\n" + open(p).read())
    print(len(codes), "output code files")
