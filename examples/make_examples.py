"""Make the small example files used by the README's Quick start (deterministic; run from anywhere).

  base.safetensors        a 2-layer Llama-shaped base (hidden 64, float32)
  adapter.safetensors     a rank-4 loratool adapter on q_proj and v_proj, with the base's fingerprint
  finetuned.safetensors   base + the adapter's delta + a little noise, for `loratool extract`
"""

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from loratool.adapter import Adapter, whole_target  # noqa: E402
from loratool.io.native import save  # noqa: E402
from loratool.ops.linalg import delta_tensor  # noqa: E402

H, I, LAYERS, RANK = 64, 128, 2, 4


def main():
    g = torch.Generator().manual_seed(0)
    base = {"model.embed_tokens.weight": torch.randn(256, H, generator=g) * 0.02}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            base[f"{p}.self_attn.{name}.weight"] = torch.randn(H, H, generator=g) * 0.05
        base[f"{p}.mlp.gate_proj.weight"] = torch.randn(I, H, generator=g) * 0.05
        base[f"{p}.mlp.up_proj.weight"] = torch.randn(I, H, generator=g) * 0.05
        base[f"{p}.mlp.down_proj.weight"] = torch.randn(H, I, generator=g) * 0.05
        base[f"{p}.input_layernorm.weight"] = torch.ones(H)
    base["model.norm.weight"] = torch.ones(H)
    save_file(base, str(HERE / "base.safetensors"), metadata={"format": "pt"})

    targets = []
    for i in range(LAYERS):
        for name in ("q_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{name}.weight"
            A = torch.randn(RANK, H, generator=g) / H**0.5
            B = torch.randn(H, RANK, generator=g) * 0.01
            sha = hashlib.sha256(base[key].numpy().tobytes()).hexdigest()
            targets.append(whole_target(key, "linear", (H, H), A, B, alpha=8, dtype="F32", sha256=sha))
    adapter = Adapter(targets={t.key: t for t in targets}, info={"source": "examples/make_examples.py"})
    out = HERE / "adapter.safetensors"
    if out.exists():
        out.unlink()
    save(adapter, out)

    ft = dict(base)
    for t in adapter:
        ft[t.key] = base[t.key] + torch.from_numpy(delta_tensor(t)) + torch.randn(H, H, generator=g) * 1e-4
    save_file(ft, str(HERE / "finetuned.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
